"""The scheduler layer: the leader loop and its Ray actor."""

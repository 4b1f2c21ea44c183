"""Pure scheduling decisions: no I/O, no Ray, no clock reads (time is a parameter)."""

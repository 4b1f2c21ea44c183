"""taskray: a durable, compute-aware task scheduler for Ray clusters."""

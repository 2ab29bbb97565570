"""The application layer: the composition root (service wiring) and the `oms` commands."""

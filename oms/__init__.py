"""Order management service: the pure domain core (no threads, no sockets)."""

__version__ = "0.1.0"

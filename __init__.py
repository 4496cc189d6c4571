"""fedsilo: privacy-preserving federated learning across the departments of one enterprise."""

__version__ = "0.4.0"

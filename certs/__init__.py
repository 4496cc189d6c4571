"""fedsilo.certs."""

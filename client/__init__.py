"""fedsilo.client."""

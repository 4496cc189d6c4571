"""fedsilo.shared."""

"""Example model factories for fedsilo: install this package wherever the model must be built."""

"""fedsilo.simulations."""

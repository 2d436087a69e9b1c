"""mixq.sensitivity."""

"""mixq.data."""

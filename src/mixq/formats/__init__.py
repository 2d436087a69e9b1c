"""mixq.formats."""

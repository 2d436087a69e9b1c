"""mixq.allocate."""

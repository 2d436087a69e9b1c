"""mixq.eval."""

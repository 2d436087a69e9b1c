"""mixq.export."""

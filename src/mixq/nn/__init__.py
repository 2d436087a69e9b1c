"""mixq.nn."""

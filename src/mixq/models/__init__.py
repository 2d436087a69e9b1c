"""mixq.models."""

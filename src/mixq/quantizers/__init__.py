"""mixq.quantizers."""

"""mixq.kernels."""

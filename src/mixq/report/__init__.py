"""mixq.report."""

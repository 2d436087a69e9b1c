"""mixq.nn: packed quantized modules for storage and inference."""

from mixq.nn.qlinear import QuantLinear

__all__ = ["QuantLinear"]

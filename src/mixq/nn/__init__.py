"""mixq.nn: packed quantized modules for storage and inference."""

from mixq.nn.qlinear import QuantLinear
from mixq.nn.swap import shared_parameters, swap_in_quant_modules

__all__ = ["QuantLinear", "shared_parameters", "swap_in_quant_modules"]

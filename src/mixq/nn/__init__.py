"""mixq.nn: packed quantized modules for storage and inference."""

from mixq.nn.group import LinearGroup
from mixq.nn.qlinear import QuantLinear
from mixq.nn.swap import shared_parameters, swap_in_quant_modules

__all__ = ["LinearGroup", "QuantLinear", "shared_parameters", "swap_in_quant_modules"]

"""mixq: mixed-precision quantization of neural networks.

Measure how sensitive each part of a model is to quantization, choose a numeric format for
every part under a budget, apply it with a real quantizer, and evaluate the result honestly.
"""

__version__ = "0.1.0"

from mixq.errors import MixqError  # noqa: E402,F401

"""mixq.quantizers: tensor in, quantized tensor out. Never walks a model.

    gptq(w, H, fmt, *, block_size, damp, act_order)     -> (QTensor, GPTQInfo)   gptq.py
    rotate_quantize(w, fmt, seed, quantize, H)           -> (w_hat, info)         hadamard.py
    smooth_quantize(w, fmt, act_absmean, gram, grid)     -> (w_hat, info)         smooth.py
    lowrank_split(w, rank)                               -> (L, R, residual)      lowrank.py
    quantize_unit(w, option, *, H, act_absmean, config) -> (QuantizedWeight, UnitInfo)  unit.py
    QuantizedWeight(Q(E) codes, UnitTransforms(s, seed, block, (L, R))).weight() -> w_hat  transformed.py

Round-to-nearest is the format's own `fake_quant`; MSE clip search is the format's `:mse`
option and composes with everything here (e.g. `int3:g64:mse+gptq`).
"""

from mixq.quantizers.gptq import GPTQInfo, gptq
from mixq.quantizers.hadamard import Rotation, fwht, hadamard_matrix, rotate_quantize, rotation
from mixq.quantizers.lowrank import lowrank_split
from mixq.quantizers.smooth import output_error, smooth_quantize, smooth_scales
from mixq.quantizers.transformed import QuantizedWeight, UnitTransforms
from mixq.quantizers.unit import UnitInfo, needs_calibration, quantize_unit

__all__ = ["GPTQInfo", "Rotation", "QuantizedWeight", "UnitInfo", "UnitTransforms", "fwht", "gptq", "hadamard_matrix", "lowrank_split",
           "needs_calibration", "output_error", "quantize_unit", "rotate_quantize", "rotation",
           "smooth_quantize", "smooth_scales"]

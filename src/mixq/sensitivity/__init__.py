"""mixq.sensitivity: per unit x candidate option, exact bits and an estimated error.

    table = analyze(model, units, ["int2:g64", "int4:g64", "int8:ch"], "hutchinson", calib_ids,
                    seed=0, model_name="smollm2-135m")
    table.save("sensitivity.json")            # deterministic bytes for the same inputs and seed
    rows = table.to_rows()                    # (unit, option, bits, error) for mixq.allocate
    spiky_units(table, ratio_threshold=100)   # units whose inputs carry activation spikes

Methods: `METHODS` (hutchinson, eigen, fisher, output, measure); see `analyze`.
"""

from mixq.sensitivity.activations import output_method
from mixq.sensitivity.analyze import METHODS, analyze, analyze_keeping, calibration_digest
from mixq.sensitivity.context import calibration_loss_fn, fwd_bwd_seconds
from mixq.sensitivity.quantized import UnitQuantizer, collect_stats, rtn_quantize
from mixq.sensitivity.table import SENSITIVITY_KIND, SENSITIVITY_SCHEMA, SensitivityTable, UnitSensitivity, spiky_units

__all__ = [
    "METHODS", "SENSITIVITY_KIND", "UnitQuantizer", "analyze_keeping", "collect_stats", "SENSITIVITY_SCHEMA", "SensitivityTable", "UnitSensitivity", "analyze",
    "calibration_digest", "calibration_loss_fn", "fwd_bwd_seconds", "output_method", "rtn_quantize", "spiky_units",
]

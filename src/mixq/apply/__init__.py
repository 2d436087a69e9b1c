"""mixq.apply: turning a plan into quantized weights, one path for everything.

    qm = quantize_model(model_or_walker, units, plan, calib, config=CalibConfig())
    qm.weights      # unit -> QuantizedWeight: the quantizer's codes + the unit's transforms
    with applied(model, units, qm.weights):     # fake quantization: each ŵ written in place
        evaluate(model)                          # float weights restored on exit
    save_quantized(loaded, units, plan, "ckpt", weights=qm.weights, manifest=qm.manifest)

`quantize.py` holds the block-by-block (sequential calibration) path, `unitwise.py` the
unit-by-unit one for models without a decoder-block list, `stats.py` the input statistics,
`manifest.py` the record of what was done and the fallbacks of options that cannot apply.
"""

from mixq.apply.inputs import check_inputs
from mixq.apply.manifest import MANIFEST_SCHEMA, Manifest, applicable_option
from mixq.apply.quantize import (Applier, QuantizedModel, applied, planned_units, quantize_block,
                                 quantize_model, stages)
from mixq.apply.stats import StatsCollector, UnitStats

__all__ = ["Applier", "MANIFEST_SCHEMA", "Manifest", "QuantizedModel", "StatsCollector", "UnitStats",
           "applicable_option", "applied", "check_inputs", "planned_units", "quantize_block", "quantize_model",
           "stages"]

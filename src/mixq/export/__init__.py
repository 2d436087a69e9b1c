"""mixq.export: packed checkpoints that save and load exactly, and generation with them.

    doc = save_quantized(loaded, loaded.units(include_head=True, include_embeddings=True), plan, "ckpt")
    q = load_quantized("ckpt")                       # LoadedModel; QuantLinear modules (packed)
    f = load_quantized("ckpt", packed=False)         # dequantized float model (== fake quant)
    generate(q, "The capital of France is", max_new_tokens=16)
    # calibrated options and transforms: store the quantizer's own codes and transforms
    qm = mixq.apply.quantize_model(loaded.walker(), units, plan, calib_ids)
    save_quantized(loaded, units, plan, "ckpt", weights=qm.weights, manifest=qm.manifest)

Layout of the directory in `mixq.export.layout`.
"""

from mixq.export.generate import generate, generate_ids
from mixq.export.layout import CHECKPOINT_SCHEMA, META_FILE, PLAN_FILE, WEIGHTS_FILE, stream_bytes
from mixq.export.load import load_qtensors, load_quantized, load_transforms, read_checkpoint
from mixq.export.save import save_quantized, unit_qtensor

__all__ = ["save_quantized", "load_quantized", "load_qtensors", "load_transforms", "read_checkpoint", "generate",
           "generate_ids", "unit_qtensor", "stream_bytes", "CHECKPOINT_SCHEMA", "META_FILE", "PLAN_FILE", "WEIGHTS_FILE"]

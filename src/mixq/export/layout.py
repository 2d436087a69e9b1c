"""The on-disk layout of a mixq checkpoint directory (shared by `save` and `load`).

    DIR/
      model.safetensors   packed units: `<unit>.codes`, `<unit>.scales`, `<unit>.zeros`,
                          `<unit>.tensor_scale` (1-D uint8 byte streams of
                          `formats.packing.pack_qtensor`); every other tensor of the model
                          (norms, biases, embeddings and head unless planned, unplanned units)
                          under its state-dict name in `float_dtype`; tied tensors once;
                          unplanned experts of a partly planned fused-expert parameter as
                          `<param>.<expert>`
      plan.json           the Plan the checkpoint was made with
      config.json, generation_config.json, tokenizer files   (Hugging Face causal LMs)
      mixq.json           kind "checkpoint": model name/source/architecture, per unit its
                          format, shape, bits and tensor names, the other tensors, tied names,
                          the sha256 and size of every other file, the quantization manifest

A stream's byte count is fixed by the format's `layout(shape)`: packed codes and zeros take
ceil(n * code_bits / 8) bytes, scales n_scales * scale_bits / 8, the NVFP4 tensor scale 4.
"""

from __future__ import annotations

from mixq.formats import Format
from mixq.models.units import Unit

CHECKPOINT_SCHEMA = 1
CHECKPOINT_KIND = "checkpoint"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "mixq.json"
PLAN_FILE = "plan.json"
STREAMS = ("codes", "scales", "zeros", "tensor_scale")


def stream_name(unit: str, stream: str) -> str:
    """Safetensors name of one stream of a unit, e.g. `model.layers.0.mlp.up_proj.codes`."""
    return f"{unit}.{stream}"


def slice_name(param: str, index: int) -> str:
    """Safetensors name of one unplanned expert of a partly planned fused parameter."""
    return f"{param}.{index}"


def stream_bytes(fmt: Format, shape: tuple[int, int]) -> dict[str, int]:
    """Bytes of every stream `pack_qtensor` writes for a weight of `shape` in `fmt`."""
    lay = fmt.layout(tuple(shape))
    if lay.scales_shape is None:  # unquantized: raw bytes of the cast tensor
        return {"codes": lay.n_codes * lay.code_bits // 8}
    out = {"codes": -(-lay.n_codes * lay.code_bits // 8), "scales": lay.n_scales * lay.scale_bits // 8}
    if lay.has_zeros:
        out["zeros"] = -(-lay.n_scales * lay.code_bits // 8)
    if lay.tensor_scale_bits:
        out["tensor_scale"] = lay.tensor_scale_bits // 8
    return out


def unit_to_dict(u: Unit) -> dict:
    return {"name": u.name, "kind": u.kind, "shape": list(u.shape), "param": u.param, "role": u.role,
            "block": u.block, "index": u.index, "tied_to": u.tied_to, "transposed": u.transposed}


def unit_from_dict(d: dict) -> Unit:
    return Unit(name=d["name"], kind=d["kind"], shape=(int(d["shape"][0]), int(d["shape"][1])), param=d["param"],
                role=d["role"], block=int(d["block"]), index=None if d["index"] is None else int(d["index"]),
                tied_to=d["tied_to"], transposed=bool(d["transposed"]))

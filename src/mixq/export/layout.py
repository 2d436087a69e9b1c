"""The on-disk layout of a mixq checkpoint directory (shared by `save` and `load`).

    DIR/
      model.safetensors   packed units: `<unit>.codes`, `<unit>.scales`, `<unit>.zeros`,
                          `<unit>.tensor_scale` (1-D uint8 byte streams of
                          `formats.packing.pack_qtensor`); every other tensor of the model
                          (norms, biases, embeddings and head unless planned, unplanned units)
                          under its state-dict name in `float_dtype`; tied tensors once;
                          unplanned experts of a partly planned fused-expert parameter as
                          `<param>.<expert>`; for a unit quantized with transforms, beside
                          its streams: `<unit>.smooth_scales` (s, float32 (in,)),
                          `<unit>.lowrank_l` (L, bf16 (out, r)), `<unit>.lowrank_r` (R, bf16
                          (r, in))
      plan.json           the Plan the checkpoint was made with
      config.json, generation_config.json, tokenizer files   (Hugging Face causal LMs)
      mixq.json           kind "checkpoint": model name/source/architecture, per unit its
                          format, shape, bits and tensor names, the other tensors, tied names,
                          the sha256 and size of every other file, the quantization manifest

A stream's byte count is fixed by the format's `layout(shape)`: packed codes and zeros take
ceil(n * code_bits / 8) bytes, scales n_scales * scale_bits / 8, the NVFP4 tensor scale 4.

Transforms (schema 2). A unit whose option smooths, rotates or adds a low-rank branch stores
the codes of its quantized *transformed* weight Q(E) (see `quantizers.transformed`), and its
record in mixq.json gains

    "transforms": {"smooth":  {"tensor": "<unit>.smooth_scales"},
                   "rotate":  {"seed": 0, "block": 64, "signs_sha256": "..."},
                   "lowrank": {"rank": 8, "l": "<unit>.lowrank_l", "r": "<unit>.lowrank_r"}}

(each key only when applied). The rotation is not stored: Q = `hadamard.rotation(in, seed)`;
the sha256 of its sign pattern is recorded so a Q that regenerates differently (another
seed, another torch random generator) is refused rather than silently misapplied. The unit's
`bits` are those of the stored tensors: the format's bits + 32 in (s) + 16 r (out + in)
(L, R), which is `Option.bits` unless a transform was dropped for the unit (a calibration
fallback, listed in the manifest). Checkpoints without transforms are written as schema 1,
which they are exactly; schema 1 and 2 are read.
"""

from __future__ import annotations

import hashlib

import torch

from mixq.formats import Format
from mixq.models.units import Unit

CHECKPOINT_SCHEMA = 2  # written when some unit has transforms; 1 otherwise
CHECKPOINT_SCHEMAS = (1, 2)  # read
CHECKPOINT_KIND = "checkpoint"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "mixq.json"
PLAN_FILE = "plan.json"
STREAMS = ("codes", "scales", "zeros", "tensor_scale")
TRANSFORM_TENSORS = ("smooth_scales", "lowrank_l", "lowrank_r")


def stream_name(unit: str, stream: str) -> str:
    """Safetensors name of one stream of a unit, e.g. `model.layers.0.mlp.up_proj.codes`."""
    return f"{unit}.{stream}"


def transform_name(unit: str, tensor: str) -> str:
    """Safetensors name of one transform tensor of a unit, e.g. `<unit>.smooth_scales`."""
    return f"{unit}.{tensor}"


def signs_digest(signs: torch.Tensor) -> str:
    """sha256 of a rotation's sign pattern (one byte per sign: 1 for +1, 0 for -1)."""
    return hashlib.sha256((signs.detach().cpu() > 0).to(torch.uint8).numpy().tobytes()).hexdigest()


def transform_bits(shape: tuple[int, int], smooth: bool, rank: int | None) -> int:
    """Bits of the transform tensors a unit stores beside its codes: s in float32, L and R
    in bf16 (a rotation is a seed)."""
    out_dim, in_dim = shape
    return (32 * in_dim if smooth else 0) + (16 * rank * (out_dim + in_dim) if rank else 0)


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

"""Read a mixq checkpoint directory back (layout in `mixq.export.layout`).

Every file is checked against the size and sha256 that mixq.json records before any tensor is
read, so a damaged, truncated or missing file is an `ArtifactError` naming it, never a
safetensors or torch trace. The model is rebuilt from its architecture description (no
download), its float tensors loaded, and each planned unit either dequantized into the float
model (`packed=False`: the very weights fake quantization evaluates) or held as a packed
`QuantLinear` (`packed=True`; units that cannot be are dequantized and listed with the reason).
A unit stored with transforms (schema 2) has its smoothing scales, rotation and low-rank
factors checked (dtype, shape, values; the rotation regenerated from its seed must match the
recorded sign digest) and either runs them online in its QuantLinear or is reconstructed as
ŵ = ((L R + Q(E)) Qᵀ) diag(1/s) by the same function fake quantization used (bit-identical).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mixq import formats
from mixq.artifacts import read_artifact, sha256_file
from mixq.errors import ArtifactError, FormatError
from mixq.export import arch as arch_mod
from mixq.export.layout import (CHECKPOINT_KIND, CHECKPOINT_SCHEMAS, META_FILE, PLAN_FILE, signs_digest,
                                slice_name, stream_bytes, unit_from_dict)
from mixq.formats import QTensor
from mixq.export.streams import kernel_weights
from mixq.formats.packing import unpack_qtensor
from mixq.models.load import LoadedModel
from mixq.models.units import Unit
from mixq.nn.swap import swap_in_quant_modules, write_dequantized
from mixq.plan import Plan
from mixq.progress import Progress, track
from mixq.quantizers.hadamard import rotation
from mixq.quantizers.transformed import UnitTransforms

log = logging.getLogger(__name__)

_REQUIRED = ("model", "weights_file", "units", "all_units", "tensors", "tied", "expert_slices", "files")


def read_checkpoint(folder: str | os.PathLike, *, verify: bool = True) -> dict:
    """The mixq.json document of a checkpoint, after checking that every file it lists is
    present with its recorded size and (with `verify`) sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such checkpoint directory")
    if not (folder / META_FILE).is_file():
        raise ArtifactError(f"{folder}: not a mixq checkpoint (file {META_FILE} is missing)")
    doc = read_artifact(folder / META_FILE, CHECKPOINT_KIND, CHECKPOINT_SCHEMAS)
    missing_keys = [k for k in _REQUIRED if k not in doc]
    if missing_keys or not isinstance(doc.get("files"), dict):
        raise ArtifactError(f"{folder / META_FILE}: malformed checkpoint metadata (missing {', '.join(missing_keys)})")
    if doc["weights_file"] not in doc["files"]:
        raise ArtifactError(f"{folder / META_FILE}: the weights file {doc['weights_file']} is not among its files")
    for rel, info in sorted(doc["files"].items()):
        path = folder / rel
        if not path.is_file():
            raise ArtifactError(f"checkpoint {folder}: file {rel} is missing")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise ArtifactError(f"checkpoint {folder}: file {rel} is {size} bytes, {META_FILE} records "
                                f"{info['bytes']}: it is truncated or damaged")
        if verify and sha256_file(path) != info["sha256"]:
            raise ArtifactError(f"checkpoint {folder}: file {rel} is damaged (its sha256 differs from the one "
                                f"{META_FILE} records)")
    return doc


def _read_tensors(folder: Path, doc: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / doc["weights_file"]
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
        raise ArtifactError(f"checkpoint {folder}: {doc['weights_file']} is unreadable "
                            f"({e.__class__.__name__}: {e})") from e


def _take(tensors: dict[str, torch.Tensor], name: str, folder: Path) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise ArtifactError(f"checkpoint {folder}: tensor {name!r} listed in {META_FILE} is not in the weights file")
    return t


def _unit_qtensors(tensors: dict[str, torch.Tensor], doc: dict, folder: Path,
                   prepacked: dict | None = None) -> dict[str, QTensor]:
    """unit -> QTensor; with a `prepacked` dict, also fills it with the kernel layout of each
    Linear unit whose stored codes stream is that layout already (`streams.kernel_weights`)."""
    out: dict[str, QTensor] = {}
    for name, u in doc["units"].items():
        try:
            fmt = formats.parse(u["format"])
            shape = (int(u["shape"][0]), int(u["shape"][1]))
            expected = stream_bytes(fmt, shape)
            streams = {k: _take(tensors, n, folder) for k, n in u["tensors"].items()}
            got = {k: s.numel() if s.dtype == torch.uint8 and s.dim() == 1 else -1 for k, s in streams.items()}
            if got != expected:
                raise ArtifactError(f"checkpoint {folder}: unit {name!r} ({fmt} {shape}) has streams {got} bytes, "
                                    f"its format needs {expected}")
            out[name] = unpack_qtensor(streams, fmt, shape)
            if prepacked is not None and u["kind"] == "linear":
                kw = kernel_weights(out[name], streams["codes"], fmt)
                if kw is not None:
                    prepacked[name] = kw
        except (KeyError, TypeError, FormatError, RuntimeError) as e:
            raise ArtifactError(f"checkpoint {folder}: unit {name!r} is malformed ({e.__class__.__name__}: {e})") from e
    return out


def _stored(tensors: dict[str, torch.Tensor], name, folder: Path, unit: str, what: str, dtype: torch.dtype,
            shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(name, str):
        raise ArtifactError(f"checkpoint {folder}: unit {unit!r}: {what} tensor name missing in {META_FILE}")
    t = _take(tensors, name, folder)
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ArtifactError(f"checkpoint {folder}: unit {unit!r}: {what} tensor {name!r} is {t.dtype} "
                            f"{tuple(t.shape)}, expected {dtype} {shape}")
    if not torch.isfinite(t).all():
        raise ArtifactError(f"checkpoint {folder}: unit {unit!r}: {what} tensor {name!r} holds NaN/inf values")
    return t


def _unit_transforms(tensors: dict[str, torch.Tensor], doc: dict, folder: Path) -> dict[str, UnitTransforms]:
    """unit -> the transforms its codes were quantized under, for units whose record has a
    "transforms" entry (schema 2), each checked against the unit's shape."""
    out: dict[str, UnitTransforms] = {}
    for name, u in doc["units"].items():
        rec = u.get("transforms") if isinstance(u, dict) else None
        if rec is None:
            continue
        where = f"checkpoint {folder}: unit {name!r}"
        try:
            out_dim, in_dim = int(u["shape"][0]), int(u["shape"][1])
            unknown = sorted(set(rec) - {"smooth", "rotate", "lowrank"})
            if unknown:
                raise ArtifactError(f"{where}: unknown transforms {unknown} in {META_FILE} (written by a newer mixq?)")
            smooth = rot_seed = rot_block = lowrank = None
            if "smooth" in rec:
                smooth = _stored(tensors, rec["smooth"].get("tensor"), folder, name, "smoothing scales",
                                 torch.float32, (in_dim,))
                if not (smooth > 0).all():
                    raise ArtifactError(f"{where}: smoothing scales must be positive")
            if "rotate" in rec:
                r = rec["rotate"]
                rot_seed, rot_block = int(r["seed"]), int(r["block"])
                try:
                    rot = rotation(in_dim, rot_seed)
                except FormatError as e:
                    raise ArtifactError(f"{where}: rotation in {META_FILE} cannot apply ({e})") from e
                if rot.block != rot_block:
                    raise ArtifactError(f"{where}: rotation block {rot_block} in {META_FILE}, an input dim of "
                                        f"{in_dim} has block {rot.block}")
                if signs_digest(rot.signs) != r["signs_sha256"]:
                    raise ArtifactError(f"{where}: the rotation regenerated from seed {rot_seed} differs from the "
                                        f"one recorded in {META_FILE} (damaged record, or a torch random "
                                        "generator that differs from the one that made it)")
            if "lowrank" in rec:
                lr = rec["lowrank"]
                rank = int(lr["rank"])
                L = _stored(tensors, lr.get("l"), folder, name, "low-rank L", torch.bfloat16, (out_dim, rank))
                R = _stored(tensors, lr.get("r"), folder, name, "low-rank R", torch.bfloat16, (rank, in_dim))
                lowrank = (L.float(), R.float())
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise ArtifactError(f"{where}: malformed transforms record in {META_FILE} "
                                f"({e.__class__.__name__}: {e})") from e
        out[name] = UnitTransforms(None if smooth is None else smooth.float(), rot_seed, rot_block, lowrank)
    return out


def load_transforms(folder: str | os.PathLike, *, verify: bool = True) -> dict[str, UnitTransforms]:
    """unit name -> `UnitTransforms` (s, rotation seed and block, L and R) of each unit stored
    with transforms; `load_qtensors` gives the codes of its transformed weight Q(E)."""
    folder = Path(folder)
    doc = read_checkpoint(folder, verify=verify)
    return _unit_transforms(_read_tensors(folder, doc), doc, folder)


def load_qtensors(folder: str | os.PathLike, *, verify: bool = True) -> dict[str, QTensor]:
    """unit name -> QTensor (codes, scales, zeros, tensor scale) as stored in the checkpoint."""
    folder = Path(folder)
    doc = read_checkpoint(folder, verify=verify)
    return _unit_qtensors(_read_tensors(folder, doc), doc, folder)


def _coverage_check(state_keys: list[str], doc: dict, units: list[Unit], folder: Path) -> None:
    """Every tensor of the rebuilt model must come from the checkpoint, and vice versa."""
    full = {u.param for u in units if u.index is None}
    per_param: dict[str, set[int]] = {}
    for u in units:
        if u.index is not None:
            per_param.setdefault(u.param, set()).add(u.index)
    for p, idx in doc["expert_slices"].items():
        per_param.setdefault(p, set()).update(int(e) for e in idx)
    slices = {slice_name(p, int(e)) for p, idx in doc["expert_slices"].items() for e in idx}
    stored = set(doc["tensors"]) - slices
    covered = stored | full | set(per_param)
    for group in doc["tied"]:
        if covered & set(group):
            covered |= set(group)
    keys = set(state_keys)
    missing = sorted(keys - covered)
    extra = sorted((stored | full | set(per_param)) - keys)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the model has tensors the checkpoint lacks: {', '.join(missing[:5])}")
        if extra:
            parts.append(f"the checkpoint has tensors the model lacks: {', '.join(extra[:5])}")
        raise ArtifactError(f"checkpoint {folder} does not fit the model rebuilt from its config: " + "; ".join(parts))


def _sync_tied(model: torch.nn.Module, doc: dict, sources: set[str]) -> None:
    """Copy each tied group's value from its stored (or planned) member to members that the
    rebuilt model does not tie itself."""
    state = dict(model.state_dict(keep_vars=True))
    for group in doc["tied"]:
        src = next((k for k in group if k in sources), None)
        if src is None or src not in state:
            continue
        with torch.no_grad():
            for k in group:
                if k != src and k in state and state[k] is not state[src]:
                    state[k].copy_(state[src])


def _hf_encode(tokenizer):
    from mixq.data.tokenize import hf_encoder

    return hf_encoder(tokenizer)  # with the tokenizer's BOS convention


def load_quantized(folder: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   packed: bool | str = True, verify: bool = True, progress: Progress | None = None) -> LoadedModel:
    """Load a checkpoint written by `save_quantized` as a `LoadedModel` in eval mode.

    packed=False: every planned unit's dequantized weight is written into the float model
    (bit-identical to the fake-quantized model in float32; for a unit with transforms, ŵ
    reconstructed from its Q(E), s, rotation and L, R). packed=True: Linear units become
    `QuantLinear` modules holding the packed codes (Triton kernel on CUDA with bf16/fp16
    activations, else dequantize + matmul), applying a unit's transforms to its input online;
    units inside fused experts, Conv2d, embeddings and tied tensors are dequantized. packed="auto": packed on CUDA, dequantized elsewhere (on CPU
    the packed reference path dequantizes every weight at every call; the dequantized model
    computes the same numbers faster). verify=False skips the sha256 check (sizes are always
    checked). `extra` carries "plan", "units" (every unit of the original
    model), "n_params" (for `accounting.bit_totals`), "dequantized_units" ({unit: reason}),
    "checkpoint" and "manifest". Do not cast the model with `.to(dtype)` afterwards: that would
    cast the packed scales too; load with the `dtype` wanted instead."""
    folder = Path(folder)
    if packed == "auto":
        packed = torch.device(device).type == "cuda"
    elif not isinstance(packed, bool):
        raise ValueError(f"packed must be True, False or 'auto', got {packed!r}")
    doc = read_checkpoint(folder, verify=verify)
    if not (folder / PLAN_FILE).is_file():
        raise ArtifactError(f"checkpoint {folder}: file {PLAN_FILE} is missing")
    plan = Plan.load(folder / PLAN_FILE)
    try:
        units = [unit_from_dict(u) for u in doc["units"].values()]
        all_units = [unit_from_dict(u) for u in doc["all_units"]]
        info = doc["model"]
        arch = info["arch"]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ArtifactError(f"{folder / META_FILE}: malformed unit or model record ({e.__class__.__name__}: {e})") from e
    if set(plan.options) - {u.name for u in all_units} or not {u.name for u in units} <= set(plan.options):
        raise ArtifactError(f"checkpoint {folder}: {PLAN_FILE} does not match the units in {META_FILE}")

    tensors = _read_tensors(folder, doc)
    prepacked: dict = {}
    qtensors = _unit_qtensors(tensors, doc, folder, prepacked if packed else None)
    transforms = _unit_transforms(tensors, doc, folder)
    model = arch_mod.rebuild(arch, folder, dtype)
    state_keys = list(model.state_dict().keys())
    _coverage_check(state_keys, doc, units, folder)

    plain = {k: _take(tensors, k, folder) for k in doc["tensors"]}
    for group in doc["tied"]:  # also load aliases, for a rebuilt model that does not tie them
        src = next((k for k in group if k in plain), None)
        for k in group:
            if src is not None and k not in plain:
                plain[k] = plain[src]
    try:
        with torch.no_grad():
            model.load_state_dict({k: v for k, v in plain.items() if k in state_keys}, strict=False)
            for param, indices in doc["expert_slices"].items():
                p = model.get_parameter(param)
                for e in indices:
                    p[int(e)].copy_(_take(tensors, slice_name(param, int(e)), folder))
    except RuntimeError as e:  # shape mismatch between config and stored tensors
        raise ArtifactError(f"checkpoint {folder}: stored tensors do not fit the model rebuilt from its config "
                            f"({str(e).splitlines()[0]})") from e
    del tensors

    dequantized: dict[str, str] = {}
    with torch.no_grad():
        if packed:
            dequantized = swap_in_quant_modules(model, units, qtensors, prepacked, transforms)
        else:
            for u in track(units, "dequantize", len(units), progress):
                write_dequantized(model, u, qtensors[u.name], transforms.get(u.name))
    _sync_tied(model, doc, set(plain) | {u.param for u in units})
    for name, why in dequantized.items():
        log.info("unit %s: dequantized into the float model (%s)", name, why)
    model = model.to(device).eval()

    tokenizer = encode = None
    if doc.get("tokenizer"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        encode = _hf_encode(tokenizer)
    return LoadedModel(
        name=info.get("name", ""), kind=info.get("kind", "causal_lm"), model=model,
        source=f"mixq checkpoint {folder} (of {info.get('source', '')})",
        encode=encode, tokenizer=tokenizer, note=info.get("note", ""), default_data=info.get("default_data", ""),
        extra={"plan": plan, "units": all_units, "n_params": int(info.get("n_params", 0)),
               "dequantized_units": dequantized, "packed": packed, "checkpoint": str(folder),
               "manifest": doc.get("manifest")},
    )

"""`save_quantized`: write a packed checkpoint directory (layout in `mixq.export.layout`).

Each planned unit is stored as the codes-plus-scales its quantizer made: the
`QuantizedWeight` of `mixq.apply.quantize_model` (GPTQ's or RTN's codes of Q(E), with s, the
rotation's seed and L, R beside them for a unit with transforms; layout in
`mixq.export.layout`), exactly as evaluation computed with them; a round-to-nearest unit
given no quantized weight is quantized here by its format from the model's weight. The directory is
assembled under a temporary name beside `out_dir` and renamed into place: a crash leaves no
half-written checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from mixq import __version__, formats
from mixq.accounting import bit_totals
from mixq.artifacts import sha256_file, write_artifact
from mixq.errors import ArtifactError, DataError, FormatError, MixqError
from mixq.export import arch as arch_mod
from mixq.export.layout import (CHECKPOINT_KIND, CHECKPOINT_SCHEMA, META_FILE, PLAN_FILE, WEIGHTS_FILE,
                                signs_digest, slice_name, stream_bytes, stream_name, transform_bits,
                                transform_name, unit_to_dict)
from mixq.formats import QTensor
from mixq.formats.packing import pack_qtensor
from mixq.models.load import LoadedModel
from mixq.models.units import Unit, get_weight
from mixq.nn.qlinear import QuantLinear
from mixq.option import Option
from mixq.plan import Plan
from mixq.progress import Progress, track
from mixq.quantizers.transformed import QuantizedWeight, UnitTransforms


def _planned_units(units: list[Unit], plan: Plan) -> list[Unit]:
    """Units the plan quantizes, one per tensor: a tied unit only when its owner is unplanned."""
    planned = [u for u in units if u.name in plan.options]
    owners = {u.name for u in planned if u.tied_to is None}
    return [u for u in planned if u.tied_to is None or u.tied_to not in owners]


def unit_qtensor(unit: Unit, option: Option, w: torch.Tensor | QTensor) -> QTensor:
    """Codes-plus-scales of one unit under a round-to-nearest `option`: the format's own
    quantization of the float weight w (out, in), or a given QTensor (its format and shape must
    match). Options with another quantizer or transforms are refused: their codes are what
    the quantizer made (a `QuantizedWeight`), never re-derived from a float weight."""
    fmt = option.fmt
    if isinstance(w, QTensor):
        if w.fmt != str(fmt) or tuple(w.shape) != tuple(unit.shape):
            raise ArtifactError(f"unit {unit.name!r}: given QTensor is {w.fmt} {tuple(w.shape)}, "
                                f"the plan says {fmt} {tuple(unit.shape)}")
        return w
    if not option.is_plain:
        raise ArtifactError(f"unit {unit.name!r}: option {option} is stored from its quantizer's output (codes and "
                            "transforms): quantize with mixq.apply.quantize_model and pass weights=qm.weights "
                            "(mixq.api.quantize does both), not a float weight")
    if w.device.type == "meta":
        raise ArtifactError(f"unit {unit.name!r}: its weight is not loaded (meta tensor) and no quantized weight "
                            "was given")
    try:
        return fmt.quantize(w.detach().float())  # refuses NaN/inf (DataError)
    except (FormatError, DataError) as e:
        raise type(e)(f"unit {unit.name!r} (shape {tuple(w.shape)}), format {fmt}: {e}") from e


def unit_transform_tensors(unit: Unit, option: Option, tf: UnitTransforms) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the unit's "transforms" record, its transform tensors by safetensors name) for the
    transforms `tf` a unit was quantized under. Each must be one the option names (a
    calibration fallback may have dropped some, never added one); raises ArtifactError naming
    the unit otherwise, or when a tensor has the wrong shape or values."""
    out_dim, in_dim = unit.shape
    where = f"unit {unit.name!r} (option {option})"
    record: dict = {}
    tensors: dict[str, torch.Tensor] = {}
    if tf.smooth_scales is not None:
        if "smooth" not in option.transforms:
            raise ArtifactError(f"{where}: smoothing scales given, but the option does not smooth")
        s = tf.smooth_scales.detach().float().cpu()
        if tuple(s.shape) != (in_dim,) or not torch.isfinite(s).all() or not (s > 0).all():
            raise ArtifactError(f"{where}: smoothing scales must be finite and positive, shape ({in_dim},); "
                                f"got shape {tuple(s.shape)}")
        name = transform_name(unit.name, "smooth_scales")
        tensors[name] = s.contiguous()
        record["smooth"] = {"tensor": name}
    if tf.rotate_seed is not None:
        if "rotate" not in option.transforms:
            raise ArtifactError(f"{where}: a rotation given, but the option does not rotate")
        rot = tf.rotation(in_dim)
        if tf.rotate_block is not None and tf.rotate_block != rot.block:
            raise ArtifactError(f"{where}: rotation block {tf.rotate_block} given, an input dim of {in_dim} "
                                f"has block {rot.block}")
        record["rotate"] = {"seed": int(tf.rotate_seed), "block": rot.block, "signs_sha256": signs_digest(rot.signs)}
    if tf.lowrank is not None:
        rank = option.lowrank
        if rank is None:
            raise ArtifactError(f"{where}: low-rank factors given, but the option has no lowrank branch")
        L, R = (t.detach().float().cpu() for t in tf.lowrank)
        r = min(rank, out_dim, in_dim)
        if tuple(L.shape) != (out_dim, r) or tuple(R.shape) != (r, in_dim):
            raise ArtifactError(f"{where}: low-rank factors must be ({out_dim}, {r}) and ({r}, {in_dim}), got "
                                f"{tuple(L.shape)} and {tuple(R.shape)}")
        Lb, Rb = L.to(torch.bfloat16), R.to(torch.bfloat16)
        if not (torch.equal(Lb.float(), L) and torch.equal(Rb.float(), R)):
            raise ArtifactError(f"{where}: low-rank factors are not bf16-exact (quantizers.lowrank_split rounds "
                                "them before forming the residual; other factors cannot be stored exactly)")
        names = {"l": transform_name(unit.name, "lowrank_l"), "r": transform_name(unit.name, "lowrank_r")}
        tensors[names["l"]], tensors[names["r"]] = Lb.contiguous(), Rb.contiguous()
        record["lowrank"] = {"rank": r, **names}
    return record, tensors


def _identity(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _plain_tensors(net: nn.Module, planned: list[Unit], float_dtype: torch.dtype | None, source=None):
    """(tensors, tied groups, expert slices): everything of the state dict the planned units do
    not cover, tied tensors once, floating tensors cast to `float_dtype` (None: kept). A meta
    tensor (a block not in memory) is read through `source(name)`."""
    full = {u.param for u in planned if u.index is None}
    experts: dict[str, set[int]] = {}
    for u in planned:
        if u.index is not None:
            experts.setdefault(u.param, set()).add(u.index)
    state = net.state_dict()
    for p, idx in experts.items():
        if len(idx) == state[p].shape[0]:
            full.add(p)
    groups: dict[tuple, list[str]] = {}
    for k, t in state.items():
        key = _identity(t) if t.numel() else ("empty", k)
        groups.setdefault(key, []).append(k)

    def cast(t: torch.Tensor, name: str) -> torch.Tensor:
        if t.device.type == "meta":
            if source is None:
                raise ArtifactError(f"tensor {name!r} is not loaded (meta) and no source to read it from was given")
            t = source(name)
        dtype = float_dtype if (float_dtype is not None and t.is_floating_point()) else t.dtype
        return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()

    tensors: dict[str, torch.Tensor] = {}
    tied: list[list[str]] = []
    slices: dict[str, list[int]] = {}
    for names in groups.values():
        if len(names) > 1:
            tied.append(sorted(names))
        if any(n in full for n in names):
            continue
        partial = next((n for n in names if n in experts), None)
        if partial is not None:
            rest = [e for e in range(state[partial].shape[0]) if e not in experts[partial]]
            slices[partial] = rest
            for e in rest:
                tensors[slice_name(partial, e)] = cast(state[partial][e], partial)
            continue
        tensors[names[0]] = cast(state[names[0]], names[0])
    return tensors, sorted(tied), slices


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> bool:
    """Whether `out_dir` holds something that `overwrite` allows replacing (a mixq checkpoint);
    ArtifactError when it may not be written. Cheap: callers check before long work."""
    out_dir = Path(out_dir)
    existing = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if existing:
        if not overwrite:
            raise ArtifactError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        if not (out_dir / META_FILE).is_file():
            raise ArtifactError(f"{out_dir} exists and is not a mixq checkpoint (no {META_FILE}); refusing to replace it")
    return existing


@contextmanager
def staging_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh temporary directory beside `out_dir`, renamed to `out_dir` when the block ends
    without an exception and removed otherwise. An existing non-empty `out_dir` is replaced
    only with `overwrite` and only if it is a mixq checkpoint."""
    out_dir = Path(out_dir)
    existing = check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    old = None
    try:
        yield tmp
        if out_dir.exists() and existing:
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / "ckpt")
        elif out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def save_quantized(model: LoadedModel | nn.Module, units: list[Unit], plan: Plan, out_dir: str | os.PathLike, *,
                   weights: dict[str, QuantizedWeight | QTensor] | None = None, manifest: dict | object | None = None,
                   progress: Progress | None = None, float_dtype: torch.dtype | None = torch.bfloat16,
                   overwrite: bool = False, tensors=None, run: dict | None = None) -> dict:
    """Write the packed checkpoint of `model` under `plan` to `out_dir`; returns the mixq.json
    document written.

    units: the model's units (all of them, e.g. `loaded.units(include_head=True,
    include_embeddings=True)`: they are recorded for bit accounting). weights: unit name ->
    `QuantizedWeight` (what `mixq.apply.quantize_model` made: the quantizer's codes and the
    unit's transforms, stored as they are) or a QTensor; a planned unit without one must have
    a round-to-nearest option, and is quantized from the model's weight here. manifest: what
    was done (a `mixq.apply.Manifest` or its dict). float_dtype: storage dtype of every
    tensor that is not a planned unit (None: each keeps its own). tensors: optional
    callable name -> tensor for state-dict entries the model holds only as meta tensors
    (blocks read lazily from disk). run: how the quantization ran (device, offload, peak
    memory, seconds), recorded as it is. Raises ArtifactError naming a unit that cannot be
    stored."""
    loaded = model if isinstance(model, LoadedModel) else None
    net = loaded.model if loaded is not None else model
    kind = loaded.kind if loaded is not None else ("causal_lm" if hasattr(net, "generate") else "image_classifier")
    arch = arch_mod.describe(net, kind)
    if any(isinstance(m, QuantLinear) for m in net.modules()):
        raise MixqError("the model already holds packed QuantLinear modules; save from the float model "
                        "(load_quantized(..., packed=False) gives one)")
    plan.check_against(units)
    weights = dict(weights or {})
    planned = _planned_units(units, plan)
    unknown = sorted(set(weights) - {u.name for u in planned})
    if unknown:
        raise ArtifactError(f"weights given for units the plan does not quantize: {', '.join(unknown[:5])}")
    if manifest is not None and hasattr(manifest, "to_dict"):
        manifest = manifest.to_dict()

    tensors: dict[str, torch.Tensor] = {}
    unit_docs: dict[str, dict] = {}
    transform_bytes = 0
    with torch.no_grad():
        for u in track(planned, "pack", len(planned), progress):
            opt = plan.options[u.name]
            given = weights.get(u.name)
            tw = given if isinstance(given, QuantizedWeight) else None
            if tw is not None:
                q = tw.qtensor
                if q.fmt != opt.format or tuple(q.shape) != tuple(u.shape):
                    raise ArtifactError(f"unit {u.name!r}: quantized weight is {q.fmt} {tuple(q.shape)}, the plan "
                                        f"says {opt.format} {tuple(u.shape)}")
            else:
                q = unit_qtensor(u, opt, given if given is not None else get_weight(net, u))
            fmt = formats.parse(q.fmt)
            streams = pack_qtensor(q, fmt)
            expected = stream_bytes(fmt, u.shape)
            got = {k: s.numel() for k, s in streams.items()}
            if got != expected:  # the format's layout and its packer disagree: a bug, not bad input
                raise MixqError(f"unit {u.name!r}: packed streams {got} differ from the layout of {fmt} {expected}")
            names = {k: stream_name(u.name, k) for k in streams}
            for k, s in streams.items():
                tensors[names[k]] = s.detach().cpu().contiguous()
            doc_u = {**unit_to_dict(u), "format": str(fmt), "option": str(opt), "bits": fmt.bits(u.shape),
                     "bytes": sum(got.values()), "tensors": names}
            if tw is not None and not tw.transforms.is_identity:
                record, extra = unit_transform_tensors(u, opt, tw.transforms)
                tensors.update(extra)
                doc_u["transforms"] = record
                doc_u["bits"] += transform_bits(u.shape, "smooth" in record, record.get("lowrank", {}).get("rank"))
                n_extra = sum(t.numel() * t.element_size() for t in extra.values())
                doc_u["bytes"] += n_extra
                transform_bytes += n_extra
            unit_docs[u.name] = doc_u
        plain, tied, slices = _plain_tensors(net, planned, float_dtype, tensors)
    clash = sorted(set(plain) & set(tensors))
    if clash:
        raise MixqError(f"tensor names clash between packed units and other tensors: {clash[:5]}")
    tensors.update(plain)

    n_params = sum(p.numel() for p in net.parameters())
    body = {
        "model": {
            "name": loaded.name if loaded is not None else (plan.model or type(net).__name__),
            "source": loaded.source if loaded is not None else "",
            "kind": kind, "arch": arch,
            "note": loaded.note if loaded is not None else "",
            "default_data": loaded.default_data if loaded is not None else "",
            "n_params": n_params,
        },
        "weights_file": WEIGHTS_FILE,
        "float_dtype": _dtype_name(float_dtype),
        "units": unit_docs,
        "all_units": [unit_to_dict(u) for u in units],
        "tensors": {k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for k, t in sorted(plain.items())},
        "tied": tied,
        "expert_slices": slices,
        "manifest": manifest,
        "run": dict(run or {}),
        "warnings": list((manifest or {}).get("warnings", [])) if isinstance(manifest, dict) else [],
        "totals": {
            "unit_bits": sum(d["bits"] for d in unit_docs.values()),
            "unit_bytes": sum(d["bytes"] for d in unit_docs.values()),
            "transform_bytes": transform_bytes,
            **{k: v for k, v in bit_totals(plan, units, n_params).items() if k.startswith("bpw_")},
            "plain_bytes": sum(t.numel() * t.element_size() for t in plain.values()),
        },
    }
    from safetensors.torch import save_file

    # without transforms nothing of schema 2 is used: written as schema 1, which older mixq reads
    schema = CHECKPOINT_SCHEMA if any("transforms" in d for d in unit_docs.values()) else 1
    with staging_dir(Path(out_dir), overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "mixq", "mixq_version": __version__,
                                                                "schema_version": str(schema)})
        _fsync(tmp / WEIGHTS_FILE)
        plan.save(tmp / PLAN_FILE)
        arch_mod.save_config(net, arch, tmp)
        tokenizer = loaded.tokenizer if loaded is not None else None
        body["tokenizer"] = tokenizer is not None
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != META_FILE)
        body["files"] = {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                         for p in files}
        body["totals"]["file_bytes"] = body["files"][WEIGHTS_FILE]["bytes"]
        doc = write_artifact(tmp / META_FILE, CHECKPOINT_KIND, schema, body)
    return doc

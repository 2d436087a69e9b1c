"""`save_quantized`: write a packed checkpoint directory (layout in `mixq.export.layout`).

Each planned unit is stored as the codes-plus-scales of its format, derived by `fmt.quantize`
from the weight: the model's own (round to nearest, exactly what fake quantization
evaluates) or an already quantized weight (GPTQ output, passed as `weights[name]` or left in
the model by `mixq.calibrate.quantize_model`), which must then lie on the format's grid so
that the stored codes reproduce it bit for bit. The directory is assembled under a temporary
name beside `out_dir` and renamed into place: a crash leaves no half-written checkpoint.
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
from mixq.artifacts import sha256_file, write_artifact
from mixq.errors import ArtifactError, DataError, FormatError, MixqError
from mixq.export import arch as arch_mod
from mixq.export.layout import (CHECKPOINT_KIND, CHECKPOINT_SCHEMA, META_FILE, PLAN_FILE, WEIGHTS_FILE,
                                slice_name, stream_bytes, stream_name, unit_to_dict)
from mixq.export.regrid import int_qtensor_on_grid
from mixq.formats import IntFormat, QTensor
from mixq.formats.packing import pack_qtensor
from mixq.models.load import LoadedModel
from mixq.models.units import Unit, get_weight
from mixq.nn.qlinear import QuantLinear
from mixq.plan import Option, Plan
from mixq.progress import Progress, track


def _planned_units(units: list[Unit], plan: Plan) -> list[Unit]:
    """Units the plan quantizes, one per tensor: a tied unit only when its owner is unplanned."""
    planned = [u for u in units if u.name in plan.options]
    owners = {u.name for u in planned if u.tied_to is None}
    return [u for u in planned if u.tied_to is None or u.tied_to not in owners]


def unit_qtensor(unit: Unit, option: Option, w: torch.Tensor | QTensor, *, given: bool = False) -> QTensor:
    """Codes-plus-scales of one unit's weight (out, in) under `option`.

    A round-to-nearest option quantizes `w` (idempotent: an already quantized weight keeps its
    codes). A given weight (`given=True`, e.g. GPTQ output) or an option with another quantizer
    or transforms must lie on the format's grid: dequantize(quantize(w)) == w exactly, else
    ArtifactError naming the unit (INT groups whose step RTN would pick differently are
    re-derived from the weight's own grid, see `export.regrid`). A QTensor is taken as it is (its format must match)."""
    fmt = option.fmt
    if isinstance(w, QTensor):
        if w.fmt != str(fmt) or tuple(w.shape) != tuple(unit.shape):
            raise ArtifactError(f"unit {unit.name!r}: given QTensor is {w.fmt} {tuple(w.shape)}, "
                                f"the plan says {fmt} {tuple(unit.shape)}")
        return w
    w = w.detach().float()
    try:
        q = fmt.quantize(w)  # refuses NaN/inf (DataError)
    except (FormatError, DataError) as e:
        raise type(e)(f"unit {unit.name!r} (shape {tuple(w.shape)}), format {fmt}: {e}") from e
    if given or option.quantizer != "rtn" or option.transforms:
        w_back = fmt.dequantize(q)
        if not torch.equal(w_back, w) and isinstance(fmt, IntFormat):
            q = int_qtensor_on_grid(fmt, w, q)  # GPTQ: groups whose step is not the one RTN picks
            w_back = fmt.dequantize(q)
        if not torch.equal(w_back, w):
            err = float((w_back - w).abs().max())
            if option.transforms:
                why = (f"option {option} applies {'+'.join(option.transforms)}; the checkpoint format stores "
                       "the format's codes only, not rotations, smoothing scales or low-rank branches")
            elif option.quantizer != "rtn" and not given:
                why = (f"option {option} needs its quantizer's output: run mixq.calibrate.quantize_model on "
                       "the model first, or pass weights={name: quantized weight}")
            else:
                why = "the codes and scales cannot be re-derived from this weight by the format's own rounding"
            raise ArtifactError(f"unit {unit.name!r}: its weight is not on the grid of {fmt} "
                                f"(max |dequantize(quantize(w)) - w| = {err:.3g}); {why}")
    return q


def _identity(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _plain_tensors(net: nn.Module, planned: list[Unit], float_dtype: torch.dtype | None):
    """(tensors, tied groups, expert slices): everything of the state dict the planned units do
    not cover, tied tensors once, floating tensors cast to `float_dtype` (None: kept)."""
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

    def cast(t: torch.Tensor) -> torch.Tensor:
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
                tensors[slice_name(partial, e)] = cast(state[partial][e])
            continue
        tensors[names[0]] = cast(state[names[0]])
    return tensors, sorted(tied), slices


@contextmanager
def staging_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh temporary directory beside `out_dir`, renamed to `out_dir` when the block ends
    without an exception and removed otherwise. An existing non-empty `out_dir` is replaced
    only with `overwrite` and only if it is a mixq checkpoint."""
    out_dir = Path(out_dir)
    existing = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if existing:
        if not overwrite:
            raise ArtifactError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        if not (out_dir / META_FILE).is_file():
            raise ArtifactError(f"{out_dir} exists and is not a mixq checkpoint (no {META_FILE}); refusing to replace it")
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
                   weights: dict[str, torch.Tensor | QTensor] | None = None, manifest: dict | object | None = None,
                   progress: Progress | None = None, float_dtype: torch.dtype | None = torch.bfloat16,
                   overwrite: bool = False) -> dict:
    """Write the packed checkpoint of `model` under `plan` to `out_dir`; returns the mixq.json
    document written.

    units: the model's units (all of them, e.g. `loaded.units(include_head=True,
    include_embeddings=True)`: they are recorded for bit accounting). weights: unit name ->
    already quantized (out, in) weight or QTensor, overriding the model's weight (it must lie on
    the format's grid). manifest: what was done (a `calibrate.Manifest` or its dict).
    float_dtype: storage dtype of every tensor that is not a planned unit (None: each keeps
    its own). Raises ArtifactError naming the unit whose weight cannot be stored exactly."""
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
    with torch.no_grad():
        for u in track(planned, "pack", len(planned), progress):
            opt = plan.options[u.name]
            given = u.name in weights
            w = weights[u.name] if given else get_weight(net, u)
            q = unit_qtensor(u, opt, w, given=given)
            fmt = formats.parse(q.fmt)
            streams = pack_qtensor(q, fmt)
            expected = stream_bytes(fmt, u.shape)
            got = {k: s.numel() for k, s in streams.items()}
            if got != expected:  # the format's layout and its packer disagree: a bug, not bad input
                raise MixqError(f"unit {u.name!r}: packed streams {got} differ from the layout of {fmt} {expected}")
            names = {k: stream_name(u.name, k) for k in streams}
            for k, s in streams.items():
                tensors[names[k]] = s.detach().cpu().contiguous()
            unit_docs[u.name] = {**unit_to_dict(u), "format": str(fmt), "option": str(opt),
                                 "bits": fmt.bits(u.shape), "bytes": sum(got.values()), "tensors": names}
        plain, tied, slices = _plain_tensors(net, planned, float_dtype)
    clash = sorted(set(plain) & set(tensors))
    if clash:
        raise MixqError(f"tensor names clash between packed units and other tensors: {clash[:5]}")
    tensors.update(plain)

    body = {
        "model": {
            "name": loaded.name if loaded is not None else (plan.model or type(net).__name__),
            "source": loaded.source if loaded is not None else "",
            "kind": kind, "arch": arch,
            "note": loaded.note if loaded is not None else "",
            "default_data": loaded.default_data if loaded is not None else "",
            "n_params": sum(p.numel() for p in net.parameters()),
        },
        "weights_file": WEIGHTS_FILE,
        "float_dtype": _dtype_name(float_dtype),
        "units": unit_docs,
        "all_units": [unit_to_dict(u) for u in units],
        "tensors": {k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for k, t in sorted(plain.items())},
        "tied": tied,
        "expert_slices": slices,
        "manifest": manifest,
        "warnings": list((manifest or {}).get("warnings", [])) if isinstance(manifest, dict) else [],
        "totals": {
            "unit_bits": sum(d["bits"] for d in unit_docs.values()),
            "unit_bytes": sum(d["bytes"] for d in unit_docs.values()),
            "plain_bytes": sum(t.numel() * t.element_size() for t in plain.values()),
        },
    }
    from safetensors.torch import save_file

    with staging_dir(Path(out_dir), overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "mixq", "mixq_version": __version__,
                                                                "schema_version": str(CHECKPOINT_SCHEMA)})
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
        doc = write_artifact(tmp / META_FILE, CHECKPOINT_KIND, CHECKPOINT_SCHEMA, body)
    return doc

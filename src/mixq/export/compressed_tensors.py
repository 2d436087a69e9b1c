"""Write a mixq checkpoint as a Hugging Face directory in the compressed-tensors format (what
vLLM, SGLang and transformers with the `compressed-tensors` package load).

    DIR/
      config.json            the model's config plus `quantization_config`: one `config_groups`
                             entry per distinct scheme with the exact layer names it targets,
                             `ignore` = every other Linear layer (float), `format` the groups'
                             format or `mixed-precision`, `quantization_status` "compressed"
      model.safetensors      per quantized layer `<layer>.weight_packed` / `.weight_scale` /
                             `.weight_shape` (+ `.weight_zero_point`), `<layer>.weight` +
                             `.weight_scale` (FP8), `.weight_packed` / `.weight_scale` /
                             `.weight_global_scale` (NVFP4); every other tensor as mixq stored it
      generation_config.json, tokenizer files   copied from the checkpoint
      mixq_export.json       provenance: the source checkpoint, each unit's scheme and bytes

The codes and scales are the checkpoint's own (no re-quantization): the mapping in
`export.ct_schema` makes compressed-tensors' dequantization give mixq's weights exactly for
INT and FP8 in float32 (a runtime in bf16 rounds the float16 INT scales to bf16 when it loads
them; `dtype="float16"` keeps them exact) and to float rounding for NVFP4, whose global scale
is stored as the reciprocal of mixq's tensor scale.

Packing (`pack_int32`): compressed-tensors' `pack-quantized` stores each row's k-bit fields
q + 2^(k-1) densely in little-endian int32 words, element j at bit j*k of the row; for 4 and
8 bits that is 32/k whole fields per word (8 nibbles, lowest first). Zero points are packed
the same way along the output dimension. NVFP4 packs two E2M1 nibbles per byte, the even
element in the low nibble.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mixq import __version__, formats
from mixq.artifacts import sha256_file, write_artifact
from mixq.errors import ArtifactError, ExportError
from mixq.export.ct_schema import FUSED_ROLES, MIXED, CTScheme, scheme_for
from mixq.export.layout import META_FILE, PLAN_FILE, unit_from_dict
from mixq.formats import QTensor
from mixq.models.units import Unit
from mixq.progress import Progress, track

EXPORT_FILE = "mixq_export.json"
EXPORT_KIND = "export"
EXPORT_SCHEMA = 1
WEIGHTS = "model.safetensors"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# files of a mixq checkpoint that the export replaces or leaves out
_NOT_COPIED = {META_FILE, PLAN_FILE, "config.json", WEIGHTS}


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) unsigned k-bit fields (uint8, each < 2**bits) -> (rows, ceil(cols * bits /
    32)) int32 words, element j of a row at bit j*bits (bits must divide 32)."""
    if 32 % bits:
        raise ValueError(f"pack_int32 packs widths that divide 32, got {bits}")
    per = 32 // bits
    rows, cols = codes.shape
    c = codes.to(torch.int64)
    pad = (-cols) % per
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    shifts = torch.arange(per, dtype=torch.int64) * bits  # (per,)
    words = (c.view(rows, -1, per) << shifts).sum(-1)  # (rows, words) in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits, as signed int32
    return words.to(torch.int32).contiguous()


def unit_tensors(prefix: str, scheme: CTScheme, q: QTensor) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized Linear `prefix` (its module name) from
    mixq's codes and scales `q`."""
    out_dim, in_dim = q.shape
    if scheme.type == "int":
        t = {f"{prefix}.weight_packed": pack_int32(q.codes, scheme.num_bits),
             f"{prefix}.weight_scale": q.scales.to(torch.float16).contiguous(),  # (out, groups): mixq's, signed
             f"{prefix}.weight_shape": torch.tensor([out_dim, in_dim], dtype=torch.int64)}
        if not scheme.symmetric:  # fields zero + 2^(k-1) - 2^(k-1): mixq's zero code, packed along the rows
            t[f"{prefix}.weight_zero_point"] = pack_int32(q.zeros.t().contiguous(), scheme.num_bits).t().contiguous()
        return t
    if scheme.num_bits == 8:  # fp8_e4m3:ch: the codes are E4M3 bit patterns
        return {f"{prefix}.weight": q.codes.contiguous().view(torch.float8_e4m3fn),
                f"{prefix}.weight_scale": q.scales.float().reshape(out_dim, 1).contiguous()}
    # nvfp4: E2M1 nibbles two per byte (even element low), E4M3 block scales, 1 / tensor scale
    codes = q.codes.to(torch.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()  # (out, in / 2)
    ts = float(q.tensor_scale)
    inv = torch.tensor([1.0], dtype=torch.float32) / torch.tensor([ts if ts > 0 else 1.0], dtype=torch.float32)
    return {f"{prefix}.weight_packed": packed,
            f"{prefix}.weight_scale": q.scales.contiguous().view(torch.float8_e4m3fn),
            f"{prefix}.weight_global_scale": inv}


def _module_name(u: Unit) -> str:
    if not u.param.endswith(".weight"):
        raise ExportError(f"unit {u.name!r}: its parameter {u.param!r} is not a module's `weight`")
    return u.param[: -len(".weight")]


def _schemes(doc: dict, units: list[Unit]) -> dict[str, CTScheme | None]:
    """unit -> scheme (None: kept in float) of every planned unit; ExportError naming every
    unit that compressed-tensors cannot hold, and every fused q/k/v or gate/up set whose
    members differ (vLLM runs each set as one layer with the first shard's scheme)."""
    problems: list[str] = []
    bad: set[str] = set()
    schemes: dict[str, CTScheme | None] = {}
    for u in units:
        rec = doc["units"].get(u.name)
        if rec is None:
            continue
        if rec.get("transforms"):
            bad.add(u.name)
            problems.append(f"{u.name}: stored with transforms ({', '.join(sorted(rec['transforms']))}) applied "
                            "online at run time, which compressed-tensors cannot express")
            continue
        try:
            schemes[u.name] = scheme_for(rec["format"], u.shape, kind=u.kind, role=u.role, transposed=u.transposed)
        except ExportError as e:
            bad.add(u.name)
            problems.append(f"{u.name} ({rec['format']}): {e}")
    fused: dict[tuple, list[Unit]] = {}
    for u in units:
        if u.role in FUSED_ROLES and u.block >= 0:
            fused.setdefault((u.block, FUSED_ROLES[u.role]), []).append(u)
    for (block, rule), members in sorted(fused.items()):
        if any(m.name in bad for m in members):
            continue
        seen = {(schemes[m.name].describe() if schemes.get(m.name) else "float") for m in members}
        if len(seen) > 1:
            desc = ", ".join(f"{m.name}={schemes[m.name].describe() if schemes.get(m.name) else 'float'}"
                             for m in members)
            problems.append(f"block {block} {rule}: the fused projections differ ({desc}); plan with --tie {rule} "
                            "(mixq plan --target compressed-tensors ties them)")
    if problems:
        raise ExportError(f"the checkpoint cannot be written as compressed-tensors ({len(problems)} problem(s)): "
                          + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))
    return schemes


def _check_nvfp4_fused(units: list[Unit], schemes: dict, qtensors: dict) -> None:
    """NVFP4 on fused shards: vLLM keeps one global scale per fused layer, so the shards'
    tensor scales must be equal."""
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        s = schemes.get(u.name)
        if s is not None and s.strategy == "tensor_group" and u.role in FUSED_ROLES:
            groups.setdefault((u.block, FUSED_ROLES[u.role]), []).append(u)
    bad = []
    for (block, rule), members in sorted(groups.items()):
        scales = {float(qtensors[m.name].tensor_scale) for m in members}
        if len(scales) > 1:
            bad.append(f"block {block} {rule} ({', '.join(m.name for m in members)})")
    if bad:
        raise ExportError("nvfp4 on fused projections with different tensor scales: vLLM uses one global scale per "
                          f"fused layer. Affected: {'; '.join(bad[:4])}. Plan with mixq plan --target "
                          "compressed-tensors (it keeps nvfp4 off fused projections)")


def _linear_modules(config_path: Path) -> list[str]:
    """Names of every nn.Linear of the model, from its config (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_path.parent))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def quantization_config(schemes: dict[str, CTScheme | None], units: list[Unit], linears: list[str]) -> dict:
    """The `quantization_config` entry of config.json: one group per distinct scheme (in
    order of first use), each targeting its layers by exact name; `ignore` lists every other
    Linear layer."""
    by_scheme: dict[CTScheme, list[str]] = {}
    for u in units:
        s = schemes.get(u.name)
        if s is not None:
            by_scheme.setdefault(s, []).append(_module_name(u))
    quantized = {n for names in by_scheme.values() for n in names}
    groups = {f"group_{i}": {"targets": sorted(names), "weights": s.weights_args(), "input_activations": None,
                             "output_activations": None, "format": s.format}
              for i, (s, names) in enumerate(by_scheme.items())}
    fmts = sorted({s.format for s in by_scheme})
    return {"quant_method": "compressed-tensors", "format": fmts[0] if len(fmts) == 1 else MIXED,
            "quantization_status": "compressed", "config_groups": groups, "kv_cache_scheme": None,
            "global_compression_ratio": None, "ignore": sorted(n for n in linears if n not in quantized),
            "sparsity_config": {}, "transform_config": {}}


def export_compressed_tensors(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None,
                              overwrite: bool = False, progress: Progress | None = None) -> dict:
    """Write the mixq checkpoint directory `checkpoint` as a compressed-tensors directory
    `out_dir` (atomically; an existing one is replaced only with `overwrite`). dtype:
    "bfloat16" | "float16" | "float32" for the unquantized tensors and the config's dtype
    (None: as the checkpoint stored them). Raises ExportError naming every unit the format
    cannot hold (see `export.ct_schema`). Returns the mixq_export.json document."""
    from safetensors.torch import save_file

    from mixq.export.load import _read_tensors, _unit_qtensors, read_checkpoint
    from mixq.export.save import _fsync, check_out_dir, staging_dir

    folder = Path(checkpoint)
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check_out_dir(out_dir, overwrite, EXPORT_FILE)
    doc = read_checkpoint(folder)
    if doc["model"].get("arch", {}).get("family") != "hf_causal_lm":
        raise ExportError(f"checkpoint {folder}: compressed-tensors holds Hugging Face causal LMs; this is a "
                          f"{doc['model'].get('arch', {}).get('family')!r} model")
    all_units = [unit_from_dict(u) for u in doc["all_units"]]
    planned = [u for u in all_units if u.name in doc["units"]]
    schemes = _schemes(doc, planned)
    if not any(s is not None for s in schemes.values()):
        raise ExportError(f"checkpoint {folder} quantizes no Linear layer: there is nothing to write as "
                          "compressed-tensors (the float model is already a Hugging Face model)")
    if doc.get("expert_slices"):
        raise ExportError(f"checkpoint {folder}: partly quantized fused experts cannot be written as "
                          "compressed-tensors")
    tensors = _read_tensors(folder, doc)
    qtensors = _unit_qtensors(tensors, doc, folder)
    _check_nvfp4_fused(planned, schemes, qtensors)
    linears = _linear_modules(folder / "config.json")
    plain_dtype = DTYPES[dtype] if dtype else None

    out: dict[str, torch.Tensor] = {}
    for name in doc["tensors"]:
        t = tensors[name]
        out[name] = t.to(plain_dtype) if (plain_dtype is not None and t.is_floating_point()) else t
    unit_docs: dict[str, dict] = {}
    for u in track(planned, "compressed-tensors", len(planned), progress):
        q, s = qtensors[u.name], schemes[u.name]
        if s is None:  # a float option: the weight as stored, in `ignore`
            w = formats.parse(q.fmt).dequantize(q).to(q.codes.dtype)
            new = {u.param: w.to(plain_dtype) if plain_dtype is not None else w}
        else:
            new = unit_tensors(_module_name(u), s, q)
        clash = sorted(set(new) & set(out))
        if clash:
            raise ArtifactError(f"checkpoint {folder}: tensor {clash[0]!r} of unit {u.name!r} is also stored plain")
        out.update(new)
        unit_docs[u.name] = {"format": q.fmt, "scheme": s.describe() if s else "float (ignored)",
                             "bytes": sum(t.numel() * t.element_size() for t in new.values()),
                             "n_params": u.n_params}
    qcfg = quantization_config(schemes, planned, linears)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    config["quantization_config"] = qcfg
    stored = doc.get("float_dtype")
    if dtype or stored:
        key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
        config[key] = dtype or stored
    n_q = sum(d["n_params"] for n, d in unit_docs.items() if schemes[n] is not None)
    q_bytes = sum(d["bytes"] for n, d in unit_docs.items() if schemes[n] is not None)
    body = {"target": "compressed-tensors", "source": {"checkpoint": str(folder),
                                                       "mixq_json_sha256": sha256_file(folder / META_FILE),
                                                       "model": doc["model"].get("name")},
            "dtype": dtype or stored, "groups": {g: {"scheme": v["weights"], "format": v["format"],
                                                     "n_targets": len(v["targets"])}
                                                 for g, v in qcfg["config_groups"].items()},
            "ignore": qcfg["ignore"], "units": unit_docs,
            "totals": {"quantized_params": n_q, "quantized_bytes": q_bytes,
                       "bits_per_weight_quantized": 8 * q_bytes / n_q if n_q else None,
                       "file_bytes": None}}
    with staging_dir(Path(out_dir), overwrite, EXPORT_FILE) as tmp:
        save_file(out, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": f"mixq {__version__}"})
        _fsync(tmp / WEIGHTS)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.name not in _NOT_COPIED:
                shutil.copy2(p, tmp / p.name)
        body["totals"]["file_bytes"] = (tmp / WEIGHTS).stat().st_size
        result = write_artifact(tmp / EXPORT_FILE, EXPORT_KIND, EXPORT_SCHEMA, body)
    return result

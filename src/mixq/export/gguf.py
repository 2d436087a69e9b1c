"""`export_gguf`: a mixq checkpoint as a GGUF file that llama.cpp runs.

Every planned unit is written with the GGML type of its format (`formats.gguf.ggml_type_of`)
from the codes and block parameters the checkpoint stores, byte for byte: the GGUF formats
as llama.cpp's blocks (`formats.gguf.to_blocks`), `int4:g32` / `int5:g32` as the Q4_0 / Q5_0
blocks they equal, fp16/bf16/fp32 as those types. Nothing is re-quantized. A plan with a unit
GGUF cannot hold (a transform, a format that is no GGML type, a row that is not a whole
number of blocks) is refused before anything is written, naming the units and the nearest
GGUF types (`export.gguf_plan`).

The other tensors: norms as F32 (llama.cpp's convention), embeddings, head and any unplanned
linear in `float_type` (f16 default, f32, bf16, or a GGUF type such as q8_0, quantized here
by mixq's round to nearest). A head tied to the embeddings is written once, as
token_embd.weight (llama.cpp uses it as the output then).

Llama's rotary layout: convert_hf_to_gguf.py permutes the rows of q_proj and k_proj (per head,
the two halves of the rotary pairs interleaved); so does this writer, moving whole rows of
codes and block parameters, which keeps every block intact. Metadata: `export.gguf_meta`.
The file is written beside its destination and renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from mixq import __version__, formats
from mixq.errors import ArtifactError, MixqError
from mixq.export.gguf_meta import check_llama, from_config, from_gguf, head_counts
from mixq.export.gguf_plan import gguf_refusal, refusal_message, tensor_name
from mixq.export.layout import PLAN_FILE
from mixq.formats.gguf import GGUFFormat, ggml_type_of, int_to_gguf, to_blocks
from mixq.plan import Plan
from mixq.progress import Progress, track

FLOAT_TYPES = ("f16", "f32", "bf16")
GGML_QNT_VERSION = 2  # general.quantization_version of the current block layouts


def _permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order of a q/k projection in llama.cpp's rotary layout: new[i] = old[idx[i]]."""
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def _float_array(t: torch.Tensor, ggml: str):
    """(numpy data, raw GGML type or None) of a float tensor in F32/F16/BF16."""
    import gguf

    x = t.detach().float().cpu().numpy()
    if ggml == "F32":
        return x.astype(np.float32), None
    if ggml == "F16":
        return x.astype(np.float16), None
    if ggml == "BF16":
        return gguf.quants.quantize(x.astype(np.float32), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    raise AssertionError(ggml)


def _unit_array(q: formats.QTensor):
    """(numpy data, raw GGML type or None) of a stored unit, exactly as stored."""
    import gguf

    fmt = formats.parse(q.fmt)
    ggml = ggml_type_of(fmt)
    if ggml in ("F32", "F16", "BF16"):
        return _float_array(fmt.dequantize(q), ggml)
    if not isinstance(fmt, GGUFFormat):
        q = int_to_gguf(q)  # int4:g32 / int5:g32: the same codes and scales as Q4_0 / Q5_0
    return to_blocks(q), gguf.GGMLQuantizationType[ggml]


def _other_array(name: str, t: torch.Tensor, float_type: str):
    """A tensor that is no planned unit: 1-D as F32, 2-D in `float_type`."""
    import gguf

    if t.dim() == 1:
        return _float_array(t, "F32")
    if float_type in FLOAT_TYPES:
        return _float_array(t, float_type.upper())
    fmt = formats.parse(float_type)
    why = fmt.supports(tuple(t.shape))
    if why is not None:
        raise MixqError(f"--float-type {float_type}: tensor {name} {tuple(t.shape)} cannot take it ({why}); "
                        f"use f16, f32, bf16 or a type whose blocks divide {t.shape[1]}")
    return to_blocks(fmt.quantize(t.float())), gguf.GGMLQuantizationType[fmt.ggml_type]


def _file_type(types: list[str]) -> int:
    """general.file_type: the MOSTLY_X of a single quantized type, else GUESSED."""
    import gguf

    quant = {t for t in types if t not in ("F32", "F16", "BF16")}
    if len(quant) == 1:
        name = f"MOSTLY_{quant.pop()}"
        if name in gguf.LlamaFileType.__members__:
            return int(gguf.LlamaFileType[name])
    if not quant:
        return int(gguf.LlamaFileType.MOSTLY_F16 if "F16" in types else gguf.LlamaFileType.ALL_F32)
    return int(gguf.LlamaFileType.GUESSED)


def check_exportable(doc: dict, plan: Plan) -> None:
    """Raise MixqError naming every unit of the checkpoint that a GGUF tensor cannot hold."""
    bad = {}
    for name, u in doc["units"].items():
        opt = plan.options[name]
        shape = (int(u["shape"][0]), int(u["shape"][1]))
        why = gguf_refusal(opt, shape)
        if why is None and "transforms" in u:
            why = f"stored with transforms {sorted(u['transforms'])}, which llama.cpp does not run"
        if why is not None:
            bad[name] = (opt, shape, why)
    if bad:
        raise MixqError(refusal_message(bad))


def export_gguf(checkpoint: str | os.PathLike, out: str | os.PathLike, *, float_type: str = "f16",
                metadata_from: str | os.PathLike | None = None, tokenizer_pre: str | None = None,
                overwrite: bool = False, progress: Progress | None = None) -> dict:
    """Write the GGUF of a mixq checkpoint directory to `out`; returns a summary (path,
    bytes, tensor types, bits per weight of the planned units, metadata source, warnings).

    float_type: type of embeddings, head and unplanned 2-D tensors (f16, f32, bf16 or a
    GGUF type such as q8_0). metadata_from: a GGUF whose architecture and tokenizer metadata
    to copy (default: the model's own source GGUF when it came from one, else config.json
    and the tokenizer files). tokenizer_pre: llama.cpp's pre-tokenizer name, when mixq does
    not recognise the tokenizer's."""
    import gguf
    from safetensors.torch import load_file

    from mixq.export.load import load_qtensors, read_checkpoint
    from mixq.models.load import source_gguf

    folder, out = Path(checkpoint), Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if float_type not in FLOAT_TYPES and not isinstance(formats.parse(float_type), GGUFFormat):
        raise MixqError(f"--float-type {float_type}: expected f16, f32, bf16 or a GGUF type (q8_0, q6_k, ...)")
    doc = read_checkpoint(folder)
    plan = Plan.load(folder / PLAN_FILE)
    check_exportable(doc, plan)
    if not (folder / "config.json").is_file():
        raise ArtifactError(f"checkpoint {folder}: config.json is missing (GGUF export needs the model's config)")
    config = json.loads((folder / "config.json").read_text())
    check_llama(config, str(folder))

    warnings: list[str] = []
    meta_path = Path(metadata_from) if metadata_from else source_gguf(doc["model"].get("name", ""))
    if meta_path is not None:
        if not meta_path.is_file():
            raise ArtifactError(f"--metadata-from {meta_path}: no such file")
        kv, meta_source = from_gguf(meta_path, config), str(meta_path)
    else:
        kv, warnings = from_config(folder, config, tokenizer_pre)
        meta_source = f"{folder}/config.json and tokenizer files"

    n_blocks = int(config["num_hidden_layers"])
    n_head, n_kv = head_counts(config)
    qtensors = load_qtensors(folder, verify=False)  # read_checkpoint verified the files above
    plain = load_file(str(folder / doc["weights_file"]))
    embed = "model.embed_tokens.weight"
    tied = {k: g for g in doc["tied"] for k in g}

    def source_name(hf_name: str) -> str:  # a head tied to the embeddings is token_embd
        return embed if embed in tied.get(hf_name, ()) else hf_name
    entries: list[tuple[str, object, object]] = []  # (gguf name, data, raw type)
    written: set[str] = set()

    def add(hf_name: str, data, raw) -> None:
        name = tensor_name(source_name(hf_name).removesuffix(".weight"), n_blocks)
        if name in written:
            return
        written.add(name)
        rows_perm = None
        if name.endswith("attn_q.weight"):
            rows_perm = _permutation(data.shape[0], n_head)
        elif name.endswith("attn_k.weight"):
            rows_perm = _permutation(data.shape[0], n_kv)
        if rows_perm is not None:
            data = data[rows_perm.numpy()]  # whole rows: codes and block parameters move together
        entries.append((name, np.ascontiguousarray(data), raw))

    unit_types = Counter()
    unit_bits = unit_params = 0
    for name in track(list(doc["units"]), "gguf units", len(doc["units"]), progress):
        data, raw = _unit_array(qtensors[name])
        u = doc["units"][name]
        unit_types[ggml_type_of(formats.parse(u["format"]))] += 1
        unit_bits += 8 * data.nbytes
        unit_params += int(u["shape"][0]) * int(u["shape"][1])
        add(u["param"], data, raw)
    for hf_name in doc["tensors"]:
        data, raw = _other_array(hf_name, plain[hf_name], float_type)
        add(hf_name, data, raw)

    all_types = [str(raw.name) if raw is not None else ("F16" if d.dtype == np.float16 else "F32")
                 for _, d, raw in entries]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        for key, value, vtype, sub in kv:
            writer.add_key_value(key, value, vtype, sub)
        writer.add_file_type(_file_type(list(unit_types)))
        writer.add_quantization_version(GGML_QNT_VERSION)
        writer.add_quantized_by(f"mixq {__version__}")
        for name, data, raw in entries:
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"path": str(out), "bytes": out.stat().st_size, "n_tensors": len(entries),
            "tensor_types": dict(Counter(all_types)), "unit_types": dict(unit_types),
            "bpw_units": unit_bits / unit_params if unit_params else None, "float_type": float_type,
            "metadata": meta_source, "warnings": warnings}

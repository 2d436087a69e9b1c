"""GGUF checkpoints: dequantized to float once, cached by the file's sha256, and described.

A GGUF file holds a quantized model; transformers dequantizes it on load, which takes from
seconds (SmolLM2-135M) to minutes (Gemma-3 270M: about 80 s here). `dequantized(path)`
does it once and keeps the float model and its tokenizer in
`<cache>/models/gguf-<sha256[:16]>/`, beside `mixq-gguf.json` (the full hash, the source
path, the file type and the tensor types). The same bytes under another name hit the same
cache entry; changed bytes miss it. Hashes of large files are remembered in
`<cache>/gguf/hashes.json` by (path, size, mtime), so a hit costs no re-hashing.

Every baseline loaded from a GGUF carries a note (`baseline_note`) saying that its "float"
numbers are those of a dequantized quantized model, naming the GGUF's tensor types.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from mixq.errors import NotFoundError

log = logging.getLogger(__name__)

INFO_FILE = "mixq-gguf.json"
_BLOCK = 1 << 20


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file says about itself: its file type (e.g. "Q4_K_M"), the number of
    tensors of each type (e.g. {"Q4_K": 169, "Q6_K": 29, "F32": 141}), its architecture."""

    file_type: str
    tensor_types: dict[str, int]
    architecture: str

    def types_text(self) -> str:
        """'Q4_K x169, Q6_K x29, F32 x141': quantized types first, most tensors first."""
        order = sorted(self.tensor_types.items(), key=lambda kv: (kv[0] in ("F32", "F16", "BF16"), -kv[1], kv[0]))
        return ", ".join(f"{t} x{n}" for t, n in order)


@dataclass(frozen=True)
class DequantizedGGUF:
    """A cached float copy of a GGUF model: `folder` loads with `from_pretrained`."""

    folder: Path
    sha256: str
    info: GGUFInfo
    source: Path


def _cache_dir() -> Path:
    from mixq.models.load import cache_dir

    return cache_dir()


def _require_gguf() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise NotFoundError("loading a GGUF checkpoint needs the `gguf` package: pip install gguf (or 'mixq[llm]')")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered by (resolved path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    index = _cache_dir() / "gguf" / "hashes.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    sha = digest.hexdigest()
    known = known if isinstance(known, dict) else {}
    known[key] = sha
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_name(f".{index.name}.{os.getpid()}")
    tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    os.replace(tmp, index)
    return sha


def gguf_info(path: Path) -> GGUFInfo:
    """File type and tensor types of a GGUF file, read from its header with `gguf.GGUFReader`."""
    _require_gguf()
    import gguf

    reader = gguf.GGUFReader(str(path))
    counts = Counter(t.tensor_type.name for t in reader.tensors)

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    ftype = field("general.file_type")
    try:
        file_type = gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else "unknown"
    except ValueError:
        file_type = f"file type {ftype}"
    return GGUFInfo(file_type, dict(counts), str(field("general.architecture") or "unknown"))


def baseline_note(info: GGUFInfo, what: str) -> str:
    """The note every report on a GGUF-loaded model carries."""
    return (f"baseline is {what} dequantized from a {info.file_type} GGUF (tensor types {info.types_text()}): "
            "its 'float' numbers are those of an already quantized model")


def dequantized(path: str | os.PathLike) -> DequantizedGGUF:
    """The cached float copy of GGUF file `path`, dequantizing it (once) when absent."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"GGUF file {path} not found")
    sha = file_sha256(path)
    folder = _cache_dir() / "models" / f"gguf-{sha[:16]}"
    meta = folder / INFO_FILE
    if (folder / "config.json").is_file() and meta.is_file():
        try:
            doc = json.loads(meta.read_text())
            if doc.get("sha256") == sha:
                info = GGUFInfo(doc["file_type"], dict(doc["tensor_types"]), doc["architecture"])
                return DequantizedGGUF(folder, sha, info, path)
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("cache entry %s is damaged; dequantizing %s again", folder, path)
    info = gguf_info(path)
    _dequantize_into(path, folder, {"sha256": sha, "source": str(path.resolve()), "file_type": info.file_type,
                                    "tensor_types": info.tensor_types, "architecture": info.architecture})
    return DequantizedGGUF(folder, sha, info, path)


def _dequantize_into(path: Path, folder: Path, doc: dict) -> None:
    """Dequantize GGUF `path` with transformers and save it (float32) with its tokenizer into
    `folder`, atomically (temp directory + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("dequantizing %s to float (once; cached at %s)", path, folder)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The GGUF loader marks the model as quantized, which save_pretrained refuses; the
    # weights are already plain float tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

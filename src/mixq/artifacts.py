"""Versioned JSON artifacts, written atomically (temp file + rename).

Every artifact carries `kind`, `schema_version`, the mixq version, and whatever the stage
records (seed, input hashes). Loading checks kind and schema and raises `ArtifactError` on a
mismatch, never a silent misapplication.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mixq import __version__
from mixq.errors import ArtifactError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that the file appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def dumps(obj: Any) -> str:
    """Deterministic JSON text: sorted keys, fixed indentation, trailing newline."""
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n"


def write_artifact(path: str | os.PathLike, kind: str, schema_version: int, body: dict) -> dict:
    """Write a JSON artifact atomically; returns the full document written."""
    doc = {"kind": kind, "schema_version": schema_version, "mixq_version": __version__, **body}
    atomic_write_bytes(path, dumps(doc).encode())
    return doc


def read_artifact(path: str | os.PathLike, kind: str, schema_version: int | tuple[int, ...]) -> dict:
    """Read a JSON artifact, checking that it is of `kind` at `schema_version` (or one of
    several versions this mixq reads)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file (expected a mixq {kind} artifact)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); expected a mixq {kind} artifact") from e
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        got = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        raise ArtifactError(f"{path}: is a {got!r} artifact, expected {kind!r}")
    accepted = (schema_version,) if isinstance(schema_version, int) else tuple(schema_version)
    if doc.get("schema_version") not in accepted:
        raise ArtifactError(
            f"{path}: {kind} schema_version {doc.get('schema_version')!r}, this mixq "
            f"({__version__}) reads schema_version {' or '.join(map(str, accepted))}; re-run the stage that made it"
        )
    return doc


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()

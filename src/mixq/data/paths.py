"""Where the shared evaluation data lives.

The data is never copied into the repository: it is read from `$MIXQ_DATA_DIR` when set,
else from `../shared/data` beside the repository checkout, else from `./shared/data` or
`../shared/data` relative to the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from mixq.errors import NotFoundError

ENV_VAR = "MIXQ_DATA_DIR"


def candidate_dirs() -> list[Path]:
    """The data directories mixq looks in, in order of preference.

    `$MIXQ_DATA_DIR`, when set, is the only candidate: a user who names a directory should
    get an error about that directory, not a silent fallback to another copy.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env).expanduser()]
    # src/mixq/data/paths.py -> parents[3] is the repository root; the data sits beside it.
    repo = Path(__file__).resolve().parents[3]
    cands = [repo.parent / "shared" / "data", Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    unique: list[Path] = []
    for c in cands:
        if c not in unique:
            unique.append(c)
    return unique


def _hint() -> str:
    return f"set {ENV_VAR} to the directory holding the shared evaluation data (see ../shared/data/README.md)"


def data_dir() -> Path:
    """The first existing data directory; `NotFoundError` naming every place looked if none."""
    cands = candidate_dirs()
    for c in cands:
        if c.is_dir():
            return c
    looked = ", ".join(str(c) for c in cands)
    raise NotFoundError(f"evaluation data directory not found; looked in: {looked}; {_hint()}")


def data_file(rel: str | os.PathLike) -> Path:
    """The path of `rel` inside the first data directory that holds it.

    Raises `NotFoundError` naming every path tried when no candidate directory has the file.
    """
    cands = candidate_dirs()
    tried = [c / rel for c in cands]
    for p in tried:
        if p.is_file():
            return p
    looked = ", ".join(str(p) for p in tried)
    raise NotFoundError(f"data file {str(rel)!r} not found; looked at: {looked}; {_hint()}")

"""Environment switches set for one measurement and restored after it (the benchmarks' routes
and kernel choices read MIXQ_* variables at every call)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def temp_env(env: dict[str, str]):
    """Set the variables of `env` for the block; afterwards each is back to its old value (or
    unset, if it was)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, val in saved.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val

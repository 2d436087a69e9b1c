"""mixq's decode-step and transform Triton kernels compile for an sm_90 GPU, checked on a
machine without one (tests/_compile_sm90.py: Triton's compiler and ptxas run on the CPU). The
kernel tests on the CPU run under Triton's interpreter, which never sees the errors only the
compiler raises (operand dtypes of tl.dot, layouts, what follows a constexpr branch's return),
so these would otherwise first show on a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
HERE = Path(__file__).resolve().parent


def test_decode_and_transform_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh cache: every kernel really compiles
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(HERE / "_compile_sm90.py")], env=env, capture_output=True, text=True,
                         timeout=600)
    if res.returncode == 2 and res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    lines = res.stdout.splitlines()
    assert res.returncode == 0, "\n".join([ln for ln in lines if ln.startswith("FAIL")] + [res.stderr[-2000:]])
    assert sum(ln.startswith("ok ") for ln in lines) >= 30, res.stdout  # every case ran

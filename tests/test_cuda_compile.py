"""mixq's CUDA kernels (kernels/csrc/*.cu: the GEMVs, the tensor-core GEMMs, the Hadamard
transform) compile with nvcc on a machine without a GPU, with the flags the extension build
uses on first use (-O3, C++17, `cuda_gemv.arch_flags` of the device): for sm_90 (sm_90a, with
the wgmma GEMM) and sm_80 (without it). On sm_90a, ptxas must not serialize the wgmmas (its
warning C7513: registers a wgmma reads written while a group is in flight), which would make
every product wait for the previous one. Skipped where no nvcc is found (PATH, CUDA_HOME,
/usr/local/cuda). The torch binding (.cpp) needs torch's CUDA headers and is built only on a
GPU machine."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mixq.kernels import cuda_gemv


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _nvcc()
CU_SOURCES = [s for s in cuda_gemv.SOURCES if s.endswith(".cu")]


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("cc", [(9, 0), (8, 0)])
@pytest.mark.parametrize("source", CU_SOURCES)
def test_cuda_source_compiles(source, cc, tmp_path):
    csrc = Path(cuda_gemv.CSRC)
    res = subprocess.run([NVCC, "-O3", "-std=c++17", *cuda_gemv.arch_flags(*cc), f"-I{csrc}", "-c",
                          str(csrc / source), "-o", str(tmp_path / "k.o")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nvcc {source}:\n{res.stderr[-4000:]}"
    assert (tmp_path / "k.o").stat().st_size > 0
    assert "C7513" not in res.stderr, f"ptxas serializes wgmmas in {source}:\n{res.stderr[-2000:]}"


def test_every_cuda_source_is_built():
    """The extension builds every .cu file in csrc (a new kernel file left out of SOURCES would
    never be compiled or tested)."""
    on_disk = sorted(p.name for p in Path(cuda_gemv.CSRC).glob("*.cu"))
    assert sorted(CU_SOURCES) == on_disk

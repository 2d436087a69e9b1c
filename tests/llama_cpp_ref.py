"""llama.cpp's own (de)quantization of one row type, through ctypes on the ggml library the
`llama-cpp-python` package ships (tests only): `dequantize_row_<type>` and
`quantize_row_<type>_ref` / `quantize_<type>` with an importance matrix, as ggml-quants.h
declares them. None when the package is not installed."""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np


def ggml_library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
            hits = sorted(Path(loc).rglob(name))
            if hits:
                return ctypes.CDLL(str(hits[0]))
    return None


_F32P = ctypes.POINTER(ctypes.c_float)


def dequantize(lib: ctypes.CDLL, type_name: str, data: np.ndarray, n: int) -> np.ndarray:
    """(n,) float32: llama.cpp's dequantize_row_<type> of `data` (the blocks of n elements)."""
    fn = getattr(lib, f"dequantize_row_{type_name}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, _F32P, ctypes.c_int64]
    src = np.ascontiguousarray(data, dtype=np.uint8)
    out = np.empty(n, dtype=np.float32)
    fn(src.ctypes.data, out.ctypes.data_as(_F32P), n)
    return out


def quantize_ref(lib: ctypes.CDLL, type_name: str, x: np.ndarray, n_bytes: int) -> np.ndarray:
    """llama.cpp's reference quantization quantize_row_<type>_ref of x (n,) float32."""
    fn = getattr(lib, f"quantize_row_{type_name}_ref")
    fn.restype = None
    fn.argtypes = [_F32P, ctypes.c_void_p, ctypes.c_int64]
    src = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(n_bytes, dtype=np.uint8)
    fn(src.ctypes.data_as(_F32P), out.ctypes.data, src.size)
    return out

"""Run mixq's Triton kernels on the CPU with Triton's interpreter (TRITON_INTERPRET=1, which
executes @triton.jit functions on numpy), for machines without a CUDA GPU.

`enable()` sets TRITON_INTERPRET=1 (it must happen before any kernel module is imported:
@triton.jit reads it when a function is decorated) and works around two interpreter bugs of
Triton 3.6 that the kernels hit:
* `range(a, b, step)` over a runtime int argument calls `int()` on a one-element numpy
  array, an error from numpy 2.4 on (the patch reads the element);
* `tl.dot` on bfloat16 operands multiplies their raw uint16 bit patterns (bf16 is stored as
  uint16 there); the patch widens them to float32 first.
Inline PTX (`tl.inline_asm_elementwise`) cannot run there: the kernels' asm paths are GPU-only.
"""

from __future__ import annotations

import importlib.util
import os


def enable() -> bool:
    """True when the interpreter is set up (triton importable, TRITON_INTERPRET not 0)."""
    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET", "1") != "1":
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import numpy as np
        import triton.language as tl
        import triton.runtime.interpreter as ti
    except Exception:  # a broken triton install: kernel tests skip
        return False
    if getattr(ti, "_mixq_patched", False):
        return True
    patch_tensor = getattr(ti, "_patch_lang_tensor", None)
    if patch_tensor is not None:
        def _patched(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        ti._patch_lang_tensor = _patched
    builder = getattr(ti, "InterpreterBuilder", None)
    if builder is not None and hasattr(builder, "create_dot"):
        create_dot = builder.create_dot

        def _widen(h):
            if h.dtype == tl.bfloat16:
                return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
            return h

        def _dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            return create_dot(self, _widen(a), _widen(b), d, input_precision, max_num_imprecise_acc)

        builder.create_dot = _dot
    ti._mixq_patched = True
    return True

"""Compile mixq's decode-step and transform Triton kernels for an sm_90 (Hopper) GPU without
one: Triton's front end, its NVIDIA passes and ptxas run on the CPU, so errors that only the
compiler raises (operand dtypes, layouts, constexpr branches), which Triton's interpreter never
sees, show on a machine with no GPU. Run as a script with TRITON_INTERPRET unset (the
interpreter replaces @triton.jit functions); prints one line per case, "ok NAME" or
"FAIL NAME: error", and exits 1 on a failure. tests/test_triton_compile.py runs it.
"""

from __future__ import annotations

import inspect
import sys

FLOATS = {"eps", "scale", "scaling", "hscale", "rope_scaling"}


def signature(fn, consts: dict, ptrs: dict, default_ptr: str) -> dict:
    names = list(inspect.signature(fn.fn).parameters)
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = ptrs.get(n, default_ptr)
        else:
            sig[n] = "fp32" if n in FLOATS else "i32"
    return sig


def cases():
    from mixq.kernels import decode_attention as A
    from mixq.kernels import decode_ops as D
    from mixq.kernels import transform as T

    half = "*bf16"
    norm_ptrs = dict(s_ptr="*fp32", sg_ptr="*fp32")
    for split, dt, hm in [(True, "*bf16", "*bf16"), (True, "*fp16", "*bf16"), (False, "*fp32", "*fp32")]:
        for f1, f2 in [(64, 64), (16, 32), (1, 128), (1, 16)]:
            block = 4096 if f1 == 1 else f1 * f2
            yield (f"add_rms_norm+transform {dt} F1={f1} F2={f2}", D._add_rms_norm_kernel,
                   dict(HAS_DELTA=True, BLOCK=block, HAS_S=True, ROTATE=True, F1=f1, F2=f2, PRECISION="tf32x3",
                        SPLIT=split, GDC=True), {**norm_ptrs, "h1_ptr": hm, "h2_ptr": hm}, dt)
            yield (f"transform {dt} F1={f1} F2={f2}", T._transform_kernel,
                   dict(HAS_S=True, ROTATE=True, F1=f1, F2=f2, BLOCK_M=16, PRECISION="tf32x3", SPLIT=split, GDC=True),
                   {"s_ptr": "*fp32", "d_ptr": "*fp32", "h1_ptr": hm, "h2_ptr": hm}, dt)
    for delta in (True, False):
        yield (f"add_rms_norm delta={delta}", D._add_rms_norm_kernel,
               dict(HAS_DELTA=delta, BLOCK=8192, HAS_S=False, ROTATE=False, F1=1, F2=16, PRECISION="ieee", SPLIT=False,
                    GDC=True), {}, half)
    yield ("add_rms_norm smooth only", D._add_rms_norm_kernel,
           dict(HAS_DELTA=True, BLOCK=8192, HAS_S=True, ROTATE=False, F1=1, F2=16, PRECISION="ieee", SPLIT=False,
                GDC=False), norm_ptrs, half)
    yield ("transform smooth only", T._transform_kernel,
           dict(HAS_S=True, ROTATE=False, F1=1, F2=128, BLOCK_M=16, PRECISION="tf32x3", SPLIT=True, GDC=True),
           {"s_ptr": "*fp32", "d_ptr": "*fp32", "h1_ptr": half, "h2_ptr": half}, half)
    yield ("rope_to_cache", D._rope_cache_kernel, dict(D=128, GDC=True), {"pos_ptr": "*i64", "f_ptr": "*fp32"}, half)
    yield ("silu_mul", D._silu_mul_kernel, dict(BLOCK=1024, GDC=True), {}, half)
    ws = {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32"}
    for rope in (False, True):
        yield (f"decode attention partial rope={rope}", A._attn_partial_kernel,
               dict(G=4, BLOCK_G=16, D=128, BLOCK_N=A.ATTN_BLOCK_N, IEEE=False, ROPE=rope, GDC=True),
               {"pos_ptr": "*i64", "f_ptr": "*fp32", **ws}, half)
    yield ("decode attention combine", A._attn_combine_kernel, dict(G=4, BLOCK_G=16, D=128, BLOCK_S=16, GDC=True),
           ws, half)
    yield ("argmax partial", D._argmax_partial_kernel, dict(BLOCK=D.ARGMAX_BLOCK, GDC=True),
           {"v_ptr": "*fp32", "i_ptr": "*i64"}, half)
    yield ("argmax combine", D._argmax_combine_kernel, dict(BLOCK_P=32, GDC=True),
           {"v_ptr": "*fp32", "i_ptr": "*i64", "o_ptr": "*i64"}, half)


def _probe(target) -> str | None:
    """None when this Triton can compile a trivial kernel for the target (an NVIDIA backend
    with its ptxas), else why not."""
    import triton
    import triton.language as tl
    from triton.compiler import ASTSource

    @triton.jit
    def _copy(x_ptr, y_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i))

    try:
        triton.compile(ASTSource(fn=_copy, signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
                                 constexprs={(2,): 16}), target=target)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    why = _probe(target)
    if why is not None:
        print(f"SKIP this Triton cannot compile for sm_90 here: {why[:300]}")
        return 2
    failed = 0
    for name, fn, consts, ptrs, default_ptr in cases():
        sig = signature(fn, consts, ptrs, default_ptr)
        names = list(sig)
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
        try:
            triton.compile(src, target=target)
            print(f"ok {name}", flush=True)
        except Exception as e:  # report every case, not only the first
            failed += 1
            root = e  # the compiler's own message sits under the source excerpts
            while (root.__cause__ or root.__context__) is not None and type(root).__name__ == "CompilationError":
                root = root.__cause__ or root.__context__
            print(f"FAIL {name}: {type(e).__name__}: {type(root).__name__}: {str(root).strip()[-300:]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

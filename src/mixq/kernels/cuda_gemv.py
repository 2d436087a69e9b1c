"""Hand-written CUDA kernels for int4 and 3-bit weights on mixq's packed layout as it is: a GEMV
for batch 1..8 and a tensor-core GEMM for int4 at any batch.

    if cuda_gemv.supports(kw.layout, x):      # int4 / int3 (sym or asym), fp16 group scales, M <= 8
        y = cuda_gemv.qmatmul(x, kw, bias)    # None if the extension could not be built
    if cuda_gemv.gemm_supports(kw.layout, x): # int4 (sym or asym), fp16 group scales, any M
        y = cuda_gemv.gemm(x, kw, bias)       # None if the extension could not be built

The GEMM (`csrc/gemm_int4.cu`) gives each lane the GEMV's work on kT tiles of 8 activation rows:
a weight is decoded once into (code - zero) * scale in x's dtype and feeds kT mma.m16n8k16
products; the warps of a block take consecutive 16-row weight tiles over the same chunks, the
next chunk's weights in registers, while the block's activations are staged in shared memory
(cp.async, double-buffered, two chunks at a time). K is divided by split K or stream-K (every
block the same number of chunks, across tiles); partial tiles go through a workspace in fragment
order and the block that completes a tile sums its slots in order (one launch, no atomics on
the data, deterministic). Measured on the H200 (bench/bench_gemm.py): it beats the Triton
tensor-core kernel for int4 with zero points or groups under 128 inputs, past 64 rows, and
where it runs stream-K from 17 rows; `gemm_preferred` routes accordingly.

On sm_90 (H100, H200) the extension is built for sm_90a and also holds a Hopper GEMM
(`GemmConfig.wgmma`, the same file): each warpgroup decodes 64 weight rows the same way into
the A fragments of wgmma.m64nNk16 (A from registers) and multiplies them by N = 16..128
activation rows that the block rewrites, per 128-input chunk, from a cp.async ring into the
B operand in the decoded K order (shared memory, no swizzle). It takes every batch above 16
rows there (`pick_wgmma_config`), except 33-64 rows on weights under 6144 rows, where the
Triton kernel measured faster. MIXQ_WGMMA=0 turns it off (a benchmark switch).

8-bit codes (groups of >= 128 inputs or per channel) run `gemv_int8`: int4's work split with
32 codes per lane and row per 128-input chunk, a pair of codes gathered by one PRMT and made
half-precision magic + code by one LOP3 (bf16: the low seven bits and the top bit as two mmas
on one accumulator), scales after the product.

3-bit codes (the 3-word units of `kernels.packed`) run `gemv_int3`: 512-input chunks (each
lane loads 16 bytes of each of the three planes), pairs of codes 16 bits apart decoded into
half-precision magic + code by one LOP3 (after a shift for 6 of 16 pairs; 24 LOP3s and 8
shifts per 32 codes), (code - zero) * scale formed in x's dtype, the same mma.m16n8k16 and
reduction as int4.

Same math and the same `KernelWeights` as `triton_qmm` (no repacking): codes are row-major
int32 words of 8 LSB-first 4-bit codes, scales float16 (N, n_groups), optional uint8 zeros.
The kernel (`csrc/gemv_int4.cu`) streams the codes with 16-byte loads (a warp load reads 8
rows x 64 contiguous bytes), decodes 2 codes per LOP3 into half-precision `magic + code`,
and multiplies on the tensor cores (mma.m16n8k16: 16 weight rows x up to 8 activation rows,
fp32 accumulation); see the .cu file's header for the layout of a lane's work and the scale
handling. A block holds one or two 16-row tiles and its warps split the input dimension,
summing through shared memory, so every call is one launch with no atomics or zero-fill.

For LM-head-sized int4 weights (more than 65536 rows, up to 4 activation rows) and for every
int4 weight at one activation row the GEMV keeps more bytes in flight than two register
buffers can: each warp streams its chunks through a ring of 4 slots in shared memory
(cp.async, 16 bytes per lane and row, each lane reading back what it copied), the scales in a
register ring beside it (`GemvConfig.stages`; 77 vs 89 µs on 128256x4096 on the H200), three
chunks per warp issued before the kernel waits on the previous one (PDL), so that in the
decode loop they stream while the glue kernels before it run (`_decode_ring`).
`qmatmul(..., silu_mul=True)` computes silu(gate) * up from a fused [gate; up] int4 or 3-bit
weight in the same launch. MIXQ_GEMV_STAGES=0|4|8 and MIXQ_GEMV3_POST=0 are
benchmark switches (every shape on one pipeline; the pre-scaled 3-bit kernel for every group
size up to 8 rows).

The same extension holds `norm_transform` (`csrc/hadamard.cu`): the online input transform
((r / s) * d) H_b of a unit for rotation blocks of 256..8192 inputs, a block of b / 8 threads
per block of inputs doing the Walsh-Hadamard butterflies in registers, across lanes and
through shared memory, optionally of r = RMSNorm(h + delta) * w in the same launch (the decode
loop's norm feeding q/k/v or gate/up); `kernels.transform` and `decode_ops.add_rms_norm` use
it where it applies (MIXQ_CUDA_TRANSFORM=0: the Triton kernels).

The extension compiles on first use on a CUDA machine (torch.utils.cpp_extension.load,
`-arch` of the current device, sm_80 or newer; ~1 minute, cached under the torch extensions
directory). If compilation fails, a warning is logged once and `qmatmul` returns None so the
caller takes the Triton or reference path. Set MIXQ_NO_CUDA_GEMV=1 to never build it.
`kernels.qmatmul` tries it first only with MIXQ_CUDA_GEMV=1 (see `preferred`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from mixq.kernels.packed import KernelWeights, PackedLayout
from mixq.kernels.workspace import Workspace

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("gemv_int4.cpp", "gemv_int4.cu", "gemm_int4.cu", "hadamard.cu")
HEADERS = ("gemv_int4.h", "common.cuh", "wgmma.cuh")
MAX_BATCH = 8  # one B tile of 8 activation rows (3-bit with groups under 128 inputs)
MAX_BATCH_TWO_TILES = 16  # two B tiles from 9 rows (each decoded weight meets both): int4, int8, 3-bit g >= 128

_lock = threading.Lock()
_ext = None
_error: str | None = None


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape: 16-row tiles per warp (1, 2), chunks of 128 inputs in flight per warp
    beyond the one being decoded (1, 2), warps per block (1..16; they split the input dim),
    and `stages`: 0 for that two-buffer register pipeline, or 4 / 8 for a ring of that many
    chunk slots per warp in shared memory, filled by cp.async, stages - 1 chunks in flight
    (int4 only, unroll 1; `ring_bytes` of shared memory per block)."""

    row_tiles: int = 1
    unroll: int = 1
    warps: int = 4
    stages: int = 0

    def ring_bytes(self) -> int:
        """Shared memory of the cp.async ring: 1 KiB per slot, row tile and warp."""
        return self.warps * self.stages * self.row_tiles * 1024


MAX_RING_BYTES = 160 * 1024  # below the 227 KiB a block may have on sm_90, leaving room for L1


@dataclass(frozen=True)
class GemmConfig:
    """Launch shape of the tensor-core GEMM: 16-row weight tiles per warp (1, 2), 8-row
    activation tiles per block (1, 2, 4, 8; further rows go to further blocks), warps per
    block (1..8, each on its own rows), and K slices (split-K blocks per output tile); or
    `stream_k`: as many blocks as fit on the device at once, each taking the same number of
    128-input chunks, across tile boundaries (split is then unused). `wgmma`: the Hopper kernel
    (sm_90a, `wgmma_available`): row_tiles 1, warps 4 or 8 (one or two warpgroups of 64 weight
    rows), n_tiles 2, 4, 8 or 16 (16 to 128 activation rows per tile, one wgmma.m64nNk16 per
    16 inputs)."""

    row_tiles: int = 2
    n_tiles: int = 2
    warps: int = 8
    split: int = 1
    stream_k: bool = False
    wgmma: bool = False


def build_error() -> str | None:
    """Why the extension is unavailable (None if it built or was never tried)."""
    return _error


def arch_flags(major: int, minor: int, wgmma: bool = True) -> list[str]:
    """nvcc flags for a device of compute capability major.minor: its own architecture; on sm_90
    (H100, H200), unless not `wgmma`, the architecture-specific sm_90a, which the wgmma GEMM
    needs, with MIXQ_WGMMA defined so that the kernel is built."""
    if wgmma and (major, minor) == (9, 0):
        return ["-gencode=arch=compute_90a,code=sm_90a", "-DMIXQ_WGMMA=1"]
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]


def _build():
    from torch.utils import cpp_extension

    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise RuntimeError(f"needs sm_80 or newer (bf16 mma), device is sm_{major}{minor}")
    def load(flags: list[str]):
        digest = hashlib.sha1()
        for name in SOURCES + HEADERS:
            digest.update((CSRC / name).read_bytes())
        digest.update(" ".join(flags).encode())
        return cpp_extension.load(
            name=f"mixq_gemv_int4_{digest.hexdigest()[:12]}", sources=[str(CSRC / s) for s in SOURCES],
            extra_include_paths=[str(CSRC)], extra_cflags=["-O3"], extra_cuda_cflags=["-O3", *flags], verbose=False)

    flags = arch_flags(major, minor)
    plain = arch_flags(major, minor, wgmma=False)
    try:
        return load(flags)
    except Exception as e:
        if flags == plain:
            raise
        # an nvcc without sm_90a (CUDA < 12): the same kernels for plain sm_90, without wgmma
        log.warning("mixq: the sm_90a build failed (%s); building for sm_90 without the wgmma GEMM",
                    str(e)[:300])
        return load(plain)


def extension():
    """The compiled extension module, building it on first call; None if unavailable."""
    global _ext, _error
    if _ext is not None or _error is not None:
        return _ext
    with _lock:
        if _ext is None and _error is None:
            if os.environ.get("MIXQ_NO_CUDA_GEMV"):
                _error = "disabled by MIXQ_NO_CUDA_GEMV"
            elif not torch.cuda.is_available():
                _error = "no CUDA device"
            else:
                try:
                    _ext = _build()
                except Exception as e:  # compiler missing, unsupported device, build error
                    _error = f"{type(e).__name__}: {e}"
                    log.warning("mixq CUDA int4 GEMV unavailable, using the Triton/reference path: %s",
                                _error[:2000])
    return _ext


def pre_scaled(layout: PackedLayout) -> bool:
    """Groups under 128 inputs (and not one per row): a 128-input chunk spans several scales, so
    the kernels scale each weight before the product instead of each chunk's sum after it."""
    return layout.group_size < min(128, layout.in_features)


def layout_supported(layout: PackedLayout) -> bool:
    """int4 (in_features a multiple of 32), 3-bit codes (in_features a multiple of 128;
    off with MIXQ_CUDA_GEMV3=0) or int8 (a multiple of 128, groups of >= 128 inputs), with an
    integer grid, float16 scales, no tensor scale, power-of-two groups >= 32 (or one group per
    row)."""
    g, k = layout.group_size, layout.in_features
    if layout.bits == 3:
        if os.environ.get("MIXQ_CUDA_GEMV3", "1") == "0" or k % 128:
            return False
    elif layout.bits == 8:  # post-scaled only: whole 128-input chunks per group
        if k % 128 or pre_scaled(layout):
            return False
    elif layout.bits != 4 or k % 32:
        return False
    return (layout.value_mode == "affine" and layout.scale_mode == "fp16" and not layout.has_tensor_scale
            and (g >= k or (g >= 32 and g & (g - 1) == 0)))


def max_batch(layout: PackedLayout) -> int:
    """Most activation rows the GEMV takes for this layout: 16 (two B tiles from 9 rows), 8 for
    3-bit codes with groups under 128 inputs (their pre-scaled kernel has one B tile)."""
    if layout.bits == 3 and pre_scaled(layout):
        return MAX_BATCH
    return MAX_BATCH_TWO_TILES


def supports(layout: PackedLayout, x: torch.Tensor) -> bool:
    """True when the CUDA kernel can take `x` (2-D, M <= `max_batch` rows) with this layout
    (the extension itself is built lazily by `qmatmul`)."""
    return (x.is_cuda and x.dim() == 2 and 1 <= x.shape[0] <= max_batch(layout)
            and x.dtype in (torch.float16, torch.bfloat16) and layout_supported(layout))


def _enabled() -> bool:
    """The extension may be used: MIXQ_CUDA_GEMV is not 0 and no build has failed."""
    return os.environ.get("MIXQ_CUDA_GEMV", "1") != "0" and _error is None


def preferred(layout: PackedLayout, x: torch.Tensor) -> bool:
    """Whether `kernels.qmatmul` should try this kernel first: where it is supported, unless
    its build already failed or MIXQ_CUDA_GEMV=0. On the H100 (bench/KERNEL_NOTES.md,
    2026-11-26) it passed every GPU test and matched or beat the Triton GEMV at batch 1-8."""
    return _enabled() and supports(layout, x)


def pick_config(m: int, layout: PackedLayout, n_sms: int = 132) -> GemvConfig:
    """Launch shape: the fastest configuration of the H100 sweep (bench/bench_gemv.py,
    2026-11-26) for each measured Llama-3-8B shape and batch 1/8 — two row tiles per warp and
    16 warps for 4096-row outputs, 4 warps (2 for the 128256-row head past batch 4) for taller
    ones — which the H200 sweep (bench_tc.py, 2026-11-30) confirmed, plus its choices for
    4097..8192 rows (fused q/k/v) and 3-bit codes; from the H200 sweep of 2026-12-01, one row
    tile only for wide batch-1 matrices and the cp.async ring for LM heads up to batch 4; from
    the decode loop (2026-12-01), the ring for every int4 weight at batch 1 (`_decode_ring`).
    int8 takes int4's warps with one row tile below 8 rows (not swept). From 9 rows (two B
    tiles), the H200 sweep of bench/bench_gemv16.py (2026-12-01): `_two_tiles_config` for int4,
    warps per shape for int8 (from 8 rows) and 3-bit."""
    n, k = layout.out_features, layout.in_features
    if layout.bits == 8:  # one row tile; below 8 rows int4's warps (not swept)
        warps = 16 if n <= 4096 else (8 if n <= 8192 else 4)
        if m >= MAX_BATCH:  # H200 sweep at 8-16 rows (bench_gemv16.py, 2026-12-01): 8 warps on 4096 rows, else 4
            warps = 8 if n <= 4096 else 4
        while warps > 1 and k // 128 < warps:
            warps //= 2
        return GemvConfig(row_tiles=1, unroll=1, warps=warps)
    if layout.bits == 3:  # H200 sweep (bench_tc.py, 2026-11-30): 8 warps, 4 for tall batch-1 weights
        warps = 4 if (n > 8192 and m == 1) else 8
        if m > 1 and 8192 < n <= 16384:  # H200, 2 warps at 2-16 rows (bench_gemv16.py; bench_gemv.py --int3-warps on
            warps = 2  # the interleaved 3-bit units, 2026-12-01): 14336x4096 at 8 rows 17.5 vs 19.5 us, at 16 26.7 vs 31.9
        chunks = -(-k // 512)
        while warps > 1 and chunks < warps:
            warps //= 2
        return GemvConfig(row_tiles=1, unroll=1, warps=warps)
    if m > MAX_BATCH:  # two B tiles
        return _with_stages(_two_tiles_config(n, k), m)
    if n <= 4096:
        warps = 16
    elif n <= 8192:  # fused q/k/v (6144 rows) on the H200: one row tile, 8 warps
        warps = 8 if -(-k // 128) >= 8 else max(1, -(-k // 128))
        return _with_stages(_decode_ring(m, GemvConfig(row_tiles=1, unroll=1, warps=warps)), m)
    elif n > 65536 and m > 4:
        warps = 2
    else:
        warps = 4
    chunks = -(-k // 128)
    while warps > 1 and chunks < warps:  # every warp keeps at least one chunk of 128 inputs
        warps //= 2
    # H200 (bench_gemv.py, 2026-12-01): at batch 1 one row tile for wide matrices (4096x14336:
    # 13.7 vs 14.3 us), two for square and tall ones (14336x4096: 14.1 vs 14.6)
    row_tiles = 1 if (m == 1 and k > n) else 2
    if n > 65536 and m <= 4:  # LM heads: the cp.async ring (H200, 128256x4096: 80.7 vs 88.9 us at m=1)
        return _with_stages(GemvConfig(row_tiles=2, unroll=1, warps=4, stages=4), m)
    return _with_stages(_decode_ring(m, GemvConfig(row_tiles=row_tiles, unroll=1, warps=warps)), m)


def _two_tiles_config(n: int, k: int) -> GemvConfig:
    """int4 at 9-16 rows: the fastest launch of the H200 sweep (bench/bench_gemv16.py,
    2026-12-01, 9/12/16 rows, `gemv16.json`): one row tile and 8 warps for 4096x4096, two and
    16 warps on the ring for wide weights (4096x14336), one and 4 for 4097-8192 rows (6144x4096),
    two and 4 on the ring up to 16384 rows (14336x4096), two and 2 beyond (28672x4096; the ring
    past 65536 rows: the LM head)."""
    if n <= 4096:
        cfg = GemvConfig(1, 1, 8) if k <= n else GemvConfig(2, 1, 16, 4)
    elif n <= 8192:
        cfg = GemvConfig(1, 1, 4)
    elif n <= 16384:
        cfg = GemvConfig(2, 1, 4, 4)
    else:
        cfg = GemvConfig(2, 1, 2, 4 if n > 65536 else 0)
    chunks = -(-k // 128)
    while cfg.warps > 1 and chunks < cfg.warps:  # every warp keeps at least one chunk of 128 inputs
        cfg = GemvConfig(cfg.row_tiles, 1, cfg.warps // 2, cfg.stages)
    return cfg


def gemv_beats_gemm(layout: PackedLayout, m: int) -> bool:
    """Whether the GEMV (two B tiles) takes 9-16 activation rows from the other kernels. 3-bit
    codes (groups of >= 128 inputs) and int8: always (H200, bench/bench_gemv16.py, 2026-12-01,
    `gemv16_other.json`, µs at 9 / 16 rows, GEMV vs the route before: int3:g128 14336x4096 28.5 /
    31.6 vs 51.1 / 50.5 (the older Triton kernel), 4096x14336 26.2 / 29.5 vs 41.9 / 41.2,
    28672x4096 51.3 / 60.3 vs 95.3 / 95.4; int8:ch 14336x4096 25.5 / 27.1 vs 29.8 / 31.1 (the
    Triton tensor-core kernel), 4096x14336 24.1 / 25.9 vs 28.0 / 29.3, 6144x4096 13.5 / 13.5 vs
    16.4 / 16.9). int4: 9-12 rows without zero points, except on 4097-8192-row weights (fused
    q/k/v) and LM heads (> 65536 rows), where the Triton kernel measured faster. H200,
    bench/bench_gemv16.py (2026-12-01, `gemv16.json`, int4:g128, µs, GEMV vs the route before):
    14336x4096 at 9 / 12 rows 19.1 / 19.8 vs 25.1 / 26.0 (Triton), 4096x4096 8.8 / 8.8 vs 11.1 /
    11.3, 4096x14336 18.6 / 19.2 vs 23.5 / 24.0, 28672x4096 33.6 / 34.3 vs 47.4 / 48.9; int4:g64
    19.6 / 20.3 vs 22.3 / 22.0 (CUDA GEMM); 6144x4096 11.7 vs 10.6 (Triton). Zero points: 21.7 /
    22.5 vs 22.0 / 21.6 (CUDA GEMM), so they stay. At 16 rows the routes tie (14336x4096: 20.3 vs
    19.9), so they stay too."""
    if os.environ.get("MIXQ_GEMV_TWO_TILES") == "0":  # benchmark switch: the routes before
        return False
    n = layout.out_features
    if layout.bits in (3, 8):
        return MAX_BATCH < m <= max_batch(layout)
    return (layout.bits == 4 and not layout.has_zeros and MAX_BATCH < m <= 12 and not 4096 < n <= 8192
            and n <= 65536)


def _decode_ring(m: int, cfg: GemvConfig) -> GemvConfig:
    """At one activation row, the cp.async ring (4 slots) for every int4 weight: it issues three
    chunks per warp before the kernel waits on the previous one (PDL), where the register pipeline
    issues two, so more of each matmul's weights stream while the decode step's glue kernels run.
    H200 decode loop (bench_e2e.py, Llama-3-8B shape, batch 1, 2026-12-01, one run): int4 1.98
    ms/token with the ring on every GEMV against 2.01 with the register pipeline on every GEMV,
    mixed-4.25 2.38 vs 2.48, int4 with smoothing and rotation 2.14 vs 2.30; in a run before, the
    ring on all but the wide down_proj (which alone, in the PDL chain of bench_transforms.py, was
    0.6 us faster without it) took 2.15, slower than either."""
    if m != 1 or cfg.stages:
        return cfg
    ring = GemvConfig(cfg.row_tiles, 1, cfg.warps, 4)
    return ring if ring.ring_bytes() <= MAX_RING_BYTES else cfg


def _with_stages(cfg: GemvConfig, m: int = 1) -> GemvConfig:
    """`cfg`, or with MIXQ_GEMV_STAGES=0/4/8 set (a tuning switch for benchmarks), that pipeline
    instead (8 slots become 4 above MAX_BATCH rows), with warps halved until the ring fits
    MAX_RING_BYTES."""
    forced = os.environ.get("MIXQ_GEMV_STAGES")
    if forced is None:
        return cfg
    if forced not in ("0", "4", "8"):
        raise ValueError(f"MIXQ_GEMV_STAGES={forced!r}: expected 0, 4 or 8")
    if forced == "8" and m > MAX_BATCH:
        forced = "4"
    out = GemvConfig(cfg.row_tiles, 1 if forced != "0" else cfg.unroll, cfg.warps, int(forced))
    while out.ring_bytes() > MAX_RING_BYTES:
        out = GemvConfig(out.row_tiles, out.unroll, out.warps // 2, out.stages)
    return out


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _rows_ok(t: torch.Tensor) -> bool:
    """2-D, unit column stride, 16-byte aligned rows (8 half-precision values)."""
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0


def _operands(x: torch.Tensor, bias: torch.Tensor | None, lay: PackedLayout, ok: bool, expected: str):
    """(extension, x, bias) ready for a kernel: x with 16-byte aligned unit-stride rows, bias
    contiguous in x's dtype; None when the extension is unavailable; ValueError naming what
    was expected when the kernel does not take this input."""
    if not ok or x.shape[-1] != lay.in_features:
        raise ValueError(f"{expected}; got {tuple(x.shape)} {x.dtype} on {x.device} for {lay.fmt}")
    ext = extension()
    if ext is None:
        return None
    if not _rows_ok(x):
        x = x.clone(memory_format=torch.contiguous_format)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    return ext, x, bias


def _check_config(cfg: GemvConfig, m: int = 1) -> None:
    """ValueError naming the limits when `cfg` is not a launch shape of the int4 GEMV for `m`
    activation rows."""
    if (cfg.row_tiles not in (1, 2) or cfg.unroll not in (1, 2) or not 1 <= cfg.warps <= 16
            or cfg.stages not in (0, 4, 8) or (cfg.stages and cfg.unroll != 1) or cfg.ring_bytes() > MAX_RING_BYTES):
        raise ValueError(f"cuda_gemv: {cfg} is not a launch shape: row_tiles 1 or 2, unroll 1 or 2, warps 1..16, "
                         f"stages 0, 4 or 8 (unroll 1 with a ring), a ring of at most {MAX_RING_BYTES} bytes "
                         f"(warps x stages x row_tiles KiB)")
    if m > MAX_BATCH and (cfg.unroll != 1 or cfg.stages == 8):
        raise ValueError(f"cuda_gemv: {cfg} is not a launch shape for {m} activation rows: above {MAX_BATCH} rows "
                         f"the int4 GEMV takes unroll 1 and stages 0 or 4")


def silu_mul_supported(layout: PackedLayout, x: torch.Tensor) -> bool:
    """Whether `qmatmul(..., silu_mul=True)` takes this weight and input: int4 or 3-bit codes, an
    even number of rows (the gate half, then the up half), and the batch `supports` takes."""
    return layout.bits in (3, 4) and layout.out_features % 2 == 0 and supports(layout, x)


def qmatmul(x: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None = None,
            config: GemvConfig | None = None, out: torch.Tensor | None = None,
            silu_mul: bool = False) -> torch.Tensor | None:
    """`x @ dequant(W)^T (+ bias)` for x of shape (M <= 8, in_features), bf16 or fp16, in x's
    dtype (fp32 accumulation). With `silu_mul` (int4 or 3-bit, W = [gate; up] of 2H rows):
    silu(gate) * up, (M, H), each rounded as the separate matmuls and `decode_ops.silu_mul` round
    it, in one launch (an int4 block takes 16 gate rows and the same 16 up rows, a 3-bit block 8
    and 8 as the two halves of its 16-row tile). Returns None when the
    extension is unavailable (the caller falls back); raises ValueError for inputs `supports`
    rejects."""
    lay = kw.layout
    ok = silu_mul_supported(lay, x) if silu_mul else supports(lay, x)
    ready = _operands(x, bias, lay, ok, f"cuda_gemv takes (M <= {max_batch(lay)}, {lay.in_features}) "
                      f"bf16/fp16 CUDA input and int4, int8 or 3-bit fp16-scale layouts (M <= {MAX_BATCH_TWO_TILES}; "
                      f"3-bit with groups under 128 inputs M <= {MAX_BATCH})"
                      + (" (silu_mul: int4 or 3-bit with an even number of rows)" if silu_mul else ""))
    if ready is None:
        return None
    ext, x, bias = ready
    if silu_mul and lay.bits == 4:  # two row tiles, gate and up; the launch of a weight of half the rows
        half = dataclasses.replace(lay, out_features=lay.out_features // 2)
        cfg = config or pick_config(x.shape[0], half, _sm_count(x.device))
        cfg = GemvConfig(2, 1, cfg.warps, cfg.stages)
    else:
        cfg = config or pick_config(x.shape[0], lay, _sm_count(x.device))
    if lay.bits == 3:
        return ext.gemv_int3(x, kw.codes, kw.scales, kw.zeros, bias, out, lay.group_size, lay.code_offset, cfg.warps,
                             silu_mul)
    if lay.bits == 8:
        return ext.gemv_int8(x, kw.codes, kw.scales, kw.zeros, bias, out, lay.group_size, lay.code_offset, cfg.warps)
    _check_config(cfg, x.shape[0])
    return ext.gemv_int4(x, kw.codes, kw.scales, kw.zeros, bias, out, lay.group_size, lay.code_offset,
                         pre_scaled(lay), cfg.row_tiles, cfg.unroll, cfg.stages, cfg.warps, silu_mul)


# --------------------------------------------------------------------------- tensor-core GEMM

def gemm_layout_supported(layout: PackedLayout) -> bool:
    """int4 codes (in_features a multiple of 32), integer grid, float16 scales, no tensor scale,
    power-of-two groups >= 32 or one group per row."""
    return layout.bits == 4 and layout_supported(layout)


def gemm_supports(layout: PackedLayout, x: torch.Tensor) -> bool:
    """True when the tensor-core GEMM can take `x` (2-D bf16/fp16 on CUDA) with this layout."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] >= 1 and x.dtype in (torch.float16, torch.bfloat16)
            and gemm_layout_supported(layout))


def pick_wgmma_config(m: int, layout: PackedLayout, n_sms: int = 132) -> GemmConfig:
    """The Hopper kernel's launch, from the H200 sweep (bench/bench_gemm.py, 2026-12-01,
    bench/results_h200/gemm_wgmma.json): two warpgroups (128 weight rows per block), N the
    smallest of 16, 32, 64, 128 covering the batch (more rows: further activation tiles); then
    stream-K from 48 output tiles (14336x4096 at 128 rows: 58.2 vs 62.0 µs without a split;
    6144x4096 at 64: 22.0 vs 23.5), else split K while the blocks fit in one wave (one block per
    SM at these register counts; 4096x4096 at 64 rows: 4 slices, 17.0 µs), each slice keeping
    at least 2 chunks of 128 inputs."""
    n, k = layout.out_features, layout.in_features
    n_tiles = 2
    while n_tiles < 16 and 8 * n_tiles < m:
        n_tiles *= 2
    tiles = -(-n // 128) * -(-m // (8 * n_tiles))
    if tiles >= 48:
        return GemmConfig(row_tiles=1, n_tiles=n_tiles, warps=8, stream_k=True, wgmma=True)
    chunks = -(-k // 128)
    split = 1
    while tiles * split * 2 <= n_sms and chunks >= 2 * split * 2:
        split *= 2
    return GemmConfig(row_tiles=1, n_tiles=n_tiles, warps=8, split=split, wgmma=True)


def pick_gemm_config(m: int, layout: PackedLayout, n_sms: int = 132, wgmma: bool = False) -> GemmConfig:
    """From the H200 sweeps (bench/bench_gemm.py, 2026-11-30): activation tiles to cover the
    batch (up to 64 rows per block), two 16-row weight tiles per warp and 8 warps (256 weight
    rows per block); then stream-K where there are at least 48 output tiles (14336x4096: 43.9
    vs 46.7 µs at 64 rows, 21.7 vs 22.2 at 16), else split K until there are about 2 blocks per
    SM up to 16 activation rows and 1 beyond (at 32 rows: 34.4 vs 37.6 µs on 14336x4096, 15.3
    vs 20.1 on 4096x4096), every slice keeping at least 2 chunks of 128 inputs. With `wgmma`
    (an sm_90 device, `wgmma_available`) and more than 16 rows: `pick_wgmma_config`."""
    if wgmma and m > 16:
        return pick_wgmma_config(m, layout, n_sms)
    n, k = layout.out_features, layout.in_features
    n_tiles = 1
    while n_tiles < 8 and 8 * n_tiles < m:
        n_tiles *= 2
    row_tiles, warps = 2, 8
    tiles = -(-n // (16 * row_tiles * warps)) * -(-m // (8 * n_tiles))
    if tiles >= 48:
        return GemmConfig(row_tiles=row_tiles, n_tiles=n_tiles, warps=warps, stream_k=True)
    chunks = -(-k // 128)
    target = (2 if m <= 16 else 1) * n_sms
    split = 1
    while tiles * split * 2 <= target and chunks >= 2 * split * 2:
        split *= 2
    return GemmConfig(row_tiles=row_tiles, n_tiles=n_tiles, warps=warps, split=split)


def gemm_smem_bytes(cfg: GemmConfig) -> int:
    """Dynamic shared memory of a launch: two buffers of the block's activations, 8 n_tiles
    rows x 256 inputs, rows padded by 16 bytes (csrc/gemm_int4.cu)."""
    return 2 * 8 * cfg.n_tiles * 33 * 16


_WGMMA_BUILT: bool | None = None  # the built extension's answer, asked once


def wgmma_available() -> bool:
    """Whether the extension has the Hopper GEMM (`GemmConfig.wgmma`): built for sm_90a, on an
    sm_90 device; not with MIXQ_WGMMA=0 (a benchmark switch)."""
    global _WGMMA_BUILT
    if os.environ.get("MIXQ_WGMMA", "1") == "0" or not _enabled():
        return False
    if _WGMMA_BUILT is None:
        ext = extension()
        if ext is None:
            return False
        _WGMMA_BUILT = bool(ext.gemm_wgmma_built())
    return _WGMMA_BUILT


def gemm_available(layout: PackedLayout, x: torch.Tensor) -> bool:
    """Whether the tensor-core GEMM can run here: supported, the extension's build has not
    failed, and neither MIXQ_CUDA_GEMM=0 nor MIXQ_CUDA_GEMV=0 (the whole extension) is set."""
    return os.environ.get("MIXQ_CUDA_GEMM", "1") != "0" and _enabled() and gemm_supports(layout, x)


def gemm_preferred(layout: PackedLayout, x: torch.Tensor) -> bool:
    """Whether `kernels.qmatmul` takes the tensor-core GEMM above the GEMV's batch sizes: where
    it measured faster than the Triton tensor-core kernel on the H200 (bench/bench_gemm.py,
    2026-11-30, bench/results_h200/gemm*.json): int4 with zero points (g128 asym at 16 rows
    on 14336x4096: 21.7 vs 26.1 µs; g64 asym 22.9 vs 27.4), with groups under 128 inputs (g32:
    23.1 vs 202 µs), past 64 activation rows (g128 at 128 rows: 77.7 vs 99.8 µs), and from 17
    rows where it runs stream-K (48 output tiles or more: 14336x4096 at 64 rows 43.9 vs 45.6 µs,
    28672x4096 75.3 vs 85.1). Symmetric g128 / per-channel int4 otherwise stays with the Triton
    kernel (14336x4096 at 16 rows: 20.0 vs 21.7 µs; 4096x4096 at 64: 16.1 vs 19.7)."""
    if not gemm_available(layout, x):
        return False
    m = x.shape[0]
    slow_on_triton = layout.has_zeros or pre_scaled(layout)
    if m > 16 and wgmma_available():
        # the Hopper kernel: ahead of both others from 17 rows (14336x4096 at 64 rows: 38-41 vs
        # 43.6 µs; at 128: 56-59 vs 74), except on weights of under 48 blocks of 128 rows at 33-64
        # rows, where the Triton kernel is (4096x4096 at 64: 15.9 vs 17.1 µs)
        return slow_on_triton or not (32 < m <= 64 and -(-layout.out_features // 128) < 48)
    if slow_on_triton or m > 64:
        return True
    return m > 16 and pick_gemm_config(m, layout, _sm_count(x.device)).stream_k


_WS = Workspace(zeroed=False)  # partial sums are stored, not accumulated: any contents
_WS_NEED: dict[tuple, tuple[int, int]] = {}


def gemm(x: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None = None, config: GemmConfig | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor | None:
    """`x @ dequant(W)^T (+ bias)` on the tensor cores for x of shape (M, in_features), any M,
    bf16 or fp16, in x's dtype (fp32 accumulation; each weight rounded once to x's dtype).
    Returns None when the extension is unavailable (the caller falls back); raises ValueError
    for inputs `gemm_supports` rejects."""
    lay = kw.layout
    ready = _operands(x, bias, lay, gemm_supports(lay, x), f"cuda_gemv.gemm takes (M, {lay.in_features}) "
                      f"bf16/fp16 CUDA input and int4 fp16-scale layouts")
    if ready is None:
        return None
    ext, x, bias = ready
    m, n, k = x.shape[0], lay.out_features, lay.in_features
    cfg = config or pick_gemm_config(m, lay, _sm_count(x.device), wgmma=wgmma_available())
    split = max(1, min(cfg.split, -(-k // 128)))
    key = (x.device.index, m, n, k, lay.group_size, cfg, split, x.dtype)
    need = _WS_NEED.get(key)
    if need is None:  # the extension plans the launch (stream-K depends on the device's occupancy)
        need = tuple(ext.gemm_int4_workspace(m, n, k, lay.group_size, cfg.row_tiles, cfg.n_tiles, cfg.warps, split,
                                             cfg.stream_k, cfg.wgmma, x.dtype == torch.bfloat16, x.device.index or 0))
        _WS_NEED[key] = need
    if need[0] > 0:
        ws, cnt = _WS.get(x.device, need[0], need[1])
    else:
        ws = cnt = kw.codes  # unused
    return ext.gemm_int4(x, kw.codes, kw.scales, kw.zeros, bias, out, ws, cnt, lay.group_size, lay.code_offset,
                         cfg.row_tiles, cfg.n_tiles, cfg.warps, split, cfg.stream_k, cfg.wgmma)


def _vector_ok(t: torch.Tensor, n: int, dtype: torch.dtype, device: torch.device) -> bool:
    return (t.dim() == 1 and t.numel() == n and t.dtype == dtype and t.device == device and t.is_contiguous()
            and t.data_ptr() % 16 == 0)


def norm_transform_supported(x: torch.Tensor, block: int | None) -> bool:
    """Whether `norm_transform` takes rows like x (..., n): a CUDA bf16/fp16 tensor, a rotation
    block of 256..8192 inputs (a power of two) dividing n; not with MIXQ_CUDA_TRANSFORM=0 or
    without the extension."""
    if os.environ.get("MIXQ_CUDA_TRANSFORM", "1") == "0" or block is None:
        return False
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and 256 <= block <= 8192
            and block & (block - 1) == 0 and x.shape[-1] % block == 0):
        return False
    return extension() is not None


def norm_transform(h: torch.Tensor, signs: torch.Tensor, block: int, *, smooth: torch.Tensor | None = None,
                   delta: torch.Tensor | None = None, weight: torch.Tensor | None = None, eps: float = 0.0,
                   h_out: torch.Tensor | None = None) -> torch.Tensor | None:
    """((r / smooth) * signs) blockdiag(H_block) of the rows of h (rows, n), in h's dtype, with
    r = h, or r = RMSNorm(h + delta) * weight (Hugging Face's rounding) when weight is given,
    h + delta then written into h_out; one launch (`csrc/hadamard.cu`). None when the
    operands do not fit it (`norm_transform_supported`, fp32 contiguous smooth and signs,
    weight in h's dtype, 16-byte aligned rows): the caller takes the Triton kernel."""
    if not norm_transform_supported(h, block) or not _rows_ok(h) or (delta is not None and not _rows_ok(delta)):
        return None
    n, dev = h.shape[-1], h.device
    if not _vector_ok(signs, n, torch.float32, dev) or (smooth is not None and not _vector_ok(smooth, n, torch.float32, dev)):
        return None
    if weight is not None and not _vector_ok(weight, n, h.dtype, dev):
        return None
    if (delta is not None and weight is None) or (h_out is not None and not _rows_ok(h_out)):
        return None
    y = torch.empty_like(h, memory_format=torch.contiguous_format)
    extension().norm_transform(h, delta, weight, smooth, signs, h_out, y, block, float(eps))
    return y

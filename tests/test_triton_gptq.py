"""The fused GPTQ kernel (`kernels.triton_gptq`) against a plain torch column loop of the same
static-group GPTQ (the loop of `quantizers.gptq` with parameters fixed up front).

On a CPU the kernel runs under the Triton interpreter, which must be switched on before
Triton kernels are defined:

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 PYTHONPATH=src python -m pytest -q tests/test_triton_gptq.py

Without it (and without a CUDA GPU) these tests skip. The `gpu` test runs the compiled
kernel on a 4096 x 4096 weight.

Agreement: the kernel rounds exactly as `formats.fixed.round_columns` and does the OBS
update with the same float operations, so codes agree except where float summation order
(the lazy batch matmul) decides an exact tie; we require >= 99.9 % equal codes, values
exactly (code - offset) * step, and the loss within 1e-5 relative.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from mixq.errors import DataError
from mixq.formats.fixed import group_params, round_columns
from mixq.formats.intk import IntFormat
from mixq.quantizers.gptq import inverse_cholesky

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
    pytest.mark.skipif(HAS_TRITON and not (HAS_CUDA or INTERPRET),
                       reason="no CUDA GPU and TRITON_INTERPRET=1 not set (the kernel needs one)"),
]

if HAS_TRITON:
    from mixq.kernels import triton_gptq as tg

DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"


def _codes_ref(fmt: IntFormat, x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Codes of x for fixed step/zero, as IntFormat._encode makes them."""
    k = fmt.code_bits
    y = x / step
    if fmt.asym:
        return torch.clamp(torch.round(y) + zero, 0, 2**k - 1)
    return torch.clamp(torch.round(y), -(2 ** (k - 1)), 2 ** (k - 1) - 1) + 2 ** (k - 1)


def reference_gptq(W, U, step_cols, zero_cols, fmt: IntFormat, block_size: int):
    """The module's pure-torch reference (the column loop of `quantizers.gptq`)."""
    Q, codes, loss = tg.gptq_static_reference(W, U, step_cols, zero_cols, fmt.code_bits, fmt.asym, block_size)
    return Q, codes.float(), loss


def _problem(rows: int, cols: int, fmt: IntFormat, seed: int = 0, device: str = DEVICE, n_samples: int = 0):
    """A random weight and SPD Hessian in act order, with static-group parameters gathered per
    column: (W (R, C), U (C, C), step_cols, zero_cols | None)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen).to(device)
    # correlated inputs with uneven scales: a Hessian far from diagonal
    n = n_samples or 2 * cols
    mix = (torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)).to(device)
    gain = torch.rand(cols, generator=gen).add(0.1).to(device)
    x = torch.randn(n, cols, generator=gen).to(device) @ mix * gain  # (n, C)
    H = 2 * x.T @ x / n  # (C, C) SPD
    params = group_params(fmt, w)
    perm = torch.argsort(torch.diagonal(H), descending=True)
    W, H = w[:, perm], H[perm][:, perm]
    U = inverse_cholesky(H, 0.01)[0]
    g = fmt.group_size_for(cols)
    step_cols = tg.gather_columns(params.step, g, cols, perm)
    zero_cols = tg.gather_columns(params.zero, g, cols, perm) if fmt.asym else None
    return W.contiguous(), U.contiguous(), step_cols, zero_cols


def _offset(fmt: IntFormat, zero_cols):
    return zero_cols if fmt.asym else 2.0 ** (fmt.code_bits - 1)


def _check_against_reference(fmt, W, U, step_cols, zero_cols, block_size, min_equal=0.999):
    Q, codes, loss = tg.gptq_static(W, U, step_cols, zero_cols, fmt.code_bits, fmt.asym, block_size)
    Q_ref, codes_ref, loss_ref = reference_gptq(W, U, step_cols, zero_cols, fmt, block_size)
    rows, cols = W.shape
    assert Q.shape == (rows, cols) and Q.dtype == torch.float32
    assert codes.shape == (rows, cols) and codes.dtype == torch.uint8
    assert loss.shape == (rows,) and loss.dtype == torch.float64
    equal = (codes.float() == codes_ref).float().mean().item()
    assert equal >= min_equal, f"{fmt}: only {equal:.5f} of codes equal the reference"
    # values are exactly the codes on the grid, and within the format's code range
    steps = step_cols.expand(rows, cols)
    assert torch.equal(Q, (codes.float() - _offset(fmt, zero_cols)) * steps)
    assert int(codes.max()) <= 2**fmt.code_bits - 1
    # ... and the grid's own rounding of them gives them back (on the grid)
    assert torch.equal(round_columns(fmt, Q, steps, zero_cols.expand(rows, cols) if fmt.asym else None), Q)
    rel = abs(float(loss.sum()) - float(loss_ref.sum())) / float(loss_ref.sum())
    assert rel <= 1e-5, f"{fmt}: loss {float(loss.sum())} vs reference {float(loss_ref.sum())}"
    assert W.isfinite().all()
    return equal


# -- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("group_size", [32, 0])
def test_gptq_static_matches_torch_loop(bits, asym, group_size):
    fmt = IntFormat(bits, group_size, asym=asym)
    W, U, step_cols, zero_cols = _problem(37, 96, fmt, seed=bits + 10 * asym)
    if not asym:
        assert (step_cols < 0).any() and (step_cols > 0).any()  # signed steps exercised
    _check_against_reference(fmt, W, U, step_cols, zero_cols, block_size=32)


@pytest.mark.parametrize("block_size,cols", [(1, 20), (48, 150), (128, 150)])
def test_block_sizes_and_partial_last_block(block_size, cols):
    """One column per block, blocks that are not a power of two, and the 128 maximum with a
    partial last block."""
    fmt = IntFormat(4, 32 if cols > 32 else 0)
    W, U, step_cols, zero_cols = _problem(21, cols, fmt, seed=3)
    _check_against_reference(fmt, W, U, step_cols, zero_cols, block_size)


@pytest.mark.parametrize("spec", ["int4:g32", "int3:g16:asym", "int8:ch", "int2:t"])
def test_reference_is_gptq_with_act_order(spec):
    """The reference (hence the kernel) reproduces `quantizers.gptq.gptq(act_order=True)`
    exactly: static groups gathered per column in act order, reordered back."""
    from mixq import formats
    from mixq.quantizers.gptq import gptq

    fmt = formats.parse(spec)
    rows, cols = 23, 80
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(rows, cols, generator=gen).to(DEVICE)
    x = (torch.randn(160, cols, generator=gen) * torch.rand(cols, generator=gen)).to(DEVICE)
    H = 2 * x.T @ x / 160
    q, info = gptq(w, H, fmt, block_size=32, act_order=True)
    w_hat = fmt.dequantize(q)
    perm = torch.argsort(torch.diagonal(H), descending=True)
    p = group_params(fmt, w)
    g = fmt.group_size_for(cols)
    step_cols = tg.gather_columns(p.step, g, cols, perm)
    zero_cols = tg.gather_columns(p.zero, g, cols, perm) if fmt.asym else None
    U = inverse_cholesky(H[perm][:, perm], 0.01)[0]
    Q, codes, loss = tg.gptq_static(w[:, perm].contiguous(), U, step_cols, zero_cols, fmt.code_bits, fmt.asym, 32)
    back = torch.argsort(perm)
    assert torch.equal(Q[:, back], w_hat)
    assert abs(float(loss.sum()) - info.loss) <= 1e-6 * info.loss


@pytest.mark.parametrize("spec", ["int4:g32", "int3:g16:asym", "int4:g40:mse", "int8:g200"])
def test_gptq_dynamic_is_gptq_without_act_order(spec):
    """Groups whose parameters come from the updated weights (act_order=False): equal to
    `quantizers.gptq.gptq` with block_size = g (one group per block), with a partial last
    group (80 columns in groups of 32; 300 in groups of 200, each wider than one launch)."""
    from mixq import formats
    from mixq.quantizers.gptq import gptq

    fmt = formats.parse(spec)
    rows, cols = 19, 80 if fmt.group_size < 128 else 300
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(rows, cols, generator=gen).to(DEVICE)
    x = (torch.randn(2 * cols, cols, generator=gen) * torch.rand(cols, generator=gen)).to(DEVICE)
    H = 2 * x.T @ x / (2 * cols)
    q, info = gptq(w, H, fmt, block_size=fmt.group_size, act_order=False)
    w_hat = fmt.dequantize(q)
    U = inverse_cholesky(H, 0.01)[0]
    Q, codes, loss, steps, zeros = tg.gptq_dynamic(w.contiguous(), U, fmt)
    g = fmt.group_size
    if g <= 128:  # one launch per group: the same float operations as the torch loop
        assert torch.equal(Q, w_hat)
        assert torch.equal(steps, q.scales.float())  # the stored scales are the steps it rounded with
        if fmt.asym:
            assert torch.equal(zeros, q.zeros.float())
    else:  # a group in two launches: the lazy update sums in another order
        assert (Q == w_hat).float().mean() >= 0.999
    offset = tg.gather_columns(zeros, g, cols) if fmt.asym else 2.0 ** (fmt.code_bits - 1)
    assert torch.equal(Q, (codes.float() - offset) * tg.gather_columns(steps, g, cols))
    assert abs(float(loss.sum()) - info.loss) <= 1e-5 * info.loss


def test_per_channel_and_per_tensor_broadcast_steps():
    """(R, 1) and (1, 1) parameters are taken as broadcast views, not materialised."""
    fmt = IntFormat(4, 0, asym=True)
    W, U, _, _ = _problem(19, 64, fmt, seed=5)
    p = group_params(fmt, W)  # per channel: step, zero (R, 1)
    _check_against_reference(fmt, W, U, p.step, p.zero, 32)
    fmt_t = IntFormat(3, -1)
    p = group_params(fmt_t, W)  # per tensor: (1, 1)
    assert p.step.shape == (1, 1)
    _check_against_reference(fmt_t, W, U, p.step, None, 32)


def test_gptq_static_equals_rtn_with_identity_hessian_including_ties():
    """H = I spreads no error: GPTQ is round-to-nearest on the fixed grid, exact halves
    rounding to even (torch.round), negative steps and clamping included."""
    rows, cols = 24, 40
    gen = torch.Generator().manual_seed(7)
    k = torch.randint(-12, 12, (rows, cols), generator=gen).float()
    step = torch.where(torch.rand(rows, 1, generator=gen) < 0.5, -1.0, 1.0) * 2.0**-3  # (R, 1)
    W = ((k + 0.5) * step).to(DEVICE)  # every value an exact tie
    step = step.to(DEVICE)
    U = torch.eye(cols, device=DEVICE) * 0.5
    for fmt, zero in ((IntFormat(4, 0), None), (IntFormat(4, 0, asym=True), torch.full((rows, 1), 7.0, device=DEVICE))):
        Q, codes, loss = tg.gptq_static(W, U, step, zero, 4, fmt.asym, 16)
        expect = round_columns(fmt, W, step.expand(rows, cols), None if zero is None else zero.expand(rows, cols))
        assert torch.equal(Q, expect)
        assert torch.equal(codes.float(), _codes_ref(fmt, W, step, zero))
        # half-way values really went to the even neighbour, and some were clamped
        level = codes.float() - (7.0 if fmt.asym else 8.0)  # round(y) where not clamped
        inside = (W / step).abs() < 7
        assert (torch.remainder(level[inside], 2) == 0).all()
        assert (codes == 0).any() and (codes == 15).any()
        assert torch.allclose(loss, ((W - Q) / 0.5).double().pow(2).sum(1) / 2, rtol=1e-6)


def test_gptq_block_direct():
    """One launch on a (R, b) block: Err1 is (w - q) / U_ii with in-block updates, loss its
    halved squares."""
    fmt = IntFormat(3, 16, asym=True)
    W, U, step_cols, zero_cols = _problem(33, 64, fmt, seed=11)
    b = 64
    Q1, codes, Err1, loss = tg.gptq_block(W, U, step_cols.contiguous(), zero_cols.contiguous(), 3, True)
    Q_ref, codes_ref, loss_ref = reference_gptq(W, U, step_cols, zero_cols, fmt, block_size=b)
    assert (codes.float() == codes_ref).float().mean() >= 0.999
    assert torch.equal(Q1, (codes.float() - zero_cols) * step_cols)
    assert torch.allclose(loss.double(), loss_ref, rtol=1e-5)
    assert torch.allclose((Err1.pow(2) / 2).sum(1), loss, rtol=1e-5)


def test_bad_inputs_are_clear_errors():
    fmt = IntFormat(4, 32)
    W, U, step_cols, _ = _problem(8, 32, fmt)
    with pytest.raises(DataError, match="U must have shape"):
        tg.gptq_static(W, U[:16, :16], step_cols, None, 4, False)
    with pytest.raises(DataError, match="float32"):
        tg.gptq_static(W.double(), U, step_cols, None, 4, False)
    with pytest.raises(DataError, match="zero points"):
        tg.gptq_static(W, U, step_cols, None, 4, True)
    with pytest.raises(DataError, match="step_cols must be"):
        tg.gptq_static(W, U, step_cols[:, :5], None, 4, False)
    with pytest.raises(DataError, match="block_size"):
        tg.gptq_static(W, U, step_cols, None, 4, False, block_size=256)
    from mixq.errors import FormatError

    with pytest.raises(FormatError, match="gptq_static"):
        tg.gptq_dynamic(W, U, IntFormat(4, 0))
    with pytest.raises(DataError, match="too few groups"):
        tg.gather_columns(torch.ones(8, 2), 32, 96)  # 96 columns of groups of 32 need 3
    with pytest.raises(DataError, match="1..128 columns"):
        tg.gptq_block(torch.zeros(4, 129, device=DEVICE), torch.eye(129, device=DEVICE),
                      torch.ones(4, 129, device=DEVICE), None, 4, False)


def test_gather_columns_follows_act_order():
    t = torch.tensor([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])  # (R, G): 3 groups of 2 columns
    perm = torch.tensor([5, 0, 3, 1, 4, 2])
    assert torch.equal(tg.gather_columns(t, 2, 6, perm)[0], torch.tensor([30.0, 10.0, 20.0, 10.0, 30.0, 20.0]))
    assert torch.equal(tg.gather_columns(t, 2, 5)[1], torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0]))


def test_supported():
    assert tg.supported(IntFormat(4, 128), DEVICE)
    assert tg.supported(IntFormat(3, 0, asym=True, mse=True), DEVICE)
    from mixq import formats

    assert not tg.supported(formats.parse("nf4:g64"), DEVICE)
    assert not tg.supported(formats.parse("mxfp4"), DEVICE)
    if not INTERPRET:
        assert not tg.supported(IntFormat(4, 128), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU (compiled kernel, not the interpreter)")
def test_compiled_kernel_4096():
    for fmt in (IntFormat(4, 128), IntFormat(3, 128, asym=True), IntFormat(8, 0)):
        W, U, step_cols, zero_cols = _problem(4096, 4096, fmt, seed=1, device="cuda", n_samples=8192)
        equal = _check_against_reference(fmt, W, U, step_cols, zero_cols, block_size=128)
        assert equal >= 0.999
    from mixq.quantizers.gptq import gptq

    fmt = IntFormat(4, 128, asym=True)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4096, 4096, generator=gen).cuda()
    x = torch.randn(8192, 4096, generator=gen).cuda() * torch.rand(4096, generator=gen).cuda()
    H = 2 * x.T @ x / 8192
    q, info = gptq(w, H, fmt, block_size=128, act_order=False)
    w_hat = fmt.dequantize(q)
    Q, codes, loss, steps, zeros = tg.gptq_dynamic(w, inverse_cholesky(H, 0.01)[0], fmt)
    assert (Q == w_hat).float().mean() >= 0.999
    assert abs(float(loss.sum()) - info.loss) <= 1e-5 * info.loss

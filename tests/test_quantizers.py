"""Quantizers as pure tensor functions: GPTQ, Hadamard rotation, smoothing, low-rank
branches, and their composition in `quantize_unit`. Each method must help where it should
and do no harm where it cannot."""

from __future__ import annotations

import pytest
import torch

from mixq import formats
from mixq.errors import DataError, FormatError, MixqError
from mixq.formats.fixed import fake_quant_with, group_params
from mixq.option import CalibConfig, parse_option
from mixq.quantizers import (fwht, gptq, hadamard_matrix, lowrank_split, output_error, quantize_unit,
                             rotate_quantize, rotation, smooth_quantize, smooth_scales)


pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_inputs(n: int = 2048, cols: int = 256, rank: int = 16, seed: int = 0) -> torch.Tensor:
    """X (n, cols) with a low-rank + noise structure: strongly correlated input channels."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, rank, generator=g) @ torch.randn(rank, cols, generator=g)
            + 0.1 * torch.randn(n, cols, generator=g))


def out_err(X: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||X Wᵀ - X Ŵᵀ||²."""
    return float((X @ (w_hat - w).T).pow(2).sum())


# ---------------------------------------------------------------- fixed group parameters

@pytest.mark.parametrize("spec", formats.catalogue())
def test_fixed_params_reproduce_fake_quant(spec):
    fmt = formats.parse(spec)
    cols = 100 if fmt.supports((12, 100)) is None else 512  # partial last groups (GGUF: whole blocks)
    w = torch.randn(12, cols, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fake_quant_with(fmt, w, group_params(fmt, w)), fmt.fake_quant(w))


# ---------------------------------------------------------------- GPTQ

@pytest.mark.parametrize("spec", ["int3:g64", "int4:ch", "fp4_e2m1:g32", "nvfp4", "mxfp4", "int3:g64:asym",
                                  "q4_0", "q2_k", "q3_k", "q4_k", "iq4_xs"])
def test_gptq_beats_rtn_on_correlated_inputs(spec):
    X = correlated_inputs()
    H = 2 * X.T @ X / X.shape[0]
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    fmt = formats.parse(spec)
    q, info = gptq(w, H, fmt)
    w_hat = fmt.dequantize(q)
    assert out_err(X, w, w_hat) < 0.5 * out_err(X, w, fmt.fake_quant(w))
    assert info.damp == 0.01 and info.damp_retries == 0 and info.n_dead == 0
    assert q.fmt == str(fmt) and q.codes.dtype == torch.uint8


@pytest.mark.parametrize("spec", ["int3:g64", "int4:ch", "int4:g32:asym", "int8:t", "fp4_e2m1:g32", "nf4:g64",
                                  "fp8_e4m3:ch", "nvfp4", "mxfp4", "mxint8", "mxfp6_e3m2", "bf16",
                                  "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl",
                                  "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs"])
def test_codes_from_fixed_parameters_dequantize_to_their_values(spec):
    """What GPTQ stores: the codes `encode_columns` picks with fixed group parameters, in a
    QTensor with those parameters' stored scales, dequantize to exactly the values it
    computed (no re-derivation from the float weight)."""
    from mixq.formats.fixed import encode_columns, param_group_size, qtensor_from

    fmt = formats.parse(spec)
    cols = 96 if fmt.supports((24, 96)) is None else 512  # GGUF k-quants: super-blocks of 256
    g = torch.Generator().manual_seed(40)
    w = torch.randn(24, cols, generator=g) * torch.rand(24, 1, generator=g) * 3
    x = w + 0.3 * torch.randn(24, cols, generator=g)  # other values, rounded with w's parameters
    params = group_params(fmt, w)
    if params is None:  # unquantized: the cast
        codes, values = encode_columns(fmt, x, None)
    else:
        gs = param_group_size(fmt, cols)  # columns sharing one step (GGUF: a sub-block)
        groups = torch.arange(cols) // gs if gs < cols else torch.zeros(cols, dtype=torch.long)
        step, zero = params.columns(groups)
        codes, values = encode_columns(fmt, x, step, zero)
    q = qtensor_from(fmt, (24, cols), codes, params)
    assert torch.equal(fmt.dequantize(q), values)
    if params is not None:
        assert torch.equal(q.scales, fmt.quantize(w).scales)  # the stored form of the same scales


def test_gptq_act_order_static_groups():
    X = correlated_inputs(seed=3)
    X[:, :8] *= 10  # a few dominant inputs, so the order matters
    H = 2 * X.T @ X / X.shape[0]
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(4))
    fmt = formats.parse("int3:g64")
    q, info = gptq(w, H, fmt, act_order=True)
    w_hat = fmt.dequantize(q)
    assert info.act_order
    # static groups: the scales are RTN's, computed from the original W, and every value is
    # on their grid
    assert torch.equal(q.scales, fmt.quantize(w).scales)
    assert torch.equal(fake_quant_with(fmt, w_hat, group_params(fmt, w)), w_hat)
    assert out_err(X, w, w_hat) < 0.5 * out_err(X, w, fmt.fake_quant(w))


@pytest.mark.parametrize("spec", ["int4:ch", "int3:g64", "int4:g64:asym", "nf4:g64", "mxfp4", "nvfp4", "int8:t",
                                  "q4_0", "q5_1", "iq4_nl", "q3_k", "q4_k", "q6_k"])
def test_gptq_with_identity_hessian_is_rtn(spec):
    fmt = formats.parse(spec)
    cols = 192 if fmt.supports((16, 192)) is None else 512
    w = torch.randn(16, cols, generator=torch.Generator().manual_seed(5))
    q, _ = gptq(w, torch.eye(cols), fmt)
    rtn = fmt.quantize(w)
    assert torch.equal(q.codes, rtn.codes) and torch.equal(q.scales, rtn.scales)  # the very same codes
    assert torch.equal(fmt.dequantize(q), fmt.fake_quant(w))


def test_gptq_composes_with_mse_clip_search():
    X = correlated_inputs(seed=6)
    H = 2 * X.T @ X / X.shape[0]
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(7))
    w[:, ::37] *= 6  # heavy tails: clipping pays
    plain, mse = formats.parse("int3:g64"), formats.parse("int3:g64:mse")
    q_mse, info = gptq(w, H, mse)
    w_mse = mse.dequantize(q_mse)
    assert out_err(X, w, w_mse) < out_err(X, w, mse.fake_quant(w))
    qw, _ = quantize_unit(w, "int3:g64:mse+gptq", H=H, config=CalibConfig(act_order=False))
    assert torch.equal(qw.weight(), w_mse)
    assert out_err(X, w, w_mse) < 1.5 * out_err(X, w, plain.dequantize(gptq(w, H, plain)[0]))


def test_gptq_damps_non_pd_hessian_and_records_it():
    g = torch.Generator().manual_seed(8)
    A = torch.randn(64, 64, generator=g)
    H = A @ A.T / 64
    H = H - 1.5 * torch.linalg.eigvalsh(H)[-1] / 64 * torch.eye(64) * 64 / 8  # indefinite
    H.diagonal().clamp_(min=0.1)
    assert torch.linalg.eigvalsh(H)[0] < 0
    w = torch.randn(8, 64, generator=g)
    q, info = gptq(w, H, "int4:g32")
    w_hat = formats.parse("int4:g32").dequantize(q)
    assert info.damp_retries > 0 and info.damp > 0.01
    assert info.damp == pytest.approx(0.01 * 10**info.damp_retries)
    assert any("not positive definite" in m for m in info.warnings)
    assert torch.isfinite(w_hat).all()


def test_gptq_dead_inputs():
    X = correlated_inputs(n=512, cols=64, seed=9)
    X[:, [3, 10]] = 0
    H = 2 * X.T @ X / X.shape[0]
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(10))
    q, info = gptq(w, H, "int4:g32")
    w_hat = formats.parse("int4:g32").dequantize(q)
    assert info.n_dead == 2
    assert (w_hat[:, [3, 10]] == 0).all()


def test_gptq_rejects_bad_hessian():
    with pytest.raises(DataError, match="Hessian must be"):
        gptq(torch.randn(4, 8), torch.eye(7), "int4:ch")
    with pytest.raises(DataError, match="NaN"):
        gptq(torch.randn(4, 8), torch.full((8, 8), float("nan")), "int4:ch")


# ---------------------------------------------------------------- Hadamard rotation

@pytest.mark.parametrize("n", [1, 2, 8, 64, 512])
def test_fwht_equals_dense_hadamard(n):
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ hadamard_matrix(n, torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 64, 128, 512, 4096, 32768])
def test_fwht_kron_equals_fwht(n):
    """The factored transform (one small matmul per Kronecker factor of H_n, <= 128 wide)
    is the butterfly transform."""
    from mixq.quantizers.hadamard import fwht_kron, hadamard_factors

    sizes = hadamard_factors(n)
    assert all(s <= 128 for s in sizes) and torch.tensor(sizes).prod() == n and sizes == sorted(sizes, reverse=True)
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    y = fwht_kron(x, [hadamard_matrix(s, torch.float64) for s in sizes])
    assert y.shape == x.shape and torch.allclose(y, fwht(x), atol=1e-12)
    with pytest.raises(FormatError, match="power-of-two"):
        hadamard_factors(96)


def test_rotation_blocks_orthogonality_and_seed():
    assert rotation(576).block == 64 and rotation(1536).block == 512 and rotation(4096).block == 4096
    rot = rotation(96, seed=3)
    Q = rot.matrix().double()
    assert torch.allclose(Q @ Q.T, torch.eye(96, dtype=torch.float64), atol=1e-6)
    assert torch.equal(rotation(96, seed=3).signs, rot.signs)
    assert not torch.equal(rotation(96, seed=4).signs, rot.signs)
    H = torch.randn(96, 96, dtype=torch.float64)
    H = H @ H.T
    assert torch.allclose(rot.rotate_hessian(H.float()).double(), Q.T @ H @ Q, rtol=1e-4, atol=1e-3)
    with pytest.raises(FormatError, match="odd"):
        rotation(75)


def test_rotation_is_function_preserving_in_float():
    g = torch.Generator().manual_seed(11)
    w, x = torch.randn(24, 192, generator=g, dtype=torch.float64), torch.randn(10, 192, generator=g, dtype=torch.float64)
    rot = rotation(192, seed=0)
    # (x Q)(W Q)ᵀ = x Wᵀ
    assert torch.allclose(rot.apply(x) @ rot.apply(w).T, x @ w.T, atol=1e-10)
    w_hat, info = rotate_quantize(w.float(), "fp32", seed=0)
    assert info["rotate_block"] == 64
    assert torch.allclose(w_hat, w.float(), atol=1e-5)


def test_rotation_reduces_error_with_outlier_input_columns():
    g = torch.Generator().manual_seed(12)
    w = 0.02 * torch.randn(64, 256, generator=g)
    w[:, [3, 77, 130, 200]] *= 25  # planted outlier input columns
    for spec in ("int4:g64", "int4:ch"):
        fmt = formats.parse(spec)
        w_rot, _ = rotate_quantize(w, fmt, seed=0)
        assert (w_rot - w).pow(2).sum() < 0.5 * (fmt.fake_quant(w) - w).pow(2).sum()


def test_rotation_does_no_harm_on_incoherent_weights():
    """Gaussian weights are already incoherent: rotating them changes the RTN error by a few
    percent at most, either way."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(21))
    for spec in ("int4:g64", "int3:g64", "int4:ch"):
        fmt = formats.parse(spec)
        w_rot, _ = rotate_quantize(w, fmt, seed=0)
        plain = (fmt.fake_quant(w) - w).pow(2).sum()
        assert 0.9 * plain < (w_rot - w).pow(2).sum() < 1.1 * plain


def test_rotate_with_gptq_rotates_the_hessian():
    X = correlated_inputs(seed=13)
    H = 2 * X.T @ X / X.shape[0]
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(14))
    qw, info = quantize_unit(w, "int3:g64+gptq+rotate", H=H, compare_rtn=True)
    w_hat = qw.weight()
    assert info.rotate_block == 256
    assert out_err(X, w, w_hat) < 0.5 * out_err(X, w, formats.parse("int3:g64").fake_quant(w))
    assert info.output_error < info.output_error_rtn


# ---------------------------------------------------------------- smoothing

def test_smoothing_beats_rtn_with_outlier_channels():
    g = torch.Generator().manual_seed(15)
    X = torch.randn(4096, 128, generator=g)
    X[:, [5, 40, 90]] *= 30  # planted activation outlier channels
    H, a = 2 * X.T @ X / X.shape[0], X.abs().mean(0)
    w = torch.randn(96, 128, generator=g)
    fmt = formats.parse("int4:g64")
    w_hat, info = smooth_quantize(w, fmt, a, H)
    assert info["alpha"] > 0
    assert info["error"] < 0.6 * output_error(fmt.fake_quant(w) - w, H)
    assert info["error_alpha0"] == pytest.approx(output_error(fmt.fake_quant(w) - w, H))
    assert out_err(X, w, w_hat) < 0.6 * out_err(X, w, fmt.fake_quant(w))


def test_smoothing_does_no_harm_on_uniform_activations():
    g = torch.Generator().manual_seed(16)
    X = torch.randn(4096, 128, generator=g)
    H, a = 2 * X.T @ X / X.shape[0], X.abs().mean(0)
    w = torch.randn(96, 128, generator=g)
    _, info = smooth_quantize(w, "int4:g64", a, H)
    assert info["error"] <= info["error_alpha0"] <= 1.01 * info["error"]  # no harm, no real gain
    s = smooth_scales(a, info["alpha"])
    assert (s - 1).abs().max() < 0.05  # near-identity scales (α ≈ 0 in effect)
    _, info = smooth_quantize(w, "int4:g64", torch.ones(128), H)
    assert info["alpha"] == 0.0  # exactly uniform: nothing to gain, α = 0 wins the tie


# ---------------------------------------------------------------- low rank

def test_lowrank_does_no_harm_without_low_rank_structure():
    """Without low-rank structure the branch takes a little energy off the residual: the
    error does not grow, the gain is small."""
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(22))
    for spec in ("int4:g64", "int3:g64"):
        fmt = formats.parse(spec)
        w_hat = quantize_unit(w, spec + "+lowrank:8")[0].weight()
        plain = (fmt.fake_quant(w) - w).pow(2).sum()
        assert 0.85 * plain < (w_hat - w).pow(2).sum() <= 1.01 * plain


def test_lowrank_reduces_error_and_is_counted():
    g = torch.Generator().manual_seed(17)
    w = 0.2 * torch.randn(128, 32, generator=g) @ torch.randn(32, 256, generator=g) + 0.05 * torch.randn(128, 256, generator=g)
    fmt = formats.parse("int3:g64")
    qw, info = quantize_unit(w, "int3:g64+lowrank:32")
    w_hat = qw.weight()
    assert info.rank == 32
    assert (w_hat - w).pow(2).sum() < 0.01 * (fmt.fake_quant(w) - w).pow(2).sum()
    L, R = qw.transforms.lowrank
    assert torch.equal(L, L.bfloat16().float()) and torch.equal(R, R.bfloat16().float())  # honest bf16 factors
    opt = parse_option("int3:g64+lowrank:32")
    assert opt.bits((128, 256)) == fmt.bits((128, 256)) + 16 * 32 * (128 + 256)
    L, R, E = lowrank_split(w, 8)
    assert torch.allclose(L @ R + E, w, atol=1e-6)
    with pytest.raises(DataError, match="rank"):
        lowrank_split(w, 0)


# ---------------------------------------------------------------- quantize_unit

def test_quantize_unit_names_missing_calibration():
    w = torch.randn(8, 64)
    with pytest.raises(MixqError, match="needs calibration data.*Hessian"):
        quantize_unit(w, "int3:g64+gptq")
    with pytest.raises(MixqError, match="needs calibration data.*mean \\|x\\|"):
        quantize_unit(w, "int4:g64+smooth", H=torch.eye(64))
    qw, info = quantize_unit(w, "int4:g64")  # RTN needs nothing
    assert torch.equal(qw.weight(), formats.parse("int4:g64").fake_quant(w))
    assert qw.transforms.is_identity
    assert info.to_dict()["quantizer"] == "rtn"


def test_quantize_unit_full_chain():
    X = correlated_inputs(seed=18)
    X[:, [1, 50]] *= 20
    H, a = 2 * X.T @ X / X.shape[0], X.abs().mean(0)
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(19))
    qw, info = quantize_unit(w, "int3:g64+gptq+smooth+rotate+lowrank:8", H=H, act_absmean=a, compare_rtn=True)
    w_hat = qw.weight()
    d = info.to_dict()
    assert d["alpha"] is not None and d["rank"] == 8 and d["rotate_block"] == 256 and d["damp"] == 0.01
    assert info.output_error < 0.5 * info.output_error_rtn
    assert info.output_error == pytest.approx(output_error(w_hat - w, H))

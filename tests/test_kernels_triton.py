"""The Triton kernels against the pure-torch reference, on the CPU under Triton's interpreter
(no GPU: see tests/_triton_interpret.py) or compiled on a GPU: the tensor-core kernel
(`triton_tc`) for every layout it takes, its block shapes, split-K, post- and pre-scaling;
the older kernels (`triton_qmm`) on the 3-bit unit layout; the fused input transform.

Shapes are small and odd (72 rows: a partial weight tile; 17-unit inputs: a partial K
step) so the interpreter stays fast. Bound: ||out - ref|| / ||ref|| < 1e-2 against a
float32 reference (bf16 rounding of weights and outputs is ~3e-3; the interpreter
truncates instead of rounding, ~6e-3).
"""

from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_DEVICE, needs_kernels
from mixq import formats
from mixq.kernels import dequantize, prepack

pytestmark = needs_kernels
REL_TOL = 1e-2

# (spec, in_features): 544 = 17 units of 32 (int3), 68 of 8 (int4), 17 groups of 32; 3-bit
# units past the last full block of 16: 1 (544, stored in order), 4 (640), 12 (896: interleaved)
TC_SPECS = [("int4:g128", 640), ("int4:g64:asym", 576), ("int4:g32", 544), ("int4:ch", 544),
            ("int8:ch", 544), ("int8:g64:asym", 576), ("int3:g64", 544), ("int3:g128:asym", 640), ("int3:g32", 896),
            ("int2:g64", 576), ("nf4:g64", 576), ("mxfp4", 544), ("nvfp4", 544), ("fp8_e4m3:ch", 544)]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def _weights(spec: str, in_features: int, out_features: int = 72, seed: int = 0):
    torch.manual_seed(seed)
    fmt = formats.parse(spec)
    w = torch.randn(out_features, in_features)
    return prepack(fmt.quantize(w), fmt).to(KERNEL_DEVICE)


@pytest.mark.parametrize("spec,in_features", TC_SPECS)
def test_tc_kernel_matches_reference(spec, in_features):
    from mixq.kernels import triton_tc

    kw = _weights(spec, in_features)
    assert triton_tc.supports(kw.layout)
    w_ref = dequantize(kw).float()  # (N, K)
    bias = torch.randn(kw.layout.out_features, device=KERNEL_DEVICE)
    for m, dtype in [(1, torch.bfloat16), (5, torch.float16), (17, torch.bfloat16)]:
        x = torch.randn(m, in_features, device=KERNEL_DEVICE).to(dtype)
        ref = x.float() @ w_ref.T + bias
        out = triton_tc.qmatmul(x, kw, bias.to(dtype))
        assert out.dtype == dtype and out.shape == (m, kw.layout.out_features)
        assert torch.isfinite(out).all(), f"{spec} M={m}: non-finite output"
        err = _rel_err(out, ref)
        assert err < REL_TOL, f"{spec} {dtype} M={m}: rel err {err:.2e}"


# the 3-bit case (32 code tiles per unit) takes ~25 s under the interpreter: GPU only there
@pytest.mark.parametrize("spec", ["int4:g64:asym", "int8:ch", "int4:g32"] + (["int3:g64"] if KERNEL_DEVICE == "cuda" else []))
def test_tc_block_shapes_split_k_and_scaling_modes(spec):
    """Every tile shape, split-K (fp32 atomics), post- and pre-scaling, on 72 x 1088 (72 x 544
    under the interpreter, which runs every program one after another)."""
    from mixq.kernels.triton_tc import TcConfig, default_block_j, qmatmul

    k = 544 if KERNEL_DEVICE == "cpu" else 1088
    kw = _weights(spec, k, seed=1)
    w_ref = dequantize(kw).float()
    bj = default_block_j(kw.layout)
    configs = [
        (1, TcConfig(64, 16, bj, 1)), (3, TcConfig(32, 16, bj, 3, post=False)), (16, TcConfig(64, 16, bj, 2)),
        (20, TcConfig(16, 32, max(1, bj // 2), 1)), (33, TcConfig(64, 64, bj, 1, 8, post=False)),
        (7, TcConfig(128, 16, 2 * bj, 1, post=False)),
    ]
    for m, cfg in configs:
        x = torch.randn(m, k, device=KERNEL_DEVICE).to(torch.bfloat16)
        err = _rel_err(qmatmul(x, kw, None, cfg), x.float() @ w_ref.T)
        assert err < REL_TOL, f"{spec} M={m} {cfg}: rel err {err:.2e}"


@pytest.mark.parametrize("spec,k", [("int3:g128", 1408), ("int3:ch", 1536)])
def test_tc_kernel_3bit_steps_over_interleaved_units(spec, k):
    """The tensor-core kernel takes 3-bit K steps in stored column order (units interleaved by
    four in blocks of 16): x and the scales follow each column's unit; scales after the product
    only where a step's units share a group (per channel on 48 units), else before it. Steps of
    4 and 16 units, split K over 3 programs, both scale orders asked for; 1408 = 2 full blocks
    and a last block of 12 units."""
    from mixq.kernels import triton_tc
    from mixq.kernels.triton_tc import TcConfig

    kw = _weights(spec, k, out_features=24)
    assert triton_tc.post_scale_ok(kw.layout, 4) is (spec == "int3:ch")
    w_ref = dequantize(kw).float()
    x = torch.randn(3, k, device=KERNEL_DEVICE).to(torch.float16)
    ref = x.float() @ w_ref.T
    for bj in (4, 16):
        for split in (1, 3):
            for post in (True, False):
                cfg = TcConfig(16, 16, bj, split, 4, 1, post, False)
                err = _rel_err(triton_tc.qmatmul(x, kw, None, cfg), ref)
                assert err < REL_TOL, f"{spec} {cfg}: rel err {err:.2e}"


@pytest.mark.parametrize("spec", ["int3:g64", "int3:g64:asym", "int3:ch"])
def test_old_kernels_read_the_3bit_layout(spec):
    from mixq.kernels import triton_qmm

    kw = _weights(spec, 544)
    w_ref = dequantize(kw).float()
    for m in (1, 3, 16):
        x = torch.randn(m, 544, device=KERNEL_DEVICE).to(torch.float16)
        err = _rel_err(triton_qmm.qmatmul(x, kw), x.float() @ w_ref.T)
        assert err < REL_TOL, f"{spec} M={m}: rel err {err:.2e}"


@pytest.mark.parametrize("in_features,rows", [(576, 3), (1024, 2), (1536, 17), (96, 5)])
def test_fused_transform_matches_torch(in_features, rows, monkeypatch):
    """Smoothing, sign flip and block Hadamard in one kernel (blocks 64, 1024 = 32 x 32,
    512 = 16 x 32, 32) equal the torch ops in float32, and to bf16 rounding in bf16."""
    from mixq.kernels.transform import online_transform, reference_transform
    from mixq.quantizers.hadamard import rotation

    monkeypatch.setenv("MIXQ_CUDA_TRANSFORM", "0")  # on a GPU: this Triton kernel, not the CUDA one
    torch.manual_seed(in_features)
    rot = rotation(in_features, 0)
    s = torch.rand(in_features) + 0.5
    # half inputs go through the split bfloat16 products (transform.split_products): float16's
    # output rounding (~2e-4 here) bounds them; without the low half it would be ~3e-3
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 5e-4)]:
        x = torch.randn(rows, in_features).to(dtype)
        for smooth, rotate in [(s, True), (None, True), (s, False)]:
            args = (smooth, rot.signs if rotate else None, rot.block if rotate else None)
            ref = reference_transform(x, *args).float()
            dev_args = tuple(a.to(KERNEL_DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
            out = online_transform(x.to(KERNEL_DEVICE), *dev_args, use_kernel=True)
            assert out.dtype == dtype and out.shape == x.shape
            err = _rel_err(out.cpu(), ref)
            assert err < tol, f"in={in_features} {dtype} smooth={smooth is not None} rotate={rotate}: {err:.2e}"


@pytest.mark.parametrize("n,rows,block", [(1024, 2, 1024), (512, 3, 32), (2048, 1, 64), (256, 1, 256), (200, 2, None)])
def test_rms_norm_applies_the_groups_transform(n, rows, block, monkeypatch):
    """add_rms_norm with a transform (one row as one block of 32 x 32 in two programs or of
    16 x 16, blocks of 32 or 64 in one or two programs, smoothing alone on a 200-wide row)
    equals RMSNorm followed by the transform, in float32 and to bf16 rounding; with the
    residual add, h + delta is unchanged by it."""
    from mixq.kernels import decode_ops as ops
    from mixq.kernels.transform import reference_transform

    monkeypatch.setenv("MIXQ_CUDA_TRANSFORM", "0")  # on a GPU: the Triton kernel, not the CUDA one
    torch.manual_seed(n)
    dev = KERNEL_DEVICE
    s = torch.rand(n) + 0.5
    signs = torch.where(torch.rand(n) < 0.5, -1.0, 1.0) if block else None
    # bf16: three roundings in a row (h + delta, the norm, the transform), each a truncation
    # under the interpreter (~4e-3 apiece there)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2 if torch.device(dev).type == "cuda" else 2e-2)]:
        h, d = torch.randn(rows, n).to(dtype), torch.randn(rows, n).to(dtype)
        w = (torch.rand(n) + 0.5).to(dtype)
        for smooth in ([s, None] if block else [s]):
            tf = (smooth, signs, block)
            assert ops.norm_transform_ok(n, *tf)
            ref_h, ref_r = ops.reference_add_rms_norm(h, d, w, 1e-5)
            ref = reference_transform(ref_r, *tf).float()
            dev_tf = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in tf)
            got_h, got = ops.add_rms_norm(h.to(dev), d.to(dev), w.to(dev), 1e-5, dev_tf)
            assert got.dtype == dtype and got.shape == h.shape and _rel_err(got_h.cpu(), ref_h.float()) < tol
            assert _rel_err(got.cpu(), ref) < tol, (dtype, smooth is not None)
            alone = ops.add_rms_norm(h.to(dev), None, w.to(dev), 1e-5, dev_tf)
            ref1 = reference_transform(ops.reference_add_rms_norm(h, None, w, 1e-5)[1], *tf).float()
            assert _rel_err(alone.cpu(), ref1) < tol
    # shapes one kernel cannot take: blocks under 16 per row, several big blocks, odd rows
    assert not ops.norm_transform_ok(64, None, torch.ones(64), 64)
    assert not ops.norm_transform_ok(1024, None, torch.ones(1024), 512)
    assert not ops.norm_transform_ok(768, None, torch.ones(768), 256)
    assert not ops.norm_transform_ok(256, None, None, None)
    with pytest.raises(ValueError, match="add_rms_norm"):
        ops.add_rms_norm(torch.zeros(1, 64, device=dev), None, torch.ones(64, device=dev), 1e-5,
                         (None, torch.ones(64, device=dev), 64))


def test_argmax_matches_torch_with_ties_across_chunks():
    """decode_ops.argmax against torch.argmax on rows of 9000 (three chunks of 4096, the last
    partial): random rows, the maximum tied within and across chunks (the first index wins),
    all -inf, and NaN (counted as the maximum)."""
    from mixq.kernels import decode_ops as ops

    torch.manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(6, 9000).to(dtype)
        x[1, [5000, 8999, 4096]] = 50.0   # tie across chunks 1 and 2
        x[2, [4095, 4096]] = 50.0         # tie at a chunk edge
        x[3] = float("-inf")
        x[4, 8998] = 60.0
        x[5, [7000, 100]] = float("nan")
        got = ops.argmax(x.to(KERNEL_DEVICE)).cpu()
        assert got.dtype == torch.int64
        assert got.tolist()[:5] == torch.argmax(x[:5], -1).tolist() and got.tolist()[1:4] == [4096, 4095, 0]
        assert int(got[5]) == 100
    with pytest.raises(ValueError, match="argmax"):
        ops.argmax(torch.zeros(3, device=KERNEL_DEVICE))


def test_split_k_workspace_is_left_zeroed():
    """Split-K programs meet in a shared fp32 workspace; the last one of each tile writes y
    and zeroes the tile and its counter, so back-to-back calls of other shapes stay right."""
    from mixq.kernels import triton_tc
    from mixq.kernels.triton_tc import TcConfig

    kw = _weights("int4:g128", 1024, out_features=72, seed=4)
    w_ref = dequantize(kw).float()
    bias = torch.randn(72, device=KERNEL_DEVICE)
    for m, split in [(3, 4), (17, 2), (1, 8), (3, 4)]:
        x = torch.randn(m, 1024, device=KERNEL_DEVICE).to(torch.bfloat16)
        out = triton_tc.qmatmul(x, kw, bias.to(torch.bfloat16), TcConfig(64, 16, 16, split))
        assert _rel_err(out, x.float() @ w_ref.T + bias) < REL_TOL, (m, split)
        ws, counters = triton_tc._WS.buffers[str(out.device)]
        assert not ws.any() and not counters.any()


@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 16), (6, 6, 32), (12, 2, 16)])
def test_decode_attention_matches_softmax_over_written_keys(heads, kv_heads, dim):
    """One query token against a cache of 200 positions (4 splits of 64 keys, the last partial):
    only keys at positions <= pos count (pos 0: three splits empty; 63 / 64: a split's edge),
    grouped-query heads (4, 1 and 6 per kv head), float32 and bf16, and garbage past pos must
    not leak in."""
    from mixq.kernels import decode_attention as ops

    torch.manual_seed(heads + dim)
    dev = KERNEL_DEVICE
    b, L = 2, 200
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        q = torch.randn(b, heads, 1, dim, device=dev).to(dtype)
        kc = torch.randn(b, kv_heads, L, dim, device=dev).to(dtype)
        vc = torch.randn(b, kv_heads, L, dim, device=dev).to(dtype)
        for pos in (0, 63, 64, 150, 199):
            positions = torch.tensor([pos], device=dev)
            kc2, vc2 = kc.clone(), vc.clone()
            kc2[:, :, pos + 1:] = 1e4  # unwritten positions: must not count
            vc2[:, :, pos + 1:] = float("nan")
            got = ops.decode_attention(q, kc2, vc2, positions, dim ** -0.5)
            ref = ops.reference_decode_attention(q, kc, vc, positions, dim ** -0.5)
            assert got.shape == (b, 1, heads * dim) and got.dtype == dtype
            assert _rel_err(got, ref) < tol, (dtype, pos)
    with pytest.raises(ValueError, match="decode_attention"):
        ops.decode_attention(torch.zeros(1, 4, 2, 16, device=dev), torch.zeros(1, 2, 8, 16, device=dev),
                             torch.zeros(1, 2, 8, 16, device=dev), torch.zeros(1, dtype=torch.long, device=dev), 1.0)


@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 16), (6, 3, 32)])
def test_decode_attention_rope_equals_rope_then_attention(heads, kv_heads, dim):
    """The rotary embedding and cache write inside the attention's split kernel give what
    rope_to_cache and decode_attention give: the caches equal to the bit (the new key and
    value at pos, nothing else touched), the output to rounding; at positions on split edges
    (0, 63, 64) and inside; q, k, v as views of one fused output; NaN at and past pos before the
    step never read."""
    from mixq.kernels import decode_attention as attn
    from mixq.kernels import decode_ops as ops

    torch.manual_seed(heads * dim)
    dev = KERNEL_DEVICE
    b, L = 2, 200
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=dev).float() / dim))
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        qkv = torch.randn(b, 1, (heads + 2 * kv_heads) * dim, device=dev).to(dtype)
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        kc0 = torch.randn(b, kv_heads, L, dim, device=dev).to(dtype)
        vc0 = torch.randn(b, kv_heads, L, dim, device=dev).to(dtype)
        for pos in (0, 63, 64, 150):
            positions = torch.tensor([pos], device=dev)
            kc, vc = kc0.clone(), vc0.clone()
            kc[:, :, pos:] = float("nan")  # pos too: a read of pos before the write shows
            vc[:, :, pos:] = float("nan")
            kr, vr = kc.clone(), vc.clone()
            qr = ops.rope_to_cache(q, k, v, positions, inv_freq, kr, vr, heads, kv_heads, dim, 0.9)
            ref = attn.decode_attention(qr, kr, vr, positions, dim ** -0.5)
            assert attn.decode_attention_rope_supported(q, kc, heads)
            got = attn.decode_attention_rope(q, k, v, positions, inv_freq, kc, vc, heads, dim ** -0.5, 0.9)
            assert torch.equal(kc.nan_to_num(7.0), kr.nan_to_num(7.0)) and torch.equal(vc.nan_to_num(7.0), vr.nan_to_num(7.0))
            assert got.shape == ref.shape and got.dtype == dtype and not got.isnan().any()
            assert _rel_err(got, ref.float()) < tol / 10, (dtype, pos)
    with pytest.raises(ValueError, match="decode_attention_rope"):
        attn.decode_attention_rope(q, k, v, positions, inv_freq, kc, vc, 5, 1.0)  # 5 heads do not divide the row


def test_decode_ops_match_torch():
    """The fused element-wise kernels of the decode step against the torch ops they replace."""
    from mixq.kernels import decode_ops as ops

    torch.manual_seed(0)
    dev = KERNEL_DEVICE
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        h, d = torch.randn(2, 3, 200, device=dev).to(dtype), torch.randn(2, 3, 200, device=dev).to(dtype)
        w = (torch.rand(200, device=dev) + 0.5).to(dtype)
        ref_h, ref_r = ops.reference_add_rms_norm(h, d, w, 1e-5)
        got_h, got_r = ops.add_rms_norm(h, d, w, 1e-5)
        assert _rel_err(got_h, ref_h.float()) < tol and _rel_err(got_r, ref_r.float()) < tol
        assert _rel_err(ops.add_rms_norm(h, None, w, 1e-5), ops.reference_add_rms_norm(h, None, w, 1e-5)[1].float()) < tol
        g, u = torch.randn(3, 1500, device=dev).to(dtype), torch.randn(3, 1500, device=dev).to(dtype)
        assert _rel_err(ops.silu_mul(g, u), ops.reference_silu_mul(g, u).float()) < tol
        # rotary + cache write: q/k/v as views of one fused output, 4 heads / 2 kv heads of 16
        b, t, hd, L = 2, 3, 16, 8
        qkv = torch.randn(b, t, (4 + 2 + 2) * hd, device=dev).to(dtype)
        q, k, v = qkv.split([4 * hd, 2 * hd, 2 * hd], dim=-1)
        pos = torch.tensor([2, 3, 4], device=dev)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
        kc = torch.zeros(b, 2, L, hd, device=dev, dtype=dtype)
        vc = torch.zeros_like(kc)
        qo = ops.rope_to_cache(q, k, v, pos, inv_freq, kc, vc, 4, 2, hd)
        ref_q = ops.reference_rope(q.reshape(b, t, 4, hd).transpose(1, 2), pos, inv_freq)
        ref_k = ops.reference_rope(k.reshape(b, t, 2, hd).transpose(1, 2), pos, inv_freq)
        assert _rel_err(qo, ref_q.float()) < tol
        assert _rel_err(kc[:, :, 2:5], ref_k.float()) < tol
        assert torch.equal(vc[:, :, 2:5], v.reshape(b, t, 2, hd).transpose(1, 2))
        assert not kc[:, :, :2].any() and not kc[:, :, 5:].any()


def test_static_decoder_fused_equals_unfused(tiny_llama):
    """The decode loop with the fused element-wise kernels generates what the torch ops do."""
    import copy

    from mixq.export.decoder import StaticDecoder

    model = copy.deepcopy(tiny_llama).to(KERNEL_DEVICE)
    prompt = [1, 17, 42, 99, 5]
    plain = StaticDecoder(model, max_len=24, fused=False, use_graph=False).generate(prompt, 6)
    fused = StaticDecoder(model, max_len=24, fused=True).generate(prompt, 6)
    assert torch.equal(plain, fused)


def test_static_decoder_applies_group_transforms_in_the_norm(monkeypatch):
    """A Llama of width 256 whose q/k/v share smoothing + rotation, gate/up share a rotation
    (one block of 16 x 16) and o/down have their own: the fused decode loop applies the
    groups' transforms inside the RMSNorm kernels (their units never transform an input) and
    generates what the unfused loop does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixq.export.decoder import StaticDecoder
    from mixq.nn import QuantLinear
    from mixq.quantizers import UnitTransforms

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    fmt = formats.parse("int8:ch")
    for ly in model.model.layers:
        qkv_tf = UnitTransforms(torch.rand(256) + 0.5, 1, None, None)
        gu_tf = UnitTransforms(None, 2, None, None)
        for mod, names, tf in [(ly.self_attn, ("q_proj", "k_proj", "v_proj"), qkv_tf),
                               (ly.self_attn, ("o_proj",), UnitTransforms(torch.rand(256) + 0.5, 3, None, None)),
                               (ly.mlp, ("gate_proj", "up_proj"), gu_tf), (ly.mlp, ("down_proj",), UnitTransforms(None, 4, None, None))]:
            for name in names:
                w = getattr(mod, name).weight.detach()
                setattr(mod, name, QuantLinear.from_qtensor(fmt.quantize(w), fmt, transforms=tf))
    model = model.to(KERNEL_DEVICE)
    prompt = [1, 17, 42, 99, 5]
    plain = StaticDecoder(model, max_len=24, fused=False, use_graph=False).generate(prompt, 6)
    fused_dec = StaticDecoder(model, max_len=24, fused=True)
    called = []
    for ly in fused_dec.layers:
        for grp in ("qkv", "gate_up"):
            norm = ly["ln1" if grp == "qkv" else "ln2"]
            assert fused_dec._norm_transform(ly[grp], torch.zeros(1, 256, device=KERNEL_DEVICE), norm) is not None
            for u in ly[grp].units:
                monkeypatch.setattr(u, "transform_input", lambda x, _c=called: _c.append(1) or x)
    fused = fused_dec.generate(prompt, 6)
    assert not called
    assert torch.equal(plain, fused)

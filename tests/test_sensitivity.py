"""mixq.sensitivity: each method against an exact computation on a tiny problem, rankings on
tiny transformers, determinism of the artifact, experts, activation spikes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mixq.errors import ArtifactError, FormatError, MixqError
from mixq.models import llm_units
from mixq.models.enumerate import cnn_units
from mixq.models.units import Unit, get_weight
from mixq.option import parse_option
from mixq.sensitivity import (METHODS, SensitivityTable, analyze, calibration_loss_fn, fwd_bwd_seconds,
                              spiky_units)

CANDS = ["int2:g32", "int4:g32", "int8:ch"]


class TinyLM(nn.Module):
    """ids -> embedding -> tanh(fc1) -> fc2 logits: small enough for an exact Hessian."""

    def __init__(self, vocab: int = 10, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        return self.fc2(torch.tanh(self.fc1(self.emb(ids))))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyLM().eval()
    units = [Unit("fc1", "linear", (6, 6), "fc1.weight", "fc", 0), Unit("fc2", "linear", (10, 6), "fc2.weight", "fc", 1)]
    calib = torch.randint(0, 10, (4, 8), generator=torch.Generator().manual_seed(2))
    return model, units, calib


def _exact_hessian(model, units, calib):
    """Hessian of the mean next-token CE over both unit weights, (n, n) with n = 36 + 60, and
    the index range of each unit in it."""
    names = [u.param for u in units]
    shapes = [model.get_parameter(n).shape for n in names]
    flat = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names]).double()

    def loss(w):
        params, off = {}, 0
        for n, s in zip(names, shapes):
            params[n] = w[off: off + s.numel()].reshape(s).float()
            off += s.numel()
        logits = functional_call(model, params, (calib,))
        return F.cross_entropy(logits[:, :-1].reshape(-1, 10), calib[:, 1:].reshape(-1)).double()

    h = torch.autograd.functional.hessian(loss, flat)
    ranges, off = [], 0
    for s in shapes:
        ranges.append(slice(off, off + s.numel()))
        off += s.numel()
    return h, ranges


def _sq(unit, model, opt):
    w = get_weight(model, unit).detach()
    return float((parse_option(opt).fmt.fake_quant(w) - w).double().pow(2).sum())


def test_hutchinson_matches_exact_trace(tiny):
    model, units, calib = tiny
    k = 200
    table = analyze(model, units, CANDS, "hutchinson", calib, tol=0.0, min_probes=k, max_probes=k, batch_size=4,
                    retain_graph=True)
    h, ranges = _exact_hessian(model, units, calib)
    for u, r in zip(units, ranges):
        info = table.unit(u.name).info
        assert info["iterations"] == k
        block = h[r, r]
        exact = float(block.trace())
        # One probe gives v_i . (H v)_i = v_i^T H_ii v_i + v_i^T H_ij v_j (j: the other units),
        # unbiased, with variance 2 * sum_{a != b in i} H_ab^2 + sum_{a in i, b not in i} H_ab^2.
        off_diag = block - torch.diag(torch.diag(block))
        cross = h[r].pow(2).sum() - block.pow(2).sum()
        sd = float(((2 * off_diag.pow(2).sum() + cross) / k).sqrt())
        assert abs(info["trace"] - exact) < 4 * sd + 1e-6, (u.name, info["trace"], exact, sd)
        assert info["avg_trace"] == pytest.approx(info["trace"] / u.n_params)
        for o in table.unit(u.name).options:
            assert o["error"] == pytest.approx(abs(info["avg_trace"]) * _sq(u, model, o["option"]), rel=1e-9)


@pytest.mark.parametrize("method", ["hutchinson", "eigen"])
def test_retained_and_rebuilt_graphs_agree(tiny, method):
    model, units, calib = tiny
    opts = {"max_probes": 5} if method == "hutchinson" else {"max_iters": 5}
    a, b = (analyze(model, units, CANDS, method, calib, batch_size=3, retain_graph=r, **opts) for r in (True, False))
    for ua, ub in zip(a.units, b.units):
        for oa, ob in zip(ua.options, ub.options):
            assert oa["error"] == pytest.approx(ob["error"], rel=1e-4)
    assert a.cost["hvp"] == b.cost["hvp"] and b.cost["forward"] > a.cost["forward"]


def test_eigen_matches_eigvalsh(tiny):
    model, units, calib = tiny
    # |lambda_2 / lambda_1| is about 0.75 for both blocks here; float32 products limit tol
    table = analyze(model, units, CANDS, "eigen", calib, tol=1e-6, max_iters=200, batch_size=4, retain_graph=True)
    h, ranges = _exact_hessian(model, units, calib)
    for u, r in zip(units, ranges):
        ev = torch.linalg.eigvalsh(h[r, r])
        dominant = float(ev[ev.abs().argmax()])
        got = table.unit(u.name).info["eigenvalue"]
        assert got == pytest.approx(dominant, rel=1e-3), (u.name, got, ev[-3:], ev[:3])
        opt = table.unit(u.name).options[0]
        assert opt["error"] == pytest.approx(abs(got) * _sq(u, model, opt["option"]), rel=1e-9)


def test_output_error_equals_direct(tiny):
    model, units, calib = tiny
    table = analyze(model, units, CANDS, "output", calib, batch_size=3)
    with torch.no_grad():
        h = model.emb(calib)  # (n, L, d)
        xs = {"fc1": h.reshape(-1, 6), "fc2": torch.tanh(model.fc1(h)).reshape(-1, 6)}
    for u in units:
        w = get_weight(model, u).detach()
        for o in table.unit(u.name).options:
            dw = parse_option(o["option"]).fmt.fake_quant(w) - w
            direct = float((xs[u.name].double() @ dw.double().t()).pow(2).sum()) / calib.numel()
            assert o["error"] == pytest.approx(direct, rel=1e-6)
        assert table.unit(u.name).stats["n_tokens"] == calib.numel()
    assert table.cost == {"forward": 1.0}


def test_fisher_equals_mean_squared_window_gradients(tiny):
    model, units, calib = tiny
    table = analyze(model, units, CANDS, "fisher", calib)
    ps = [model.fc1.weight, model.fc2.weight]
    sq = [torch.zeros_like(p, dtype=torch.float64) for p in ps]
    for i in range(calib.shape[0]):
        ids = calib[i: i + 1]
        loss = F.cross_entropy(model(ids)[:, :-1].reshape(-1, 10), ids[:, 1:].reshape(-1))
        for acc, g in zip(sq, torch.autograd.grad(loss, ps)):
            acc += g.double() ** 2
    for u, s in zip(units, sq):
        fisher = s / calib.shape[0]
        w = get_weight(model, u).detach()
        for o in table.unit(u.name).options:
            dw = (parse_option(o["option"]).fmt.fake_quant(w) - w).double()
            assert o["error"] == pytest.approx(float((fisher * dw**2).sum()), rel=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_measure_identity_zero_and_harsher_larger(tiny_llama):
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    units = llm_units(tiny_llama)
    table = analyze(tiny_llama, units, ["fp32", "int2:g32", "int8:ch"], "measure", calib)
    for u in table.units:
        errs = {o["option"]: o["error"] for o in u.options}
        assert errs["fp32"] < 1e-12
        assert errs["int2:g32"] > errs["int8:ch"] > 0
    # block replay gives what a full forward per (unit, option) gives
    full = analyze(tiny_llama, units, ["fp32", "int2:g32", "int8:ch"], "measure", calib, replay=False)
    for a, b in zip(table.units, full.units):
        for oa, ob in zip(a.options, b.options):
            assert oa["error"] == pytest.approx(ob["error"], rel=1e-5, abs=1e-14)
    n_units_by_block = [sum(1 for u in units if u.block == b) for b in (0, 1)]
    # float pass + statistics pass + one pass from the unit's block per unit and option
    assert table.cost["forward"] == pytest.approx(2 + 3 * (n_units_by_block[0] * 1.0 + n_units_by_block[1] * 0.5))
    assert full.cost["forward"] == pytest.approx(2 + 3 * len(units))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_ranks_int2_int4_int8(tiny_llama, method):
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    opts = {"hutchinson": {"max_probes": 4, "batch_size": 2}, "eigen": {"max_iters": 3, "batch_size": 2}}.get(method, {})
    table = analyze(tiny_llama, llm_units(tiny_llama), CANDS, method, calib, **opts)
    assert [u.name for u in table.units] == [u.name for u in llm_units(tiny_llama)]
    for u in table.units:
        e = [o["error"] for o in u.options]
        assert e[0] > e[1] > e[2] > 0, (method, u.name, e)
        assert [o["bits"] for o in u.options] == [parse_option(c).bits(u.shape) for c in CANDS]
        assert u.stats["n_tokens"] == 32 and u.stats["ratio"] > 1
    rows = table.to_rows()
    assert len(rows) == 3 * len(table.units) and rows[0][:2] == (table.units[0].name, "int2:g32")
    # the model is left as it was: attention implementation, grad flags, eval mode
    assert tiny_llama.config._attn_implementation == "sdpa"
    assert all(p.requires_grad for p in tiny_llama.parameters()) and not tiny_llama.training


def test_artifact_deterministic_and_seeded(tiny_llama, tmp_path):
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    units = llm_units(tiny_llama)
    kw = dict(max_probes=4, batch_size=2, model_name="tiny-llama", calib_description="random ids")
    paths = []
    for i, seed in enumerate((0, 0, 1)):
        t = analyze(tiny_llama, units, CANDS, "hutchinson", calib, seed=seed, **kw)
        assert t.timing["wall_s"] > 0
        paths.append(tmp_path / f"s{i}.json")
        t.save(paths[-1])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    a, c = SensitivityTable.load(paths[0]), SensitivityTable.load(paths[2])
    assert a.to_rows() != c.to_rows()
    assert a.seed == 0 and c.seed == 1 and a.model == "tiny-llama" and a.method == "hutchinson"
    assert a.calibration["shape"] == [2, 16] and len(a.calibration["sha256"]) == 64
    assert a.mixq_version and a.method_opts["iterations"] == 4
    assert a.to_rows() == SensitivityTable.load(paths[1]).to_rows()
    info = a.units_info[0]
    assert set(info) >= {"name", "shape", "n_params", "role", "block", "stats", "info"}
    plan = tmp_path / "plan.json"
    plan.write_text('{"kind": "plan", "schema_version": 1}')
    with pytest.raises(ArtifactError):
        SensitivityTable.load(plan)


def test_moe_rows_per_expert_and_routed_tokens(tiny_moe):
    model = copy.deepcopy(tiny_moe)

    class NeverThree(nn.Module):
        """Routes every token to its best two of experts 0..2: expert 3 gets nothing."""

        def __init__(self, gate):
            super().__init__()
            self.weight = gate.weight

        def forward(self, h):
            logits = F.linear(h, self.weight)  # (T, 4)
            scores, idx = torch.topk(torch.softmax(logits[:, :3], -1), 2, dim=-1)
            return logits, scores / scores.sum(-1, keepdim=True), idx

    model.model.layers[1].mlp.gate = NeverThree(model.model.layers[1].mlp.gate)
    calib = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(6))
    units = llm_units(model)
    table = analyze(model, units, CANDS, "output", calib)
    names = [u.name for u in table.units]
    for b in (0, 1):
        for e in range(4):
            assert f"model.layers.{b}.mlp.experts.down_proj.{e}" in names
        routed = sum(table.unit(f"model.layers.{b}.mlp.experts.gate_up_proj.{e}").stats["n_tokens"] for e in range(4))
        assert routed == 24 * 2
    dead = table.unit("model.layers.1.mlp.experts.down_proj.3")
    assert dead.stats == {"n_tokens": 0} and all(o["error"] == 0.0 for o in dead.options)
    live = table.unit("model.layers.1.mlp.experts.down_proj.0")
    assert live.stats["n_tokens"] > 0 and all(o["error"] > 0 for o in live.options)


def test_planted_activation_spike_is_flagged(tiny_llama):
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
    units = llm_units(tiny_llama)
    clean = analyze(tiny_llama, units, ["int8:ch"], "output", calib)
    assert spiky_units(clean, 200.0) == []
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[17] *= 100.0  # down_proj input channel 17 x100
    spiked = analyze(model, units, ["int8:ch"], "output", calib)
    assert spiky_units(spiked, 200.0) == ["model.layers.1.mlp.down_proj"]
    stats = spiked.unit("model.layers.1.mlp.down_proj").stats
    assert stats["top_channel"] == 17 and stats["channel_ratio"] > 50 and stats["kurtosis"] > 3


def test_image_task_conv_units(tmp_path):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.fc = nn.Linear(4 * 6 * 6, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    model = Net().eval()
    units = cnn_units(model)
    images, labels = torch.randn(6, 3, 6, 6), torch.randint(0, 5, (6,))
    table = analyze(model, units, CANDS, "output", (images, labels), batch_size=4)
    assert table.task == "image" and table.calibration["shape"] == [[6, 3, 6, 6], [6]]
    cols = F.unfold(images, 3, padding=1).transpose(1, 2).reshape(-1, 27)  # (6*36, 27)
    w = get_weight(model, units[0]).detach()
    for o in table.unit("conv").options:
        dw = parse_option(o["option"]).fmt.fake_quant(w) - w
        assert o["error"] == pytest.approx(float((cols @ dw.t()).double().pow(2).sum()) / 6, rel=1e-5)
    for method in ("measure", "hutchinson", "fisher"):
        t = analyze(model, units, CANDS, method, (images, labels), max_probes=4) if method == "hutchinson" \
            else analyze(model, units, CANDS, method, (images, labels))
        assert all(o["error"] >= 0 for u in t.units for o in u.options)


def test_bad_inputs_and_quantize_hook(tiny):
    model, units, calib = tiny
    with pytest.raises(MixqError, match="unknown sensitivity method"):
        analyze(model, units, CANDS, "magic", calib)
    with pytest.raises(FormatError):
        analyze(model, units, ["int99:g7"], "output", calib)
    with pytest.raises(MixqError, match="not plain round to nearest.*UnitQuantizer"):
        analyze(model, units, ["int4:g32+gptq"], "output", calib)
    same = analyze(model, units, CANDS, "output", calib, quantize_fn=lambda u, w, opt: w)
    assert all(o["error"] == 0.0 for u in same.units for o in u.options)


def test_calibration_loss_and_cost_helpers(tiny):
    model, units, calib = tiny
    loss = calibration_loss_fn(model, calib, batch_size=3)()
    with torch.no_grad():
        logits = model(calib)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 10), calib[:, 1:].reshape(-1))
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-6)
    assert fwd_bwd_seconds(model, calib) > 0

"""Weights, activations and the KV cache in one budget: the multi-constraint ILP against brute
force, the planner's accounting, the spike rule for activations, the analysis of activation
and KV candidates on the tiny Llama, artifacts (plan and table schema 2, schema 1 read)."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from mixq import api
from mixq.accounting import bit_totals, kv_totals
from mixq.allocate import MultiGroup, solve_multi
from mixq.budget import Budget, kv_costs, unit_costs
from mixq.errors import BudgetError, MixqError
from mixq.formats.kvcache import parse_kv
from mixq.option import parse_option
from mixq.plan import Plan
from mixq.planner import make_plan_multi, spike_rule
from mixq.sensitivity import SensitivityTable

pytestmark = pytest.mark.usefixtures("one_thread")


def random_groups(rng: random.Random, n_groups: int, n_options: int, resources: list[str]) -> list[MultiGroup]:
    groups = []
    for g in range(n_groups):
        costs = {r: tuple(rng.randrange(0, 50) for _ in range(n_options)) for r in resources}
        error = tuple(round(rng.random(), 3) for _ in range(n_options))
        groups.append(MultiGroup((f"u{g}",), tuple(f"o{i}" for i in range(n_options)), costs, error))
    return groups


def brute(groups, limits):
    best = None
    for picks in itertools.product(*(range(len(g.names)) for g in groups)):
        if all(sum(g.costs[r][p] for g, p in zip(groups, picks)) <= lim for r, lim in limits.items()):
            err = math.fsum(g.error[p] for g, p in zip(groups, picks))
            best = err if best is None else min(best, err)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_multi_ilp_equals_brute_force(seed):
    rng = random.Random(seed)
    resources = ["a", "b", "c"]
    groups = random_groups(rng, 5, 4, resources)
    lo = {r: sum(min(g.costs[r]) for g in groups) for r in resources}
    hi = {r: sum(max(g.costs[r]) for g in groups) for r in resources}
    limits = {r: rng.randint(lo[r], (lo[r] + hi[r]) // 2 + 1) for r in resources}
    expect = brute(groups, limits)
    if expect is None:
        with pytest.raises((BudgetError, MixqError)):
            solve_multi(groups, limits)
        return
    sol = solve_multi(groups, limits)
    assert sol.total_error == pytest.approx(expect, abs=1e-9)
    for r in resources:
        assert sol.totals[r] == sum(g.costs[r][g.names.index(sol.choice[g.units[0]])] for g in groups)
        assert sol.totals[r] <= limits[r]


def test_multi_ilp_refuses_an_impossible_budget_naming_the_resource():
    groups = [MultiGroup(("u",), ("a", "b"), {"bits": (4, 8), "bops": (10, 5)}, (1.0, 0.0))]
    with pytest.raises(BudgetError, match="bops needs at least 5"):
        solve_multi(groups, {"bits": 8, "bops": 4})
    sol = solve_multi(groups, {"bits": 8, "bops": 10})
    assert sol.choice == {"u": "b"}
    assert solve_multi(groups, {"bits": 4, "bops": 10}).choice == {"u": "a"}  # bits bind


def synthetic_table():
    """Two blocks of two units, activation candidates, one KV layer per block."""
    units, rows = [], []
    opts = ["int4:g64", "int4:g64@int8:tok", "int4:g64@int4:tok", "int8:ch", "int8:ch@int8:tok", "int8:ch@int4:tok"]
    err = {"int4:g64": 1.0, "int8:ch": 0.1}
    act = {None: 0.0, "int8:tok": 0.05, "int4:tok": 0.8}
    for b in range(2):
        for role, shape in (("q_proj", (64, 128)), ("down_proj", (128, 256))):
            name = f"model.layers.{b}.{role}"
            units.append({"name": name, "shape": list(shape), "n_params": shape[0] * shape[1], "role": role,
                          "block": b})
            for o in opts:
                po = parse_option(o)
                e = err[str(po.weight_only)] * (1 + b) + act[str(po.act) if po.act else None] * (2 if role == "down_proj" else 1)
                rows.append((name, o, po.bits(shape), e))
    kv = [{"name": f"model.layers.{b}.self_attn", "block": b, "n_kv_heads": 2, "head_dim": 64,
           "options": [{"kv": "int8", "error": 0.01}, {"kv": "int4:kchan", "error": 0.3},
                       {"kv": "int2:kchan:out1%:sink", "error": 2.0}]} for b in range(2)]
    return units, rows, kv


def test_planner_meets_every_budget_and_accounts_exactly():
    units, rows, kv = synthetic_table()
    budget = Budget(bits_per_weight=6.0, max_bytes=150_000, context=256, bits_per_mac=40.0)
    plan, sol = make_plan_multi("synthetic", units, rows, kv, budget)
    n = sum(u["n_params"] for u in units)
    shapes = {u["name"]: tuple(u["shape"]) for u in units}
    w_bits = sum(plan.options[u].bits(s) for u, s in shapes.items())
    bops = sum(unit_costs(plan.options[u], s)["bops"] for u, s in shapes.items())
    kv_bits = sum((plan.kv[l["name"]] if l["name"] in plan.kv else parse_kv("fp16")).bits_total(256, 2, 64)
                  for l in kv)
    assert w_bits <= 6.0 * n and bops <= 40.0 * n and (w_bits + kv_bits) <= 8 * 150_000
    assert plan.meta["achieved"]["bits_per_weight"] == pytest.approx(w_bits / n)
    assert plan.meta["achieved"]["bytes"] == pytest.approx((w_bits + kv_bits) / 8)
    assert plan.meta["achieved"]["bits_per_mac"] == pytest.approx(bops / n)
    assert sol.total_error == pytest.approx(sum(e for u, o, _, e in rows if plan.options[u] == parse_option(o))
                                            + sum(o["error"] for l in kv for o in l["options"]
                                                  if plan.kv.get(l["name"]) == parse_kv(o["kv"])))
    # the exhaustive optimum over the same choices
    unit_opts = {u["name"]: [(o, e) for n_, o, _, e in rows if n_ == u["name"]] for u in units}
    kv_opts = {l["name"]: [(o["kv"], o["error"]) for o in l["options"]] + [("fp16", 0.0)] for l in kv}
    best = None
    names = list(unit_opts) + list(kv_opts)
    for picks in itertools.product(*(unit_opts[n_] if n_ in unit_opts else kv_opts[n_] for n_ in names)):
        wb = sum(parse_option(o).bits(shapes[n_]) for n_, (o, _) in zip(names, picks) if n_ in unit_opts)
        bo = sum(unit_costs(parse_option(o), shapes[n_])["bops"] for n_, (o, _) in zip(names, picks) if n_ in unit_opts)
        kb = sum(kv_costs(parse_kv(o), 256, 2, 64)["kv_bits"] for n_, (o, _) in zip(names, picks) if n_ in kv_opts)
        if wb <= 6.0 * n and bo <= 40 * n and wb + kb <= 8 * 150_000:
            e = math.fsum(e for _, e in picks)
            best = e if best is None else min(best, e)
    assert sol.total_error == pytest.approx(best)


def test_bytes_budget_trades_weight_bits_against_kv_bits():
    units, rows, kv = synthetic_table()
    loose = make_plan_multi("s", units, rows, kv, Budget(max_bytes=400_000, context=256))[0]
    assert loose.kv == {} and {str(o) for o in loose.options.values()} == {"int8:ch"}  # everything fits: least error
    mid = make_plan_multi("s", units, rows, kv, Budget(max_bytes=200_000, context=256))[0]
    tight = make_plan_multi("s", units, rows, kv, Budget(max_bytes=110_000, context=256))[0]
    for p, cap in ((mid, 200_000), (tight, 110_000)):
        assert p.meta["achieved"]["bytes"] <= cap
    # the KV cache gives way first (its errors are the cheaper ones here), weights stay at 8 bits
    assert mid.kv and {str(o) for o in mid.options.values()} == {"int8:ch"}
    assert tight.meta["predicted_error"] > mid.meta["predicted_error"] > loose.meta["predicted_error"] == 0.1 * 2 * 3
    with pytest.raises(BudgetError, match="bytes of weights \\+ KV cache at 256 tokens"):
        make_plan_multi("s", units, rows, kv, Budget(max_bytes=10_000, context=256))
    with pytest.raises(MixqError, match="context"):
        Budget(max_bytes=10_000)


def test_spike_rule_keeps_spiky_inputs_at_8_bits_unless_rotated():
    units = [{"name": "d", "n_params": 64 * 64}]
    rows = [("d", o, parse_option(o).bits((64, 64)), 1.0) for o in
            ["int4:g64@int4:tok", "int4:g64+rotate@int4:tok", "int8:ch@int4:tok", "int8:ch@int8:tok", "int8:ch",
             "int4:g64+rotate@int8:tok"]]
    kept, _ = spike_rule(rows, units, ["d"], "rotate")
    assert {r[1] for r in kept} == {"int4:g64+rotate@int4:tok", "int8:ch@int8:tok", "int8:ch",
                                    "int4:g64+rotate@int8:tok"}
    kept, _ = spike_rule(rows, units, ["d"], "keep")
    assert {r[1] for r in kept} == {"int8:ch@int8:tok", "int8:ch"}


def test_plan_schema_2_round_trip_and_schema_1_read(tmp_path, tiny_llama):
    from mixq.apply.runtime import uniform_kv
    from mixq.models.enumerate import llm_units

    units = llm_units(tiny_llama)
    plan = Plan.uniform("tiny", units, "int4:g32+gptq@int8:tok", kv=uniform_kv(tiny_llama, parse_kv("int4:kchan")))
    plan.save(tmp_path / "p.json")
    back = Plan.load(tmp_path / "p.json")
    assert back.options == plan.options and back.kv == plan.kv
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["schema_version"] == 2 and doc["kv"]["model.layers.0.self_attn"] == "int4:kchan"
    doc["schema_version"] = 1
    del doc["kv"]
    (tmp_path / "old.json").write_text(json.dumps(doc))
    old = Plan.load(tmp_path / "old.json")
    assert old.kv == {} and old.options == plan.options
    doc["kv"] = {"model.layers.0.self_attn": "int9"}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(Exception, match="bad.json.*KV spec"):
        Plan.load(tmp_path / "bad.json")


def test_analysis_of_activation_and_kv_candidates(tiny_loaded, text_file, tmp_path):
    table = api.analyze(tiny_loaded, candidates=["int4:g32", "int8:ch", "int4:g32+rotate"],
                        act_candidates=["none", "int8:tok", "int4:tok"],
                        kv_candidates=["int8", "int4:kchan", "int2:kchan:out1%:sink"], calib=str(text_file),
                        samples=4, seqlen=64, measure_cost=False)
    assert "int4:g32+rotate@int4:tok" in table.candidates and len(table.candidates) == 9
    for u in table.units:
        e = {o["option"]: o["error"] for o in u.options}
        for w in ("int4:g32", "int8:ch", "int4:g32+rotate"):
            assert e[w] <= e[f"{w}@int8:tok"] <= e[f"{w}@int4:tok"]  # coarser inputs, more error
        assert e["int8:ch@int4:tok"] > e["int8:ch"]
        assert u.info["kappa"] > 0
        assert {o["bits"] for o in u.options if o["option"].startswith("int8:ch")} == {parse_option("int8:ch").bits(u.shape)}
    assert [l["name"] for l in table.kv] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for layer in table.kv:
        e = {o["kv"]: o["error"] for o in layer["options"]}
        assert 0 < e["int8"] < e["int4:kchan"] < e["int2:kchan:out1%:sink"]
    table.save(tmp_path / "s.json")
    back = SensitivityTable.load(tmp_path / "s.json")
    assert back.kv == table.kv and back.kv_candidates == table.kv_candidates
    plan, _ = api.plan(tmp_path / "s.json", 6.0, context=512, bits_per_mac=40.0, kv_bits=6.0)
    assert plan.kv and plan.meta["achieved"]["bits_per_mac"] <= 40.0 and plan.meta["achieved"]["kv_bits"] <= 6.0
    plan.save(tmp_path / "plan.json")
    res = api.evaluate(tiny_loaded, plans=[str(tmp_path / "plan.json")], data=str(text_file), windows=2, seqlen=64)
    row = res["rows"][1]
    assert row["kl"] > 0 and row["kv_format"] is not None
    assert row["kv_bits_per_element"] == pytest.approx(kv_totals(tiny_loaded.model, plan, 64)["kv_bits_per_element"])
    assert row["bpw_units"] == pytest.approx(bit_totals(plan, tiny_loaded.units(include_head=True, include_embeddings=True),
                                                        tiny_loaded.n_params)["bpw_units"])


def test_activation_candidates_refused_where_they_cannot_apply(tiny_loaded, text_file):
    with pytest.raises(MixqError, match="q_proj.*candidate int8:ch@int4:g128.*do not divide the input dimension 64"):
        api.analyze(tiny_loaded, candidates=["int8:ch@int4:g128"], calib=str(text_file), samples=2, seqlen=32,
                    measure_cost=False)
    with pytest.raises(MixqError, match="fisher or output"):
        api.analyze(tiny_loaded, candidates=["int8:ch"], kv_candidates=["int4"], method="hutchinson",
                    calib=str(text_file), samples=2, seqlen=32, measure_cost=False)
    with pytest.raises(MixqError, match="head dimension"):
        api.analyze(tiny_loaded, candidates=["int8:ch"], kv_candidates=["int4:g12"], calib=str(text_file), samples=2,
                    seqlen=32, measure_cost=False)


def test_eval_kv_alone_and_crossed(tiny_loaded, text_file):
    res = api.evaluate(tiny_loaded, formats=["int8:ch@int8:tok"], kv=["int8", "int4:kchan"], data=str(text_file),
                       windows=2, seqlen=32)
    labels = [r["label"] for r in res["rows"]]
    assert labels == ["float", "int8:ch@int8:tok kv int8", "int8:ch@int8:tok kv int4:kchan"]
    assert res["rows"][1]["kv_bits_per_element"] == pytest.approx(parse_kv("int8").bits_per_element(32, 2, 16))
    alone = api.evaluate(tiny_loaded, kv=["int4"], data=str(text_file), windows=2, seqlen=32)
    assert alone["rows"][1]["label"] == "float weights kv int4" and alone["rows"][1]["bpw_blocks"] == 16
    assert alone["rows"][1]["kl"] > 0


def test_run_with_activation_and_kv_candidates(tiny_loaded, text_file, tmp_path):
    from mixq.pipeline import run

    out = tmp_path / "run"
    res = run(tiny_loaded, budget_bpw=6.0, out_dir=out, candidates=["int4:g32", "int8:ch"], calib=str(text_file),
              samples=4, seqlen=32, eval_data=str(text_file), eval_windows=2, n_checks=2,
              act_candidates=["none", "int8:tok"], kv_candidates=["int8", "int4:kchan"], context=32, bits_per_mac=64.0,
              kv_bits=8.5)
    plan = Plan.load(out / "plan.json")
    assert plan.kv and plan.meta["achieved"]["bits_per_mac"] <= 64.0 and plan.meta["achieved"]["kv_bits"] <= 8.5
    labels = [r["label"] for r in res["eval"]["rows"]]
    assert "int8:ch@int8:tok" in labels and "mixed ILP @ 6" in labels
    assert (out / "report.html").is_file()


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma", "gemma3", "qwen3"])
def test_kv_and_inputs_on_other_families(family):
    """The KV hooks find each family's keys (k_norm where there is one) and its RoPE; an
    identity hook changes nothing, a quantized cache changes the logits a little."""
    import transformers as tf

    from mixq.apply.runtime import Runtime, uniform_kv
    from mixq.models.enumerate import llm_units
    from mixq.models.kvcache import kv_hooks, kv_layers

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    cfg, cls = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM), "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
                "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[family]
    extra = {"head_dim": 16} if family in ("gemma", "gemma3", "qwen3") else {}
    torch.manual_seed(0)
    model = cls(cfg(**common, **extra)).eval()
    layers = kv_layers(model)
    assert len(layers) == 2 and layers[0].head_dim == 16 and layers[0].n_kv_heads == 2
    assert layers[0].key_module.endswith("k_norm" if family in ("gemma3", "qwen3") else "k_proj")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    seen = []

    def keys(k, rope):
        assert rope is not None and torch.allclose(rope(rope(k, False), True), k, atol=1e-5)
        seen.append(k.shape)
        return k

    with torch.no_grad():
        ref = model(ids).logits
        with kv_hooks(model, layers, {l.name: keys for l in layers}, {l.name: (lambda v: v) for l in layers}):
            same = model(ids).logits
        rt = Runtime(model, uniform_kv(model, parse_kv("int4:kchan:sink")))
        units = llm_units(model)
        rt.add(units[0], parse_option("int8:ch@int8:tok"), None)
        with rt.active():
            quant = model(ids).logits
    assert torch.equal(same, ref) and seen == [(2, 12, 2, 16)] * 2
    assert torch.isfinite(quant).all() and not torch.allclose(quant, ref, atol=1e-6)

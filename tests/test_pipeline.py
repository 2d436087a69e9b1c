"""analyze -> plan -> eval -> report on tiny models (fast), and plan-building rules."""

import json

import pytest
import torch

from mixq import api
from mixq.errors import ArtifactError, BudgetError, MixqError
from mixq.pipeline import check_points, closest_uniform, run
from mixq.planner import expand_pattern, tie_groups

CANDS = ["int2:g32", "int4:g32", "int8:ch"]


@pytest.fixture()
def table(tiny_loaded, text_file):
    return api.analyze(tiny_loaded, candidates=CANDS, method="output", calib=str(text_file), samples=4, seqlen=32,
                       measure_cost=False)


def test_plan_meets_budget_and_is_explicit(table):
    plan, curve = api.plan(table, 4.0, frontier_points=9)
    assert set(plan.options) == {u.name for u in table.units}
    bits = sum(plan.unit_bits().values())
    params = sum(u.n_params for u in table.units)
    assert bits <= 4.0 * params
    assert plan.meta["bits_per_weight"] == pytest.approx(bits / params)
    # The frontier is monotone: more bits, less predicted error.
    assert all(a["bits_per_weight"] < b["bits_per_weight"] and a["predicted_error"] > b["predicted_error"]
               for a, b in zip(curve, curve[1:]))


def test_ilp_never_worse_than_greedy(table):
    for budget in (3.0, 4.0, 5.5):
        ilp, _ = api.plan(table, budget)
        greedy, _ = api.plan(table, budget, solver="greedy")
        assert ilp.meta["predicted_error"] <= greedy.meta["predicted_error"] * (1 + 1e-9)


def test_keep_and_tie_rules(table):
    # Pinned units count in the budget: bf16 down_proj (a third of the weights) needs a larger one.
    plan, _ = api.plan(table, 7.0, keep={"*.down_proj": "bf16"}, ties=["qkv"])
    for b in (0, 1):
        assert str(plan.options[f"model.layers.{b}.mlp.down_proj"]) == "bf16"
        qkv = {str(plan.options[f"model.layers.{b}.self_attn.{p}"]) for p in ("q_proj", "k_proj", "v_proj")}
        assert len(qkv) == 1


def test_pattern_that_matches_nothing_is_an_error(table):
    with pytest.raises(MixqError, match="matches no unit"):
        api.plan(table, 3.0, keep={"*.nothing": "int8:ch"})


def test_infeasible_budget_gives_range(table):
    with pytest.raises(BudgetError, match=r"achievable range .* 2\.5"):
        api.plan(table, 1.0)


def test_tie_groups_for_experts():
    units = [{"name": f"l0.e.down.{e}", "role": "experts.down_proj", "block": 0} for e in range(4)]
    units += [{"name": f"l1.e.down.{e}", "role": "experts.down_proj", "block": 1} for e in range(4)]
    groups = tie_groups(units, ["experts"])
    assert sorted(map(len, groups)) == [4, 4]
    with pytest.raises(MixqError, match="unknown tie rule"):
        tie_groups(units, ["bogus"])


def test_expand_pattern_regex():
    names = ["model.layers.0.mlp.down_proj", "model.layers.10.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    assert expand_pattern(r"re:layers\.(0|1)\.", names) == [names[0], names[2]]
    assert expand_pattern("*.down_proj", names) == names[:2]


def test_closest_uniform_and_check_points():
    shapes = {"a": (64, 64), "b": (64, 128)}
    assert closest_uniform(["int2:g64", "int4:g64", "int8:ch"], shapes, 4.3) == "int4:g64"
    assert closest_uniform(["int4:g64"], shapes, 2.0) is None
    curve = [{"bits_per_weight": i} for i in range(10)]
    assert [p["bits_per_weight"] for p in check_points(curve, 4)] == [0, 3, 6, 9]


def test_run_leaves_a_complete_run_directory(tiny_loaded, text_file, tmp_path):
    import mixq.api as api_mod

    out = tmp_path / "run"
    before = {k: v.clone() for k, v in tiny_loaded.model.state_dict().items()}
    # Evaluate on the same small text (a test file stands in for both splits here).
    stages = []
    res = run(tiny_loaded, budget_bpw=4.0, out_dir=out, candidates=CANDS, calib=str(text_file), samples=4, seqlen=32,
              eval_data=str(text_file), eval_windows=4, n_checks=4, stage=lambda i, n, t: stages.append((i, n, t)))
    assert [(i, n) for i, n, _ in stages] == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert stages[1][2].startswith(f"analyze: fisher sensitivity of {len(CANDS)} candidates on 4 calibration windows")
    for name in ("sensitivity.json", "plan.json", "plan_greedy.json", "frontier.json", "eval.json", "check.json",
                 "report.html", "sensitivity.png", "bits.png", "frontier.png"):
        assert (out / name).is_file(), name
    ev = json.loads((out / "eval.json").read_text())
    labels = [r["label"] for r in ev["rows"]]
    assert labels[:4] == ["float"] + CANDS and "mixed ILP @ 4" in labels
    check = json.loads((out / "check.json").read_text())
    assert len(check["plans"]) >= 3 and -1 <= check["spearman"] <= 1
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Additivity check" in html
    assert all(torch.equal(before[k], v) for k, v in tiny_loaded.model.state_dict().items())
    assert res["plan"].meta["budget_bpw"] == 4.0
    del api_mod


def test_report_refuses_a_non_run_directory(tmp_path):
    from mixq.report import write_report

    with pytest.raises(ArtifactError, match="not a mixq run directory"):
        write_report(tmp_path)


def test_run_on_a_cnn_defaults_to_benchmark_calibration_and_per_channel(monkeypatch, tmp_path):
    """`mixq run` on a CNN: 512 calibration images and per-channel candidates by default (the
    CIFAR benchmarks' set-up), not 8 images and group-64 candidates."""
    from mixq import api
    from mixq.models import LoadedModel
    from mixq.models.resnet_cifar import CifarResNet

    seen = {}

    class Stop(Exception):
        pass

    def fake_analyze(loaded, candidates, method, calib, samples, *args, **kw):
        seen.update(candidates=candidates, samples=samples)
        raise Stop

    monkeypatch.setattr(api, "analyze_keeping", fake_analyze)
    cnn = LoadedModel(name="resnet20", kind="image_classifier", model=CifarResNet(20), source="fixture")
    with pytest.raises(Stop):
        run(cnn, out_dir=tmp_path / "r")
    assert seen["samples"] == 512 and tuple(seen["candidates"]) == ("int2:ch", "int3:ch", "int4:ch", "int8:ch")
    with pytest.raises(Stop):
        run(cnn, out_dir=tmp_path / "r", samples=64, candidates=["int4:ch"])
    assert seen["samples"] == 64 and list(seen["candidates"]) == ["int4:ch"]

"""The public Python API: thin functions over the pipeline stages. The command line is a
thin layer over these."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mixq.formats.grouping import all_finite
from mixq.accounting import bit_totals, kv_totals
from mixq.artifacts import sha256_text
from mixq.errors import DataError, MixqError
from mixq.models import DEFAULT_MODEL, LoadedModel, get_weight, load_model
from mixq.models.calibration import IMAGE_CALIBRATION, calibration_data, calibration_inputs, check_window  # noqa: F401
from mixq.option import CalibConfig, parse_option
from mixq.plan import Plan
from mixq.progress import Progress

log = logging.getLogger(__name__)

EVAL_SCHEMA = 1


def _plans_for(loaded: LoadedModel, formats: list[str], plans: list[str | Path | Plan],
               include_head: bool, kv: list[str] = ()) -> list[tuple[str, Plan]]:
    """(label, plan) per format and plan, each once per KV format in `kv` (which replaces a
    plan's own KV formats); KV formats alone give plans with float weights."""
    from mixq.apply.runtime import check_kv, uniform_kv
    from mixq.formats.kvcache import parse_kv

    units = loaded.units(include_head=include_head)
    kv_maps = [(str(parse_kv(k)), uniform_kv(loaded.model, parse_kv(k))) for k in kv]
    base: list[tuple[str, Plan]] = []
    for spec in formats:
        uniform = Plan.uniform(loaded.name, units, spec)
        uniform.check_against(units)  # e.g. a k-quant on rows that are not whole super-blocks
        base.append((spec, uniform))
    for p in plans:
        plan = p if isinstance(p, Plan) else Plan.load(p)
        all_units = loaded.units(include_head=True, include_embeddings=True)
        plan.check_against(all_units)
        check_kv(loaded.model, plan.kv)
        base.append((str(p) if not isinstance(p, Plan) else plan.meta.get("label", "plan"), plan))
    if not kv_maps:
        return base
    if not base:
        base = [("float weights", Plan.uniform(loaded.name, units, None))]
    return [(f"{label} kv {name}", plan.with_kv(kv_map)) for label, plan in base for name, kv_map in kv_maps]


def evaluate(
    model: str | LoadedModel = DEFAULT_MODEL,
    formats: list[str] | tuple[str, ...] = (),
    plans: list[str | Path | Plan] | tuple = (),
    data: str | None = None,
    seqlen: int = 512,
    windows: int | None = 8,
    tasks: list[str] | tuple[str, ...] = (),
    limit: int | None = None,
    include_head: bool = False,
    calib: str | None = None,
    calib_samples: int = 128,
    calib_seqlen: int = 512,
    seed: int = 0,
    progress: Progress | None = None,
    config: CalibConfig | None = None,
    device: str | None = "auto",
    dtype: str | None = None,
    offload: str | None = "auto",
    cache: dict | None = None,
    rotate_residual: int | None = None,
    kv: list[str] | tuple[str, ...] = (),
) -> dict:
    """Evaluate the float model and each uniform format / plan on it.

    Causal LMs: token-level perplexity on `windows` non-overlapping windows of `seqlen`
    tokens of `data` (None: all full windows), KL to the float model and top-1 agreement,
    and zero-shot `tasks` (first `limit` examples each), all variants in one block-by-block
    walk over the model (`eval.streamed`). Image classifiers: top-1 on the evaluation half
    of CIFAR-10. Every row carries its all-in bits per weight.
    Options with GPTQ or smoothing (`int3:g64+gptq+rotate`) are calibrated on `calib_samples`
    random windows of `calib_seqlen` tokens of `calib` (default `wikitext2-valid`), block by
    block; image classifiers on `calib_samples` random images of the CIFAR-10 calibration
    half (`cifar10-calib`), unit by unit. The manifest's warnings land in the row. `cache`:
    (unit, option) -> QuantizedWeight made earlier (e.g. by the analysis), used instead of
    quantizing again. device/dtype/offload: see `models.load_model` (a LoadedModel keeps its own).
    Options may carry an input-activation format (`int8:ch@int8:tok`); `kv` lists KV-cache
    formats (`int4:kchan`), each applied to every layer of every format / plan in turn (alone:
    with float weights). rotate_residual: a seed to fold a residual-stream rotation into the
    model first (see `models.fold`); the float row is then the rotated model (equal to the
    original to float rounding). Returns the body of an `eval` artifact (see `mixq.artifacts`).
    """
    check_requests(options=list(formats), tasks=list(tasks))  # before the model loads
    loaded = _load(model, dtype, device, offload, rotate_residual)
    config = config or CalibConfig(seed=seed)
    planned = _plans_for(loaded, list(formats), list(plans), include_head, list(kv))  # refuses models without known blocks
    if loaded.kind == "causal_lm":
        check_window(loaded, seqlen, "eval seqlen")
    n_params = loaded.n_params
    all_units = loaded.units(include_head=True, include_embeddings=True)
    _check_weights(loaded, all_units, planned)
    body: dict = {"model": loaded.name, "model_source": loaded.source, "note": loaded.note,
                  "model_params": n_params, "include_head": include_head, **_placement(loaded),
                  "rotate_residual": loaded.extra.get("rotate_residual")}
    calib_ids = None
    if any(_needs_calibration(p) for _, p in planned) and (not cache or any(_static_acts(p) for _, p in planned)):
        calib_data, desc = calibration_data(loaded, calib, calib_samples, calib_seqlen, seed)
        calib_ids = calibration_inputs(calib_data)
        body["calibration"] = desc
    _reset_peak(loaded)
    if loaded.kind == "causal_lm":
        rows = _eval_lm(loaded, planned, all_units, n_params, body, data, seqlen, windows, tasks, limit, progress,
                        calib_ids, config, cache)
    else:
        rows = _eval_image(loaded, planned, all_units, n_params, body, progress, calib_ids, config)
    body["rows"] = rows
    body.update(_peak_memory(loaded))
    return body


def _load(model: str | LoadedModel, dtype, device, offload, rotate_residual: int | None) -> LoadedModel:
    """The model to work on: loaded by name (with the residual rotation folded in when
    `rotate_residual` is a seed), or a LoadedModel as given (folded in place if asked)."""
    from mixq.models.load import fold_residual_rotation

    if not isinstance(model, LoadedModel):
        return load_model(model, dtype=dtype, device=device, offload=offload, rotate_residual=rotate_residual)
    if rotate_residual is not None:
        fold_residual_rotation(model, rotate_residual)
    return model


def check_requests(options=(), tasks=()) -> None:
    """Refuse bad option specs (`FormatError`) and unknown zero-shot tasks (`NotFoundError`)
    before any model is loaded."""
    from mixq.data import TASK_NAMES
    from mixq.errors import NotFoundError

    for spec in options:
        parse_option(spec)
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown:
        raise NotFoundError(f"unknown task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(TASK_NAMES)}")


def _needs_calibration(plan: Plan) -> bool:
    return any(o.needs_calibration for o in plan.options.values())


def _static_acts(plan: Plan) -> bool:
    return any(o.act is not None and o.act.static for o in plan.options.values())


def _placement(loaded: LoadedModel) -> dict:
    dev = loaded.compute_device
    dtype = next((p.dtype for p in loaded.model.parameters() if p.is_floating_point()), None)
    return {"device": str(dev), "dtype": str(dtype).removeprefix("torch.") if dtype else None,
            "offload": loaded.offload}


def _reset_peak(loaded: LoadedModel) -> None:
    import torch

    if loaded.compute_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.compute_device)


def _peak_memory(loaded: LoadedModel) -> dict:
    """Peak memory allocated on the CUDA device since the last reset (bytes), when it is one."""
    import torch

    if loaded.compute_device.type != "cuda":
        return {}
    return {"peak_device_bytes": int(torch.cuda.max_memory_allocated(loaded.compute_device))}


def _check_weights(loaded: LoadedModel, units, planned) -> None:
    """Refuse NaN/inf weights in any unit a plan quantizes, naming the unit, before any work
    (weights not in memory, read from disk block by block, are checked when quantized)."""
    wanted = {name for _, plan in planned for name in plan.options}
    for u in units:
        if u.name in wanted:
            w = get_weight(loaded.model, u)
            if w.device.type != "meta":
                check_finite(u, w)


def check_finite(unit, w) -> None:
    """Raise DataError naming the unit if its weight holds NaN or inf."""
    import torch

    if not all_finite(w):
        n_bad = int((~torch.isfinite(w)).sum())
        raise DataError(f"unit {unit.name!r}: weight contains {n_bad} NaN/inf values; refusing to quantize it")


def _eval_lm(loaded, planned, all_units, n_params, body, data, seqlen, n_windows, tasks, limit, progress, calib_ids,
             config, cache):
    from mixq.apply import applied
    from mixq.data import load_text, token_windows, tokenization_record
    from mixq.eval.streamed import Variant, evaluate_variants
    from mixq.eval.zeroshot import zero_shot

    data = data or loaded.default_data
    text = load_text(data)
    windows = token_windows(loaded.encode, text, seqlen, n_windows)
    body.update({"data": data, "data_sha256": sha256_text(text), "seqlen": seqlen,
                 "n_windows": int(windows.shape[0]), "n_tokens": int(windows.shape[0] * (seqlen - 1)),
                 "tokenization": tokenization_record(loaded.encode), "tasks": list(tasks), "task_limit": limit})
    if tasks and loaded.offload != "none":
        raise MixqError("zero-shot tasks run on the whole model: load it on the device (--offload none) or drop --tasks")
    t0 = time.perf_counter()
    walker = loaded.walker()
    variants = [Variant.for_plan(label, loaded.model, plan, calib=calib_ids, config=config, cache=cache,
                                 keep_all=bool(tasks)) for label, plan in planned]
    float_m, metrics = evaluate_variants(walker, all_units, windows, variants, progress=progress)
    wall = time.perf_counter() - t0

    def task_scores():
        return {t: zero_shot(loaded.model, loaded.encode, t, limit=limit, progress=progress) for t in tasks}

    row = {"label": "float", "option": None, **bit_totals(None, all_units, n_params), **float_m,
           "kl": 0.0, "top1_agree": 1.0, "tasks": task_scores()}
    rows = [row]
    for (label, plan), v, m in zip(planned, variants, metrics):
        row = {"label": label, "option": _describe(plan), **bit_totals(plan, all_units, n_params),
               **kv_totals(loaded.model, plan, windows.shape[1]), **m}
        if tasks:
            with applied(loaded.model, all_units, v.applier.weights, v.applier.runtime):
                row["tasks"] = task_scores()
        else:
            row["tasks"] = {}
        rows.append(row)
    body["eval_s"] = wall
    return rows


def _eval_image(loaded, planned, all_units, n_params, body, progress, calib_ids, config):
    from mixq.apply import applied, quantize_model
    from mixq.data import load_cifar10
    from mixq.eval.vision import top1

    images, labels = load_cifar10("eval")
    body.update({"data": "cifar10-eval", "n_images": int(images.shape[0])})
    rows = [{"label": "float", "option": None, **bit_totals(None, all_units, n_params),
             **top1(loaded.model, images, labels, progress=progress)}]
    for label, plan in planned:
        t0 = time.perf_counter()
        qm = quantize_model(loaded.model, all_units, plan, calib_ids, config=config, progress=progress,
                            keep_device=None)
        t_quant = time.perf_counter() - t0
        with applied(loaded.model, all_units, qm.weights, qm.runtime):
            m = top1(loaded.model, images, labels, progress=progress)
        row = {"label": label, "option": _describe(plan), **bit_totals(plan, all_units, n_params), **m,
               "quantize_s": t_quant}
        if any(not o.is_plain for o in plan.options.values()):
            row["manifest_warnings"] = list(qm.manifest.warnings)
        rows.append(row)
    return rows


def _describe(plan: Plan) -> str:
    opts = sorted({str(o) for o in plan.options.values()})
    if not opts:
        return "float"
    return opts[0] if len(opts) == 1 else f"mixed ({len(opts)} options)"


# ---------------------------------------------------------------- analyze / plan

FRONTIER_SCHEMA = 1
DEFAULT_CANDIDATES = ("int2:g64", "int3:g64", "int4:g64", "int8:ch")


def analyze(model: str | LoadedModel = DEFAULT_MODEL, candidates=DEFAULT_CANDIDATES, method: str = "fisher",
            calib: str | None = None, samples: int = 8, seqlen: int = 512, seed: int = 0,
            include_head: bool = False, measure_cost: bool = True, progress: Progress | None = None,
            device: str | None = "auto", dtype: str | None = None, offload: str | None = "auto",
            config: CalibConfig | None = None, rotate_residual: int | None = None, act_candidates=(),
            kv_candidates=(), **method_opts):
    """Measure sensitivity once: a `SensitivityTable` over every unit x candidate option.

    Causal LMs run fisher, output and (offloaded) hutchinson block by block, one block on the
    device at a time. Its `timing` holds the analysis wall time and, with `measure_cost`, the
    wall time of one float forward+backward over the same calibration set and their ratio
    (when the model fits the device), and the peak device memory. `act_candidates`
    (`int8:tok`, `int4:tok`; "none" for float inputs) are crossed with every candidate that
    has no @ part; `kv_candidates` (`int4:kchan`, ...) are weighed for every attention layer
    (fisher and output; see `mixq.sensitivity.actkv`). rotate_residual: a seed to fold a
    residual-stream rotation into the model first (recorded in the table's
    `calibration["rotate_residual"]`)."""
    return analyze_keeping(model, candidates, method, calib, samples, seqlen, seed, include_head, measure_cost,
                           progress, device, dtype, offload, config, rotate_residual=rotate_residual,
                           act_candidates=act_candidates, kv_candidates=kv_candidates, **method_opts)[0]


def cross_act(candidates, act_candidates) -> list[str]:
    """Every candidate without an @ part once per activation candidate ("none": float
    inputs, the candidate as it is); candidates with an @ part stay as they are."""
    if not act_candidates:
        return list(candidates)
    out: list[str] = []
    for c in candidates:
        if "@" in c:
            out.append(c)
            continue
        for a in act_candidates:
            out.append(c if a.strip().lower() in ("none", "float", "") else f"{c}@{a.strip()}")
    return list(dict.fromkeys(out))


def analyze_keeping(model, candidates, method, calib, samples, seqlen, seed, include_head, measure_cost, progress,
                    device, dtype, offload, config, keep: bool = False, rotate_residual: int | None = None,
                    act_candidates=(), kv_candidates=(),
                    **method_opts):
    """`analyze`, also returning the quantized weights of its calibrated candidates when
    `keep` (see `sensitivity.analyze_keeping`): (table, cache)."""
    import torch

    from mixq.sensitivity import UnitQuantizer, fwd_bwd_seconds
    from mixq.sensitivity import analyze_keeping as run_analysis

    check_requests(options=list(candidates))  # before the model loads
    loaded = _load(model, dtype, device, offload, rotate_residual)
    config = config or CalibConfig(seed=seed)
    units = loaded.units(include_head=include_head)
    candidates = cross_act(candidates, act_candidates)
    data, description = calibration_data(loaded, calib, samples, seqlen, seed)
    options = [parse_option(c) for c in candidates]
    if loaded.kind == "image_classifier":
        # Images are small: batches of 64 (the Fisher is then over per-batch gradients of 64).
        method_opts.setdefault("batch_size", 64)
    _reset_peak(loaded)
    if loaded.kind == "causal_lm":
        fd = method == "hutchinson" and loaded.offload != "none"
        target = loaded.walker(compute_dtype=torch.float32 if fd else None)
        keep_set = {str(o) for o in options if not o.is_plain} if keep else None
    else:
        target, keep_set = loaded.model, None
        if any(not o.is_plain for o in options):
            # Candidates with GPTQ/rotation/smoothing: their weights come from per-unit
            # statistics of one float capture pass on the same calibration data
            # (image models: the calibration images, without their labels).
            method_opts["quantize_fn"] = UnitQuantizer.from_calibration(loaded.model, units, calibration_inputs(data),
                                                                        config=config, progress=progress)
    if kv_candidates:
        method_opts["kv_candidates"] = list(kv_candidates)
    table, cache = run_analysis(target, units, list(candidates), method, data, seed=seed, model_name=loaded.name,
                                calib_description=description, progress=progress, config=config, keep=keep_set,
                                **method_opts)
    table.timing.update(_peak_memory(loaded))
    table.timing.update(_placement(loaded))
    if loaded.extra.get("rotate_residual") is not None:
        table.calibration["rotate_residual"] = loaded.extra["rotate_residual"]
    if loaded.kind == "causal_lm":
        from mixq.data import tokenization_record

        table.calibration["tokenization"] = tokenization_record(loaded.encode)
    if measure_cost and loaded.offload == "none":
        fb = fwd_bwd_seconds(loaded.model, data, batch_size=method_opts.get("batch_size", 1))
        table.timing["fwd_bwd_s"] = fb
        table.timing["ratio_to_fwd_bwd"] = table.timing["wall_s"] / fb
    return table, cache


def plan(table, budget_bpw: float | None, *, solver: str = "ilp", max_bytes: int | None = None,
         keep: dict[str, str] | None = None, ties: list[str] | None = None, min_bits: float | None = None,
         max_bits: float | None = None, frontier_points: int = 0, spikes: str | None = None,
         spike_ratio: float = 1000.0, target: str | None = None, progress: Progress | None = None,
         context: int | None = None, bits_per_mac: float | None = None, kv_bits: float | None = None):
    """Allocate options under a budget from a sensitivity table (or its path).

    With `context`, `bits_per_mac` or `kv_bits` the plan meets every given limit at once
    (`mixq.budget.Budget`: average bits per weight, bytes of weights plus the KV cache of
    `context` tokens when `max_bytes` is given, bit operations per MAC, KV bits per cached
    element) and chooses the KV format of every layer of the table's `kv` section too
    (exact ILP, `mixq.allocate.solve_multi`; no frontier).

    `spikes` applies the spike-aware rule to the units whose inputs spike (input
    max/median > `spike_ratio`): "keep" (8+ bits), "rotate" (+rotate options or 8+ bits) or
    an option to pin them to (see `mixq.planner.spike_rule`); the flagged units land in
    the plan's meta. `target` restricts the plan to what a runtime format holds:
    "compressed-tensors" keeps only the candidates `export.ct_schema` maps onto a scheme and
    ties q/k/v and gate/up (what it dropped lands in the plan's `meta["target"]`); "gguf"
    offers each unit only the GGUF types its shape can take (`mixq.export.targets`), so the
    plan exports as it is; a unit left with no candidate is refused by name. Returns (plan,
    frontier) where frontier is a list of points (empty unless `frontier_points` > 0):
    estimated error against bits, each with its explicit choice."""
    from mixq.planner import make_frontier, make_plan
    from mixq.sensitivity import SensitivityTable

    if not isinstance(table, SensitivityTable):
        source = str(table)
        table = SensitivityTable.load(table)
    else:
        source = "in-memory table"
    info = table.units_info
    rows = table.to_rows()
    meta = {"sensitivity": {"source": source, "method": table.method, "seed": table.seed,
                            "calibration": table.calibration, "candidates": table.candidates}}
    if target is not None:
        rows, ties, meta["target"] = _restrict_to_target(target, rows, info, keep, ties)
    if spikes:
        from mixq.planner import spike_rule
        from mixq.sensitivity import spiky_units

        spiky = spiky_units(table, spike_ratio)
        rows, keep = spike_rule(rows, info, spiky, spikes, keep)
        meta["spikes"] = {"rule": spikes, "ratio": spike_ratio, "units": spiky}
    if context is not None or bits_per_mac is not None or kv_bits is not None:
        from mixq.budget import Budget
        from mixq.planner import make_plan_multi

        budget = Budget(budget_bpw, max_bytes, context, bits_per_mac, kv_bits)
        the_plan, _ = make_plan_multi(table.model, info, rows, table.kv, budget, keep=keep, ties=ties,
                                      min_bits=min_bits, max_bits=max_bits, meta=meta)
        return the_plan, []
    if budget_bpw is None:
        raise MixqError("give a bits-per-weight budget (--budget), or other budgets with --context, --bits-per-mac, "
                        "--kv-bits")
    the_plan, _ = make_plan(table.model, info, rows, budget_bpw, solver=solver, max_bytes=max_bytes, keep=keep,
                            ties=ties, min_bits=min_bits, max_bits=max_bits, meta=meta)
    curve = []
    if frontier_points:
        curve = make_frontier(info, rows, n_points=frontier_points, solver=solver, keep=keep, ties=ties,
                              min_bits=min_bits, max_bits=max_bits, progress=progress)
    return the_plan, curve


# The runtime formats mixq writes: `export(to=...)` and `plan(target=...)` take the same names
# (the command line lists them too, in `cli.EXPORT_TARGETS`, without importing this module).
EXPORT_TARGETS = ("gguf", "compressed-tensors")


def _restrict_to_target(target: str, rows, info, keep, ties):
    """(rows, ties, meta) of a plan that a runtime format must hold (see `plan`)."""
    from mixq.errors import ExportError

    if target == "compressed-tensors":
        from mixq.export.ct_schema import TARGET_TIES, restrict_rows

        kept, dropped = restrict_rows(rows, info, keep)
        ties = sorted(set(ties or []) | set(TARGET_TIES))
        return kept, ties, {"name": target, "ties": list(TARGET_TIES), "dropped": dropped}
    if target == "gguf":
        from mixq.export.targets import restrict_rows

        kept = restrict_rows(rows, info, target, keep)
        return kept, ties, {"name": target, "candidate_rows_dropped": len(rows) - len(kept)}
    raise ExportError(f"--target {target!r}: expected one of {', '.join(EXPORT_TARGETS)}")


def llama_quantize_args(the_plan: Plan, embedding_type: str = "f16") -> list[str]:
    """The plan as llama-quantize arguments: a `--tensor-type REGEX=TYPE` per role and type
    (every option must be a GGUF type; see `mixq.export.gguf_plan`)."""
    from mixq.export.gguf_plan import llama_quantize_args as args_of

    return args_of(the_plan, embedding_type=embedding_type)


def llama_quantize_base(the_plan: Plan) -> str:
    """llama-quantize's positional type for the plan (its most frequent GGML type)."""
    from mixq.export.gguf_plan import base_type

    return base_type(the_plan)


def save_frontier(path, curve: list[dict], meta: dict) -> None:
    from mixq.artifacts import write_artifact

    write_artifact(path, "frontier", FRONTIER_SCHEMA, {**meta, "points": curve})


# ---------------------------------------------------------------- quantize / checkpoints


def is_checkpoint(path: str | Path) -> bool:
    from mixq.export import META_FILE

    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()


def quantize(model: str | LoadedModel, out_dir: str | Path, *, plan: str | Path | Plan | None = None,
             fmt: str | None = None, include_head: bool = False, calib: str | None = None, calib_samples: int = 128,
             calib_seqlen: int = 512, seed: int = 0, fp32: bool = False, overwrite: bool = False,
             progress: Progress | None = None, config: CalibConfig | None = None, device: str | None = "auto",
             dtype: str | None = None, offload: str | None = "auto", rotate_residual: int | None = None,
             kv: str | None = None) -> dict:
    """Quantize a model by a plan (or one option everywhere) and write a packed checkpoint.

    Activation formats (`@` parts, with their calibrated static scales) and KV formats (the
    plan's, or `kv` for every layer) are recorded in mixq.json; the packed modules do not run
    them (no kernels for them yet), so `evaluate_checkpoint` measures the weights alone.

    Every unit goes through `mixq.apply.quantize_model` (block by block, one block on the
    device at a time; GPTQ/smoothing calibrated on `calib`), and the checkpoint stores the
    quantizer's codes as they are: a unit with transforms (rotate, smooth, lowrank) as the
    codes of its transformed weight Q(E) with s, the rotation's seed and the low-rank
    factors beside them, applied online when the checkpoint runs. The manifest of what was
    done lands in the checkpoint's mixq.json. rotate_residual: a seed to fold a residual-stream
    rotation into the model before quantizing (the checkpoint then holds the rotated model, a
    plain model of the same architecture; mixq.json records the rotation). Returns that
    document."""
    import torch

    from mixq.apply import quantize_model
    from mixq.export import save_quantized
    from mixq.export.save import check_out_dir

    if (plan is None) == (fmt is None):
        raise MixqError("give exactly one of a plan (--plan plan.json) or a format (--format SPEC)")
    check_out_dir(out_dir, overwrite)  # before any quantization work
    check_requests(options=[fmt] if fmt else [])
    loaded = _load(model, dtype, device, offload, rotate_residual)
    config = config or CalibConfig(seed=seed)
    units = loaded.units(include_head=True, include_embeddings=True)
    if plan is None:
        the_plan = Plan.uniform(loaded.name, loaded.units(include_head=include_head), fmt)
    else:
        the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    the_plan.check_against(units)
    if kv:
        from mixq.apply.runtime import uniform_kv
        from mixq.formats.kvcache import parse_kv

        the_plan = the_plan.with_kv(uniform_kv(loaded.model, parse_kv(kv)))
    _check_weights(loaded, units, [("plan", the_plan)])
    calib_ids = None
    if _needs_calibration(the_plan):
        calib_ids = calibration_inputs(calibration_data(loaded, calib, calib_samples, calib_seqlen, seed)[0])
    _reset_peak(loaded)
    target = loaded.walker() if loaded.kind == "causal_lm" else loaded.model
    qm = quantize_model(target, units, the_plan, calib_ids, config=config, progress=progress, keep_device="cpu")
    run = {**_placement(loaded), **_peak_memory(loaded), "quantize_s": qm.manifest.wall_s}
    return save_quantized(loaded, units, the_plan, out_dir, weights=qm.weights, manifest=qm.manifest, progress=progress,
                          float_dtype=torch.float32 if fp32 else torch.bfloat16, overwrite=overwrite,
                          tensor_source=loaded.store.tensor if loaded.store is not None else None, run=run,
                          runtime=qm.runtime.describe() if qm.runtime is not None else None)


def export_compressed_tensors(checkpoint: str | Path, out_dir: str | Path, *, dtype: str | None = None,
                              overwrite: bool = False, progress: Progress | None = None) -> dict:
    """Write a mixq checkpoint as a Hugging Face compressed-tensors directory (vLLM,
    transformers): see `mixq.export.compressed_tensors`. Returns its mixq_export.json."""
    from mixq.export.compressed_tensors import export_compressed_tensors as write

    return write(checkpoint, out_dir, dtype=dtype, overwrite=overwrite, progress=progress)


def export(checkpoint: str | Path, out: str | Path, *, to: str = "gguf", float_type: str = "f16",
           metadata_from: str | Path | None = None, tokenizer_pre: str | None = None, overwrite: bool = False,
           progress: Progress | None = None) -> dict:
    """Write a mixq checkpoint in a runtime's own format. `to="gguf"`: one GGUF file for
    llama.cpp (`mixq.export.gguf.export_gguf`: the stored codes as llama.cpp's blocks;
    embeddings, head and unplanned tensors in `float_type`); `to="compressed-tensors"`: see
    `export_compressed_tensors` (which also takes its `dtype`). A plan with a unit the target
    cannot hold is refused, naming the units. Returns a summary of what was written."""
    if to not in EXPORT_TARGETS:
        raise MixqError(f"unknown export target {to!r}; expected one of {', '.join(EXPORT_TARGETS)}")
    if to == "compressed-tensors":
        return export_compressed_tensors(checkpoint, out, overwrite=overwrite, progress=progress)
    from mixq.export.gguf import export_gguf

    return export_gguf(checkpoint, out, float_type=float_type, metadata_from=metadata_from,
                       tokenizer_pre=tokenizer_pre, overwrite=overwrite, progress=progress)


def evaluate_checkpoint(path: str | Path, *, data: str | None = None, seqlen: int = 512, windows: int | None = 8,
                        tasks=(), limit: int | None = None, progress: Progress | None = None,
                        device: str | None = "auto", dtype: str | None = None, offload: str | None = "auto") -> dict:
    """Evaluate a packed checkpoint against the float model it was made from (loaded by the
    name its mixq.json records), without quantizing again. On a GPU the checkpoint runs
    packed (the quantized kernels); the float reference runs block by block when it does not
    fit the device (its log-probabilities are then kept in host memory)."""
    from mixq.export import load_quantized, read_checkpoint
    from mixq.models.placement import DTYPES, resolve_device, resolve_dtype

    check_requests(tasks=list(tasks))
    dev = resolve_device(device)
    stored = read_checkpoint(path, verify=False).get("float_dtype")
    compute_dtype = resolve_dtype(dtype, dev, DTYPES.get(stored) if stored else None)
    q = load_quantized(path, device=dev, dtype=compute_dtype, packed="auto", progress=progress)
    plan = q.extra["plan"]
    plan.meta.setdefault("label", f"checkpoint {Path(path).name}")
    ref_model = load_model(q.name, dtype=compute_dtype, device=dev, offload=offload)
    body: dict = {"model": q.name, "model_source": ref_model.source, "checkpoint": str(path), "note": ref_model.note,
                  "model_params": q.extra["n_params"], "include_head": False, **_placement(ref_model),
                  "packed": bool(q.extra.get("packed"))}
    if plan.kv or any(o.act is not None for o in plan.options.values()):
        body["note"] = ((body["note"] + "; ") if body["note"] else "") + (
            "the checkpoint records activation/KV formats that its packed modules do not run yet: weights only")
    totals = bit_totals(plan, q.extra["units"], q.extra["n_params"])
    _reset_peak(ref_model)
    if ref_model.kind == "causal_lm":
        from mixq.data import load_text, token_windows, tokenization_record
        from mixq.eval.perplexity import FloatReference, lm_eval
        from mixq.eval.streamed import streamed_log_probs
        from mixq.eval.zeroshot import zero_shot

        check_window(ref_model, seqlen, "eval seqlen")
        data = data or ref_model.default_data
        text = load_text(data)
        win = token_windows(ref_model.encode, text, seqlen, windows)
        body.update({"data": data, "data_sha256": sha256_text(text), "seqlen": seqlen, "n_windows": int(win.shape[0]),
                     "n_tokens": int(win.shape[0] * (seqlen - 1)),
                     "tokenization": tokenization_record(ref_model.encode), "tasks": list(tasks), "task_limit": limit})
        if ref_model.offload == "none":
            ref = FloatReference(ref_model.model, win)
        else:
            ref = FloatReference.from_log_probs(win, streamed_log_probs(ref_model.walker(), win, progress=progress))
        fl = {"label": "float", "option": None, **bit_totals(None, q.extra["units"], q.extra["n_params"]),
              **ref.metrics(progress), "kl": 0.0, "top1_agree": 1.0}
        if tasks and ref_model.offload != "none":
            raise MixqError("zero-shot tasks run on the whole float model: load it on the device (--offload none) "
                            "or drop --tasks")
        fl["tasks"] = {t: zero_shot(ref_model.model, ref_model.encode, t, limit=limit) for t in tasks}
        qr = {"label": plan.meta["label"], "option": _describe(plan), **totals,
              **lm_eval(q.model, win, reference=ref, progress=progress),
              "tasks": {t: zero_shot(q.model, q.encode, t, limit=limit) for t in tasks}}
    else:
        from mixq.data import load_cifar10
        from mixq.eval.vision import top1

        images, labels = load_cifar10("eval")
        body.update({"data": "cifar10-eval", "n_images": int(images.shape[0])})
        fl = {"label": "float", "option": None, **bit_totals(None, q.extra["units"], q.extra["n_params"]),
              **top1(ref_model.model, images, labels, progress=progress)}
        qr = {"label": plan.meta["label"], "option": _describe(plan), **totals,
              **top1(q.model, images, labels, progress=progress)}
    body["rows"] = [fl, qr]
    body.update(_peak_memory(ref_model))
    return body

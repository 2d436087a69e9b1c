"""The public Python API: thin functions over the pipeline stages. The command line is a
thin layer over these."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mixq.accounting import bit_totals
from mixq.apply import check_finite, fake_quantized
from mixq.artifacts import sha256_text
from mixq.models import DEFAULT_MODEL, LoadedModel, get_weight, load_model
from mixq.plan import Plan
from mixq.progress import Progress

log = logging.getLogger(__name__)

EVAL_SCHEMA = 1


def _plans_for(loaded: LoadedModel, formats: list[str], plans: list[str | Path | Plan],
               include_head: bool) -> list[tuple[str, Plan]]:
    units = loaded.units(include_head=include_head)
    out: list[tuple[str, Plan]] = []
    for spec in formats:
        out.append((spec, Plan.uniform(loaded.name, units, spec)))
    for p in plans:
        plan = p if isinstance(p, Plan) else Plan.load(p)
        all_units = loaded.units(include_head=True, include_embeddings=True)
        plan.check_against(all_units)
        out.append((str(p) if not isinstance(p, Plan) else plan.meta.get("label", "plan"), plan))
    return out


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
    progress: Progress | None = None,
) -> dict:
    """Evaluate the float model and each uniform format / plan on it.

    Causal LMs: token-level perplexity on `windows` non-overlapping windows of `seqlen`
    tokens of `data` (None: all full windows), KL to the float model and top-1 agreement,
    and zero-shot `tasks` (first `limit` examples each). Image classifiers: top-1 on the
    evaluation half of CIFAR-10. Every row carries its all-in bits per weight.
    Returns the body of an `eval` artifact (see `mixq.artifacts`).
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    planned = _plans_for(loaded, list(formats), list(plans), include_head)
    n_params = loaded.n_params
    all_units = loaded.units(include_head=True, include_embeddings=True)
    _check_weights(loaded, all_units, planned)
    body: dict = {"model": loaded.name, "model_source": loaded.source, "note": loaded.note,
                  "model_params": n_params, "include_head": include_head}
    if loaded.kind == "causal_lm":
        rows = _eval_lm(loaded, planned, all_units, n_params, body, data, seqlen, windows, tasks, limit, progress)
    else:
        rows = _eval_image(loaded, planned, all_units, n_params, body, progress)
    body["rows"] = rows
    return body


def _check_weights(loaded: LoadedModel, units, planned) -> None:
    """Refuse NaN/inf weights in any unit a plan quantizes, naming the unit, before any work."""
    wanted = {name for _, plan in planned for name in plan.options}
    for u in units:
        if u.name in wanted:
            check_finite(u, get_weight(loaded.model, u))


def _eval_lm(loaded, planned, all_units, n_params, body, data, seqlen, n_windows, tasks, limit, progress):
    from mixq.data import load_text, token_windows
    from mixq.eval.perplexity import FloatReference, lm_eval
    from mixq.eval.zeroshot import zero_shot

    data = data or loaded.default_data
    text = load_text(data)
    windows = token_windows(loaded.encode, text, seqlen, n_windows)
    body.update({"data": data, "data_sha256": sha256_text(text), "seqlen": seqlen,
                 "n_windows": int(windows.shape[0]), "n_tokens": int(windows.shape[0] * (seqlen - 1)),
                 "tasks": list(tasks), "task_limit": limit})
    # Float log-probs are cached; when they would not all fit, the reference keeps a private
    # float copy of the model to recompute from while the shared one is fake-quantized.
    logp_bytes = windows.shape[0] * (seqlen - 1) * _vocab_size(loaded) * 4
    ref = FloatReference(loaded.model, windows, copy_model=logp_bytes > _REF_CACHE_BYTES,
                         cache_bytes=_REF_CACHE_BYTES)

    def task_scores():
        return {t: zero_shot(loaded.model, loaded.encode, t, limit=limit, progress=progress) for t in tasks}

    t0 = time.perf_counter()
    row = {"label": "float", "option": None, **bit_totals(None, all_units, n_params),
           **ref.metrics(progress), "kl": 0.0, "top1_agree": 1.0}
    row["tasks"] = task_scores()
    row["eval_s"] = time.perf_counter() - t0
    rows = [row]
    for label, plan in planned:
        t0 = time.perf_counter()
        with fake_quantized(loaded.model, all_units, plan, progress):
            m = lm_eval(loaded.model, windows, reference=ref, progress=progress)
            row = {"label": label, "option": _describe(plan), **bit_totals(plan, all_units, n_params), **m}
            row["tasks"] = task_scores()
        row["eval_s"] = time.perf_counter() - t0
        rows.append(row)
    return rows


_REF_CACHE_BYTES = 6e9


def _vocab_size(loaded: LoadedModel) -> int:
    return int(loaded.model.get_output_embeddings().weight.shape[0])


def _eval_image(loaded, planned, all_units, n_params, body, progress):
    from mixq.data import load_cifar10
    from mixq.eval.vision import top1

    images, labels = load_cifar10("eval")
    body.update({"data": "cifar10-eval", "n_images": int(images.shape[0])})
    rows = [{"label": "float", "option": None, **bit_totals(None, all_units, n_params),
             **top1(loaded.model, images, labels, progress=progress)}]
    for label, plan in planned:
        with fake_quantized(loaded.model, all_units, plan, progress):
            m = top1(loaded.model, images, labels, progress=progress)
        rows.append({"label": label, "option": _describe(plan), **bit_totals(plan, all_units, n_params), **m})
    return rows


def _describe(plan: Plan) -> str:
    opts = sorted({str(o) for o in plan.options.values()})
    return opts[0] if len(opts) == 1 else f"mixed ({len(opts)} options)"

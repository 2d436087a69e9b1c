"""The self-contained HTML report of a run directory: sensitivity per unit, the frontier with
measured points on it, the bits chosen per unit, and the table of figures. PNGs are written
beside the page and embedded in it, so the page alone can be mailed around."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from mixq.artifacts import atomic_write_bytes
from mixq.errors import ArtifactError
from mixq.report import plots


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return html.escape(str(v))


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_num(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.note{color:#666;font-size:13px}"""


def write_report(run_dir: str | Path) -> Path:
    """Write `report.html` (and its PNGs) for a run directory made by `mixq run`."""
    run = Path(run_dir)
    sens, plan, front = _load(run / "sensitivity.json"), _load(run / "plan.json"), _load(run / "frontier.json")
    ev, check = _load(run / "eval.json"), _load(run / "check.json")
    if sens is None or plan is None:
        raise ArtifactError(f"{run}: not a mixq run directory (needs sensitivity.json and plan.json)")
    parts = [f"<h1>mixq report: {html.escape(sens['model'])}</h1>"]
    if ev and ev.get("note"):
        parts.append(f"<p class=note>Note: {html.escape(ev['note'])}</p>")
    meta = plan["meta"]
    parts.append(
        f"<p>Budget {_num(meta.get('budget_bpw'))} bits per weight; plan uses {_num(meta.get('bits_per_weight'))} "
        f"(all-in, over the {len(plan['units'])} quantized units), solver {html.escape(str(meta.get('solver')))} "
        f"({html.escape(str(meta.get('status')))}). Sensitivity method <b>{html.escape(sens['method'])}</b>, "
        f"candidates {html.escape(', '.join(sens['candidates']))}; calibration "
        f"{html.escape(sens['calibration'].get('description', ''))}.</p>")

    if ev:
        parts.append("<h2>Figures</h2>")
        parts.append(_figures_table(ev))

    units = sens["units"]
    low = next((c for c in sens["candidates"] if any(o["option"] == c for u in units for o in u["options"])),
               sens["candidates"][0])
    png = plots.sensitivity_bars(units, low, run / "sensitivity.png",
                                 f"sensitivity ({sens['method']}) per unit at {low}")
    parts += ["<h2>Sensitivity per unit</h2>", _img(png, "sensitivity per unit"),
              "<p class=note>Estimated error of the lowest-bit candidate for every unit, in model order; "
              "colour is the projection type.</p>"]

    by_name = {u["name"]: u for u in units}
    bpw = [plan["units"][u["name"]]["bits"] / u["n_params"] if u["name"] in plan["units"] else 16.0 for u in units]
    png = plots.bits_per_unit(units, bpw, run / "bits.png", "bits per weight chosen per unit")
    parts += ["<h2>Bits chosen per unit</h2>", _img(png, "bits per unit")]
    parts.append(_choice_table(plan, by_name))

    if front:
        measured = (check or {}).get("plans", [])
        uniform = (check or {}).get("uniform", [])
        metric = (check or {}).get("metric", "")
        png = plots.frontier_plot(front["points"], measured, uniform, metric, run / "frontier.png",
                                  f"estimated error frontier, with measured {metric} of plans on it")
        parts += ["<h2>Frontier</h2>", _img(png, "frontier")]
        if check:
            parts.append(
                f"<p>Additivity check: over {len(measured)} plans along the frontier, Spearman rank correlation of "
                f"predicted error and measured {html.escape(check['metric'])} = <b>{_num(check.get('spearman'))}</b>; "
                f"Pearson of logs = {_num(check.get('pearson_log'))}.</p>")
            parts.append(_table(["budget", "bits/weight", "predicted error", f"measured {check['metric']}", "ppl"],
                                [[m["budget_bpw"], m["bits_per_weight"], m["predicted"], m["measured"], m.get("ppl")]
                                 for m in measured]))
    doc = (f"<!doctype html><html><head><meta charset=utf-8><title>mixq report</title><style>{CSS}</style></head>"
           f"<body>{''.join(parts)}</body></html>")
    out = run / "report.html"
    atomic_write_bytes(out, doc.encode())
    return out


def _figures_table(ev: dict) -> str:
    rows = ev["rows"]
    if "ppl" in rows[0]:
        tasks = ev.get("tasks", [])
        headers = ["model", "bpw blocks", "bpw all", "ppl", "KL", "top-1 agree"] + tasks
        body = [[r["label"], r["bpw_blocks"], r["bpw_all"], r["ppl"], r["kl"], r["top1_agree"]]
                + [_task_score(r["tasks"].get(t)) for t in tasks]
                for r in rows]
        cap = (f"{ev['data']}: {ev['n_windows']} windows x {ev['seqlen']} tokens = {ev['n_tokens']} scored tokens; "
               "bpw all counts embeddings, head and norms at 16 bits unless quantized.")
    else:
        headers = ["model", "bpw quantized", "bpw all", "top-1 %"]
        body = [[r["label"], r["bpw_units"], r["bpw_all"], 100 * r["top1"]] for r in rows]
        cap = f"{ev['data']}: {ev['n_images']} images."
    return _table(headers, body) + f"<p class=note>{html.escape(cap)}</p>"


def _task_score(scores: dict | None):
    """The task's headline metric (`metric`: acc_norm where lm-evaluation-harness reports it,
    else acc); artifacts written before `metric` existed: acc_norm when present, else acc."""
    if not scores:
        return None
    if scores.get("metric") in ("acc", "acc_norm"):
        return scores[scores["metric"]]
    return scores["acc_norm"] if scores.get("acc_norm") is not None else scores.get("acc")


def _choice_table(plan: dict, by_name: dict) -> str:
    counts: dict[tuple[str, str], int] = {}
    for name, u in plan["units"].items():
        role = by_name[name]["role"] if name in by_name else "?"
        counts[(role, u["option"])] = counts.get((role, u["option"]), 0) + 1
    rows = [[role, opt, n] for (role, opt), n in sorted(counts.items())]
    return _table(["projection", "option", "units"], rows)

"""The `mixq` command line: a thin layer over `mixq.api`. Each stage is a subcommand."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Callable, Sequence

from mixq.errors import MixqError

log = logging.getLogger("mixq")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _progress(args):
    """Progress bars on a terminal; one line per finished stage when stderr is not one (a
    log file, CI); nothing with -q."""
    from mixq.progress import LineProgress, TqdmProgress, no_progress

    if getattr(args, "quiet", False):
        return no_progress
    if not sys.stderr.isatty():
        return LineProgress(sys.stderr)
    return TqdmProgress()


def _stage_printer(args, command: str = "run"):
    """The overall stage line of `mixq run` / `mixq demo`, on stderr (none with -q)."""
    if getattr(args, "quiet", False):
        return None

    def stage(i: int, n: int, text: str) -> None:
        print(f"mixq {command} [{i}/{n}] {text}", file=sys.stderr, flush=True)

    return stage


# ---------------------------------------------------------------- tables


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if abs(v) >= 1000:
            return f"{v:.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def render_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain aligned text table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(parts))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def eval_table(result: dict) -> str:
    """The table `mixq eval` prints: one row per format/plan, float first."""
    rows = result["rows"]
    is_lm = "ppl" in rows[0]
    task_names = list(result.get("tasks", []))
    if is_lm:
        headers = ["format", "bpw blocks", "bpw all", "ppl", "KL", "top1 agree"]
        headers += [f"{t} {m}" for t in task_names for m in ("acc", "acc_norm")]
        body = [[r["label"], r["bpw_blocks"], r["bpw_all"], r["ppl"], r["kl"], r["top1_agree"]]
                + [v for t in task_names for v in _task_columns(r["tasks"].get(t))] for r in rows]
        if any(r.get("kv_format") for r in rows):
            headers.insert(3, "kv bits")
            for b, r in zip(body, rows):
                b.insert(3, r.get("kv_bits_per_element"))
        if any("quantize_s" in r for r in rows):
            headers.append("quant s")
            for b, r in zip(body, rows):
                b.append(r.get("quantize_s"))
        head = (f"model {result['model']}  data {result['data']}: {result['n_windows']} windows x "
                f"{result['seqlen']} tokens = {result['n_tokens']} scored tokens")
        tok = result.get("tokenization") or {}
        if tok.get("bos"):
            head += f"; each window starts with the tokenizer's BOS {tok.get('bos_token')!r}"
        if task_names:
            head += (f"; zero-shot on {result.get('task_limit') or 'all'} examples per task: acc, and acc_norm where "
                     "lm-evaluation-harness reports it (- where it does not: boolq, copa, winogrande, lambada)")
    else:
        headers = ["format", "bpw quantized", "bpw all", "top1 %"]
        body = [[r["label"], r["bpw_units"], r["bpw_all"], 100 * r["top1"]] for r in rows]
        if any("quantize_s" in r for r in rows):
            headers.append("quant s")
            for b, r in zip(body, rows):
                b.append(r.get("quantize_s"))
        head = f"model {result['model']}  data {result['data']}: {result['n_images']} images"
        if result.get("calibration"):
            head += f"; calibration {result['calibration']}"
    foot = ("bpw blocks: all-in bits per weight of the units in the blocks; bpw all: every parameter, "
            "embeddings/head/norms at 16 bits unless quantized"
            + ("; kv bits: all-in bits per cached key/value element at the window length" if any(
                r.get("kv_format") for r in rows) else "")) if is_lm else (
            "bpw quantized: all-in bits per weight of the conv/linear units; bpw all: every parameter, "
            "batch-norm and biases at 16 bits")
    note = f"\nnote: {result['note']}" if result.get("note") else ""
    return f"{head}\n{render_table(headers, body)}\n{foot}{note}"


def _task_columns(scores: dict | None) -> list:
    """[acc, acc_norm] of a task's scores (None where absent)."""
    if not scores:
        return [None, None]
    return [scores.get("acc"), scores.get("acc_norm")]


# ---------------------------------------------------------------- commands


def cmd_formats(args) -> int:
    from mixq import formats

    shape = (args.rows, args.cols)
    rows = []
    for spec in formats.catalogue():
        fmt = formats.parse(spec)
        why = fmt.supports(shape)
        rows.append([spec, fmt.bits(shape) / (shape[0] * shape[1]) if why is None else f"- ({why})"])
    print(f"bits per weight (all-in: codes, scales, zero points) for a {shape[0]}x{shape[1]} matrix")
    print(render_table(["format", "bits/weight"], rows))
    return 0


def _write_json(path, kind: str, schema: int, body: dict) -> None:
    from mixq.artifacts import write_artifact

    write_artifact(path, kind, schema, body)
    print(f"wrote {path}")


def cmd_eval(args) -> int:
    from mixq import api

    if api.is_checkpoint(args.model):
        if args.format or args.plan:
            raise MixqError(f"{args.model} is a quantized checkpoint: evaluate it as it is (no --format/--plan)")
        result = api.evaluate_checkpoint(args.model, data=args.data, seqlen=args.seqlen,
                                         windows=None if args.windows == 0 else args.windows,
                                         tasks=_csv(args.tasks) if args.tasks else [], limit=args.limit,
                                         progress=_progress(args), **_placement(args))
        print(eval_table(result))
        if args.json:
            _write_json(args.json, "eval", api.EVAL_SCHEMA, result)
        return 0

    suffix = ""
    if args.quantizer != "rtn":
        suffix += f"+{args.quantizer}"
    for t in args.transform:
        suffix += "".join(f"+{x}" for x in _csv(t))
    result = api.evaluate(
        model=args.model,
        formats=[f + suffix for spec in args.format for f in _split_formats(spec)],
        plans=args.plan,
        data=args.data,
        seqlen=args.seqlen,
        windows=None if args.windows == 0 else args.windows,
        tasks=_csv(args.tasks) if args.tasks else [],
        limit=args.limit,
        include_head=args.include_head,
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen,
        seed=args.seed,
        progress=_progress(args),
        rotate_residual=_rotation(args),
        kv=[k for spec in args.kv for k in _csv(spec)],
        **_placement(args),
    )
    print(eval_table(result))
    if args.json:
        _write_json(args.json, "eval", api.EVAL_SCHEMA, result)
    return 0


def _split_formats(spec: str) -> list[str]:
    # Several formats may be given comma-separated; a format spec itself never holds a comma.
    return _csv(spec)


def cmd_demo(args) -> int:
    from mixq import api
    from mixq.demo import run_demo

    print("mixq demo: measure how sensitive each unit of the default model is, let the ILP spend the bits of a "
          "uniform format where they matter, and compare at equal bits")
    res = run_demo(samples=args.samples, seqlen=args.seqlen, windows=args.windows, out_dir=args.out,
                   progress=_progress(args), stage=_stage_printer(args, "demo"))
    print(eval_table(res.eval))
    rows = {r["label"]: r for r in res.eval["rows"]}
    print()
    for uniform, mixed in res.pairs:
        u, m = rows[uniform], rows[mixed]
        counts: dict[str, int] = {}
        for o in res.plans[mixed].options.values():
            counts[str(o)] = counts.get(str(o), 0) + 1
        mix = ", ".join(f"{n} x {o}" for o, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        print(f"at {m['bpw_blocks']:.2f} bits per weight: KL to float {m['kl']:.3f} mixed vs {u['kl']:.3f} uniform "
              f"{uniform} ({100 * (m['kl'] - u['kl']) / u['kl']:+.0f}%), ppl {m['ppl']:.2f} vs {u['ppl']:.2f}; "
              f"the plan: {mix}")
    t = res.timing
    print(f"\n{t['total_s']:.0f} s in all. Left in {res.out_dir}: sensitivity.json (measured once) and the plans.")
    print("next:")
    print(f"  mixq plan {res.out_dir / 'sensitivity.json'} --budget 3.5     # any other budget from the same measurement")
    print("  mixq run --budget 3.5 --out runs/default     # analyze, plan, eval, frontier check and report in one go")
    print("  open runs/default/report.html                # sensitivity bars, frontier, bits per layer")
    if args.json:
        _write_json(args.json, "eval", api.EVAL_SCHEMA, res.eval)
    return 0


def _keep_arg(items: list[str]) -> dict[str, str]:
    keep = {}
    for item in items:
        if "=" not in item:
            raise MixqError(f"--keep {item!r}: expected PATTERN=OPTION, e.g. '*.down_proj=int8:ch'")
        pattern, opt = item.rsplit("=", 1)
        keep[pattern.strip()] = opt.strip()
    return keep


def cmd_analyze(args) -> int:
    from mixq import api
    from mixq.sensitivity import spiky_units

    table = api.analyze(args.model, candidates=_csv(args.candidates), method=args.method, calib=args.calib,
                        samples=args.samples, seqlen=args.seqlen, seed=args.seed, include_head=args.include_head,
                        progress=_progress(args), rotate_residual=_rotation(args),
                        act_candidates=_csv(args.act_candidates), kv_candidates=_csv(args.kv_candidates),
                        **_placement(args))
    table.save(args.output)
    t = table.timing
    print(f"sensitivity ({table.method}) of {len(table.units)} units x {len(table.candidates)} candidates; "
          f"calibration: {table.calibration.get('description', '')}")
    if "ratio_to_fwd_bwd" in t:
        print(f"analysis {t['wall_s']:.1f} s = {t['ratio_to_fwd_bwd']:.1f} x one float forward+backward over the "
              f"calibration set ({t['fwd_bwd_s']:.2f} s)")
    else:
        print(f"analysis {t['wall_s']:.1f} s (blocks offloaded to {t.get('offload')}: no whole-model reference timed)")
    if t.get("peak_device_bytes"):
        print(f"peak {t['device']} memory {t['peak_device_bytes'] / 2**30:.2f} GiB")
    first = table.candidates[0]
    errs = {u.name: next((o["error"] for o in u.options if o["option"] == first), None) for u in table.units}
    worst = sorted((u for u in table.units if errs[u.name] is not None), key=lambda u: -errs[u.name])[:8]
    print(render_table(["most sensitive unit", f"error @ {first}", "input max/median"],
                       [[u.name, errs[u.name], u.stats.get("ratio")] for u in worst]))
    skipped: dict[str, int] = {}
    for u in table.units:
        for opt in u.skipped:
            skipped[opt] = skipped.get(opt, 0) + 1
    if skipped:
        print("candidates skipped where a unit's shape rules them out (recorded per unit in the table): "
              + ", ".join(f"{o} on {n} unit(s)" for o, n in skipped.items()))
    spiky = spiky_units(table, args.spike_ratio)
    if spiky:
        print(f"activation spikes (input max/median > {args.spike_ratio:g}): {', '.join(spiky)}")
    if table.kv:
        print(render_table(["KV format", "error summed over layers"],
                           [[k, sum(e for _, kk, e in table.kv_rows() if kk == k)] for k in table.kv_candidates]))
    print(f"wrote {args.output}")
    return 0


def cmd_plan(args) -> int:
    from mixq import api

    the_plan, curve = api.plan(args.sensitivity, args.budget, solver=args.solver, max_bytes=args.max_bytes,
                               keep=_keep_arg(args.keep), ties=_csv(args.tie) if args.tie else [],
                               min_bits=args.min_bits, max_bits=args.max_bits,
                               frontier_points=args.points if args.frontier else 0, spikes=args.spikes,
                               spike_ratio=args.spike_ratio, target=args.target, progress=_progress(args),
                               context=args.context, bits_per_mac=args.bits_per_mac, kv_bits=args.kv_bits)
    the_plan.save(args.output)
    m = the_plan.meta
    counts: dict[str, int] = {}
    for o in the_plan.options.values():
        counts[str(o)] = counts.get(str(o), 0) + 1
    if "achieved" in m:
        a = m["achieved"]
        parts = [f"{a['bits_per_weight']:.4f} bits/weight", f"{a['bits_per_mac']:.2f} bits/MAC"]
        if a.get("kv_bits") is not None:
            parts.append(f"KV {a['kv_bits']:.3f} bits/element")
        if a.get("bytes") is not None:
            parts.append(f"{a['bytes'] / 2**20:.2f} MiB of weights + KV at {args.context} tokens")
        print(f"plan under {', '.join(f'{k}={v}' for k, v in m['budget'].items() if v is not None)} "
              f"({m['status']}): {', '.join(parts)} over {len(the_plan.options)} units, "
              f"predicted error {m['predicted_error']:.6g}")
    else:
        print(f"plan at {args.budget:g} bits/weight ({args.solver}, {m['status']}): "
              f"{m['bits_per_weight']:.4f} bits/weight over {len(the_plan.options)} units, "
              f"predicted error {m['predicted_error']:.6g}")
    print(render_table(["option", "units"], sorted(counts.items())))
    if m.get("target"):
        dropped = m["target"]["dropped"]
        print(f"target {m['target']['name']}: tied {', '.join(m['target']['ties'])}"
              + (f"; dropped candidates: {', '.join(sorted(dropped))}" if dropped else ""))
    if the_plan.kv:
        kv_counts: dict[str, int] = {}
        for f in the_plan.kv.values():
            kv_counts[str(f)] = kv_counts.get(str(f), 0) + 1
        print(render_table(["KV format", "layers"], sorted(kv_counts.items())))
    if m.get("spikes"):
        sp = m["spikes"]["units"]
        print(f"spike rule {args.spikes!r} on {len(sp)} unit(s): " + ", ".join(f"{n}={the_plan.options[n]}" for n in sp))
    print(f"wrote {args.output}")
    if args.frontier:
        api.save_frontier(args.frontier, curve, {"model": the_plan.model, "solver": args.solver,
                                                 "sensitivity": m["sensitivity"]})
        print(f"wrote {args.frontier} ({len(curve)} points)")
    if args.emit == "llama-quantize":
        import shlex

        print("the same plan with llama.cpp's own quantizer (from an F32/F16 GGUF of the model; add --imatrix FILE "
              "to weight its rounding):")
        print(shlex.join(["llama-quantize", *api.llama_quantize_args(the_plan), "MODEL-F32.gguf", "OUT.gguf",
                          api.llama_quantize_base(the_plan)]))
    return 0


def cmd_run(args) -> int:
    from mixq.pipeline import run

    budgets = [float(b) for b in _csv(args.budget)]
    if not budgets:
        raise MixqError("--budget: give one or more bits-per-weight budgets, e.g. 3.5 or 4.25,3.25")
    res = run(args.model, budget_bpw=budgets if len(budgets) > 1 else budgets[0], out_dir=args.out,
              candidates=_csv(args.candidates) if args.candidates else None, method=args.method, calib=args.calib,
              samples=args.samples, seqlen=args.seqlen, eval_windows=args.windows, n_checks=args.checks,
              seed=args.seed, ties=_csv(args.tie) if args.tie else [], progress=_progress(args),
              stage=_stage_printer(args), rotate_residual=_rotation(args),
              act_candidates=_csv(args.act_candidates), kv_candidates=_csv(args.kv_candidates),
              context=args.context, bits_per_mac=args.bits_per_mac, kv_bits=args.kv_bits, max_bytes=args.max_bytes,
              **_placement(args))
    print(eval_table(res["eval"]))
    chk = res["check"]
    if chk.get("spearman") is not None:
        print(f"additivity check over {len(chk['plans'])} frontier plans: Spearman(predicted error, measured "
              f"{chk['metric']}) = {chk['spearman']:.3f}")
    print(f"closest uniform format under {args.budget} bits: {res['eval'].get('closest_uniform')}")
    print(f"run directory {res['out_dir']}; report {res['report']}")
    return 0


def cmd_quantize(args) -> int:
    from mixq import api

    suffix = "".join(f"+{x}" for x in ([args.quantizer] if args.quantizer != "rtn" else []) + _csv(",".join(args.transform)))
    doc = api.quantize(args.model, args.output, plan=args.plan, fmt=(args.format + suffix) if args.format else None,
                       include_head=args.include_head, calib=args.calib, calib_samples=args.calib_samples,
                       calib_seqlen=args.calib_seqlen, seed=args.seed, fp32=args.fp32, overwrite=args.overwrite,
                       progress=_progress(args), rotate_residual=_rotation(args), kv=args.kv, **_placement(args))
    t = doc.get("totals", {})
    print(f"wrote {args.output}: {len(doc['units'])} packed units"
          + (f", {t.get('bpw_all', float('nan')):.3f} bits per weight all-in" if t else ""))
    if doc.get("warnings"):
        print(f"{len(doc['warnings'])} warning(s) recorded in mixq.json, first: {doc['warnings'][0]}")
    r = doc.get("run", {})
    if r.get("peak_device_bytes"):
        print(f"quantized in {r['quantize_s']:.1f} s on {r['device']} (blocks offloaded: {r['offload']}), "
              f"peak memory {r['peak_device_bytes'] / 2**30:.2f} GiB")
    return 0


EXPORT_TARGETS = ["gguf", "compressed-tensors"]  # = api.EXPORT_TARGETS (tested); kept here so --help loads no api


def cmd_export(args) -> int:
    from mixq import api

    gguf_only = [f for f, v in (("--float-type", args.float_type), ("--metadata-from", args.metadata_from),
                                ("--tokenizer-pre", args.tokenizer_pre)) if v is not None]
    if args.to == "compressed-tensors" and gguf_only:
        raise MixqError(f"{', '.join(gguf_only)}: options of --to gguf, not of --to compressed-tensors")
    if args.to == "gguf" and args.dtype is not None:
        raise MixqError("--dtype: an option of --to compressed-tensors; for gguf, --float-type sets the type of the "
                        "unquantized tensors")
    if args.to == "compressed-tensors":
        doc = api.export_compressed_tensors(args.checkpoint, args.output, dtype=args.dtype, overwrite=args.overwrite,
                                            progress=_progress(args))
        t = doc["totals"]
        groups = ", ".join(f"{g}: {v['scheme']['type']}{v['scheme']['num_bits']} {v['scheme']['strategy']} "
                           f"x{v['n_targets']}" for g, v in doc["groups"].items())
        bpw = t["bits_per_weight_quantized"]
        print(f"wrote {args.output}: compressed-tensors, {len(doc['groups'])} scheme(s) ({groups}), "
              f"{len(doc['ignore'])} layer(s) in float"
              + (f", {bpw:.3f} bits per weight over the quantized layers" if bpw else ""))
        print(f"run it: vllm serve {args.output}   |   AutoModelForCausalLM.from_pretrained({str(args.output)!r})")
        return 0
    res = api.export(args.checkpoint, args.output, to=args.to, float_type=args.float_type or "f16",
                     metadata_from=args.metadata_from, tokenizer_pre=args.tokenizer_pre, overwrite=args.overwrite,
                     progress=_progress(args))
    types = ", ".join(f"{t} x{n}" for t, n in sorted(res["unit_types"].items()))
    print(f"wrote {res['path']}: {res['bytes'] / 2**20:.1f} MiB, {res['n_tensors']} tensors; planned units {types} "
          f"({res['bpw_units']:.4f} bits per weight); other 2-D tensors {res['float_type']}, norms f32; "
          f"metadata from {res['metadata']}")
    for w in res["warnings"]:
        print(f"warning: {w}")
    print(f"run it: llama-cli -m {res['path']}")
    return 0


def _rotation(args) -> int | None:
    """The residual-rotation seed of --rotate-residual (the run's --seed), or None."""
    return args.seed if getattr(args, "rotate_residual", False) else None


def _rotation_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rotate-residual", action="store_true",
                   help="fold a random Hadamard rotation of the residual stream (seeded by --seed) into the weights "
                        "first: a plain model of the same architecture that quantizes better and exports anywhere")


def cmd_generate(args) -> int:
    import torch

    from mixq.export import generate, load_quantized
    from mixq.models.placement import resolve_device, resolve_dtype

    dev = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, dev, torch.bfloat16)
    loaded = load_quantized(args.checkpoint, device=dev, dtype=dtype, packed="auto")
    print(generate(loaded, args.prompt, args.max_new_tokens, greedy=not args.sample, chat=args.chat, seed=args.seed,
                   engine=args.engine))
    return 0


def cmd_report(args) -> int:
    from mixq.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


# ---------------------------------------------------------------- parser


class _DEFAULTS(argparse.ArgumentDefaultsHelpFormatter):
    """"(default: X)" after every option's help, except where the default is None, empty or
    False (the help says what None means) or the help already names its default."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or (isinstance(d, (str, list)) and not d) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _aliases() -> str:
    from mixq.models import MODELS

    return ", ".join(MODELS)


def _task_names() -> tuple[str, ...]:
    from mixq.data.tasks import TASK_NAMES

    return TASK_NAMES


def _add_common(sp: argparse.ArgumentParser) -> None:
    """-q / -v after the subcommand too (`mixq eval -q ...`); SUPPRESS keeps the value given
    before the subcommand when they are absent here."""
    sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details")
    sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                    help="no progress bars or stage lines")


def _placement_args(p: argparse.ArgumentParser) -> None:
    """--device / --dtype / --offload (see mixq.models.placement)."""
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, "
                   "cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (the model's own dtype on a GPU, float32 on the CPU), "
                   "bfloat16, float16, float32 (default auto)")
    p.add_argument("--offload", default="auto", choices=["auto", "none", "cpu", "disk"],
                   help="where the decoder blocks wait while one at a time computes on the device: none (all on "
                   "the device), cpu (host memory), disk (read from the safetensors shards); auto picks none when "
                   "the model fits the device (default auto)")


def _actkv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--act-candidates", default="", help="input-activation formats crossed with every candidate, "
                   "e.g. none,int8:tok,int4:tok (none: float inputs)")
    p.add_argument("--kv-candidates", default="", help="KV-cache formats weighed for every attention layer, e.g. "
                   "int8,int4,int4:kchan,int3:kchan:out1%%:sink")


def _budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=int, default=None, help="tokens of KV cache counted in --max-bytes and "
                   "--kv-bits (the plan then chooses each layer's KV format too)")
    p.add_argument("--bits-per-mac", type=float, default=None, help="bit-operation budget: average weight bits x "
                   "activation bits per multiply-accumulate (W4A4 = 16, W4A8 = 32, W8A8 = 64)")
    p.add_argument("--kv-bits", type=float, default=None, help="average all-in bits per cached key/value element")


def _placement(args) -> dict:
    return {"device": args.device, "dtype": args.dtype, "offload": args.offload}


def build_parser() -> argparse.ArgumentParser:
    from mixq import __version__

    p = argparse.ArgumentParser(prog="mixq", description="Mixed-precision quantization: measure, plan, quantize, evaluate.")
    p.add_argument("--version", action="version", version=f"mixq {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or stage lines (bars are off anyway "
                   "when stderr is not a terminal: one line per finished stage instead)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser("formats", help="list every numeric format with its all-in bits per weight",
                       formatter_class=_DEFAULTS)
    f.add_argument("--rows", type=int, default=4096, help="rows (output channels) of the matrix the bits are counted for")
    f.add_argument("--cols", type=int, default=4096, help="columns (input channels) of that matrix")
    _add_common(f)
    f.set_defaults(func=cmd_formats)

    e = sub.add_parser("eval", help="evaluate the float model and quantized versions of it")
    e.add_argument("model", help=f"built-in alias ({_aliases()}), model directory, GGUF file, "
                   "hub id, or a checkpoint directory written by mixq quantize")
    e.add_argument("--format", action="append", default=[], metavar="SPEC",
                   help="format for every unit, e.g. int4:g64, or with an input-activation format int8:ch@int8:tok "
                        "(repeat or comma-separate for several)")
    e.add_argument("--plan", action="append", default=[], metavar="PLAN_JSON", help="evaluate a plan.json")
    e.add_argument("--kv", action="append", default=[], metavar="SPEC",
                   help="KV-cache format for every attention layer, e.g. int8, int4:kchan, int3:kchan:out1%%:sink "
                        "(repeat or comma-separate: each format/plan is evaluated with each; alone: float weights)")
    e.add_argument("--data", default=None, help="wikitext2 (default), wikitext2-valid, ptb, ptb-valid, or a text file")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--windows", type=int, default=8, help="number of windows from the start of the text; 0 = all (default 8)")
    e.add_argument("--tasks", default="", help=f"zero-shot tasks, comma-separated: {','.join(_task_names())}")
    e.add_argument("--limit", type=int, default=None, help="examples per zero-shot task (default all)")
    e.add_argument("--include-head", action="store_true", help="also quantize lm_head (tied heads share the embedding)")
    e.add_argument("--quantizer", default="rtn", choices=["rtn", "gptq"], help="quantizer for --format (default rtn)")
    e.add_argument("--transform", action="append", default=[], metavar="T",
                   help="transform(s) before quantizing --format units: rotate, smooth, lowrank:R (repeat or comma-separate)")
    e.add_argument("--calib", default=None, help="calibration data for gptq/smooth: a text (default wikitext2-valid); "
                   "image models: cifar10-calib (the default), the calibration half of the CIFAR-10 test images")
    e.add_argument("--calib-samples", type=int, default=128,
                   help="calibration windows, or images drawn at random from cifar10-calib (default 128)")
    e.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    e.add_argument("--seed", type=int, default=0, help="seed of calibration sampling and rotations")
    e.add_argument("--json", default=None, metavar="OUT", help="write the results as an eval artifact")
    _rotation_arg(e)
    _add_common(e)
    _placement_args(e)
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser("analyze", help="measure per-unit sensitivity to every candidate format, once")
    a.add_argument("model", nargs="?", default="smollm2-135m")
    a.add_argument("--candidates", default="int2:g64,int3:g64,int4:g64,int8:ch", help="comma-separated options")
    a.add_argument("--method", default="fisher", help="fisher (default), output, hutchinson, eigen, measure; "
                   "hutchinson/eigen/measure are costly: use few --samples")
    a.add_argument("--calib", default=None, help="calibration text (default wikitext2-valid); CIFAR models use "
                   "cifar10-calib, the calibration half (--samples random images of it)")
    a.add_argument("--samples", type=int, default=8, help="calibration windows (or images)")
    a.add_argument("--seqlen", type=int, default=512)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--include-head", action="store_true")
    a.add_argument("--spike-ratio", type=float, default=1000.0, help="input max/median ratio that flags an activation spike")
    _actkv_args(a)
    a.add_argument("-o", "--output", default="sensitivity.json")
    _rotation_arg(a)
    _add_common(a)
    _placement_args(a)
    a.set_defaults(func=cmd_analyze)

    pl = sub.add_parser("plan", help="choose a format per unit under a bit budget")
    pl.add_argument("sensitivity", help="sensitivity.json from mixq analyze")
    pl.add_argument("--budget", type=float, default=None, help="average all-in bits per weight over the units")
    pl.add_argument("--max-bytes", type=int, default=None, help="also cap the total bytes of the units (with "
                    "--context: of the units' weights plus the KV cache of that many tokens)")
    _budget_args(pl)
    pl.add_argument("--keep", action="append", default=[], metavar="PATTERN=OPTION",
                    help="pin units matching a glob (or re:REGEX) to an option, e.g. '*.down_proj=int8:ch'")
    pl.add_argument("--tie", default="", help="units that must share an option: qkv, gate_up, experts (comma-separated)")
    pl.add_argument("--min-bits", type=float, default=None, help="drop options under this many bits per weight")
    pl.add_argument("--max-bits", type=float, default=None, help="drop options over this many bits per weight")
    pl.add_argument("--spikes", default=None, metavar="keep|rotate|OPTION",
                    help="spike-aware rule for units whose inputs spike: keep (8+ bits), rotate (+rotate options or "
                         "8+ bits), or an option to pin them to")
    pl.add_argument("--spike-ratio", type=float, default=1000.0, help="input max/median ratio that flags a spike")
    pl.add_argument("--solver", default="ilp", choices=["ilp", "greedy", "dp"])
    pl.add_argument("--target", default=None, choices=EXPORT_TARGETS,
                    help="offer each unit only the candidates this export target stores as they are (gguf: llama.cpp's "
                    "types, k-quants only where rows are multiples of 256; compressed-tensors: its schemes, and qkv "
                    "and gate_up tied), so that the plan exports")
    pl.add_argument("--emit", default=None, choices=["llama-quantize"],
                    help="also print the plan as llama-quantize --tensor-type arguments")
    pl.add_argument("-o", "--output", default="plan.json")
    pl.add_argument("--frontier", default=None, metavar="FRONTIER_JSON", help="also write the whole error-vs-bits curve")
    pl.add_argument("--points", type=int, default=41, help="frontier points")
    _add_common(pl)
    pl.set_defaults(func=cmd_plan)

    r = sub.add_parser("run", help="analyze, plan, eval and report in one go, into a run directory",
                       formatter_class=_DEFAULTS)
    r.add_argument("model", nargs="?", default="smollm2-135m", help=f"built-in alias ({_aliases()}), model "
                   "directory, GGUF file or hub id")
    r.add_argument("--budget", default="3.5", help="average all-in bits per weight of the plan; several "
                   "comma-separated (4.25,3.25) share one analysis")
    r.add_argument("--candidates", default=None, help="comma-separated options to choose from (default: "
                   "int2:g64,int3:g64,int4:g64,int8:ch for LMs, int2:ch,int3:ch,int4:ch,int8:ch for CNNs)")
    r.add_argument("--method", default="fisher", help="sensitivity method: fisher, output, hutchinson, eigen, measure")
    r.add_argument("--calib", default=None, help="calibration text (default: wikitext2-valid; CNNs: cifar10-calib)")
    r.add_argument("--samples", type=int, default=None, help="calibration windows (default: 8) or, for CNNs, images "
                   "drawn at random from cifar10-calib (default: 512, as the CIFAR benchmarks)")
    r.add_argument("--seqlen", type=int, default=512, help="tokens per calibration and evaluation window")
    r.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows the plans are evaluated on")
    r.add_argument("--checks", type=int, default=5, help="frontier plans measured for the additivity check")
    r.add_argument("--tie", default="", help="units that must share an option: qkv, gate_up, experts "
                   "(comma-separated; default: none)")
    r.add_argument("--seed", type=int, default=0, help="seed of calibration sampling (recorded in every artifact)")
    r.add_argument("--out", default="runs/default", help="run directory (artifacts and report.html)")
    _rotation_arg(r)
    r.add_argument("--max-bytes", type=int, default=None, help="cap the bytes of weights plus the KV cache at --context")
    _actkv_args(r)
    _budget_args(r)
    _placement_args(r)
    _add_common(r)
    r.set_defaults(func=cmd_run)

    qz = sub.add_parser("quantize", help="quantize a model by a plan (or one format) and write a packed checkpoint",
                        formatter_class=_DEFAULTS)
    qz.add_argument("model", help=f"built-in alias ({_aliases()}), model directory, GGUF file or hub id")
    qz.add_argument("--plan", default=None, help="plan.json from mixq plan (give it or --format)")
    qz.add_argument("--format", default=None, help="one option for every unit instead of a plan, e.g. int4:g64 "
                    "(give it or --plan)")
    qz.add_argument("--quantizer", default="rtn", choices=["rtn", "gptq"], help="quantizer for --format")
    qz.add_argument("--transform", action="append", default=[], metavar="T",
                    help="transform(s) before quantizing --format units: rotate, smooth, lowrank:R (repeat or "
                         "comma-separate; default: none)")
    qz.add_argument("--include-head", action="store_true", help="also quantize lm_head with --format (default: off)")
    qz.add_argument("--calib", default=None, help="calibration text for gptq/smooth (default: wikitext2-valid; "
                    "CNNs: cifar10-calib)")
    qz.add_argument("--calib-samples", type=int, default=128, help="calibration windows (or images)")
    qz.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    qz.add_argument("--seed", type=int, default=0, help="seed of calibration sampling and rotations")
    qz.add_argument("--fp32", action="store_true", help="store unquantized tensors in fp32 instead of bf16 "
                    "(default: bf16)")
    qz.add_argument("--overwrite", action="store_true", help="replace an existing mixq checkpoint directory "
                    "(default: refuse)")
    qz.add_argument("-o", "--output", required=True, help="checkpoint directory (required)")
    qz.add_argument("--kv", default=None, metavar="SPEC", help="KV-cache format for every layer, recorded in mixq.json")
    _rotation_arg(qz)
    _placement_args(qz)
    _add_common(qz)
    qz.set_defaults(func=cmd_quantize)

    x = sub.add_parser("export", help="write a checkpoint in a runtime's format (gguf: one file for llama.cpp; "
                       "compressed-tensors: a directory for vLLM and transformers)")
    x.add_argument("checkpoint", help="checkpoint directory written by mixq quantize")
    x.add_argument("--to", required=True, choices=EXPORT_TARGETS, help="target format")
    x.add_argument("-o", "--output", required=True, help="output file (gguf) or directory (compressed-tensors)")
    x.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="compressed-tensors: dtype of the unquantized tensors and of the config (default: as the "
                        "checkpoint stores them); float16 keeps mixq's float16 INT scales exact in the runtime")
    x.add_argument("--float-type", default=None, help="gguf: type of embeddings, head and unplanned tensors: f16 "
                   "(default), f32, bf16 or a GGUF type such as q8_0; norms are always f32")
    x.add_argument("--metadata-from", default=None, metavar="GGUF",
                   help="gguf: copy architecture and tokenizer metadata from this GGUF (default: the model's own "
                   "source GGUF when it came from one, else config.json and the tokenizer files)")
    x.add_argument("--tokenizer-pre", default=None, help="gguf: llama.cpp's pre-tokenizer name (tokenizer.ggml.pre), "
                   "when mixq does not recognise the tokenizer's")
    x.add_argument("--overwrite", action="store_true", help="replace an existing export")
    x.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="generate text with a packed checkpoint")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=int, default=0)
    _add_common(g)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    g.add_argument("--dtype", default="auto", help="activation dtype: auto (bf16 on a GPU, float32 on the CPU), "
                   "bfloat16, float16, float32")
    g.add_argument("--engine", choices=["auto", "static", "hf"], default="auto",
                   help="decode loop: static (static KV cache, CUDA graph per step), hf (model.generate), "
                        "auto (static on a GPU for Llama-family models)")
    g.set_defaults(func=cmd_generate)

    rp = sub.add_parser("report", help="write report.html for a run directory")
    rp.add_argument("run_dir")
    _add_common(rp)
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="the main job in a few minutes: measure sensitivity, plan at the bits of "
                       "uniform int3/int4, compare at equal bits", formatter_class=_DEFAULTS)
    d.add_argument("--samples", type=int, default=4, help="calibration windows the sensitivity is measured on")
    d.add_argument("--seqlen", type=int, default=512, help="tokens per calibration and evaluation window")
    d.add_argument("--windows", type=int, default=4, help="WikiText-2 test windows the plans are evaluated on")
    d.add_argument("--out", default="runs/demo", help="directory for sensitivity.json and the plans")
    d.add_argument("--json", default=None, metavar="OUT", help="also write the results as an eval artifact")
    _add_common(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    func: Callable = args.func
    try:
        return func(args)
    except MixqError as e:
        print(f"mixq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

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
    from mixq.progress import TqdmProgress

    return TqdmProgress(disable=getattr(args, "quiet", False))


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
        headers = ["format", "bpw blocks", "bpw all", "ppl", "KL", "top1 agree"] + task_names
        body = [[r["label"], r["bpw_blocks"], r["bpw_all"], r["ppl"], r["kl"], r["top1_agree"]]
                + [_task_acc(r["tasks"].get(t)) for t in task_names] for r in rows]
        if any("quantize_s" in r for r in rows):
            headers.append("quant s")
            for b, r in zip(body, rows):
                b.append(r.get("quantize_s"))
        head = (f"model {result['model']}  data {result['data']}: {result['n_windows']} windows x "
                f"{result['seqlen']} tokens = {result['n_tokens']} scored tokens")
        if task_names:
            head += f"; zero-shot acc_norm (acc for lambada) on {result.get('task_limit') or 'all'} examples per task"
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
            "embeddings/head/norms at 16 bits unless quantized") if is_lm else (
            "bpw quantized: all-in bits per weight of the conv/linear units; bpw all: every parameter, "
            "batch-norm and biases at 16 bits")
    note = f"\nnote: {result['note']}" if result.get("note") else ""
    return f"{head}\n{render_table(headers, body)}\n{foot}{note}"


def _task_acc(scores: dict | None):
    if not scores:
        return None
    norm = scores.get("acc_norm")
    return norm if norm is not None else scores.get("acc")


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
        **_placement(args),
    )
    print(eval_table(result))
    if args.json:
        _write_json(args.json, "eval", api.EVAL_SCHEMA, result)
    return 0


def _split_formats(spec: str) -> list[str]:
    # Several formats may be given comma-separated; a format spec itself never holds a comma.
    return _csv(spec)


DEMO_FORMATS = ["int8:ch", "int4:g64", "int4:g64:asym", "int3:g64", "mxfp4", "nvfp4", "nf4:g64"]


def cmd_demo(args) -> int:
    from mixq import api

    print(f"mixq demo: default model, WikiText-2 test, {args.windows} windows x {args.seqlen} tokens, "
          f"formats {', '.join(DEMO_FORMATS)} (round to nearest)")
    result = api.evaluate(formats=DEMO_FORMATS, seqlen=args.seqlen, windows=args.windows,
                          progress=_progress(args))
    print(eval_table(result))
    if args.json:
        _write_json(args.json, "eval", api.EVAL_SCHEMA, result)
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
                        progress=_progress(args), **_placement(args))
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
    print(f"wrote {args.output}")
    return 0


def cmd_plan(args) -> int:
    from mixq import api

    the_plan, curve = api.plan(args.sensitivity, args.budget, solver=args.solver, max_bytes=args.max_bytes,
                               keep=_keep_arg(args.keep), ties=_csv(args.tie) if args.tie else [],
                               min_bits=args.min_bits, max_bits=args.max_bits,
                               frontier_points=args.points if args.frontier else 0, spikes=args.spikes,
                               spike_ratio=args.spike_ratio, target=args.target, progress=_progress(args))
    the_plan.save(args.output)
    m = the_plan.meta
    counts: dict[str, int] = {}
    for o in the_plan.options.values():
        counts[str(o)] = counts.get(str(o), 0) + 1
    print(f"plan at {args.budget:g} bits/weight ({args.solver}, {m['status']}): "
          f"{m['bits_per_weight']:.4f} bits/weight over {len(the_plan.options)} units, "
          f"predicted error {m['predicted_error']:.6g}")
    print(render_table(["option", "units"], sorted(counts.items())))
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
              candidates=_csv(args.candidates), method=args.method, calib=args.calib, samples=args.samples,
              seqlen=args.seqlen, eval_windows=args.windows, n_checks=args.checks, seed=args.seed,
              ties=_csv(args.tie) if args.tie else [], progress=_progress(args), **_placement(args))
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
                       progress=_progress(args), **_placement(args))
    t = doc.get("totals", {})
    print(f"wrote {args.output}: {len(doc['units'])} packed units"
          + (f", {t.get('bpw_all', float('nan')):.3f} bits per weight all-in" if t else ""))
    if doc.get("warnings"):
        print(f"{len(doc['warnings'])} warning(s) recorded in mixq.json, first: {doc['warnings'][0]}")
    return 0


def cmd_export(args) -> int:
    from mixq import api

    res = api.export(args.checkpoint, args.output, to=args.to, float_type=args.float_type,
                     metadata_from=args.metadata_from, tokenizer_pre=args.tokenizer_pre, overwrite=args.overwrite,
                     progress=_progress(args))
    types = ", ".join(f"{t} x{n}" for t, n in sorted(res["unit_types"].items()))
    print(f"wrote {res['path']}: {res['bytes'] / 2**20:.1f} MiB, {res['n_tensors']} tensors; planned units {types} "
          f"({res['bpw_units']:.4f} bits per weight); other 2-D tensors {res['float_type']}, norms f32; "
          f"metadata from {res['metadata']}")
    for w in res["warnings"]:
        print(f"warning: {w}")
    if args.to == "gguf":
        print(f"run it: llama-cli -m {res['path']}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from mixq.export import generate, load_quantized

    from mixq.models.placement import resolve_device, resolve_dtype

    dev = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, dev, torch.bfloat16)
    loaded = load_quantized(args.checkpoint, device=dev, dtype=dtype, packed="auto")
    print(generate(loaded, args.prompt, args.max_new_tokens, greedy=not args.sample, chat=args.chat, seed=args.seed))
    return 0


def cmd_report(args) -> int:
    from mixq.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


# ---------------------------------------------------------------- parser


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


def _placement(args) -> dict:
    return {"device": args.device, "dtype": args.dtype, "offload": args.offload}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixq", description="Mixed-precision quantization: measure, plan, quantize, evaluate.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser("formats", help="list every numeric format with its all-in bits per weight")
    f.add_argument("--rows", type=int, default=4096)
    f.add_argument("--cols", type=int, default=4096)
    f.set_defaults(func=cmd_formats)

    e = sub.add_parser("eval", help="evaluate the float model and quantized versions of it")
    e.add_argument("model", help="built-in alias (smollm2-135m, resnet20-cifar10, resnet56-cifar10), model directory, "
                   "hub id, or a checkpoint directory written by mixq quantize")
    e.add_argument("--format", action="append", default=[], metavar="SPEC",
                   help="format for every unit, e.g. int4:g64 (repeat or comma-separate for several)")
    e.add_argument("--plan", action="append", default=[], metavar="PLAN_JSON", help="evaluate a plan.json")
    e.add_argument("--data", default=None, help="wikitext2 (default), wikitext2-valid, ptb, ptb-valid, or a text file")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--windows", type=int, default=8, help="number of windows from the start of the text; 0 = all (default 8)")
    e.add_argument("--tasks", default="", help="zero-shot tasks, comma-separated: piqa,arc_easy,arc_challenge,winogrande,hellaswag,lambada,...")
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
    a.add_argument("-o", "--output", default="sensitivity.json")
    _placement_args(a)
    a.set_defaults(func=cmd_analyze)

    pl = sub.add_parser("plan", help="choose a format per unit under a bit budget")
    pl.add_argument("sensitivity", help="sensitivity.json from mixq analyze")
    pl.add_argument("--budget", type=float, required=True, help="average all-in bits per weight over the units")
    pl.add_argument("--max-bytes", type=int, default=None, help="also cap the total bytes of the units")
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
    pl.add_argument("--target", default=None, choices=["gguf"],
                    help="offer each unit only the candidates this export target stores as they are (gguf: llama.cpp's "
                    "types; k-quants only where rows are multiples of 256), so that the plan exports")
    pl.add_argument("--emit", default=None, choices=["llama-quantize"],
                    help="also print the plan as llama-quantize --tensor-type arguments")
    pl.add_argument("-o", "--output", default="plan.json")
    pl.add_argument("--frontier", default=None, metavar="FRONTIER_JSON", help="also write the whole error-vs-bits curve")
    pl.add_argument("--points", type=int, default=41, help="frontier points")
    pl.set_defaults(func=cmd_plan)

    r = sub.add_parser("run", help="analyze, plan, eval and report in one go, into a run directory")
    r.add_argument("model", nargs="?", default="smollm2-135m")
    r.add_argument("--budget", default="3.5", help="average all-in bits per weight; several comma-separated "
                   "(4.25,3.25) share one analysis (default 3.5)")
    r.add_argument("--candidates", default="int2:g64,int3:g64,int4:g64,int8:ch")
    r.add_argument("--method", default="fisher")
    r.add_argument("--calib", default=None)
    r.add_argument("--samples", type=int, default=8)
    r.add_argument("--seqlen", type=int, default=512)
    r.add_argument("--windows", type=int, default=8, help="evaluation windows")
    r.add_argument("--checks", type=int, default=5, help="frontier plans measured for the additivity check")
    r.add_argument("--tie", default="")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="runs/default", help="run directory")
    _placement_args(r)
    r.set_defaults(func=cmd_run)

    qz = sub.add_parser("quantize", help="quantize a model by a plan (or one format) and write a packed checkpoint")
    qz.add_argument("model")
    qz.add_argument("--plan", default=None, help="plan.json from mixq plan")
    qz.add_argument("--format", default=None, help="one option for every unit instead of a plan, e.g. int4:g64")
    qz.add_argument("--quantizer", default="rtn", choices=["rtn", "gptq"])
    qz.add_argument("--transform", action="append", default=[], metavar="T")
    qz.add_argument("--include-head", action="store_true")
    qz.add_argument("--calib", default=None)
    qz.add_argument("--calib-samples", type=int, default=128)
    qz.add_argument("--calib-seqlen", type=int, default=512)
    qz.add_argument("--seed", type=int, default=0)
    qz.add_argument("--fp32", action="store_true", help="store unquantized tensors in fp32 (default bf16)")
    qz.add_argument("--overwrite", action="store_true", help="replace an existing mixq checkpoint directory")
    qz.add_argument("-o", "--output", required=True, help="checkpoint directory")
    _placement_args(qz)
    qz.set_defaults(func=cmd_quantize)

    x = sub.add_parser("export", help="write a checkpoint in a runtime's format (gguf: one file for llama.cpp)")
    x.add_argument("checkpoint", help="checkpoint directory written by mixq quantize")
    x.add_argument("--to", required=True, choices=["gguf"], help="the runtime format")
    x.add_argument("-o", "--output", required=True, help="output file (gguf)")
    x.add_argument("--float-type", default="f16", help="gguf: type of embeddings, head and unplanned tensors: f16 "
                   "(default), f32, bf16 or a GGUF type such as q8_0; norms are always f32")
    x.add_argument("--metadata-from", default=None, metavar="GGUF",
                   help="gguf: copy architecture and tokenizer metadata from this GGUF (default: the model's own "
                   "source GGUF when it came from one, else config.json and the tokenizer files)")
    x.add_argument("--tokenizer-pre", default=None, help="gguf: llama.cpp's pre-tokenizer name (tokenizer.ggml.pre), "
                   "when mixq does not recognise the tokenizer's")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    x.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="generate text with a packed checkpoint")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    g.add_argument("--dtype", default="auto", help="activation dtype: auto (bf16 on a GPU, float32 on the CPU), "
                   "bfloat16, float16, float32")
    g.set_defaults(func=cmd_generate)

    rp = sub.add_parser("report", help="write report.html for a run directory")
    rp.add_argument("run_dir")
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="run the default model through a few formats and print the table")
    d.add_argument("--seqlen", type=int, default=512)
    d.add_argument("--windows", type=int, default=8)
    d.add_argument("--json", default=None, metavar="OUT")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
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

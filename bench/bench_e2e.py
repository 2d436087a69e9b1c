"""End-to-end decode speed of a Llama-3-8B-shaped model through mixq's decode loop
(`export.decoder.StaticDecoder`: static KV cache, each step one CUDA-graph replay), bf16
against packed plans, batch 1 (or --batch rows decoded together), on a GPU.

    PYTHONPATH=src python3 bench/bench_e2e.py --out e2e.json [--layers 32] [--ctx 1024] [--batch 1]

The model is built from its config, never downloaded: LlamaConfig(hidden_size=4096,
intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
num_key_value_heads=8, vocab_size=128256), random bf16 weights on the GPU. Each plan
quantizes every linear unit of the blocks and the LM head by round to nearest into
`QuantLinear`s (random weights: speed does not depend on values). Plans:

* int4: int4:g128 everywhere (4.125 bpw);
* mixed-4.25 / mixed-3.5: three formats by a fixed priority (a stand-in for a sensitivity
  ranking): int3:g128 for the gate/up projections of the middle blocks, int8:ch for every
  unit of the first and last two blocks where the budget allows, int4:g128 elsewhere, then
  units upgraded (int4 -> int8, or int3 -> int4 for the 3.5-bit plan) in priority order
  until the all-in bits per weight of the planned units reach the target; q/k/v and gate/up
  always share a format (as the planner gives units that read one input), so they fuse.

A plan name may add online input transforms to every unit of the blocks (not the LM head):
`int4+rotate` (the seeded random-sign Hadamard rotation, blocks of 4096 inputs for q/k/v/o/
gate/up and 2048 for down), `int4+smooth+rotate` (smoothing scales too); units that read one
input share one transform, as the planner gives them, so the decode loop applies it inside
the RMSNorm kernel that feeds them (MIXQ_NORM_TRANSFORM=0 in --variants: its own kernel).

Each plan runs with the fused element-wise kernels of the decode step (`kernels.decode_ops`);
`<plan>:unfused` runs the same step with the model's own torch modules for the glue.

Timing: after a prefill, `steps` replays of the captured step graph, CUDA events around
them (ms/token = total / steps); the cache is `ctx` tokens long and the timed steps sit at
its last positions, so attention reads about `ctx` keys every step (mixq's decode attention
reads the written keys only; torch's SDPA on the unfused path reads the whole cache), as a
serving engine's decode at that context would.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import temp_env  # noqa: E402  (not bench_kernels: it turns PDL off on import)

from mixq import formats  # noqa: E402
from mixq.export.decoder import StaticDecoder  # noqa: E402
from mixq.models import llm_units  # noqa: E402
from mixq.nn import QuantLinear  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256)


def log(*a):
    print(*a, flush=True)


def build_model(n_layers: int, ctx: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**LLAMA3_8B, "vocab_size": vocab}, num_hidden_layers=n_layers,
                      max_position_embeddings=max(ctx, 2048), tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _bits(spec: str, shape) -> float:
    return formats.parse(spec).bits(shape)


GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def plan_for(name: str, units, n_layers: int) -> dict[str, str]:
    """unit name -> format for the named plan (see module docstring). Units that read one
    input (q/k/v, gate/up) get one format, as mixq's planner gives them, so they run as one
    fused matmul."""
    if name == "int4":
        return {u.name: "int4:g128" for u in units}
    target = {"mixed-4.25": 4.25, "mixed-3.5": 3.5}[name]
    edge = {0, 1, n_layers - 2, n_layers - 1}
    groups: dict[tuple, list] = {}
    for u in units:
        leaf = u.name.rsplit(".", 1)[-1]
        groups.setdefault((u.block, GROUPS.get(leaf, leaf)), []).append(u)

    def priority(key):  # higher first: edge blocks, attention, down, the head, then gate/up
        block, kind = key
        rank = {"qkv": 0, "o_proj": 1, "down_proj": 2, "lm_head": 3, "gate_up": 4}.get(kind, 5)
        return (0 if block in edge else 1, rank, block)

    order = sorted(groups, key=priority)
    n_params = sum(u.shape[0] * u.shape[1] for u in units)
    if target >= 4.125:
        start = {key: ("int3:g128" if key[1] == "gate_up" and key[0] not in edge else "int4:g128") for key in groups}
        ladder = {"int3:g128": "int4:g128", "int4:g128": "int8:ch"}
    else:
        start = {key: "int3:g128" for key in groups}
        ladder = {"int3:g128": "int4:g128"}
    bits = lambda key, spec: sum(_bits(spec, u.shape) for u in groups[key])  # noqa: E731
    total = sum(bits(key, spec) for key, spec in start.items())
    for _ in range(2):
        for key in order:
            up = ladder.get(start[key])
            if up is None:
                continue
            delta = bits(key, up) - bits(key, start[key])
            if (total + delta) / n_params <= target + 1e-3:
                start[key] = up
                total += delta
    return {u.name: start[key] for key, us in groups.items() for u in us}


def quantize_in_place(model, plan: dict[str, str]) -> None:
    for name, spec in plan.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, leaf)
        setattr(parent, leaf, QuantLinear.from_linear(lin, spec))
        del lin
    gc.collect()
    torch.cuda.empty_cache()


TRANSFORMS = ("smooth", "rotate")


def add_transforms(model, kinds: list[str]) -> None:
    """Online input transforms (see the module docstring) on the QuantLinear units of every
    block; q/k/v share one, gate/up share one, o and down have their own."""
    from mixq.quantizers import UnitTransforms

    bad = [k for k in kinds if k not in TRANSFORMS]
    if bad:
        raise SystemExit(f"unknown transform(s) {bad} in a plan name: expected {TRANSFORMS}")
    for i, ly in enumerate(model.model.layers):
        for j, (mod, names) in enumerate([(ly.self_attn, ("q_proj", "k_proj", "v_proj")), (ly.self_attn, ("o_proj",)),
                                          (ly.mlp, ("gate_proj", "up_proj")), (ly.mlp, ("down_proj",))]):
            k = getattr(mod, names[0]).in_features
            g = torch.Generator().manual_seed(4 * i + j)
            smooth = torch.rand(k, generator=g) + 0.5 if "smooth" in kinds else None
            tf = UnitTransforms(smooth, 4 * i + j if "rotate" in kinds else None, None, None)
            for name in names:
                q = getattr(mod, name)
                if not isinstance(q, QuantLinear):
                    raise SystemExit(f"transforms need a quantized plan; {name} is {type(q).__name__}")
                setattr(mod, name, QuantLinear(q.weights(), q.bias, tf))


def weight_stats(model, units) -> tuple[int, float]:
    """(bytes the decode step reads for the planned units' weights, all-in bits per weight)."""
    nbytes, n_params = 0, 0
    for u in units:
        mod = model.get_submodule(u.name)
        n_params += u.shape[0] * u.shape[1]
        nbytes += mod.weights().nbytes() if isinstance(mod, QuantLinear) else mod.weight.numel() * mod.weight.element_size()
    return nbytes, 8 * nbytes / n_params


def time_decode(model, ctx: int, steps: int, fused: bool | None = None, batch: int = 1) -> float:
    """ms per step (one token for each of `batch` rows) of graph-replayed greedy steps."""
    dec = StaticDecoder(model, max_len=ctx, batch=batch, fused=fused)
    with torch.no_grad():
        dec.forward(torch.randint(0, 1000, (batch, 8), device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda"))
        graph, state = dec.step_graph()
        # the timed steps end at the last position of the cache, so attention reads about ctx keys
        state["pos"].fill_(max(0, ctx - 1 - (3 + 3 * steps)))
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(steps):
                graph.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / steps)
    del graph, dec
    return sorted(times)[1]


def profile_step(model, ctx: int, steps: int = 8, top: int = 14) -> dict:
    """Kernel time inside the replayed step graph (torch.profiler / CUPTI): per kernel name,
    calls and µs per token, and their sum against the step's wall time, so the gaps between
    kernels show."""
    try:
        return _profile_step(model, ctx, steps, top)
    except Exception as e:  # a profiler that cannot see graph kernels must not cost the timings
        return dict(kernels_per_token=0, busy_us=0.0, top=[], error=f"{type(e).__name__}: {e}")


def _profile_step(model, ctx: int, steps: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    dec = StaticDecoder(model, max_len=ctx)
    with torch.no_grad():
        dec.forward(torch.randint(0, 1000, (1, 8), device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda"))
        graph, state = dec.step_graph()
        state["pos"].fill_(max(0, ctx - 1 - (3 + steps)))
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                graph.replay()
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append(dict(kernel=e.key[:90], calls=e.count / steps, us=t / steps))
    rows.sort(key=lambda r: -r["us"])
    del graph, dec
    busy = sum(r["us"] for r in rows)
    return dict(kernels_per_token=sum(r["calls"] for r in rows), busy_us=busy, top=rows[:top])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="e2e.json")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (one token each per step)")
    ap.add_argument("--plans", default="bf16,int4,mixed-4.25,mixed-3.5,bf16:unfused,int4:unfused",
                    help="plans; ':unfused' runs the decode step without the fused element-wise kernels")
    ap.add_argument("--variants", default="",
                    help="';'-separated environment settings to time each quantized plan under again, e.g. "
                         "'MIXQ_PDL=1;MIXQ_PDL=1,MIXQ_GEMV_STAGES=4' (the step graph is captured anew for each)")
    ap.add_argument("--profile", action="store_true", help="kernel times of the step per plan (torch.profiler)")
    args = ap.parse_args(argv)
    variants = [dict(kv.split("=", 1) for kv in v.split(",")) for v in args.variants.split(";") if v.strip()]
    props = torch.cuda.get_device_properties(0)
    res = dict(device=props.name, torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"),
               layers=args.layers, ctx=args.ctx, vocab=args.vocab, batch=args.batch, rows=[])
    out = Path(args.out)
    for label in args.plans.split(","):
        name, _, mode = label.partition(":")
        name, *tf_kinds = name.split("+")
        t0 = time.time()
        model = build_model(args.layers, args.ctx, args.vocab)
        units = llm_units(model, include_head=True)
        plan = None
        if name != "bf16":
            plan = plan_for(name, units, args.layers)
            quantize_in_place(model, plan)
        if tf_kinds:
            add_transforms(model, tf_kinds)
        nbytes, bpw = weight_stats(model, units)
        t_build = time.time() - t0
        ms = time_decode(model, args.ctx, args.steps, fused=False if mode == "unfused" else None, batch=args.batch)
        counts = {}
        for spec in (plan or {}).values():
            counts[spec] = counts.get(spec, 0) + 1
        row = dict(plan=label, ms_per_token=ms, tokens_per_s=args.batch * 1e3 / ms, weight_GB=nbytes / 1e9, bpw=bpw,
                   weight_GBps=nbytes / (ms * 1e-3) / 1e9, formats=counts, build_s=t_build)
        res["rows"].append(row)
        base = res["rows"][0]["tokens_per_s"] if res["rows"][0]["plan"] == "bf16" else None
        log(f"{label:>18}: {ms:6.2f} ms/token {args.batch * 1e3 / ms:7.1f} tok/s  weights {nbytes / 1e9:5.2f} GB ({bpw:.3f} bpw) "
            f"-> {row['weight_GBps']:6.0f} GB/s" + (f"  x{row['tokens_per_s'] / base:.2f} bf16" if base else "")
            + f"  {counts}  (build {t_build:.0f} s)")
        if args.profile:
            row["profile"] = profile_step(model, args.ctx)
            pr = row["profile"]
            log(f"{'':>18}  {pr['kernels_per_token']:.0f} kernels/token, busy {pr['busy_us']:.0f} us of "
                f"{ms * 1e3:.0f}: " + "; ".join(f"{r['kernel'][:48]} x{r['calls']:.0f} {r['us']:.0f}us" for r in pr["top"][:8]))
        for env in (variants if plan is not None else []):
            with temp_env(env):
                ms_v = time_decode(model, args.ctx, args.steps, fused=False if mode == "unfused" else None,
                                   batch=args.batch)
                vrow = dict(plan=label, env=env, ms_per_token=ms_v, tokens_per_s=args.batch * 1e3 / ms_v, bpw=bpw,
                            weight_GBps=nbytes / (ms_v * 1e-3) / 1e9)
                if args.profile:
                    vrow["profile"] = profile_step(model, args.ctx)
            res["rows"].append(vrow)
            log(f"{label:>18} {env}: {ms_v:6.2f} ms/token" + (f"  x{vrow['tokens_per_s'] / base:.2f} bf16" if base else "")
                + (f"  busy {vrow['profile']['busy_us']:.0f} us" if args.profile else ""))
        out.write_text(json.dumps(res, indent=1))
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

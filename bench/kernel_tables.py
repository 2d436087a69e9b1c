"""Markdown tables from the JSON of bench_tc.py, bench_gemm.py, peer_gemv.py and bench_e2e.py
(for BENCHMARKS.md), with each figure as a ratio to bf16 and % of copy bandwidth.

    python3 bench/kernel_tables.py [--tc tc.json] [--gemm gemm.json] [--peers peer.json] [--e2e e2e.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def tc_table(doc: dict) -> str:
    bw = doc["copy_GBps"] * 1e9
    out = [f"device {doc['device']}, copy {doc['copy_GBps']:.0f} GB/s, {doc['date']}", "",
           "| format | out x in | batch | best µs | % copy | best config | heuristic µs | dispatch µs (route) | bf16 µs | x bf16 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc.get("tc", []):
        io = r["weight_bytes"] + r["m"] * r["k"] * 2 + r["m"] * r["n"] * 2
        b = r["best"]
        cfg = f"{b['block_n']}x{b['block_m']} j{b['block_j']} s{b['split_k']} w{b['num_warps']} st{b['num_stages']}" + \
              ("" if b["post"] else " pre") + ("" if b["asm"] else " noasm")
        ratio = r["bf16_us"] / r["dispatch_us"] if r.get("bf16_us") else None
        out.append(f"| {r['spec']} | {r['n']}x{r['k']} | {r['m']} | {r['best_us']:.1f} | {100 * io / (r['best_us'] * 1e-6) / bw:.0f}% "
                   f"| {cfg} | {_f(r['heuristic_us'])} | {r['dispatch_us']:.1f} ({r['dispatch_route']}) | {_f(r.get('bf16_us'))} "
                   f"| {_f(ratio, '{:.2f}')} |")
    for r in doc.get("cuda_gemv", []):
        pct = ""
        if "weight_bytes" in r:
            io = r["weight_bytes"] + r["m"] * r["k"] * 2 + r["m"] * r["n"] * 2
            pct = f" ({100 * io / (r['best_us'] * 1e-6) / bw:.0f}% copy)"
        out.append(f"cuda_gemv {r.get('spec', 'int4:g128')} {r['n']}x{r['k']} M={r['m']}: best {r['best_us']:.1f} µs{pct} "
                   f"{r['best']} heuristic {_f(r['heuristic_us'])}")
    return "\n".join(out)


def gemm_table(doc: dict) -> str:
    """bench_gemm.py: the CUDA GEMM's heuristic launch (fastest of its grid; split K and
    stream-K apart where both were timed) against the Triton kernel, the GEMV, the dispatcher
    and bf16."""
    bw = doc["copy_GBps"] * 1e9
    out = [f"device {doc['device']}, copy {doc['copy_GBps']:.0f} GB/s, {doc['date']}", "",
           "| format | out x in | batch | CUDA GEMM (best) µs | % copy | best split K / stream-K µs | Triton tc µs "
           "| CUDA GEMV µs | dispatch µs (route) | bf16 µs | x bf16 |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        pct = 100 * r["io_bytes"] / (r["best_us"] * 1e-6) / bw
        kinds = f"{_f(r.get('best_split_us'))} / {_f(r.get('best_stream_k_us'))}"
        out.append(f"| {r['spec']} | {r['n']}x{r['k']} | {r['m']} | {_f(r['heuristic_us'])} ({_f(r['best_us'])}) | {pct:.0f}% "
                   f"| {kinds} | {_f(r.get('triton_tc_us'))} | {_f(r.get('gemv_us'))} | {r['dispatch_us']:.1f} "
                   f"({r['dispatch_route']}) | {_f(r['bf16_us'])} | {r['bf16_us'] / r['dispatch_us']:.2f} |")
    return "\n".join(out)


def peer_table(doc: dict) -> str:
    peers = [p for p in ("mixq", "mixq_gemv", "mixq_tc", "tinygemm", "gemlite", "bf16") if any(p in r for r in doc["rows"])]
    out = [f"device {doc.get('device', '?')}, copy {doc['copy_bw'] / 1e9:.0f} GB/s, {doc.get('date', '')}", "",
           "| out x in | batch | " + " | ".join(peers) + " | mixq x bf16 |", "|---|---|" + "---|" * (len(peers) + 1)]
    for r in doc["rows"]:
        cells = []
        for p in peers:
            v = r.get(p, {})
            cells.append("-" if "us" not in v else f"{v['us']:.1f} ({v['pct']:.0f}%)")
        ratio = (r["bf16"]["us"] / r["mixq"]["us"]) if "us" in r.get("bf16", {}) and "us" in r.get("mixq", {}) else None
        out.append(f"| {r['n']}x{r['k']} | {r['m']} | " + " | ".join(cells) + f" | {_f(ratio, '{:.2f}')} |")
    return "\n".join(out)


def e2e_table(doc: dict) -> str:
    rows = doc["rows"]
    base = next((r for r in rows if r["plan"] == "bf16"), None)
    out = [f"device {doc['device']}, {doc['layers']} layers, ctx {doc['ctx']}, vocab {doc['vocab']}, {doc['date']}", "",
           "| plan | bpw (linear units, all-in) | weights GB | ms/token | tokens/s | weight GB/s | x bf16 |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        out.append(f"| {r['plan']} | {r['bpw']:.3f} | {r['weight_GB']:.2f} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} "
                   f"| {r['weight_GBps']:.0f} | {_f(ratio, '{:.2f}')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tc")
    ap.add_argument("--gemm")
    ap.add_argument("--peers")
    ap.add_argument("--e2e")
    args = ap.parse_args(argv)
    for path, fn in ((args.tc, tc_table), (args.gemm, gemm_table), (args.peers, peer_table), (args.e2e, e2e_table)):
        if path and Path(path).exists():
            print(fn(json.loads(Path(path).read_text())))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

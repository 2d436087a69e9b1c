"""Why rotation alone and the low-rank branch alone hurt SmolLM2-135M at int3:g64.

Per unit, the output error tr(ΔW H ΔWᵀ) (H from a few wikitext2-valid windows) of RTN after a
rotation and of RTN with a rank-8 bf16 branch, relative to plain RTN; the share of plain
RTN's output error in the 8 input channels with the largest H_ii; and the mean |w| of those
channels relative to the whole weight. Prints the median per projection, then the worst unit.

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 bench/diagnose_transforms.py --format int3:g64 --windows 4
"""
import argparse
import collections
import statistics

import torch

from mixq import formats
from mixq.sensitivity import collect_stats
from mixq.data import calibration_windows
from mixq.models import load_model
from mixq.models.enumerate import llm_units
from mixq.models.units import get_weight
from mixq.quantizers.hadamard import rotation
from mixq.quantizers.lowrank import lowrank_split
from mixq.quantizers.smooth import output_error as oe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="int3:g64")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    a = ap.parse_args()
    lm = load_model("smollm2-135m")
    units = llm_units(lm.model)
    calib = calibration_windows(lm.encode, "wikitext2-valid", seqlen=512, n_samples=a.windows, seed=0)
    stats = collect_stats(lm.model, units, calib, batch_size=2)
    fmt = formats.parse(a.format)
    rows = collections.defaultdict(list)
    for u in units:
        W = get_weight(lm.model, u).detach().float()
        H = stats[u.name].hessian()
        rot = rotation(W.shape[1], 0)
        d0 = fmt.fake_quant(W) - W
        dr = rot.apply_t(fmt.fake_quant(rot.apply(W))) - W
        L, R, E = lowrank_split(W, a.rank)
        dl = L @ R + fmt.fake_quant(E) - W
        e0 = oe(d0, H)
        hd = H.diag()
        top = hd.topk(8).indices
        share = float((d0[:, top].pow(2) * hd[top]).sum()) / float((d0.pow(2) * hd).sum())
        rows[u.role].append((oe(dr, H) / e0, oe(dl, H) / e0, share, float(W[:, top].abs().mean() / W.abs().mean()),
                             u.name))
    print(f"{a.format}, {a.windows} windows: medians per projection")
    print("projection | rotate/plain | lowrank/plain | top-8 share | top-8 |w| rel | worst rotate | worst lowrank")
    for role, v in rows.items():
        rot_worst = max(v, key=lambda t: t[0])
        lr_worst = max(v, key=lambda t: t[1])
        print(f"{role} | {statistics.median(t[0] for t in v):.3f} | {statistics.median(t[1] for t in v):.3f} | "
              f"{statistics.median(t[2] for t in v):.3f} | {statistics.median(t[3] for t in v):.3f} | "
              f"{rot_worst[0]:.2f} {rot_worst[4]} | {lr_worst[1]:.2f} {lr_worst[4]}")


if __name__ == "__main__":
    main()

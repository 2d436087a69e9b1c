"""`quantize_unit`: one weight, one `Option` (format + quantizer + transforms), one result.

Composition order (each step optional, as the option names it):

    smooth  W1 = W diag(s)          H1 = diag(1/s) H diag(1/s)    (inputs x/s)
    rotate  W2 = W1 Q               H2 = Qᵀ H1 Q                  (inputs x/s Q)
    lowrank W2 = L R + E            (L, R kept in bf16)
    quantize E with RTN (fmt.fake_quant) or GPTQ (against H2)
    ŵ = ((L R + Q(E)) Qᵀ) diag(1/s)

ŵ is the float32 weight the stored model computes with, in the unit's own basis, so it can
be evaluated by fake quantization. The smoothing exponent α is searched with round-to-
nearest (after the rotation, without the low-rank branch; see `smooth.py`), then the whole
chain runs once with the chosen s. What each step needs: gptq a Hessian H (in, in) of the
unit's inputs (2XᵀX/n); smooth the per-channel mean |x| (in,) and H; rotate and lowrank
nothing but the weight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mixq.errors import DataError, MixqError
from mixq.formats.fixed import GroupParams
from mixq.plan import Option, parse_option
from mixq.quantizers.gptq import check_hessian, gptq
from mixq.quantizers.hadamard import rotation
from mixq.quantizers.lowrank import lowrank_split
from mixq.quantizers.smooth import output_error, smooth_quantize, smooth_scales
from mixq.quantizers.transformed import TransformedWeight, UnitTransforms


@dataclass
class UnitInfo:
    """What `quantize_unit` did; `to_dict()` is JSON-serialisable (the tensors are not in it).

    params: group parameters of the quantized (transformed) weight, from GPTQ; None for RTN
    (re-derivable from the transformed weight). `transformed`, set when the option has
    transforms: the quantized transformed-basis weight Q(E) (on the format's grid) with s,
    the rotation and L, R: what a packed checkpoint stores (not in `to_dict`)."""

    option: str
    quantizer: str
    transforms: list[str]
    seed: int
    damp: float | None = None
    damp_retries: int = 0
    n_dead: int = 0
    alpha: float | None = None
    rank: int | None = None
    rotate_block: int | None = None
    output_error: float | None = None  # tr(ΔW H ΔWᵀ), when H was given
    output_error_rtn: float | None = None  # the same for plain RTN of the format
    warnings: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    params: GroupParams | None = field(default=None, repr=False)
    smooth_scales: torch.Tensor | None = field(default=None, repr=False)
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    transformed: TransformedWeight | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"option": self.option, "quantizer": self.quantizer, "transforms": list(self.transforms),
                "seed": self.seed, "damp": self.damp, "damp_retries": self.damp_retries, "n_dead": self.n_dead,
                "alpha": self.alpha, "rank": self.rank, "rotate_block": self.rotate_block,
                "output_error": self.output_error, "output_error_rtn": self.output_error_rtn,
                "warnings": list(self.warnings), "wall_s": self.wall_s}


def needs_calibration(option: Option | str) -> bool:
    """Whether the option needs calibration data (a Hessian or activation statistics)."""
    opt = parse_option(option) if isinstance(option, str) else option
    return opt.quantizer == "gptq" or "smooth" in opt.transforms


def lowrank_rank(option: Option) -> int | None:
    ranks = [int(t.split(":", 1)[1]) for t in option.transforms if t.startswith("lowrank:")]
    return ranks[-1] if ranks else None


def quantize_unit(w: torch.Tensor, option: Option | str, *, H: torch.Tensor | None = None,
                  act_absmean: torch.Tensor | None = None, seed: int = 0, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True, smooth_grid: int = 20,
                  compare_rtn: bool = False) -> tuple[torch.Tensor, UnitInfo]:
    """Quantize one weight w (out, in) with `option` (an Option or a string such as
    'int3:g64+gptq+rotate'). Returns (ŵ (out, in) float32, UnitInfo).

    H (in, in): Hessian of the unit's inputs, 2XᵀX/n (needed by gptq and smooth; used to
    report `output_error` whenever given). act_absmean (in,): mean |x| per input channel
    (needed by smooth). seed: the rotation's sign seed. `compare_rtn` also records the
    output error of plain RTN (needs H). Raises MixqError naming what is missing.

    GPTQ runs with `act_order=True` by default here (columns in decreasing H_ii order, static
    groups from the original weight, so the stored layout is unchanged): on SmolLM2-135M at
    int3:g128 it cut the KL to the float model from 1.53 to 0.95 (see the benchmarks)."""
    t0 = time.perf_counter()
    opt = parse_option(option) if isinstance(option, str) else option
    fmt = opt.fmt
    if w.dim() != 2:
        raise DataError(f"expected a 2-D weight (out, in), got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise DataError(f"weight contains {int((~torch.isfinite(w)).sum())} NaN/inf values")
    cols = w.shape[1]
    missing = []
    if opt.quantizer == "gptq" and H is None:
        missing.append("a Hessian H of the unit's inputs (gptq)")
    if "smooth" in opt.transforms:
        if act_absmean is None:
            missing.append("per-channel mean |x| of the unit's inputs (smooth)")
        if H is None and "a Hessian" not in " ".join(missing):
            missing.append("the inputs' Gram matrix / Hessian H (smooth)")
    if missing:
        raise MixqError(f"option {opt} needs calibration data: " + "; ".join(missing)
                        + " (use mixq.calibrate.quantize_model with calibration windows)")
    if opt.quantizer not in ("rtn", "gptq"):
        raise MixqError(f"option {opt}: unknown quantizer {opt.quantizer!r}")
    if H is not None:
        check_hessian(H, cols)
        H = H.float()

    info = UnitInfo(str(opt), opt.quantizer, list(opt.transforms), int(seed))
    W = w.detach().float()  # (out, in)
    rot = rotation(cols, seed) if "rotate" in opt.transforms else None
    if rot is not None:
        info.rotate_block = rot.block

    # 1. smoothing: search α with RTN (after the rotation when there is one)
    s = None
    if "smooth" in opt.transforms:
        if rot is None:
            search_q = fmt.fake_quant
        else:
            def search_q(x: torch.Tensor) -> torch.Tensor:
                return rot.apply_t(fmt.fake_quant(rot.apply(x)))
        _, sinfo = smooth_quantize(W, fmt, act_absmean.float(), H, grid=smooth_grid, quantize=search_q)
        info.alpha = sinfo["alpha"]
        s = smooth_scales(act_absmean.float(), info.alpha)  # (in,)
        info.smooth_scales = s
    W1 = W if s is None else W * s
    H1 = H if (H is None or s is None) else H / s[:, None] / s[None, :]

    # 2. rotation
    W2 = W1 if rot is None else rot.apply(W1)
    H2 = H1 if (H1 is None or rot is None) else rot.rotate_hessian(H1)

    # 3. low-rank branch
    rank = lowrank_rank(opt)
    E = W2
    if rank is not None:
        rank = min(rank, min(W2.shape))
        L, R, E = lowrank_split(W2, rank)
        info.rank = rank
        info.lowrank = (L, R)

    # 4. quantize
    if opt.quantizer == "gptq":
        QE, ginfo = gptq(E, H2, fmt, block_size=block_size, damp=damp, act_order=act_order)
        info.damp, info.damp_retries, info.n_dead = ginfo.damp, ginfo.damp_retries, ginfo.n_dead
        info.params = ginfo.params
        info.warnings.extend(ginfo.warnings)
    else:
        QE = fmt.fake_quant(E)

    # 5. back to the unit's basis: ŵ = ((L R + Q(E)) Qᵀ) diag(1/s), by the function the
    # checkpoint loader uses too (bit-identical reconstruction from the stored Q(E))
    if opt.transforms:
        tf = UnitTransforms(s, int(seed) if rot is not None else None, rot.block if rot is not None else None,
                            info.lowrank)
        info.transformed = TransformedWeight(QE, tf)
        w_hat = tf.to_weight(QE, rot)
    else:
        w_hat = QE
    if H is not None:
        info.output_error = output_error(w_hat - W, H)
        if compare_rtn:
            info.output_error_rtn = output_error(fmt.fake_quant(W) - W, H)
    info.wall_s = time.perf_counter() - t0
    return w_hat, info

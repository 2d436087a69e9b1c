"""Fixing the block parameters of the GGUF formats from float weights (`fit_headers`).

Legacy types follow llama.cpp's reference quantizer exactly (`quantize_row_*_ref`), so their
float16 scales and mins are the bytes llama-quantize writes without an importance matrix:

    q4_0 / q5_0   d = x_ext / -8 (-16), x_ext the block's element of largest magnitude
    q8_0          d = max|x| / 127
    q4_1 / q5_1   d = (max - min) / 15 (31), m = min

The other types search, per block, the parameters that minimise the (weighted) squared error,
each element weighted by `weights` (default 1):

    iq4_nl             d among x_ext / t for targets t around the table's ends, each refitted
                       by least squares on its nearest levels (as llama.cpp's IQ4 search)
    sub-blocks         (k-quants, iq4_xs) the same search per sub-block, for a float scale
                       (and, with mins, llama.cpp's make_qkx2 grid: the range [min(x, 0), max]
                       mapped onto nmax + rmin + rdelta i levels, then scale and min refitted;
                       also [0, max] with no min, which suits a block with one large outlier)
    super-block        d = s_ext / (the integer range's end + a small stretch), the sub-block
                       scales rounded to integers of it (mins: dmin = max m / m_max), then each
                       sub-block's integer scale (and min) moved by one where that lowers its
                       error; the stretch with the least error of the final rounding wins

Every candidate is scored on the values the stored (float16, integer) parameters give, so the
search never does worse than its first candidate, llama.cpp's own starting point.
"""

from __future__ import annotations

import torch

from mixq.formats.gguf import GGMLType, block_params, encode_header

# make_qkx2 settings of llama.cpp's reference k-quants (rmin, rdelta, nstep)
QKX2 = {"q2_k": (-0.5, 0.1, 15), "q4_k": (-1.0, 0.1, 20), "q5_k": (-0.5, 0.1, 15)}
# stretches of the super-block scale tried (fractions of the integer range)
SUPER_STRETCH = (0.0, -0.04, 0.03, 0.06, 0.1, 0.15, 0.22)
MIN_STRETCH = (0.0, 0.3)  # and of the super-min (types with mins)


def _levels(t: GGMLType) -> torch.Tensor:
    lv = t.levels()
    return lv[t.code_min:] if t.lo is not None else lv


def _nearest(y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest of the sorted `levels` to each y (ties to the lower)."""
    levels = levels.to(y.device)
    mids = (levels[1:] + levels[:-1]) / 2
    return levels[torch.bucketize(y, mids)]


def _signed_ext(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude along the last dim, with its sign."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def _fit_sym(x: torch.Tensor, w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """(..., ) float32 scale s minimising sum w (x - s l)^2 over nearest levels l, searched over
    targets t (the extreme mapped onto t, both ends of the grid) and refitted."""
    ext = _signed_ext(x)
    lo, hi = float(levels[0]), float(levels[-1])
    span = hi - lo
    targets = [lo + span * f for f in (-0.03, 0.0, 0.02, 0.04, 0.06, 0.08, 0.11, 0.15)]
    targets += [hi + span * f for f in (-0.06, -0.03, 0.0, 0.03)]
    best_s = torch.where(ext != 0, ext / lo, torch.zeros_like(ext))
    best = torch.full_like(ext, -1.0)
    for t in targets:
        s = ext / t
        safe = torch.where(s != 0, s, torch.ones_like(s)).unsqueeze(-1)
        lv = _nearest(x / safe, levels)
        sxl = (w * x * lv).sum(-1)
        sll = (w * lv * lv).sum(-1)
        score = torch.where(sll > 0, sxl * sxl / torch.where(sll > 0, sll, torch.ones_like(sll)), torch.zeros_like(sll))
        better = (score > best) & (sll > 0) & (ext != 0)
        best = torch.where(better, score, best)
        best_s = torch.where(better, sxl / torch.where(sll > 0, sll, torch.ones_like(sll)), best_s)
    return best_s


def _fit_asym(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """(scale a >= 0, min m >= 0) with values a q - m, q in [0, nmax], minimising the weighted
    squared error: llama.cpp's make_qkx2 grid, every candidate refitted by least squares."""
    mn = x.amin(-1).clamp(max=0)
    mx = x.amax(-1)
    rng = mx - mn
    ok = rng > 0
    safe_rng = torch.where(ok, rng, torch.ones_like(rng))
    sw, sx = w.sum(-1), (w * x).sum(-1)
    best_a = torch.where(ok, rng / nmax, torch.zeros_like(rng))
    best_b = mn.clone()
    q0 = torch.clamp(torch.round((x - mn.unsqueeze(-1)) / torch.where(ok, best_a, torch.ones_like(rng)).unsqueeze(-1)), 0, nmax)
    best_err = (w * (best_a.unsqueeze(-1) * q0 + best_b.unsqueeze(-1) - x) ** 2).sum(-1)
    for i in range(nstep + 1):
        iscale = (nmax + rmin + rdelta * i) / safe_rng
        q = torch.clamp(torch.round(iscale.unsqueeze(-1) * (x - mn.unsqueeze(-1))), 0, nmax)
        sq, sqq, sxq = (w * q).sum(-1), (w * q * q).sum(-1), (w * x * q).sum(-1)
        D = sw * sqq - sq * sq
        safe_D = torch.where(D > 0, D, torch.ones_like(D))
        a = (sw * sxq - sx * sq) / safe_D
        b = (sqq * sx - sq * sxq) / safe_D
        pos = b > 0
        a = torch.where(pos, sxq / torch.where(sqq > 0, sqq, torch.ones_like(sqq)), a)
        b = torch.where(pos, torch.zeros_like(b), b)
        err = (w * (a.unsqueeze(-1) * q + b.unsqueeze(-1) - x) ** 2).sum(-1)
        better = (err < best_err) & (D > 0) & ok
        best_err = torch.where(better, err, best_err)
        best_a = torch.where(better, a, best_a)
        best_b = torch.where(better, b, best_b)
        # the same grid from 0 (no min): a block with one large outlier is often best served
        # by leaving its small elements at level 0
        pos = mx > 0
        q = torch.clamp(torch.round(((nmax + rmin + rdelta * i) / torch.where(pos, mx, torch.ones_like(mx))).unsqueeze(-1)
                                    * x), 0, nmax)
        sqq, sxq = (w * q * q).sum(-1), (w * x * q).sum(-1)
        a = sxq / torch.where(sqq > 0, sqq, torch.ones_like(sqq))
        err = (w * (a.unsqueeze(-1) * q - x) ** 2).sum(-1)
        better = (err < best_err) & (sqq > 0) & pos
        best_err = torch.where(better, err, best_err)
        best_a = torch.where(better, a, best_a)
        best_b = torch.where(better, torch.zeros_like(best_b), best_b)
    return best_a.clamp(min=0), (-best_b).clamp(min=0)


def _round_error(t: GGMLType, x: torch.Tensor, w: torch.Tensor, header: torch.Tensor) -> torch.Tensor:
    """(N,) weighted squared error of x (N, block) rounded to the nearest levels of the block
    parameters in `header` (N, hb)."""
    from mixq.formats.gguf import GGUFFormat

    step, offset = block_params(t, header)
    xs = x.reshape(x.shape[0], t.n_sub, t.sub)
    _, values = GGUFFormat(t.name).encode(xs, step.unsqueeze(-1), None if offset is None else offset.unsqueeze(-1),
                                          with_codes=False)
    return (w.reshape(xs.shape) * (values - xs) ** 2).sum((1, 2))


def _legacy(t: GGMLType, x: torch.Tensor) -> torch.Tensor:
    nmax = 2 ** t.code_bits - 1
    if t.asym:
        mx, mn = x.amax(-1), x.amin(-1)
        return encode_header(t, (mx - mn) / nmax, mn)
    if t.name == "q8_0":
        return encode_header(t, x.abs().amax(-1) / 127)
    return encode_header(t, _signed_ext(x) / t.lo)


def _iq4_nl(t: GGMLType, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    levels = t.levels()
    s = _fit_sym(x, w, levels)
    # the float16 rounding of the refitted scale, or of the plain end mapping: the better one
    first = encode_header(t, torch.where(_signed_ext(x) != 0, _signed_ext(x) / levels[0], torch.zeros_like(s)))
    fitted = encode_header(t, s)
    better = _round_error(t, x, w, fitted) < _round_error(t, x, w, first)
    return torch.where(better.unsqueeze(1), fitted, first)


def _quantize_subs(t: GGMLType, s: torch.Tensor, m: torch.Tensor | None, stretch: float, min_stretch: float = 0.0):
    """Super-block parameters of float sub-block scales s (N, S) (mins m): (d, dmin, sc, mi)."""
    lo, hi = t.sub_scale
    if lo == 0:  # unsigned scales (with mins)
        d = s.amax(1) / (hi * (1 + stretch))
    else:
        d = _signed_ext(s) / (lo * (1 + stretch))
    d16 = d.to(torch.float16).float()
    safe = torch.where(d16 != 0, d16, torch.ones_like(d16)).unsqueeze(1)
    sc = torch.where(d16.unsqueeze(1) != 0, torch.clamp(torch.round(s / safe), lo, hi), torch.zeros_like(s)).long()
    if m is None:
        return d, None, sc, None
    mlo, mhi = t.sub_min
    dmin = m.amax(1) / (mhi * (1 + min_stretch))
    dm16 = dmin.to(torch.float16).float()
    safe_m = torch.where(dm16 != 0, dm16, torch.ones_like(dm16)).unsqueeze(1)
    mi = torch.where(dm16.unsqueeze(1) != 0, torch.clamp(torch.round(m / safe_m), mlo, mhi), torch.zeros_like(m)).long()
    return d, dmin, sc, mi


def _refine(t: GGMLType, xs: torch.Tensor, ws: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor | None,
            sc: torch.Tensor, mi: torch.Tensor | None):
    """The integer sub-block scales (and mins) within one of their rounded values that give
    each sub-block the least error of the final rounding, the super-scales held."""
    from mixq.formats.gguf import GGUFFormat

    fmt = GGUFFormat(t.name)
    d16 = d.to(torch.float16).float().unsqueeze(1)
    dm16 = None if dmin is None else dmin.to(torch.float16).float().unsqueeze(1)
    lo, hi = t.sub_scale
    best_sc, best_mi, best_e = sc, mi, None
    for ds in (0, -1, 1):
        for dm in ((0, -1, 1) if mi is not None else (0,)):
            c_sc = torch.clamp(sc + ds, lo, hi)
            c_mi = None if mi is None else torch.clamp(mi + dm, *t.sub_min)
            step = (d16 * c_sc.float()).unsqueeze(-1)  # the products block_params forms
            off = None if c_mi is None else (dm16 * c_mi.float()).unsqueeze(-1)
            _, v = fmt.encode(xs, step, off, with_codes=False)
            e = (ws * (v - xs) ** 2).sum(-1)  # (N, S)
            if best_e is None:
                best_e = e
                continue
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_sc = torch.where(better, c_sc, best_sc)
            if mi is not None:
                best_mi = torch.where(better, c_mi, best_mi)
    return best_sc, best_mi


def _super(t: GGMLType, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    xs, ws = x.reshape(n, t.n_sub, t.sub), w.reshape(n, t.n_sub, t.sub)
    if t.asym:
        s, m = _fit_asym(xs, ws, 2 ** t.code_bits - 1, *QKX2[t.name])
    else:
        s, m = _fit_sym(xs, ws, _levels(t)), None
    best_h = best_e = None
    pairs = [(a, b) for a in SUPER_STRETCH for b in (MIN_STRETCH if t.asym else (0.0,))]
    for stretch, min_stretch in pairs:
        d, dmin, sc, mi = _quantize_subs(t, s, m, stretch, min_stretch)
        sc, mi = _refine(t, xs, ws, d, dmin, sc, mi)
        h = encode_header(t, d, dmin, sc, mi)
        e = _round_error(t, x, w, h)
        if best_h is None:
            best_h, best_e = h, e
        else:
            better = e < best_e
            best_h = torch.where(better.unsqueeze(1), h, best_h)
            best_e = torch.where(better, e, best_e)
    return best_h


def fit_headers(t: GGMLType, w: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, n_blocks * header_bytes) uint8 block parameters of w (rows, cols) float32 (cols a
    multiple of the block), minimising the squared error weighted by `weights` ((cols,) or
    (rows, cols); legacy types ignore them and follow llama.cpp's reference rules)."""
    rows, cols = w.shape
    x = w.reshape(-1, t.block)  # (N, block)
    if t.sub_scale is None and t.name != "iq4_nl":
        return _legacy(t, x).reshape(rows, -1)
    if weights is None:
        wt = torch.ones_like(x)
    else:
        wt = weights.float().to(w.device).expand(rows, cols).reshape(-1, t.block)
    header = _iq4_nl(t, x, wt) if t.name == "iq4_nl" else _super(t, x, wt)
    return header.reshape(rows, -1)

"""Element grids: code -> value tables of the small float elements (OCP OFP8 E4M3/E5M2, OCP MX
v1.0 FP6 E3M2/E2M3 and FP4 E2M1) and of NF4, plus rounding of float32 values to the nearest
grid value.

Minifloat codes are the element's bit patterns (sign-magnitude: sign bit on top, then
exponent, then mantissa), so a grid's `levels` is a table of 2**code_bits values indexed by
bit pattern. Patterns that are not finite numbers (E4M3's S.1111.111, E5M2's inf/NaN) hold
inf/NaN in the table and are never produced by rounding.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Minifloat:
    """A sign-magnitude binary float: 1 sign bit, `exp_bits` exponent bits, `man_bits`
    mantissa bits, exponent `bias`. `special` says which patterns are not numbers:
      "ieee": the top exponent is inf (mantissa 0) or NaN (E5M2, OFP8 spec);
      "fn":   only S.1111.111 is NaN, no inf (E4M3, OFP8 spec);
      "none": every pattern is a finite number (FP6/FP4 elements of OCP MX v1.0).
    Exponent field 0 is subnormal: value = mantissa/2**man_bits * 2**(1 - bias)."""

    exp_bits: int
    man_bits: int
    bias: int
    special: str

    @property
    def code_bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    def decode(self, code: int) -> float:
        """The value of one bit pattern."""
        m, e_top = self.man_bits, (1 << self.exp_bits) - 1
        sign = -1.0 if (code >> (self.exp_bits + m)) & 1 else 1.0
        e, f = (code >> m) & e_top, code & ((1 << m) - 1)
        if self.special == "ieee" and e == e_top:
            return sign * math.inf if f == 0 else math.nan
        if self.special == "fn" and e == e_top and f == (1 << m) - 1:
            return math.nan
        if e == 0:
            return sign * f * 2.0 ** (1 - self.bias - m)
        return sign * (1.0 + f / 2**m) * 2.0 ** (e - self.bias)


MINIFLOATS: dict[str, Minifloat] = {
    "fp8_e4m3": Minifloat(4, 3, 7, "fn"),     # max 448, min subnormal 2**-9
    "fp8_e5m2": Minifloat(5, 2, 15, "ieee"),  # max 57344, min subnormal 2**-16
    "fp6_e3m2": Minifloat(3, 2, 3, "none"),   # max 28, min subnormal 2**-4
    "fp6_e2m3": Minifloat(2, 3, 1, "none"),   # max 7.5, min subnormal 2**-3
    "fp4_e2m1": Minifloat(2, 1, 1, "none"),   # 0, 0.5, 1, 1.5, 2, 3, 4, 6
}

# NormalFloat4 (Dettmers et al. 2023, QLoRA, appendix E; the bitsandbytes table): quantiles
# of N(0, 1) normalised to [-1, 1], 7 negative, an exact zero and 8 positive values.
# Code i -> NF4_LEVELS[i] (ascending).
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class Grid:
    """A code -> value table: `levels[code]` for every code < 2**code_bits."""

    name: str
    levels: tuple[float, ...]

    @property
    def code_bits(self) -> int:
        return int(math.log2(len(self.levels)))

    @property
    def codes_ascending(self) -> bool:
        """Whether code order is value order (NF4), so a sorted index is the code."""
        return all(a < b for a, b in zip(self.levels, self.levels[1:]))

    @property
    def max_abs(self) -> float:
        """Largest finite magnitude (the scale maps a group's amax onto it)."""
        return max(abs(v) for v in self.levels if math.isfinite(v))

    @property
    def emax(self) -> int:
        """Exponent of the largest finite magnitude, floor(log2(max_abs)) (OCP MX emax_elem)."""
        return math.frexp(self.max_abs)[1] - 1


def minifloat_grid(name: str) -> Grid:
    mf = MINIFLOATS[name]
    return Grid(name, tuple(mf.decode(c) for c in range(1 << mf.code_bits)))


GRIDS: dict[str, Grid] = {name: minifloat_grid(name) for name in MINIFLOATS}
GRIDS["nf4"] = Grid("nf4", NF4_LEVELS)


@functools.lru_cache(maxsize=64)
def grid_tables(grid: Grid, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(levels (2**k,), sorted values (n,), their codes (n,), midpoints (n-1,)) on `device`.

    The sorted list holds each finite value once (+0 stands for both zeros).
    """
    levels = torch.tensor(grid.levels, dtype=torch.float32)
    pairs = sorted(
        (v, c) for c, v in enumerate(grid.levels)
        if math.isfinite(v) and not (v == 0.0 and math.copysign(1.0, v) < 0)
    )
    values = torch.tensor([v for v, _ in pairs], dtype=torch.float32)
    codes = torch.tensor([c for _, c in pairs], dtype=torch.int64)
    mids = (values[:-1] + values[1:]) / 2
    return tuple(t.to(device) for t in (levels, values, codes, mids))


def round_to_grid(y: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Codes (uint8, same shape) of the grid values nearest to float32 `y`, by table search.

    Values beyond the largest magnitude saturate to it; an exact tie between two neighbours
    goes to the lower value. This serves NF4 (whose ties have no rounding convention); the
    minifloats use `round_minifloat` (ties to even), which tests check against this search.
    """
    _, _, codes, mids = grid_tables(grid, y.device)
    idx = torch.bucketize(y, mids, out_int32=True)  # mids[i-1] < y <= mids[i] -> i
    if not grid.codes_ascending:
        idx = codes[idx]
    return idx.to(torch.uint8)


def grid_levels(grid: Grid, device: torch.device) -> torch.Tensor:
    """float32 (2**k,) code -> value table on `device`."""
    return grid_tables(grid, device)[0]


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 2**e for an integer tensor e in [-149, 127], built from bits (so it is
    exact on every device, whatever its exp2/pow accuracy)."""
    e = e.to(torch.int32)
    normal = (e + 127).clamp(min=1) << 23  # biased exponent field, e >= -126
    subnormal = torch.ones_like(e) << (e + 149).clamp(0, 22)  # 2**-149 .. 2**-127
    return torch.where(e >= -126, normal, subnormal).view(torch.float32)


def round_minifloat(y: torch.Tensor, name: str, *, with_codes: bool = True):
    """(codes uint8 | None, values float32) of float32 `y` rounded to minifloat `name`:
    nearest, ties to even mantissa, saturating at +-max. Arithmetic, no table search.

    With e = max(floor(log2|y|), emin) (emin = 1 - bias, the lowest normal binade, whose step
    subnormals share), step = 2**(e - m) and n = round(|y| / step) (half to even; |y|/step is
    exact). n is the mantissa with its hidden bit, so the magnitude code is
    ((e + bias - 1) << m) + n; a carry into the next binade (n = 2**(m+1)) and a subnormal
    rounding up to the smallest normal both land on the right pattern by this formula.
    floor(log2|y|) + 127 is read off float32's exponent field (float32 subnormals and 0 read
    as below emin, which the clamp takes care of); step is built from bits, exactly.
    """
    mf, grid = MINIFLOATS[name], GRIDS[name]
    a = y.abs()
    biased_e = (a.view(torch.int32) >> 23).clamp_(min=128 - mf.bias)  # e + 127, e >= emin
    step = ((biased_e - mf.man_bits) << 23).view(torch.float32)  # 2**(e - m), a float32 normal
    n = a.div_(step).round_()  # (reuses a's memory)
    values = (n * step).clamp_(max=grid.max_abs).copysign_(y)
    if not with_codes:
        return None, values
    field = ((biased_e + (mf.bias - 128)) << mf.man_bits) + n.to(torch.int32)
    field = torch.where(n > 0, field, 0).clamp_(max=max_magnitude_code(name))  # n = 0: code +0
    sign = ((y < 0) & (field > 0)).to(torch.int32) << (mf.code_bits - 1)
    return (field | sign).to(torch.uint8), values


@functools.lru_cache(maxsize=None)
def max_magnitude_code(name: str) -> int:
    """The bit pattern of +max (E4M3 0x7E, E5M2 0x7B, FP6/FP4 all ones below the sign)."""
    levels = GRIDS[name].levels
    return levels.index(GRIDS[name].max_abs)


def round_elements(y: torch.Tensor, name: str, *, with_codes: bool = True):
    """(codes | None, values) of `y` on element grid `name` (a minifloat or 'nf4')."""
    if name in MINIFLOATS:
        return round_minifloat(y, name, with_codes=with_codes)
    codes = round_to_grid(y, GRIDS[name])
    return codes, grid_levels(GRIDS[name], y.device)[codes.long()]

"""The budget problem: units, their candidate options, and the constraints between them.

A problem is a table of (unit, option, bits, error) rows plus constraints:

- ties: sets of units that must take the same option *name* (fused q/k/v, the experts of
  one MoE layer). Tied units may differ in shape, so their bits differ; overlapping tie sets
  are merged (tying is transitive).
- pins: unit -> option name, forced.
- min/max bits per weight: options whose bits / n_params lie outside the window are removed.

Everything is validated on construction; a bad input raises `ProblemError` naming it.
Errors are assumed additive across units: the solvers minimise their sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from mixq.errors import MixqError

# Slack (in bits per weight) when testing an option against min/max_bits_per_weight, so that
# 4.000000000001 bits/weight computed by float division still counts as 4.
BPW_TOL = 1e-9


class ProblemError(MixqError, ValueError):
    """A malformed allocation problem: unknown or duplicate units, bad option values, tied
    units offering different options, or constraints that leave a unit with no option."""


@dataclass(frozen=True)
class Choice:
    """One candidate for a unit: a format name, its exact all-in bits, its estimated error."""

    name: str
    bits: int
    error: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ProblemError(f"option name must be a non-empty string, got {self.name!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
            raise ProblemError(f"option {self.name!r}: bits must be an integer, got {self.bits!r}")
        if self.bits < 0:
            raise ProblemError(f"option {self.name!r}: bits must be >= 0, got {self.bits}")
        try:
            error = float(self.error)
        except (TypeError, ValueError):
            raise ProblemError(f"option {self.name!r}: error must be a number, got {self.error!r}") from None
        if not math.isfinite(error) or error < 0:
            raise ProblemError(f"option {self.name!r}: error must be finite and >= 0, got {self.error!r}")
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "error", error)


@dataclass
class UnitChoices:
    """A unit (fully qualified weight name), its parameter count and its candidate options,
    in preference order (the order breaks ties deterministically)."""

    unit: str
    n_params: int
    options: list[Choice]

    def __post_init__(self) -> None:
        if not isinstance(self.unit, str) or not self.unit:
            raise ProblemError(f"unit name must be a non-empty string, got {self.unit!r}")
        if isinstance(self.n_params, bool) or not isinstance(self.n_params, (int, np.integer)) or self.n_params <= 0:
            raise ProblemError(f"unit {self.unit!r}: n_params must be a positive integer, got {self.n_params!r}")
        self.n_params = int(self.n_params)
        self.options = list(self.options)
        if not self.options:
            raise ProblemError(f"unit {self.unit!r} has no options")
        seen: set[str] = set()
        for opt in self.options:
            if not isinstance(opt, Choice):
                raise ProblemError(f"unit {self.unit!r}: options must be Choice, got {type(opt).__name__}")
            if opt.name in seen:
                raise ProblemError(f"unit {self.unit!r}: option {opt.name!r} listed twice")
            seen.add(opt.name)

    def option(self, name: str) -> Choice:
        """The option called `name`; ProblemError if the unit has none."""
        for opt in self.options:
            if opt.name == name:
                return opt
        raise ProblemError(f"unit {self.unit!r} has no option {name!r}; it has {[o.name for o in self.options]}")


@dataclass(frozen=True)
class Group:
    """Units that take one option together (a tie group, or a single unit), with the
    options still allowed after filters and pins, in the first unit's option order.
    `bits[i]` / `error[i]` are the sums over the group's units for option `names[i]`."""

    units: tuple[str, ...]
    names: tuple[str, ...]
    bits: tuple[int, ...]
    error: tuple[float, ...]


@dataclass
class Problem:
    """Units with candidate options, plus ties, pins and a bits-per-weight window."""

    units: list[UnitChoices]
    ties: list[list[str]] = field(default_factory=list)
    pins: dict[str, str] = field(default_factory=dict)
    min_bits_per_weight: float | None = None
    max_bits_per_weight: float | None = None

    def __post_init__(self) -> None:
        self.units = list(self.units)
        self.ties = [list(t) for t in self.ties]
        self.pins = dict(self.pins)
        self.groups()  # validates everything; raises ProblemError

    @property
    def n_params(self) -> int:
        """Parameters over all allocated units (the denominator of bits per weight)."""
        return sum(u.n_params for u in self.units)

    def groups(self) -> list[Group]:
        """The problem as independent groups (one per tie set or untied unit), ordered by
        each group's first unit in `units`. Raises ProblemError on any invalid input."""
        by_name = _index_units(self.units)
        _check_window(self.min_bits_per_weight, self.max_bits_per_weight)
        unknown = sorted({n for tie in self.ties for n in tie if n not in by_name} | {n for n in self.pins if n not in by_name})
        if unknown:
            raise ProblemError(f"ties/pins name unknown units: {unknown}")
        return [self._group(members, by_name) for members in _tie_sets(self.units, self.ties)]

    def _group(self, members: list[str], by_name: dict[str, UnitChoices]) -> Group:
        first = by_name[members[0]]
        names = [o.name for o in first.options]
        for other in members[1:]:
            other_names = {o.name for o in by_name[other].options}
            if other_names != set(names):
                raise ProblemError(
                    f"tied units {members[0]!r} and {other!r} offer different options: "
                    f"only {members[0]!r} has {sorted(set(names) - other_names)}, "
                    f"only {other!r} has {sorted(other_names - set(names))}"
                )
        names = self._pinned(members, by_name, names)
        allowed = [n for n in names if all(self._in_window(by_name[m], n) for m in members)]
        if not allowed:
            raise ProblemError(self._empty_message(members, by_name, names))
        bits = tuple(sum(by_name[m].option(n).bits for m in members) for n in allowed)
        error = tuple(math.fsum(by_name[m].option(n).error for m in members) for n in allowed)
        return Group(units=tuple(members), names=tuple(allowed), bits=bits, error=error)

    def _pinned(self, members: list[str], by_name: dict[str, UnitChoices], names: list[str]) -> list[str]:
        pins = {m: self.pins[m] for m in members if m in self.pins}
        for unit, name in pins.items():
            by_name[unit].option(name)  # raises if the unit has no such option
        if len(set(pins.values())) > 1:
            raise ProblemError(f"tied units are pinned to different options: {pins}")
        if not pins:
            return names
        (unit, name), *_ = pins.items()
        for m in members:
            if not self._in_window(by_name[m], name):
                bpw = by_name[m].option(name).bits / by_name[m].n_params
                raise ProblemError(
                    f"unit {unit!r} is pinned to {name!r}, which gives {m!r} {bpw:g} bits per weight, "
                    f"outside the allowed window {self._window_text()}"
                )
        return [name]

    def _in_window(self, unit: UnitChoices, name: str) -> bool:
        bpw = unit.option(name).bits / unit.n_params
        if self.min_bits_per_weight is not None and bpw < self.min_bits_per_weight - BPW_TOL:
            return False
        if self.max_bits_per_weight is not None and bpw > self.max_bits_per_weight + BPW_TOL:
            return False
        return True

    def _window_text(self) -> str:
        lo = "-inf" if self.min_bits_per_weight is None else f"{self.min_bits_per_weight:g}"
        hi = "inf" if self.max_bits_per_weight is None else f"{self.max_bits_per_weight:g}"
        return f"[{lo}, {hi}] bits per weight"

    def _empty_message(self, members: list[str], by_name: dict[str, UnitChoices], names: list[str]) -> str:
        offered = ", ".join(
            f"{n}=" + "/".join(f"{by_name[m].option(n).bits / by_name[m].n_params:g}" for m in members) for n in names
        )
        who = f"unit {members[0]!r}" if len(members) == 1 else f"tie group {members}"
        return f"{who} has no option left within {self._window_text()}; it offers (bits per weight) {offered}"


def problem_from_rows(
    rows: Iterable[tuple[str, str, int, float]],
    n_params: dict[str, int],
    ties: list[list[str]] | None = None,
    pins: dict[str, str] | None = None,
    min_bits_per_weight: float | None = None,
    max_bits_per_weight: float | None = None,
) -> Problem:
    """Build a Problem from (unit, option, bits, error) rows (e.g. a sensitivity table) and a
    unit -> n_params map. Units appear in order of first row; options in row order."""
    options: dict[str, list[Choice]] = {}
    for unit, name, bits, error in rows:
        try:
            options.setdefault(unit, []).append(Choice(name, bits, error))
        except ProblemError as e:
            raise ProblemError(f"unit {unit!r}: {e}") from None
    missing = sorted(set(options) - set(n_params))
    if missing:
        raise ProblemError(f"n_params missing for units: {missing}")
    units = [UnitChoices(u, n_params[u], opts) for u, opts in options.items()]
    return Problem(units, ties or [], pins or {}, min_bits_per_weight, max_bits_per_weight)


def _index_units(units: list[UnitChoices]) -> dict[str, UnitChoices]:
    if not units:
        raise ProblemError("problem has no units")
    by_name: dict[str, UnitChoices] = {}
    dups: list[str] = []
    for u in units:
        if not isinstance(u, UnitChoices):
            raise ProblemError(f"units must be UnitChoices, got {type(u).__name__}")
        if u.unit in by_name:
            dups.append(u.unit)
        by_name[u.unit] = u
    if dups:
        raise ProblemError(f"duplicate units: {sorted(set(dups))}")
    return by_name


def _check_window(lo: float | None, hi: float | None) -> None:
    for label, v in (("min_bits_per_weight", lo), ("max_bits_per_weight", hi)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ProblemError(f"{label} must be a finite number >= 0 or None, got {v!r}")
    if lo is not None and hi is not None and lo > hi:
        raise ProblemError(f"min_bits_per_weight={lo:g} exceeds max_bits_per_weight={hi:g}")


def _tie_sets(units: list[UnitChoices], ties: list[list[str]]) -> list[list[str]]:
    """Merge overlapping ties (union-find); every unit lands in exactly one set. Sets and
    their members are ordered by position in `units`, so the result is deterministic."""
    order = {u.unit: i for i, u in enumerate(units)}
    parent = {u.unit: u.unit for u in units}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for tie in ties:
        for a, b in zip(tie, tie[1:]):
            ra, rb = root(a), root(b)
            if ra != rb:
                # The earlier unit stays the root, keeping roots independent of tie order.
                if order[ra] < order[rb]:
                    parent[rb] = ra
                else:
                    parent[ra] = rb
    sets: dict[str, list[str]] = {}
    for u in units:
        sets.setdefault(root(u.unit), []).append(u.unit)
    return list(sets.values())

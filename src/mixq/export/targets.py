"""Export targets and the options each can hold: `mixq plan --target NAME` offers a unit only
the candidates its target stores as they are, so a plan made for a target always exports.

One explicit dict, `TARGETS`: target name -> refusal(option, shape) -> None (it exports) or
the reason it does not.
"""

from __future__ import annotations

from typing import Callable

from mixq.errors import MixqError
from mixq.export.gguf_plan import gguf_refusal
from mixq.option import Option

TARGETS: dict[str, Callable[[Option | str, tuple[int, int]], str | None]] = {
    "gguf": gguf_refusal,
}


def refusal_of(target: str) -> Callable[[Option | str, tuple[int, int]], str | None]:
    """The refusal function of a target; MixqError naming the known targets otherwise."""
    if target not in TARGETS:
        raise MixqError(f"unknown export target {target!r}; known: {', '.join(TARGETS)}")
    return TARGETS[target]


def restrict_rows(rows: list[tuple[str, str, int, float]], units: list[dict], target: str,
                  keep: dict[str, str] | None = None) -> list[tuple[str, str, int, float]]:
    """The (unit, option, bits, error) rows whose option `target` can store for the unit's
    shape. Raises MixqError when a unit is left with no candidate, or a pinned option
    (`keep`, pattern -> option) cannot be stored."""
    refuse = refusal_of(target)
    shapes = {u["name"]: tuple(u["shape"]) for u in units}
    out = [r for r in rows if refuse(r[1], shapes[r[0]]) is None]
    have = {r[0] for r in out}
    empty = [u["name"] for u in units if u["name"] not in have]
    if empty:
        first = next(r for r in rows if r[0] == empty[0])
        raise MixqError(f"--target {target}: unit(s) {', '.join(empty[:3])}{' and more' if len(empty) > 3 else ''} "
                        f"have no candidate that {target} can store (e.g. {first[1]}: {refuse(first[1], shapes[empty[0]])}); "
                        "analyse with candidates it can (for gguf: q4_0, q4_k, iq4_nl, q8_0, ...)")
    from mixq.planner import expand_pattern

    for pattern, opt in (keep or {}).items():
        for name in expand_pattern(pattern, list(shapes)):
            why = refuse(opt, shapes[name])
            if why is not None:
                raise MixqError(f"--target {target}: --keep {pattern}={opt}: unit {name!r} cannot be stored ({why})")
    return out

"""The `Plan` artifact: an explicit unit -> option mapping, and layer -> KV-cache format.

An option (`mixq.option.Option`) is a numeric format plus the quantizer that produces it and
any transforms applied first, and the unit's input-activation format, written
`FORMAT[+QUANTIZER][+TRANSFORM...][@ACT]` (e.g. `int4:g64`, `int3:g64+gptq+rotate`,
`int8:ch@int8:tok`). Every unit is named; nothing is left to patterns. A plan records the
shape of every unit so that applying it to another model is refused with the first
mismatches listed. `kv` maps attention layers (`model.layers.3.self_attn`) to the format
their KV cache is stored in (`mixq.formats.kvcache`); a layer not named keeps a float cache.

Schema 2 added `kv` (and activation formats in options); a plan without them is still
written, and read, as schema 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mixq.artifacts import read_artifact, write_artifact
from mixq.errors import ArtifactError, FormatError
from mixq.formats.kvcache import KVFormat, parse_kv
from mixq.models.units import Unit
from mixq.option import Option, parse_option

PLAN_SCHEMA = 2
PLAN_SCHEMAS_READ = (1, 2)


@dataclass
class Plan:
    """unit name -> Option for every quantized unit, plus each unit's shape and provenance;
    attention layer -> KV-cache format (`kv`, empty: float caches)."""

    model: str
    options: dict[str, Option]
    shapes: dict[str, tuple[int, int]]
    meta: dict = field(default_factory=dict)
    kv: dict[str, KVFormat] = field(default_factory=dict)

    @classmethod
    def uniform(cls, model: str, units: list[Unit], option: str | Option | None, meta: dict | None = None,
                kv: dict[str, KVFormat | str] | None = None) -> "Plan":
        """One option for every unit (None: weights left float), and the KV formats `kv`."""
        quantized = [u for u in units if u.tied_to is None] if option is not None else []
        opt = parse_option(option) if option is not None else None
        return cls(model, {u.name: opt for u in quantized}, {u.name: u.shape for u in quantized},
                   dict(meta or {}), {n: parse_kv(f) for n, f in (kv or {}).items()})

    def with_kv(self, kv: dict[str, KVFormat | str]) -> "Plan":
        """A copy whose KV formats are `kv` (replacing any the plan had)."""
        return Plan(self.model, dict(self.options), dict(self.shapes), dict(self.meta),
                    {n: parse_kv(f) for n, f in kv.items()})

    def check_against(self, units: list[Unit], max_listed: int = 5) -> None:
        """Raise ArtifactError if the plan names units the model lacks, shapes differ, or a
        unit's option cannot hold its shape (e.g. a k-quant on rows that are not multiples
        of 256)."""
        by_name = {u.name: u for u in units}
        problems = []
        for name, shape in self.shapes.items():
            u = by_name.get(name)
            if u is None:
                problems.append(f"unit {name!r} is not in the model")
            elif tuple(u.shape) != tuple(shape):
                problems.append(f"unit {name!r} has shape {tuple(u.shape)} in the model, {tuple(shape)} in the plan")
            elif (why := self.options[name].supports(shape)) is not None:
                problems.append(f"unit {name!r} cannot take {self.options[name]}: {why}")
        if problems:
            more = f" (and {len(problems) - max_listed} more)" if len(problems) > max_listed else ""
            raise ArtifactError(
                f"plan for model {self.model!r} does not fit this model: " + "; ".join(problems[:max_listed]) + more
            )

    def unit_bits(self) -> dict[str, int]:
        return {n: o.bits(self.shapes[n]) for n, o in self.options.items()}

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "meta": self.meta,
            "units": {n: {"option": str(o), "shape": list(self.shapes[n]), "bits": o.bits(self.shapes[n])}
                      for n, o in self.options.items()},
            **({"kv": {n: str(f) for n, f in self.kv.items()}} if self.kv else {}),
        }

    @property
    def schema(self) -> int:
        """2 when the plan uses what schema 2 added (KV formats, activation formats), else 1,
        which older mixq reads too."""
        return PLAN_SCHEMA if self.kv or any(o.act is not None for o in self.options.values()) else 1

    @classmethod
    def from_dict(cls, doc: dict, source: str = "plan") -> "Plan":
        try:
            units = doc["units"]
            options = {n: parse_option(u["option"]) for n, u in units.items()}
            shapes = {n: (int(u["shape"][0]), int(u["shape"][1])) for n, u in units.items()}
            kv = {n: parse_kv(f) for n, f in doc.get("kv", {}).items()}
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise ArtifactError(f"{source}: malformed plan ({e.__class__.__name__}: {e})") from e
        except FormatError as e:
            raise ArtifactError(f"{source}: {e}") from e
        return cls(doc.get("model", ""), options, shapes, doc.get("meta", {}), kv)

    def save(self, path: str | os.PathLike) -> None:
        write_artifact(path, "plan", self.schema, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        return cls.from_dict(read_artifact(path, "plan", PLAN_SCHEMAS_READ), str(path))

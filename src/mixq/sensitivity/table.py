"""The `SensitivityTable` artifact: per unit x candidate option, exact bits and an estimated
error, plus each unit's input statistics and what the method learnt about it.

Saved as JSON (kind "sensitivity", schema_version 2) with `mixq.artifacts.write_artifact`.
Schema 2 added the KV-cache candidates of each attention layer (`kv`, `kv_candidates`) and
activation candidates; a table without them is still written, and read, as schema 1. Options with an activation part
(`int4:g64@int8:tok`) are ordinary rows: their error includes the activation's.
The file is a pure function of the inputs and the seed (same model, units, candidates,
calibration and seed give the same bytes): wall-clock time is kept on the object
(`timing`), never in the file; the deterministic cost (passes over the calibration set) is.

Errors are comparable across units and options of one table (that is what allocation
needs), not across methods.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mixq.artifacts import read_artifact, write_artifact
from mixq.errors import ArtifactError

SENSITIVITY_KIND = "sensitivity"
SENSITIVITY_SCHEMA = 2
SENSITIVITY_SCHEMAS_READ = (1, 2)


@dataclass
class UnitSensitivity:
    """One unit's row group: identity, per-option (option, bits, error), input statistics
    (`mixq.sensitivity.activations`) and method-specific information (trace, eigenvalue,
    iterations, ...)."""

    name: str
    kind: str
    shape: tuple[int, int]
    role: str
    block: int
    options: list[dict]  # [{"option": str, "bits": int, "error": float}] in candidate order
    stats: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    index: int | None = None
    skipped: dict = field(default_factory=dict)  # candidate -> why the unit cannot take it

    @property
    def n_params(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "shape": list(self.shape), "n_params": self.n_params,
             "role": self.role, "block": self.block, "index": self.index, "options": self.options,
             "stats": self.stats, "info": self.info}
        if self.skipped:
            d["skipped"] = dict(self.skipped)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UnitSensitivity":
        return cls(d["name"], d["kind"], (int(d["shape"][0]), int(d["shape"][1])), d["role"], int(d["block"]),
                   [{"option": o["option"], "bits": int(o["bits"]), "error": float(o["error"])} for o in d["options"]],
                   dict(d.get("stats", {})), dict(d.get("info", {})), d.get("index"), dict(d.get("skipped", {})))


@dataclass
class SensitivityTable:
    """The result of `mixq.sensitivity.analyze`.

    model, method, candidates, seed, loss, task: what was analysed and how.
    calibration: {"description", "shape", "sha256"} of the calibration inputs.
    method_opts: the method's options as used (including e.g. Hutchinson's probe count).
    cost: deterministic pass counts over the calibration set ({"forward", "backward", "hvp"}).
    units: one `UnitSensitivity` per analysed unit, in the order given.
    timing: wall seconds etc. of this run (not saved).
    """

    model: str
    method: str
    candidates: list[str]
    seed: int
    loss: str
    task: str
    calibration: dict
    method_opts: dict
    cost: dict
    units: list[UnitSensitivity]
    timing: dict = field(default_factory=dict, compare=False)
    mixq_version: str = ""
    kv_candidates: list[str] = field(default_factory=list)
    kv: list[dict] = field(default_factory=list)  # per layer: name, block, n_kv_heads, head_dim, options

    # -- views ------------------------------------------------------------------------
    def to_rows(self) -> list[tuple[str, str, int, float]]:
        """(unit, option, bits, error) rows, the input of `mixq.allocate.problem_from_rows`."""
        return [(u.name, o["option"], o["bits"], o["error"]) for u in self.units for o in u.options]

    def n_params(self) -> dict[str, int]:
        """unit -> parameter count."""
        return {u.name: u.n_params for u in self.units}

    @property
    def units_info(self) -> list[dict]:
        """Per unit: name, kind, shape, n_params, role, block, index, stats, info (no options,
        no skipped candidates)."""
        return [{k: v for k, v in u.to_dict().items() if k not in ("options", "skipped")} for u in self.units]

    def error(self, unit: str, option: str) -> float:
        for u in self.units:
            if u.name == unit:
                for o in u.options:
                    if o["option"] == option:
                        return o["error"]
                raise KeyError(f"option {option!r} not analysed for unit {unit!r} (candidates {self.candidates})")
        raise KeyError(f"unit {unit!r} not in the sensitivity table")

    def unit(self, name: str) -> UnitSensitivity:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(f"unit {name!r} not in the sensitivity table")

    # -- artifact ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "method": self.method,
            "candidates": list(self.candidates),
            "seed": self.seed,
            "loss": self.loss,
            "task": self.task,
            "calibration": self.calibration,
            "method_opts": self.method_opts,
            "cost": self.cost,
            "units": [u.to_dict() for u in self.units],
            **({"kv_candidates": list(self.kv_candidates), "kv": self.kv} if self.kv_candidates else {}),
        }

    @property
    def schema(self) -> int:
        """2 with KV or activation candidates (what schema 2 added), else 1."""
        return SENSITIVITY_SCHEMA if self.kv_candidates or any("@" in c for c in self.candidates) else 1

    def kv_rows(self) -> list[tuple[str, str, float]]:
        """(layer, KV format, error) rows of the KV candidates."""
        return [(layer["name"], o["kv"], o["error"]) for layer in self.kv for o in layer["options"]]

    @classmethod
    def from_dict(cls, doc: dict, source: str = "sensitivity table") -> "SensitivityTable":
        try:
            return cls(doc["model"], doc["method"], list(doc["candidates"]), int(doc["seed"]), doc["loss"],
                       doc["task"], dict(doc["calibration"]), dict(doc["method_opts"]), dict(doc["cost"]),
                       [UnitSensitivity.from_dict(u) for u in doc["units"]],
                       mixq_version=doc.get("mixq_version", ""), kv_candidates=list(doc.get("kv_candidates", [])),
                       kv=[dict(layer) for layer in doc.get("kv", [])])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ArtifactError(f"{source}: malformed sensitivity table ({e.__class__.__name__}: {e})") from e

    def save(self, path: str | os.PathLike) -> None:
        """Write the artifact atomically; same table, same bytes."""
        write_artifact(path, SENSITIVITY_KIND, self.schema, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SensitivityTable":
        return cls.from_dict(read_artifact(path, SENSITIVITY_KIND, SENSITIVITY_SCHEMAS_READ), str(path))


def spiky_units(table: SensitivityTable, ratio_threshold: float = 100.0) -> list[str]:
    """Units whose input max|x| / median|x| exceeds `ratio_threshold` (the activation spikes
    of LLaMA-style models, concentrated in the down_proj of a few blocks), most spiky first."""
    hits = [(u.stats.get("ratio", 0.0), u.name) for u in table.units if u.stats.get("ratio", 0.0) > ratio_threshold]
    return [name for _, name in sorted(hits, key=lambda t: (-t[0], t[1]))]

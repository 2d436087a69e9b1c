"""Sensitivity of input-activation and KV-cache candidates, from the same block-by-block pass
as the weights' (`sensitivity.blockwise`, methods fisher and output).

While a block is recomputed, each unit's inputs X (tokens, in) and, for fisher, the gradient
G (tokens, out) of the micro-batch's mean loss with respect to its output are kept (a
uniform subsample of the rows, the same for X and G); the keys and values every attention
layer caches, with the gradients with respect to them and the rotary embedding of the call,
are kept whole. The error of changing the unit's output y = x Wᵀ to ŷ is weighed by the
output's diagonal Fisher (HAWQ-V2's activation term, taken at the unit's output, where it
sees the weight's and the input's errors alike):

    oF(ŷ) = Σ_rows Σ_out G² (ŷ - y)²          (output method: G = 1)

For an option w@a (weight option w, activation format a), ŷ = A(x) ŵᵀ (`InputQuantizer`, in
the basis of w's transforms). The activation part's error adds to the weight option's:

    e(w@a) = e(w) + κ_u · max(0, oF(w@a) - oF(w)),   κ_u = Σ_f e(f) / Σ_f oF(f)

κ_u (over the unit's plain weight formats f) converts the output Fisher into the method's
own units for this unit, so weight and activation errors are summed on one scale. The KV
cache of a layer: e(kv) = κ_k · oF(k̂ - k) + κ_v · oF(v̂ - v), k̂ and v̂ as the cache would
hold them (`quantizers.kvcache`), G the gradients with respect to the keys before RoPE and
the values, κ_k and κ_v those of the layer's k_proj and v_proj (each scaled by that unit's
row subsampling, since the cache errors are summed over every token).
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch

from mixq.formats.kvcache import KVFormat
from mixq.models.capture import unit_inputs
from mixq.models.inputs import check_hookable, output_grads
from mixq.models.kvcache import KVLayer, kv_hooks
from mixq.models.units import Unit
from mixq.option import Option, parse_option
from mixq.quantizers.activation import input_quantizer
from mixq.quantizers.kvcache import quantize_keys, quantize_values
from mixq.quantizers.transformed import QuantizedWeight


class ActKVCollector:
    """What one block's activation and KV candidates are weighed on (see the module
    docstring). `with_grads`: fisher (G kept) or output (G = 1)."""

    def __init__(self, act_options: list[Option], kv_formats: list[KVFormat], layers: list[KVLayer], *,
                 with_grads: bool, max_rows: int, n_batches: int) -> None:
        self.act_options = act_options
        self.kv_formats = kv_formats
        self.layers = layers
        self.with_grads = with_grads
        self.rows_per_batch = max(1, math.ceil(max_rows / max(1, n_batches)))
        self.x: dict[str, list[torch.Tensor]] = {}
        self.g: dict[str, list[torch.Tensor]] = {}
        self.n_rows: dict[str, int] = {}  # rows seen before subsampling
        self.kv: dict[str, dict[str, list]] = {}

    def _stride(self, n: int) -> int:
        return max(1, math.ceil(n / self.rows_per_batch))

    @contextmanager
    def capture(self, model, units: list[Unit], block: int) -> Iterator[None]:
        """Keep the block's unit inputs (and output gradients) and its layers' keys and values
        during the forward (and backward) passes made inside."""
        # inputs and output gradients: every unit with activation candidates; for KV candidates
        # alone, the key and value projections (their κ weighs the cache)
        act_units = list(units) if self.act_options else [u for u in units if u.role in ("k_proj", "v_proj")]
        for u in act_units:
            check_hookable(u)
        layers = [layer for layer in self.layers if layer.block == block] if self.kv_formats else []
        last: list = [None, None]

        def take_x(u: Unit, x: torch.Tensor) -> None:
            self.n_rows[u.name] = self.n_rows.get(u.name, 0) + x.shape[0]
            if last[0] is x:
                rows = last[1]
            else:
                rows = x[:: self._stride(x.shape[0])].float()
                last[:] = [x, rows]
            self.x.setdefault(u.name, []).append(rows)

        def take_g(u: Unit, y: torch.Tensor, g: torch.Tensor) -> None:
            g2 = g.reshape(-1, g.shape[-1])
            self.g.setdefault(u.name, []).append(g2[:: self._stride(g2.shape[0])].float())

        def observe(layer: KVLayer, kind: str):
            def fn(t: torch.Tensor, rope=None) -> torch.Tensor:
                rec = self.kv.setdefault(layer.name, {"k": [], "v": [], "gk": [], "gv": [], "rope": []})
                rec[kind].append(t.detach().float())
                if kind == "k":
                    rec["rope"].append(rope)
                if self.with_grads and t.requires_grad:
                    t.register_hook(lambda g: rec["g" + kind].append(g.detach().float()))
                return t

            return fn

        with ExitStack() as stack:
            if act_units:
                stack.enter_context(unit_inputs(model, act_units, take_x))
                if self.with_grads:
                    stack.enter_context(output_grads(model, act_units, take_g))
            if layers:
                keys = {layer.name: observe(layer, "k") for layer in layers}
                values = {layer.name: observe(layer, "v") for layer in layers}
                stack.enter_context(kv_hooks(model, layers, keys, values))
            yield

    def _rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.cat(self.x[name])
        g = torch.cat(self.g[name]) if self.with_grads else None
        if g is not None and g.shape[0] != x.shape[0]:
            raise RuntimeError(f"unit {name!r}: {x.shape[0]} input rows but {g.shape[0]} gradient rows")
        return x, g

    def _weighed(self, diff: torch.Tensor, g: torch.Tensor | None) -> float:
        d2 = diff.double().square()
        return float((d2 * g.double().square()).sum() if g is not None else d2.sum())

    def unit_increments(self, unit: Unit, w: torch.Tensor, weights: dict[str, tuple[torch.Tensor, QuantizedWeight | None]],
                        errors: dict[str, float]) -> tuple[dict[str, float], float | None]:
        """({act option: error increment}, κ_u) of one unit. `weights`: weight option string ->
        (ŵ (out, in) float32, its QuantizedWeight or None for plain RTN); `errors`: the method's
        error of each weight option (plain formats among them give κ_u)."""
        if unit.name not in self.x:
            return {str(o): 0.0 for o in self.act_options}, None
        x, g = self._rows(unit.name)
        y = x @ w.float().T  # (rows, out)
        of = {name: self._weighed(x @ w_hat.T - y, g) for name, (w_hat, _) in weights.items()}
        plain = [name for name in weights if parse_option(name).is_plain]
        num = math.fsum(errors[p] for p in plain)
        den = math.fsum(of[p] for p in plain)
        kappa = num / den if den > 0 else 0.0
        out = {}
        for o in self.act_options:
            wname = str(o.weight_only)
            if wname not in weights:  # the weight format cannot hold this unit's shape
                continue
            w_hat, qw = weights[wname]
            iq = input_quantizer(o.act, qw.transforms if qw is not None else None, unit.shape[1])
            if iq.needs_scale:
                iq = iq.calibrated(float(iq.transformed(x).abs().max()))
            of_act = self._weighed(iq(x) @ w_hat.T - y, g)
            out[str(o)] = kappa * max(0.0, of_act - of[wname])
        return out, kappa

    def kv_errors(self, layer: KVLayer, kappa_k: float, kappa_v: float) -> dict[str, float]:
        """{kv format: error} of one layer (see the module docstring); κ already scaled."""
        rec = self.kv.get(layer.name)
        if rec is None:
            return {str(f): 0.0 for f in self.kv_formats}
        out = {}
        for f in self.kv_formats:
            ek = ev = 0.0
            for i, k in enumerate(rec["k"]):
                gk = rec["gk"][i] if self.with_grads else None
                ek += self._weighed(quantize_keys(k, f, rec["rope"][i]) - k, gk)
            for i, v in enumerate(rec["v"]):
                gv = rec["gv"][i] if self.with_grads else None
                ev += self._weighed(quantize_values(v, f) - v, gv)
            out[str(f)] = kappa_k * ek + kappa_v * ev
        return out

    def row_fraction(self, name: str) -> float:
        """Kept rows / rows seen of a unit (1 when nothing was subsampled)."""
        seen = self.n_rows.get(name, 0)
        return sum(t.shape[0] for t in self.x.get(name, [])) / seen if seen else 1.0

    def release(self) -> None:
        self.x.clear()
        self.g.clear()
        self.n_rows.clear()
        self.kv.clear()


__all__ = ["ActKVCollector"]

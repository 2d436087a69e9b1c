"""All-in bit accounting for a model under a plan.

Three figures, always reported together:
- `bpw_units`: bits per weight over the units the plan quantizes (tied copies counted once);
- `bpw_blocks`: over every weight unit inside the blocks (units the plan leaves alone count
  at 16 bits, their bf16 storage);
- `bpw_all`: over every parameter of the model, counted once: quantized units at their
  all-in bits, everything else (embeddings, head, norms, biases) at 16 bits.
"""

from __future__ import annotations

from mixq.models.units import Unit
from mixq.plan import Plan

FLOAT_STORAGE_BITS = 16  # unquantized tensors are counted as bf16 storage


def bit_totals(plan: Plan | None, units: list[Unit], n_params_model: int) -> dict:
    """Bits-per-weight figures of `plan` (None: the unquantized model) on a model whose
    quantizable units are `units` and whose parameters number `n_params_model`.

    Tied units (a head sharing the embedding's tensor) are one tensor: it is counted once,
    at the bits of whichever of its names the plan quantizes."""
    unit_bits = plan.unit_bits() if plan is not None else {}
    tensors: dict[str, dict] = {}  # owner name -> {params, bits (None: float), block}
    for u in units:
        owner = u.tied_to or u.name
        t = tensors.setdefault(owner, {"params": u.n_params, "bits": None, "block": u.block})
        if u.name in unit_bits:
            t["bits"] = unit_bits[u.name]
        if u.tied_to is None:
            t["block"] = u.block
    quantized = [t for t in tensors.values() if t["bits"] is not None]
    q_params = sum(t["params"] for t in quantized)
    q_bits = sum(t["bits"] for t in quantized)
    in_blocks = [t for t in tensors.values() if t["block"] >= 0]
    b_params = sum(t["params"] for t in in_blocks)
    b_bits = sum(t["bits"] if t["bits"] is not None else FLOAT_STORAGE_BITS * t["params"] for t in in_blocks)
    all_bits = q_bits + FLOAT_STORAGE_BITS * (n_params_model - q_params)
    return {
        "bpw_units": q_bits / q_params if q_params else float(FLOAT_STORAGE_BITS),
        "bpw_blocks": b_bits / b_params if b_params else float(FLOAT_STORAGE_BITS),
        "bpw_all": all_bits / n_params_model,
        "total_bits": all_bits,
        "quantized_params": q_params,
        "model_params": n_params_model,
    }


def kv_totals(model, plan: Plan | None, context: int) -> dict:
    """KV-cache figures of `plan` on `model` for a cache of `context` tokens (one sequence):
    `kv_format` (the one format of every layer, "mixed (n formats)", or None for float),
    `kv_bits_per_element` (all-in over keys and values of every layer; float layers at 16)
    and `kv_bytes`. Empty for a model without a KV cache."""
    from mixq.models.kvcache import kv_layers

    layers = kv_layers(model)
    if not layers:
        return {}
    kv = plan.kv if plan is not None else {}
    bits = 0
    elements = 0
    for layer in layers:
        n = layer.elements_per_token * context
        fmt = kv.get(layer.name)
        bits += fmt.bits_total(context, layer.n_kv_heads, layer.head_dim) if fmt is not None else FLOAT_STORAGE_BITS * n
        elements += n
    names = {str(kv[layer.name]) if layer.name in kv else None for layer in layers}
    fmt_name = next(iter(names)) if len(names) == 1 else f"mixed ({len(names)} formats)"
    return {"kv_format": fmt_name, "kv_bits_per_element": bits / elements, "kv_bytes": bits / 8, "kv_context": context}

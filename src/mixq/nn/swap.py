"""Put quantized weights into a float model: packed `QuantLinear` modules where a unit is a
whole Linear (or GPT-2 Conv1D) the kernels can hold, the dequantized weight written in place
everywhere else (Conv2d, embeddings, fused experts, tied tensors, unquantized formats). A
unit with transforms (smooth, rotate, lowrank) becomes a QuantLinear that applies them online,
or gets the reconstructed ŵ = ((L R + Q(E)) Qᵀ) diag(1/s) written in place."""

from __future__ import annotations

from torch import nn

from mixq import formats
from mixq.errors import FormatError
from mixq.formats import PlainFormat, QTensor
from mixq.kernels import KernelWeights
from mixq.models.units import Unit, set_weight
from mixq.nn.qlinear import QuantLinear
from mixq.quantizers.transformed import UnitTransforms


def shared_parameters(model: nn.Module) -> set[str]:
    """Names of parameters whose tensor is also reachable under another name (tied)."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    return {n for names in by_tensor.values() if len(names) > 1 for n in names}


def _packed_reason(model: nn.Module, unit: Unit, fmt, shared: set[str]) -> str | None:
    """Why `unit` cannot become a QuantLinear (None: it can)."""
    if unit.kind != "linear":
        return f"{unit.kind} units compute with the dequantized weight"
    if unit.param in shared:
        return "its weight is tied to another tensor"
    if isinstance(fmt, PlainFormat):
        return f"{fmt} is unquantized"
    module = model.get_submodule(unit.name)
    if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
        return f"module is a {type(module).__name__}, not a Linear"
    return None


def write_dequantized(model: nn.Module, unit: Unit, q: QTensor, transforms: UnitTransforms | None = None) -> None:
    """Write the unit's dequantized weight into the model in place: ŵ rebuilt from the stored
    Q(E) by `transforms.to_weight` when the unit has transforms (as fake quantization does)."""
    w = formats.parse(q.fmt).dequantize(q)
    set_weight(model, unit, w if transforms is None or transforms.is_identity else transforms.to_weight(w))


def swap_in_quant_modules(model: nn.Module, units: list[Unit], qtensors: dict[str, QTensor],
                          prepacked: dict[str, KernelWeights] | None = None,
                          transforms: dict[str, UnitTransforms] | None = None) -> dict[str, str]:
    """For every unit named in `qtensors`, replace its Linear module by a `QuantLinear` holding
    the packed codes (bias kept, in the module's dtype), or, where that is not possible, write
    the dequantized weight into the model in place. `prepacked` may give a unit's kernel
    layout already (else `kernels.prepack` builds it). `transforms`: unit -> the transforms
    its stored codes were quantized under (run online by the QuantLinear, or applied to the
    dequantized weight). Returns {unit name: why it was dequantized} for the units that were
    not packed."""
    shared = shared_parameters(model)
    dequantized: dict[str, str] = {}
    for unit in units:
        q = qtensors.get(unit.name)
        if q is None:
            continue
        fmt = formats.parse(q.fmt)
        tf = (transforms or {}).get(unit.name)
        reason = _packed_reason(model, unit, fmt, shared)
        if reason is None:
            module = model.get_submodule(unit.name)
            try:
                kw = (prepacked or {}).get(unit.name)
                qlin = (QuantLinear(kw, module.bias, tf) if kw is not None
                        else QuantLinear.from_qtensor(q, fmt, module.bias, tf))
            except FormatError as e:  # e.g. in_features not a multiple of the kernel unit
                reason = f"no packed kernel layout ({e})"
            else:
                parent_name, _, leaf = unit.name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, leaf, qlin.to(module.weight.device))
                continue
        write_dequantized(model, unit, q, tf)
        dequantized[unit.name] = reason
    return dequantized

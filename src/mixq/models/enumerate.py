"""Enumerate the quantizable units of a model: the only place that knows which modules of an
architecture carry weights worth quantizing."""

from __future__ import annotations

import re

from torch import nn

from mixq.models.units import Unit

# Block index in a fully qualified name: Llama/Qwen/Mistral/Gemma/Mixtral `model.layers.N`,
# OPT `model.decoder.layers.N`, GPT-2 `transformer.h.N`, CIFAR ResNets `layerS.N`.
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")
# Routers decide which expert runs; they are tiny and kept in high precision.
_ROUTER_LEAVES = {"gate", "router", "shared_expert_gate"}


def block_index(name: str) -> int:
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else -1


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): weight stored (in, out).
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def llm_units(model: nn.Module, include_head: bool = False, include_embeddings: bool = False) -> list[Unit]:
    """Units of a causal LM: every Linear (and GPT-2 Conv1D) inside the transformer blocks,
    one unit per expert for fused 3-D expert parameters, routers excluded; `lm_head` and the
    input embedding only when asked. A head tied to the embedding is marked `tied_to`."""
    units: list[Unit] = []
    for name, module in model.named_modules():
        block = block_index(name)
        if block < 0:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear):
            if leaf in _ROUTER_LEAVES:
                continue
            w = module.weight
            units.append(Unit(name, "linear", (w.shape[0], w.shape[1]), f"{name}.weight", leaf, block))
        elif _is_conv1d(module):
            w = module.weight  # (in, out)
            units.append(Unit(name, "linear", (w.shape[1], w.shape[0]), f"{name}.weight", leaf, block, transposed=True))
        elif leaf == "experts":
            # Fused experts: 3-D parameters (n_experts, out, in), one unit per expert.
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() != 3:
                    continue
                for e in range(p.shape[0]):
                    units.append(
                        Unit(f"{name}.{pname}.{e}", "expert", (p.shape[1], p.shape[2]), f"{name}.{pname}",
                             f"experts.{pname}", block, index=e)
                    )
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    emb_name = names.get(id(emb)) if emb is not None else None
    head_name = names.get(id(head)) if head is not None else None
    tied = emb is not None and head is not None and head.weight is emb.weight
    if include_embeddings and emb_name is not None:
        w = emb.weight
        units.append(Unit(emb_name, "embedding", (w.shape[0], w.shape[1]), f"{emb_name}.weight", "embed"))
    if include_head and head_name is not None:
        w = head.weight
        tied_to = emb_name if (tied and include_embeddings) else None
        units.append(Unit(head_name, "linear", (w.shape[0], w.shape[1]), f"{head_name}.weight", "lm_head",
                          tied_to=tied_to))
    return units


def cnn_units(model: nn.Module) -> list[Unit]:
    """Units of a CNN: every Conv2d and Linear, the stem and classifier included."""
    # Residual blocks are named `layer<stage>.<i>.`; number them consecutively across stages.
    stage_block = re.compile(r"^layer(\d+)\.(\d+)\.")
    keys = sorted({(int(m.group(1)), int(m.group(2))) for n, _ in model.named_modules() if (m := stage_block.match(n))})
    block_of = {k: i for i, k in enumerate(keys)}
    units: list[Unit] = []
    for name, module in model.named_modules():
        m = stage_block.match(name)
        block = block_of[(int(m.group(1)), int(m.group(2)))] if m else -1
        if isinstance(module, nn.Conv2d):
            w = module.weight  # (out, in, kh, kw) viewed as (out, in*kh*kw)
            units.append(Unit(name, "conv2d", (w.shape[0], w[0].numel()), f"{name}.weight", "conv", block))
        elif isinstance(module, nn.Linear):
            w = module.weight
            units.append(Unit(name, "linear", (w.shape[0], w.shape[1]), f"{name}.weight", "fc", block))
    return units

"""Small helpers shared by the evaluators: the model's device and its logits."""

from __future__ import annotations

import inspect

import torch

from mixq.errors import DataError


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless module."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _takes_use_cache(model: torch.nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (batch, seq, vocab) of `model(ids)` for ids (batch, seq).

    Accepts models that return a tensor, an object with `.logits` (Hugging Face causal LMs)
    or a tuple whose first item is the logits. Hugging Face models are called with
    `use_cache=False`: evaluation never needs the key/value cache.
    """
    out = model(ids, use_cache=False) if _takes_use_cache(model) else model(ids)
    if isinstance(out, torch.Tensor):
        logits = out
    elif getattr(out, "logits", None) is not None:
        logits = out.logits
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    else:
        raise DataError(f"model returned {type(out).__name__}; expected logits, an object with .logits, or a tuple")
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise DataError(f"model logits have shape {tuple(logits.shape)}, expected (batch, seq, vocab) for ids {tuple(ids.shape)}")
    return logits

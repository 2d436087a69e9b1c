"""Describe a model's architecture so a checkpoint can rebuild it without downloading anything,
and rebuild it: Hugging Face causal LMs from their `config.json`, CIFAR ResNets from their
depth. One explicit function per family; any other model is refused by name."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mixq.errors import ArtifactError, MixqError


def _is_hf(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "to_json_string") and hasattr(model, "generate")


def describe(model: nn.Module, kind: str) -> dict:
    """What `rebuild` needs: {"family": "hf_causal_lm", "class": ...} or {"family":
    "cifar_resnet", "depth": ..., "num_classes": ...}."""
    from mixq.models.resnet_cifar import CifarResNet

    if kind == "causal_lm" and _is_hf(model):
        return {"family": "hf_causal_lm", "class": type(model).__name__}
    if isinstance(model, CifarResNet):
        n_blocks = len(model.layer1)
        return {"family": "cifar_resnet", "depth": 6 * n_blocks + 2, "num_classes": int(model.linear.out_features)}
    raise MixqError(
        f"cannot write a checkpoint for a {type(model).__name__} ({kind}): mixq rebuilds Hugging Face "
        "causal LMs (from config.json) and CIFAR ResNets (from their depth) only"
    )


def save_config(model: nn.Module, arch: dict, folder: Path) -> None:
    """Write the files `rebuild` reads besides mixq.json (HF: config.json, generation_config.json)."""
    if arch["family"] == "hf_causal_lm":
        model.config.save_pretrained(folder)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(folder)


def _no_init():
    """transformers' context that skips random weight initialisation (every tensor of a
    rebuilt model is loaded from the checkpoint, so initialising 8B weights is wasted time)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def rebuild(arch: dict, folder: Path, dtype: torch.dtype) -> nn.Module:
    """The described architecture with uninitialised weights (every one is loaded from the
    checkpoint, `load._coverage_check`), in `dtype`, eval mode."""
    family = arch.get("family")
    if family == "hf_causal_lm":
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        if not (folder / "config.json").is_file():
            raise ArtifactError(f"checkpoint {folder}: file config.json is missing (needed to rebuild the model)")
        try:
            config = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"checkpoint {folder}: config.json is unreadable ({e.__class__.__name__}: {e})") from e
        cls = getattr(transformers, arch.get("class", ""), None)
        with _no_init():
            if cls is not None and hasattr(cls, "_from_config"):
                model = cls._from_config(config, dtype=dtype)
            else:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model.eval()
    if family == "cifar_resnet":
        from mixq.models.resnet_cifar import CifarResNet

        return CifarResNet(int(arch["depth"]), num_classes=int(arch["num_classes"])).to(dtype).eval()
    raise ArtifactError(f"checkpoint {folder}: unknown architecture family {family!r} in mixq.json")

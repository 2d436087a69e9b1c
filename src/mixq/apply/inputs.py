"""Checks of calibration inputs: token windows (LongTensor (n, seqlen)) or images (float
(n, C, H, W)), against what the model takes."""

from __future__ import annotations

import torch
from torch import nn

from mixq.errors import DataError


def check_ids(calib_ids) -> torch.Tensor:
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise DataError("calib_ids must be a LongTensor (n_windows, seqlen) of token ids (see mixq.data.calibration_windows)")
    if calib_ids.shape[0] < 1 or calib_ids.shape[1] < 1:
        raise DataError(f"calib_ids {tuple(calib_ids.shape)}: need at least one window")
    return calib_ids


_INPUTS_HELP = ("calib_ids (the calibration inputs) must be token windows, a LongTensor (n_windows, seqlen) (see "
                "mixq.data.calibration_windows), or for an image model a float tensor of images (n, C, H, W) "
                "(see mixq.data.load_cifar10)")


def _first_layer(model: nn.Module) -> nn.Module | None:
    """The first Conv2d / Linear / Embedding in module order (what the inputs meet first)."""
    return next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))), None)


def check_inputs(calib, model: nn.Module | None = None) -> torch.Tensor:
    """Token windows (LongTensor (n, seqlen)) or images (float (n, C, H, W)); with `model`,
    images must have the channels its first Conv2d takes, and a model that starts with a
    Conv2d takes no token ids. Raises DataError saying what was expected."""
    if isinstance(calib, (tuple, list)):
        raise DataError(f"{_INPUTS_HELP}; got a {type(calib).__name__} (for an (images, labels) pair, pass the images)")
    if calib is None:
        raise DataError(f"the plan has gptq/smooth options, which need calibration data: {_INPUTS_HELP}")
    if not isinstance(calib, torch.Tensor):
        raise DataError(f"{_INPUTS_HELP}; got {type(calib).__name__}")
    first = _first_layer(model) if model is not None else None
    if calib.dtype == torch.long:
        if isinstance(first, nn.Conv2d):
            raise DataError(f"this model starts with a Conv2d: it takes float images (n, C, H, W), not token ids "
                            f"{tuple(calib.shape)}")
        return check_ids(calib)
    if not calib.is_floating_point():
        raise DataError(f"{_INPUTS_HELP}; got dtype {calib.dtype} (token ids must be int64; convert uint8 images to "
                        "normalised floats)")
    if isinstance(first, nn.Embedding):
        raise DataError(f"this model starts with an Embedding: it takes token ids, a LongTensor (n_windows, seqlen), "
                        f"not {calib.dtype} {tuple(calib.shape)}")
    if calib.dim() != 4:
        raise DataError(f"calibration images must be (n, C, H, W), got shape {tuple(calib.shape)}")
    if calib.shape[0] < 1:
        raise DataError(f"calibration images {tuple(calib.shape)}: need at least one image")
    if isinstance(first, nn.Conv2d) and first.in_channels != calib.shape[1]:
        raise DataError(f"calibration images have {calib.shape[1]} channels {tuple(calib.shape)}; "
                        f"the model's first Conv2d takes {first.in_channels}")
    if not torch.isfinite(calib).all():
        raise DataError("calibration images contain NaN/inf values")
    return calib


def to_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x on the model's device; float inputs (images) in the model's floating dtype."""
    p = next(model.parameters())
    return x.to(device=p.device, dtype=p.dtype if x.is_floating_point() and p.is_floating_point() else x.dtype)

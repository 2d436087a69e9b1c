"""Top-1 accuracy of an image classifier."""

from __future__ import annotations

import torch

from mixq.errors import DataError
from mixq.eval.common import model_device
from mixq.progress import Progress, track


def top1(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 500,
    progress: Progress | None = None,
) -> dict:
    """Fraction of `images` (N, C, H, W) whose argmax logit equals `labels` (N,).

    Runs under `torch.inference_mode()` in batches on the model's device (images are cast
    to the model's floating dtype). Returns `{"top1": fraction in [0, 1], "n": N}`.
    """
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise DataError(f"need as many labels as images (and at least one): {tuple(images.shape)} vs {tuple(labels.shape)}")
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    device = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    n = images.shape[0]
    correct = 0
    starts = range(0, n, batch_size)
    with torch.inference_mode():
        for s in track(starts, "top-1", len(starts), progress):
            x = images[s : s + batch_size].to(device=device, dtype=dtype)  # (B, C, H, W)
            logits = model(x)  # (B, classes)
            correct += int((logits.argmax(-1).cpu() == labels[s : s + batch_size].cpu()).sum())
    return {"top1": correct / n, "n": n}

"""CIFAR-10 test images (JPEG re-encodings) for the vision models.

The 10,000 test images are split once, deterministically, into two disjoint halves:
`numpy.random.default_rng(0).permutation(10000)`; its first 5,000 entries are the
calibration half (`"calib"`), its last 5,000 the evaluation half (`"eval"`). Each half is
returned in ascending index order. `"all"` is the whole set in file order.
"""

from __future__ import annotations

import numpy as np
import torch

from mixq.data.paths import data_file
from mixq.errors import DataError

CIFAR10_FILE = "vision/cifar10_test_jpeg.npz"
CIFAR10_MEAN = (0.485, 0.456, 0.406)
CIFAR10_STD = (0.229, 0.224, 0.225)
CIFAR10_SPLITS = ("calib", "eval", "all")
SPLIT_SEED = 0


def cifar10_split_indices(split: str, n_images: int = 10_000) -> np.ndarray:
    """Indices into the test set of `split` (see the module docstring), ascending."""
    if split not in CIFAR10_SPLITS:
        raise DataError(f"unknown CIFAR-10 split {split!r}; expected one of {CIFAR10_SPLITS}")
    if split == "all":
        return np.arange(n_images)
    perm = np.random.default_rng(SPLIT_SEED).permutation(n_images)
    half = n_images // 2
    return np.sort(perm[:half] if split == "calib" else perm[half:])


def normalize_images(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) images -> float32 (N, 3, 32, 32), scaled to [0, 1] and normalised."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_cifar10(split: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 test images of `split` ("calib", "eval" or "all") and their labels.

    Returns (images float32 (N, 3, 32, 32) normalised with `CIFAR10_MEAN`/`CIFAR10_STD`,
    labels int64 (N,)).
    """
    with np.load(data_file(CIFAR10_FILE)) as z:
        images, labels = z["images"], z["labels"]
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
        raise DataError(f"{CIFAR10_FILE}: expected uint8 images (N, 32, 32, 3), got {images.dtype} {images.shape}")
    idx = cifar10_split_indices(split, len(images))
    return normalize_images(images[idx]), torch.from_numpy(labels[idx].astype(np.int64))

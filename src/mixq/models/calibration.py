"""Calibration inputs of a loaded model: random token windows of a calibration text for causal
LMs, a random draw of the CIFAR-10 calibration half for image classifiers, and the check
that a window fits the model's context."""

from __future__ import annotations

from mixq.errors import DataError
from mixq.models.load import LoadedModel
from mixq.models.support import context_length


def check_window(loaded: LoadedModel, seqlen: int, what: str) -> None:
    """Refuse windows longer than the model's context, naming the limit."""
    from mixq.data import check_context

    check_context(seqlen, context_length(loaded.model), what)


IMAGE_CALIBRATION = "cifar10-calib"


def calibration_data(loaded: LoadedModel, calib: str | None = None, samples: int = 8, seqlen: int = 512,
                     seed: int = 0):
    """Calibration inputs and a description: random token windows of a calibration text
    (causal LMs; default `wikitext2-valid`), or for image classifiers an (images, labels)
    pair of `samples` images drawn at random (`seed`) from the CIFAR-10 calibration half,
    `cifar10-calib` (the only image calibration set: the other half evaluates). The draw
    is random because the half is stored class by class (its first 500 images are all
    airplanes); it is returned in ascending index order."""
    if loaded.kind == "causal_lm":
        from mixq.data import DEFAULT_CALIBRATION, bos_of, calibration_windows

        check_window(loaded, seqlen, "calibration seqlen")
        name = calib or DEFAULT_CALIBRATION
        ids = calibration_windows(loaded.encode, name, seqlen=seqlen, n_samples=samples, seed=seed)
        bos = "" if bos_of(loaded.encode) is None else ", each after the tokenizer's BOS"
        return ids, f"{name}: {samples} random windows x {seqlen} tokens{bos}, seed {seed}"
    import torch

    from mixq.data import load_cifar10

    if calib not in (None, IMAGE_CALIBRATION):
        raise DataError(f"calibration {calib!r} for image model {loaded.name}: image models calibrate on "
                        f"{IMAGE_CALIBRATION!r}, the calibration half of the CIFAR-10 test images (the other "
                        "half is for evaluation)")
    if samples < 1:
        raise DataError(f"calibration samples must be positive, got {samples}")
    images, labels = load_cifar10("calib")
    n = min(samples, images.shape[0])
    pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:n].sort().values
    return ((images[pick], labels[pick]),
            f"{IMAGE_CALIBRATION}: {n} of {images.shape[0]} images drawn at random, seed {seed}")


def calibration_inputs(data):
    """What `mixq.apply.quantize_model` takes from `calibration_data`'s result: the token windows, or
    the images of an (images, labels) pair."""
    return data[0] if isinstance(data, tuple) else data

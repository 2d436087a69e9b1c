"""Hooks on a model: what each unit sees as input, and block-by-block replay of a forward pass.

Everything here knows module types (Linear, Conv2d, GPT-2 Conv1D, Embedding, fused
Mixtral-style experts) and the decoder-block list of Hugging Face causal LMs; the math done
with what is captured lives in `mixq.sensitivity`.

- `unit_inputs(model, units, consumer)`: while active, every forward pass calls
  `consumer(unit, x)` with the 2-D input `(tokens, in)` each unit's weight multiplies
  (`in` as in `Unit.shape`): a Linear's input flattened over batch and sequence, a Conv2d's
  input unfolded (im2col) to `(batch * positions, in * kh * kw)`, a fused expert's *routed*
  tokens only (an expert that receives none is not called), and for an Embedding the 1-D
  LongTensor of token ids it looks up.
- `BlockReplay`: cache what a float forward pass leaves after each decoder block, then run
  a later pass from block b onward only (blocks 0..b-1 replaced by their cached output).
- `forward_logits(model, x)`: logits of a causal LM (`use_cache=False`) or an image model.
- `unit_view(unit, t)`: the 2-D (out, in) view of a parameter-shaped tensor (a gradient),
  matching `get_weight`.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mixq.errors import MixqError
from mixq.models.units import Unit

Consumer = Callable[[Unit, torch.Tensor], None]


def unit_view(unit: Unit, t: torch.Tensor) -> torch.Tensor:
    """The 2-D (out, in) view of a tensor shaped like the unit's parameter (e.g. its gradient)."""
    t = t[unit.index] if unit.index is not None else t
    if unit.transposed:
        return t.t()
    return t.reshape(t.shape[0], -1)


def owner_module(model: nn.Module, unit: Unit) -> nn.Module:
    """The module that holds the unit's parameter."""
    mod_name = unit.param.rsplit(".", 1)[0] if "." in unit.param else ""
    return model.get_submodule(mod_name)


def _takes_use_cache(model: nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def forward_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of `model(x)`: (batch, seq, vocab) for a causal LM given ids (batch, seq),
    (batch, classes) for an image classifier. Hugging Face models run with `use_cache=False`."""
    out = model(x, use_cache=False) if _takes_use_cache(model) else model(x)
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise MixqError(f"model returned {type(out).__name__}; expected logits, an object with .logits, or a tuple")


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Within the block, a Hugging Face model uses eager attention (the CPU SDPA kernel has no
    double backward, which Hessian-vector products need); the previous setting is restored."""
    config = getattr(model, "config", None)
    setter = getattr(model, "set_attn_implementation", None)
    before = getattr(config, "_attn_implementation", None) if config is not None else None
    if setter is None or before is None or before == "eager":
        yield
        return
    setter("eager")
    try:
        yield
    finally:
        setter(before)


# ---------------------------------------------------------------------------------------
# Unit inputs


def _conv_columns(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col of a Conv2d input: (batch * positions, in * kh * kw), columns ordered as the
    weight's (in, kh, kw) flattening."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        if isinstance(module.padding, str) and module.padding == "valid":
            padding = 0
        else:
            raise MixqError(f"Conv2d with padding={module.padding!r}, padding_mode={module.padding_mode!r}: "
                            "input capture supports numeric zero padding only")
    else:
        padding = module.padding
    if module.groups != 1:
        raise MixqError("grouped/depthwise Conv2d: input capture supports groups=1 only")
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (batch * positions, in*kh*kw)


def _expert_layout(experts: nn.Module) -> tuple[nn.Parameter, nn.Parameter, Callable]:
    """(gate_up_proj (E, 2I, H), down_proj (E, H, I), act_fn) of a Mixtral-style expert set."""
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    act = getattr(experts, "act_fn", None)
    ok = (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and act is not None
          and gate_up.dim() == 3 and down.dim() == 3 and gate_up.shape[1] == 2 * down.shape[2]
          and gate_up.shape[2] == down.shape[1] and not getattr(experts, "has_bias", False))
    if not ok:
        raise MixqError(
            f"fused experts {type(experts).__name__}: input capture knows the Mixtral layout only "
            "(gate_up_proj (E, 2I, H), down_proj (E, H, I), act_fn, no biases)"
        )
    return gate_up, down, act


def _expert_hook(experts: nn.Module, units: list[Unit], consumer: Consumer):
    """Forward pre-hook on a fused experts module, called as
    experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)): each expert's
    routed tokens, and for down_proj the activations act(gate) * up they produce."""
    gate_up, down, act = _expert_layout(experts)
    by_param_leaf: dict[tuple[str, int], Unit] = {}
    for u in units:
        by_param_leaf[(u.param.rsplit(".", 1)[-1], int(u.index))] = u

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        with torch.no_grad():
            hidden = hidden.detach()
            for e in range(gate_up.shape[0]):
                u_gu = by_param_leaf.get(("gate_up_proj", e))
                u_dn = by_param_leaf.get(("down_proj", e))
                if u_gu is None and u_dn is None:
                    continue
                routed = (top_k_index == e).any(dim=-1)  # (T,)
                if not bool(routed.any()):
                    continue
                x = hidden[routed]  # (T_e, H)
                if u_gu is not None:
                    consumer(u_gu, x)
                if u_dn is not None:
                    gate, up = F.linear(x, gate_up[e].detach()).chunk(2, dim=-1)
                    consumer(u_dn, act(gate) * up)  # (T_e, I)
        return None

    return hook


@contextmanager
def unit_inputs(model: nn.Module, units: list[Unit], consumer: Consumer) -> Iterator[None]:
    """While active, each forward pass calls `consumer(unit, x)` with the input the unit's
    weight multiplies: x (tokens, in) as float, detached (an Embedding gets its 1-D ids).
    A module that runs several times per pass (or a unit fed by several calls) calls the
    consumer once per call."""
    handles = []
    experts: dict[str, list[Unit]] = {}
    try:
        for u in units:
            module = owner_module(model, u)
            if u.kind == "expert":
                experts.setdefault(u.param.rsplit(".", 1)[0], []).append(u)
                continue

            def hook(mod, args, u=u):
                x = args[0].detach()
                if u.kind == "embedding":
                    consumer(u, x.reshape(-1))
                elif u.kind == "conv2d":
                    consumer(u, _conv_columns(mod, x))
                else:
                    consumer(u, x.reshape(-1, x.shape[-1]))

            if u.kind not in ("linear", "conv2d", "embedding"):
                raise MixqError(f"unit {u.name!r}: input capture does not know kind {u.kind!r}")
            handles.append(module.register_forward_pre_hook(hook))
        for mod_name, us in experts.items():
            module = model.get_submodule(mod_name)
            handles.append(module.register_forward_pre_hook(_expert_hook(module, us, consumer), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------
# Block replay

_BLOCK_LISTS = ("layers", "h", "blocks")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder-block list of a transformer (`model.layers`, `transformer.h`, ...): the
    longest ModuleList whose name ends in layers/h/blocks, or None."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LISTS and len(module) > 0:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


class _Replay(nn.Module):
    """Stands in for a block: ignores its input and returns a cached output."""

    def __init__(self, output) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


class BlockReplay:
    """Run a model from decoder block b onward, the blocks before it replayed from a cache.

        replay = BlockReplay(model)              # replay.n_blocks == 0: no block list found
                                                 # (or enabled=False): every pass runs in full
        with replay.recording():                 # one float pass per batch, in order
            for i, x in enumerate(batches): replay.set_batch(i); model(x)
        with replay.from_block(b, batch=i):      # blocks < b return the cached output of b-1
            model(x)                             # embeddings, blocks b.., norm and head run

    The embedding, mask and position computations before the first block still run (cheap);
    the cached outputs are those of the float model, so the weights of blocks < b must not
    change between recording and replay.
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        found = find_blocks(model) if enabled else None
        self.prefix, self.blocks = found if found is not None else ("", None)
        self.n_blocks = len(self.blocks) if self.blocks is not None else 0
        self._outputs: dict[tuple[int, int], object] = {}
        self._batch = 0

    def block_of(self, unit: Unit) -> int:
        """Index of the block holding the unit, or -1 when it lies outside every block."""
        if self.blocks is None:
            return -1
        head = self.prefix + "."
        if not unit.param.startswith(head):
            return -1
        idx = unit.param[len(head):].split(".", 1)[0]
        return int(idx) if idx.isdigit() else -1

    def set_batch(self, batch: int) -> None:
        self._batch = batch

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Cache each block's output for the current batch (see `set_batch`)."""
        handles = []

        def make(i: int):
            def hook(mod, args, output):
                self._outputs[(self._batch, i)] = _detach(output)

            return hook

        try:
            if self.blocks is not None:
                for i, block in enumerate(self.blocks):
                    handles.append(block.register_forward_hook(make(i)))
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def from_block(self, block: int, batch: int) -> Iterator[None]:
        """Within the block, blocks 0..block-1 return the cached output of block-1 on `batch`."""
        if block <= 0 or self.blocks is None:
            yield
            return
        if (batch, block - 1) not in self._outputs:
            raise MixqError(f"no cached output of block {block - 1} for batch {batch}; record a float pass first")
        originals = [self.blocks[i] for i in range(block)]
        stand_in = _Replay(self._outputs[(batch, block - 1)])
        try:
            for i in range(block):
                self.blocks[i] = stand_in
            yield
        finally:
            for i, m in enumerate(originals):
                self.blocks[i] = m


def _detach(output):
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return tuple(_detach(o) for o in output)
    return output

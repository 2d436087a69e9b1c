"""The KV cache of a Hugging Face decoder: which attention layers cache keys and values, and
hooks that replace what they cache.

`kv_layers(model)` finds every attention module with `k_proj` and `v_proj` projections
(Llama, Qwen2/3, Mistral, Gemma 1-3, Mixtral, OPT, ...), named by its fully qualified module
name (`model.layers.3.self_attn`), with its KV heads, head dimension and rotary embedding.
Models without such layers (the CIFAR ResNets, GPT-2's fused `c_attn`) have none.

`kv_hooks(model, layers, keys, values)`: while active, the keys each layer computes are
replaced, at the output of the module that produces them before the rotary embedding
(`k_norm` where the model normalises keys, before or after moving the heads in front, else
`k_proj`), by `keys[layer](k, rope)`, and
its values at `v_proj`'s output by `values[layer](v)`; k and v are (batch, tokens,
kv_heads, head_dim). `rope(x, inverse)` applies that call's rotary embedding (the cos/sin
the attention module was called with, through the model's own `apply_rotary_pos_emb`; the
inverse with -sin), so a quantizer can work on the keys as the cache holds them. The
attention module itself runs unchanged. The same hooks with functions that return their
input unchanged observe the keys and values (sensitivity analysis).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from mixq.errors import MixqError
from mixq.models.enumerate import block_index

KeyFn = Callable[[torch.Tensor, "Callable | None"], torch.Tensor]
ValueFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class KVLayer:
    """One attention layer's cache. name: the attention module; key_module / value_module:
    the modules whose outputs are the keys (before RoPE) and values; block: decoder block."""

    name: str
    block: int
    key_module: str
    value_module: str
    n_kv_heads: int
    head_dim: int

    @property
    def elements_per_token(self) -> int:
        """Cached elements per token: keys and values."""
        return 2 * self.n_kv_heads * self.head_dim


def _head_dim(attn: nn.Module, k_proj: nn.Linear) -> tuple[int, int]:
    cfg = getattr(attn, "config", None)
    head_dim = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
    if head_dim is None and cfg is not None:
        head_dim = cfg.hidden_size // cfg.num_attention_heads
    if not head_dim or k_proj.out_features % head_dim:
        raise MixqError(f"{type(attn).__name__}: cannot tell the head dimension of its keys "
                        f"(k_proj gives {k_proj.out_features} features)")
    return k_proj.out_features // head_dim, int(head_dim)


def kv_layers(model: nn.Module) -> list[KVLayer]:
    """Every attention module with k_proj / v_proj Linear projections inside a decoder
    block, in model order (see the module docstring)."""
    out = []
    for name, m in model.named_modules():
        k, v = getattr(m, "k_proj", None), getattr(m, "v_proj", None)
        if not (isinstance(k, nn.Linear) and isinstance(v, nn.Linear)):
            continue
        block = block_index(name)
        if block < 0:
            continue
        n_heads, head_dim = _head_dim(m, k)
        key = f"{name}.k_norm" if isinstance(getattr(m, "k_norm", None), nn.Module) else f"{name}.k_proj"
        out.append(KVLayer(name, block, key, f"{name}.v_proj", n_heads, head_dim))
    return out


def _rope_fn(attn: nn.Module) -> Callable | None:
    mod = sys.modules.get(type(attn).__module__)
    return getattr(mod, "apply_rotary_pos_emb", None)


def _heads_first(out: torch.Tensor, inp: torch.Tensor, n_heads: int) -> bool:
    """Whether a 4-D key-norm output is (B, H, T, D) (Gemma 3 normalises after the transpose)
    rather than (B, T, H, D) (Qwen3 before it): by shape, and where heads and tokens are
    equally many, by its input, the (B, T, H, D) view of the projection or its transpose."""
    if out.shape[1] == n_heads and out.shape[2] != n_heads:
        return True
    if out.shape[2] == n_heads and out.shape[1] != n_heads:
        return False
    return not inp.is_contiguous()


def _as_heads(out: torch.Tensor, layer: KVLayer, inp: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    """(B, T, H, D) view of a projection output (B, T, H*D) or of a normed 4-D key, and the
    function restoring the original layout."""
    if out.dim() == 4:
        if _heads_first(out, inp, layer.n_kv_heads):
            return out.transpose(1, 2), lambda x: x.transpose(1, 2)
        return out, lambda x: x
    B, T, _ = out.shape
    return out.view(B, T, layer.n_kv_heads, layer.head_dim), lambda x: x.reshape(B, T, -1)


@contextmanager
def kv_hooks(model: nn.Module, layers: list[KVLayer], keys: dict[str, KeyFn],
             values: dict[str, ValueFn]) -> Iterator[None]:
    """Replace the keys / values of the layers named in `keys` / `values` (see the module
    docstring)."""
    handles = []
    try:
        for layer in layers:
            kf, vf = keys.get(layer.name), values.get(layer.name)
            if kf is None and vf is None:
                continue
            attn = model.get_submodule(layer.name)
            apply_rope = _rope_fn(attn)
            call: dict = {}

            def pre(mod, args, kwargs, call=call):
                pe = kwargs.get("position_embeddings")
                if pe is None and len(args) > 1 and isinstance(args[1], tuple):
                    pe = args[1]
                call["pe"] = pe
                return None

            def post(mod, args, kwargs, output, call=call):
                call.pop("pe", None)
                return None

            handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(attn.register_forward_hook(post, with_kwargs=True))
            if kf is not None:
                def key_hook(mod, args, out, layer=layer, kf=kf, call=call):
                    k, back = _as_heads(out, layer, args[0])
                    return back(kf(k, _rope(call.get("pe"), apply_rope)))

                handles.append(model.get_submodule(layer.key_module).register_forward_hook(key_hook))
            if vf is not None:
                def value_hook(mod, args, out, layer=layer, vf=vf):
                    v, back = _as_heads(out, layer, args[0])
                    return back(vf(v))

                handles.append(model.get_submodule(layer.value_module).register_forward_hook(value_hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _rope(pe, apply_rope) -> Callable | None:
    """rope(x (B, T, H, D), inverse) for this call's (cos, sin), or None without RoPE."""
    if pe is None or apply_rope is None:
        return None
    cos, sin = pe

    def rope(x: torch.Tensor, inverse: bool) -> torch.Tensor:
        s = -sin if inverse else sin
        xt = x.transpose(1, 2)  # (B, H, T, D), as the attention rotates it
        _, rotated = apply_rope(xt, xt, cos.to(x.dtype), s.to(x.dtype))
        return rotated.transpose(1, 2)

    return rope


__all__ = ["KVLayer", "kv_hooks", "kv_layers"]

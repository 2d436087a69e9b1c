"""A decode loop for Llama-family causal LMs (Llama, Mistral, Qwen2, SmolLM2): a static KV
cache and, on a CUDA device, the one-token step captured once as a CUDA graph and replayed.

    dec = StaticDecoder(model, max_len=1024, batch=1)        # model: an HF *ForCausalLM
    new_ids = dec.generate(prompt_ids, max_new_tokens=64)    # (batch, n_new) token ids

It runs the model's own modules (embedding, norms, rotary embedding, the linear units, which
may be `QuantLinear`s) in a forward of its own (on a GPU with the element-wise steps fused
by `kernels.decode_ops`: residual add + RMSNorm, together with the online input transform of
the units that read its output where they share one; rotary + cache write; SiLU * up, inside
the gate/up matmul where the CUDA GEMV takes it; attention of a one-token step over the
written keys only): q/k/v and gate/up go through one `nn.LinearGroup` each (one packed
matmul over the concatenated weights where the formats match, one shared input transform),
keys and values are written into preallocated (batch, kv_heads, max_len, head_dim) tensors at
the step's position, and prefill attention is SDPA over the whole cache with a mask of the
positions written so far, so every step has the same shapes and no host synchronisation: the
step (embedding to next token, greedy or sampled) is captured once and replayed
`max_new_tokens` times; the tokens are read back at the end. The prompt is processed eagerly
in one call (prefill).

Greedy decoding returns the tokens Hugging Face's `generate` returns for the same model, up
to ties in the logits; on the CPU the same code runs without a graph.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from mixq.errors import DataError, MixqError
from mixq.nn.group import LinearGroup

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def supports(model: nn.Module) -> bool:
    """Whether `StaticDecoder` knows this model's architecture."""
    return type(model).__name__ in SUPPORTED and hasattr(model, "model") and hasattr(model.model, "layers")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as in Hugging Face's Llama: x (B, H, T, D), cos/sin (B, T, D)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class StaticDecoder:
    """Prefill + graph-replayed decode steps over a static KV cache (see module docstring)."""

    def __init__(self, model: nn.Module, max_len: int, batch: int = 1, *, use_graph: bool | None = None,
                 fused: bool | None = None):
        if not supports(model):
            raise MixqError(f"StaticDecoder: {type(model).__name__} is not one of {SUPPORTED}")
        cfg = model.config
        if getattr(cfg, "sliding_window", None) and cfg.sliding_window < max_len and getattr(cfg, "use_sliding_window", True):
            raise MixqError(f"StaticDecoder: sliding-window attention ({cfg.sliding_window}) shorter than max_len={max_len}")
        self.model = model
        self.cfg = cfg
        inner = model.model
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.head = model.lm_head
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                ln1=layer.input_layernorm, ln2=layer.post_attention_layernorm,
                qkv=LinearGroup([attn.q_proj, attn.k_proj, attn.v_proj]), o=attn.o_proj,
                gate_up=LinearGroup([mlp.gate_proj, mlp.up_proj]), down=mlp.down_proj, act=mlp.act_fn,
                scaling=float(getattr(attn, "scaling", attn.head_dim ** -0.5))))
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.max_len, self.batch = int(max_len), int(batch)
        p = next(model.parameters())
        self.device = p.device
        self.dtype = self.embed.weight.dtype
        shape = (len(self.layers), self.batch, self.n_kv, self.max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        self._graph = None
        self._key_pos = torch.arange(self.max_len, device=self.device)
        can_fuse = self._fusable()
        if fused and not can_fuse:
            raise MixqError("StaticDecoder: fused=True needs Triton, RMSNorm layers, SiLU MLPs and a static rotary "
                            "embedding")
        self.fused = (can_fuse and self.device.type == "cuda") if fused is None else bool(fused)

    def _fusable(self) -> bool:
        """Whether the fused element-wise kernels (`kernels.decode_ops`) apply to this model."""
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return False
        norms = [self.norm] + [ly[n] for ly in self.layers for n in ("ln1", "ln2")]
        if not all(hasattr(n, "variance_epsilon") and getattr(n, "weight", None) is not None
                   and "RMSNorm" in type(n).__name__ for n in norms):
            return False
        if not all(isinstance(ly["act"], nn.SiLU) or type(ly["act"]).__name__ == "SiLUActivation" for ly in self.layers):
            return False
        rope_type = getattr(self.rotary, "rope_type", "default")
        half = self.head_dim // 2  # the rotary kernel takes power-of-two half head dims
        return (hasattr(self.rotary, "inv_freq") and "dynamic" not in str(rope_type) and self.head_dim % 2 == 0
                and half & (half - 1) == 0)

    # ------------------------------------------------------------------ forward

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (batch, vocab) of the last of T tokens `ids` (batch, T) at positions
        pos + 0 .. pos + T - 1 (pos: 1-element long tensor), writing their keys and values
        into the cache."""
        if self.fused:
            return self._forward_fused(ids, pos)
        b, t = ids.shape
        positions = pos + torch.arange(t, device=ids.device)  # (T,)
        h = self.embed(ids)  # (B, T, H)
        cos, sin = self.rotary(h, positions[None].expand(b, t))
        mask = self._key_pos[None, :] <= positions[:, None]  # (T, L): keys written up to each query
        for i, ly in enumerate(self.layers):
            r = ly["ln1"](h)
            q, k, v = ly["qkv"](r)
            q = _rope(q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
            k = _rope(k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2), cos, sin)
            v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc.index_copy_(2, positions, k.to(kc.dtype))
            vc.index_copy_(2, positions, v.to(vc.dtype))
            a = nn.functional.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=ly["scaling"],
                                                           enable_gqa=self.n_kv != self.n_heads)
            h = h + ly["o"](a.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
            r = ly["ln2"](h)
            g, u = ly["gate_up"](r)
            h = h + ly["down"](ly["act"](g) * u)
        return self.head(self.norm(h[:, -1]))  # (B, vocab)

    def _forward_fused(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """`forward` with the element-wise steps fused (`kernels.decode_ops`): residual add +
        RMSNorm, rotary embedding + cache write, SiLU * up (the same rounding as the model's
        own modules), and for one-token steps attention over the written keys only with the
        rotary embedding and cache write inside it (`kernels.decode_attention`, flash-decoding;
        prefill keeps torch's SDPA)."""
        from mixq.kernels import decode_attention as attn
        from mixq.kernels import decode_ops as ops

        b, t = ids.shape
        positions = pos + torch.arange(t, device=ids.device)  # (T,)
        mask = None  # (T, L), for the SDPA path only
        inv_freq = self.rotary.inv_freq
        rope_scale = float(getattr(self.rotary, "attention_scaling", 1.0))
        h = self.embed(ids)  # (B, T, H)
        delta = None
        for i, ly in enumerate(self.layers):
            ln1 = ly["ln1"]
            tf = self._norm_transform(ly["qkv"], h, ln1)
            if delta is None:
                r = ops.add_rms_norm(h, None, ln1.weight, ln1.variance_epsilon, tf)
            else:
                h, r = ops.add_rms_norm(h, delta, ln1.weight, ln1.variance_epsilon, tf)
            q, k, v = ly["qkv"](r, transformed=tf is not None)
            if t == 1 and attn.decode_attention_rope_supported(q, self.k_cache[i], self.n_heads):
                # a decode step: rotary + cache write inside attention over the written keys only
                a = attn.decode_attention_rope(q, k, v, positions, inv_freq, self.k_cache[i], self.v_cache[i],
                                              self.n_heads, ly["scaling"], rope_scale)
            else:
                q = ops.rope_to_cache(q, k, v, positions, inv_freq, self.k_cache[i], self.v_cache[i], self.n_heads,
                                      self.n_kv, self.head_dim, rope_scale)
                if t == 1 and attn.decode_attention_supported(q, self.k_cache[i]):  # written keys only
                    a = attn.decode_attention(q, self.k_cache[i], self.v_cache[i], positions, ly["scaling"])
                else:
                    if mask is None:
                        mask = self._key_pos[None, :] <= positions[:, None]
                    a = nn.functional.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask,
                                                                   scale=ly["scaling"],
                                                                   enable_gqa=self.n_kv != self.n_heads)
                    a = a.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
            o = ly["o"](a)
            ln2 = ly["ln2"]
            tf = self._norm_transform(ly["gate_up"], h, ln2)
            h, r = ops.add_rms_norm(h, o, ln2.weight, ln2.variance_epsilon, tf)
            # one launch where the CUDA GEMV takes the fused int4 weight
            m = ly["gate_up"].silu_mul(r, transformed=tf is not None)
            if m is None:
                g, u = ly["gate_up"](r, transformed=tf is not None)
                m = ops.silu_mul(g, u)
            delta = ly["down"](m)
        h = h + delta
        return self.head(self.norm(h[:, -1]))

    @staticmethod
    def _norm_transform(group: LinearGroup, h: torch.Tensor, norm: nn.Module) -> tuple | None:
        """The input transform the group's units share, where the RMSNorm kernel that feeds the
        group can apply it (`decode_ops.norm_transform_ok`), so the group runs no transform
        kernel of its own; else None. MIXQ_NORM_TRANSFORM=0 keeps the transform in its own
        kernel (for benchmarks)."""
        from mixq.kernels import decode_ops as ops

        tf = group.shared_transform()
        if tf is None or os.environ.get("MIXQ_NORM_TRANSFORM") == "0":
            return None
        return tf if ops.norm_transform_ok(h.shape[-1], *tf, x=h, weight=norm.weight) else None

    # ------------------------------------------------------------------ sampling

    def _pick(self, logits: torch.Tensor, greedy: bool, temperature: float, top_p: float) -> torch.Tensor:
        """(B,) next tokens: argmax (with the fused kernels, `decode_ops.argmax`: a 128k
        vocabulary in parallel chunks), or a sample of softmax(logits / T) restricted to the
        smallest set of tokens whose probability reaches top_p (Gumbel-max over that set,
        so no host synchronisation)."""
        if greedy:
            if self.fused:
                from mixq.kernels import decode_ops as ops

                return ops.argmax(logits.contiguous())
            return logits.argmax(-1)
        z = logits.float() / temperature
        if top_p < 1.0:
            sorted_z, order = z.sort(-1, descending=True)
            p = sorted_z.softmax(-1)
            drop = (p.cumsum(-1) - p) >= top_p  # keep the first token always
            sorted_z = sorted_z.masked_fill(drop, float("-inf"))
            z = torch.full_like(z, float("-inf")).scatter(-1, order, sorted_z)
        gumbel = -torch.log(-torch.log(torch.rand_like(z).clamp_(1e-20, 1.0)))
        return (z + gumbel).argmax(-1)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor | list[int] | list[list[int]], max_new_tokens: int, *,
                 greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """(batch, <= max_new_tokens) new token ids after `prompt` (batch, T) (one prompt per
        row, equal lengths), cut after the first `eos_token_id` of row 0 when given."""
        ids = torch.as_tensor(prompt, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.shape[0] != self.batch:
            raise DataError(f"StaticDecoder: prompt has {ids.shape[0]} rows, the decoder was built for batch {self.batch}")
        t = ids.shape[1]
        if t == 0:
            raise DataError("generate: the prompt has no tokens")
        if max_new_tokens < 1:
            raise DataError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        if t + max_new_tokens > self.max_len:
            raise DataError(f"StaticDecoder: prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds max_len {self.max_len}")
        if not greedy and temperature <= 0:
            raise DataError(f"generate: temperature must be > 0 when sampling, got {temperature}")
        torch.manual_seed(seed)
        self.k_cache.zero_()
        self.v_cache.zero_()
        pos = torch.zeros(1, dtype=torch.long, device=self.device)
        first = self._pick(self.forward(ids, pos), greedy, temperature, top_p)  # prefill
        out = torch.empty(self.batch, max_new_tokens, dtype=torch.long, device=self.device)
        out[:, 0] = first
        state = dict(tok=first[:, None].clone(), pos=torch.full((1,), t, dtype=torch.long, device=self.device),
                     step=torch.zeros(1, dtype=torch.long, device=self.device), out=out)

        def step():
            nxt = self._pick(self.forward(state["tok"], state["pos"]), greedy, temperature, top_p)
            state["step"].add_(1)
            state["out"].index_copy_(1, state["step"], nxt[:, None])
            state["tok"].copy_(nxt[:, None])
            state["pos"].add_(1)

        n_steps = max_new_tokens - 1
        if n_steps and self.use_graph:
            graph = self._capture(step, state)
            for _ in range(n_steps):
                graph.replay()
        else:
            for _ in range(n_steps):
                step()
        new = out.cpu()
        if eos_token_id is not None:
            hits = (new[0] == eos_token_id).nonzero()
            if hits.numel():
                new = new[:, : int(hits[0]) + 1]
        return new

    def _capture(self, step, state) -> torch.cuda.CUDAGraph:
        """Capture one decode step as a CUDA graph (warmed up on a side stream first, which
        also compiles every kernel); the step leaves `state` as it found it plus one token,
        so the warm-up's effects are undone before capture."""
        saved = {k: v.clone() for k, v in state.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
                for k, v in saved.items():
                    state[k].copy_(v)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for k, v in saved.items():  # capture ran nothing, but keep the state exact
            state[k].copy_(v)
        return graph

    def step_graph(self) -> tuple[torch.cuda.CUDAGraph, dict]:
        """A captured greedy decode step and its state (for timing: replay it repeatedly;
        position and cache grow by one per replay until max_len)."""
        state = dict(tok=torch.zeros(self.batch, 1, dtype=torch.long, device=self.device),
                     pos=torch.zeros(1, dtype=torch.long, device=self.device),
                     step=torch.zeros(1, dtype=torch.long, device=self.device),
                     out=torch.zeros(self.batch, 1, dtype=torch.long, device=self.device))

        def step():
            nxt = self._pick(self.forward(state["tok"], state["pos"]), True, 1.0, 1.0)
            state["tok"].copy_(nxt[:, None])
            state["pos"].add_(1)
            state["pos"].remainder_(self.max_len)

        return self._capture(step, state), state

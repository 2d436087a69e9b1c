"""Fold a rotation of the residual stream into the weights (QuaRot / SpinQuant's R1).

In a pre-norm decoder (Llama, Mistral, Qwen2, Qwen3) every block reads the residual stream h
through an RMSNorm and writes back into it through o_proj and down_proj. With Q an orthogonal
(d, d) matrix, the model with residual stream h Q computes the same function when

    RMSNorm weights g are folded into the linears that read them:  W <- W diag(g),  g <- 1
    the embedding rotates:                       E <- E Q                       (vocab, d)
    q/k/v, gate/up and the head read h Q:        W <- W Q                       (out, d)
    o_proj and down_proj write into h Q:         W <- Qᵀ W,  b <- b Q           (d, in)

because an RMSNorm without weight commutes with Q (||x Q|| = ||x||, so norm(x Q) = norm(x) Q)
and (x Q)(W Q)ᵀ = x Wᵀ. The result is a plain model of the same architecture (its norms
have weight 1) that any runtime runs unchanged, with no online transform; its linears see
rotated weights, whose outlier channels are spread out, so they quantize better (GPTQ keeps
most of the gain of an online `+rotate`). Q is `models.hadamard.random_hadamard(d, seed)`.

Tied embeddings (SmolLM2 ties lm_head to embed_tokens): the head must become E diag(g_f) Q
(the final norm's weight g_f folded in) while the embedding becomes E Q, and these differ
unless g_f is all ones, so the head is untied: it gets its own tensor (vocab x d more
parameters, counted in every bit total) and the config says `tie_word_embeddings: false`.
The rotation of both is the same Q, so the head reads the rotated stream consistently.

The folding is done in float64 and written back in each parameter's dtype, in place.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from mixq.errors import MixqError
from mixq.models.hadamard import random_hadamard

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ATTN_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")


def _check(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    family = getattr(cfg, "model_type", None)
    if family not in FAMILIES:
        raise MixqError(f"rotate_residual folds a rotation into {', '.join(FAMILIES)} decoders (pre-norm RMSNorm "
                        f"blocks); this model is {family or type(model).__name__!r}")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise MixqError("rotate_residual needs every weight in memory: load the model with --offload none or cpu "
                        "(not disk)")
    if getattr(model.model, "embed_tokens", None) is None or getattr(model, "lm_head", None) is None:
        raise MixqError(f"{type(model).__name__}: expected model.embed_tokens and lm_head")


@torch.no_grad()
def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    p.copy_(value.to(device=p.device, dtype=p.dtype))


def _read(p: torch.Tensor) -> torch.Tensor:
    return p.detach().to(torch.float64)


@torch.no_grad()
def _fold_reader(norm: nn.Module, linears: list[nn.Linear], Q: torch.Tensor) -> None:
    """W <- W diag(g) Q for the linears reading RMSNorm `norm` (weight g), then g <- 1."""
    g = _read(norm.weight).to(Q.device)  # (d,)
    for lin in linears:
        w = _read(lin.weight).to(Q.device)  # (out, d)
        _set(lin.weight, (w * g.view(1, -1)) @ Q)
    _set(norm.weight, torch.ones_like(g))


@torch.no_grad()
def _fold_writer(lin: nn.Linear, Q: torch.Tensor) -> None:
    """W <- Qᵀ W, b <- b Q for a linear writing into the residual stream."""
    w = _read(lin.weight).to(Q.device)  # (d, in)
    _set(lin.weight, Q.t() @ w)
    if lin.bias is not None:
        _set(lin.bias, _read(lin.bias).to(Q.device) @ Q)


def rotate_residual(model: nn.Module, seed: int = 0) -> dict:
    """Fold a seeded random Hadamard rotation of the residual stream (and every RMSNorm
    weight) into a Llama/Mistral/Qwen2/Qwen3 causal LM, in place; the model computes the same
    function up to float rounding. Unties a tied head (see the module docstring). Returns the
    record the artifacts keep: seed, hidden size, the Hadamard construction, the sha256 of Q
    (float64 bytes) and whether the head was untied."""
    _check(model)
    Q, how = random_hadamard(int(model.config.hidden_size), seed)  # (d, d) float64
    return {"seed": int(seed), **fold_rotation(model, Q), "hadamard": how}


def fold_rotation(model: nn.Module, Q: torch.Tensor) -> dict:
    """Fold the orthogonal residual-stream rotation Q (d, d) into the model in place (see the
    module docstring); returns {"hidden_size", "untied_head", "q_sha256"}."""
    _check(model)
    base, cfg = model.model, model.config
    d = int(cfg.hidden_size)
    if tuple(Q.shape) != (d, d):
        raise MixqError(f"rotation of shape {tuple(Q.shape)} for a hidden size of {d}")
    Q = Q.to(torch.float64)
    if not torch.allclose(Q @ Q.t(), torch.eye(d, dtype=Q.dtype, device=Q.device), atol=1e-9, rtol=0):
        raise MixqError("the residual rotation must be orthogonal (Q Qᵀ = I); the model would change otherwise")
    emb, head = base.embed_tokens, model.lm_head
    untied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    with torch.no_grad():
        if untied:
            head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
            cfg.tie_word_embeddings = False
            text_cfg = getattr(cfg, "get_text_config", lambda: cfg)()
            text_cfg.tie_word_embeddings = False
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            _fold_reader(layer.input_layernorm, [getattr(attn, n) for n in ATTN_IN], Q)
            _fold_writer(attn.o_proj, Q)
            _fold_reader(layer.post_attention_layernorm, [getattr(mlp, n) for n in MLP_IN], Q)
            _fold_writer(mlp.down_proj, Q)
        _set(emb.weight, _read(emb.weight).to(Q.device) @ Q)  # (vocab, d)
        _fold_reader(base.norm, [head], Q)
    return {"hidden_size": d, "untied_head": bool(untied),
            "q_sha256": hashlib.sha256(Q.cpu().contiguous().numpy().tobytes()).hexdigest()}

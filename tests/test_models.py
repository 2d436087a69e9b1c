"""Unit enumeration and weight access on tiny models built from configs."""

import pytest
import torch

from mixq.models import cnn_units, get_weight, llm_units, set_weight
from mixq.models.resnet_cifar import CifarResNet


def test_llama_units_are_every_block_linear(tiny_llama):
    units = llm_units(tiny_llama)
    names = [u.name for u in units]
    assert len(units) == 2 * 7  # q,k,v,o,gate,up,down per block
    assert "model.layers.1.mlp.down_proj" in names
    assert all(u.block in (0, 1) for u in units)
    down = next(u for u in units if u.name == "model.layers.0.mlp.down_proj")
    assert down.shape == (64, 128) and down.role == "down_proj"
    assert "lm_head" not in names


def test_head_and_embedding_are_opt_in(tiny_llama):
    units = llm_units(tiny_llama, include_head=True, include_embeddings=True)
    head = next(u for u in units if u.name == "lm_head")
    emb = next(u for u in units if u.name == "model.embed_tokens")
    assert head.tied_to is None  # the fixture does not tie
    assert emb.kind == "embedding" and emb.shape == (128, 64)


def test_tied_head_is_marked():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg)
    units = llm_units(m, include_head=True, include_embeddings=True)
    head = next(u for u in units if u.name == "lm_head")
    assert head.tied_to == "model.embed_tokens"
    # Without the embedding as a unit, the head owns the shared tensor.
    assert next(u for u in llm_units(m, include_head=True) if u.name == "lm_head").tied_to is None


def test_moe_gives_one_unit_per_expert(tiny_moe):
    units = llm_units(tiny_moe)
    experts = [u for u in units if u.kind == "expert"]
    assert len(experts) == 2 * 2 * 4  # blocks x (gate_up, down) x experts
    assert not any(u.name.endswith(".gate") for u in units)  # routers excluded
    u = next(u for u in experts if u.name == "model.layers.0.mlp.experts.down_proj.2")
    assert u.shape == (64, 96) and u.index == 2
    w = get_weight(tiny_moe, u)
    assert torch.equal(w, tiny_moe.model.layers[0].mlp.experts.down_proj[2])


def test_get_set_weight_round_trip(tiny_moe):
    units = llm_units(tiny_moe)
    u = next(u for u in units if u.kind == "expert")
    before = get_weight(tiny_moe, u).clone()
    set_weight(tiny_moe, u, before * 2)
    assert torch.equal(get_weight(tiny_moe, u), before * 2)
    set_weight(tiny_moe, u, before)
    assert torch.equal(get_weight(tiny_moe, u), before)


def test_gpt2_conv1d_is_transposed():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64))
    units = llm_units(m)
    attn = next(u for u in units if u.name == "transformer.h.0.attn.c_attn")
    assert attn.transposed and attn.shape == (96, 32)  # (out, in)
    w = get_weight(m, attn)
    x = torch.randn(3, 32)
    assert torch.allclose(m.transformer.h[0].attn.c_attn(x), x @ w.T + m.transformer.h[0].attn.c_attn.bias, atol=1e-6)


def test_resnet_units_cover_every_conv_and_fc():
    m = CifarResNet(20)
    units = cnn_units(m)
    assert len(units) == 1 + 3 * 3 * 2 + 1  # stem, 9 blocks x 2 convs, fc
    stem = units[0]
    assert stem.name == "conv1" and stem.shape == (16, 27) and stem.block == -1
    assert sorted({u.block for u in units if u.block >= 0}) == list(range(9))
    assert units[-1].role == "fc" and units[-1].shape == (10, 64)


def test_resnet_depth_is_checked():
    with pytest.raises(ValueError, match="depth"):
        CifarResNet(21)

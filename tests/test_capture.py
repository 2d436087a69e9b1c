"""Hooks in mixq.models.capture: unit inputs (Linear, Conv2d im2col, routed experts) and
block replay."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixq.models import llm_units
from mixq.models.capture import BlockReplay, find_blocks, forward_logits, unit_inputs
from mixq.models.enumerate import cnn_units
from mixq.models.units import get_weight


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _collect(model, units, run):
    got: dict[str, list[torch.Tensor]] = {}
    with unit_inputs(model, units, lambda u, x: got.setdefault(u.name, []).append(x.clone())):
        with torch.no_grad():
            run()
    return {k: torch.cat(v) for k, v in got.items()}


def test_conv_columns_reproduce_the_convolution():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    units = cnn_units(model)
    x = torch.randn(2, 3, 8, 8)
    cols = _collect(model, units, lambda: model(x))
    conv = [u for u in units if u.name == "conv"][0]
    assert cols["conv"].shape == (2 * 4 * 4, 3 * 3 * 3)
    w2d = get_weight(model, conv)  # (out, in*kh*kw)
    want = F.conv2d(x, model.conv.weight, None, stride=2, padding=1)  # (2, 5, 4, 4)
    got = (cols["conv"] @ w2d.t()).reshape(2, 4, 4, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cols["fc"].shape == (2, 80)


def test_linear_inputs_are_flattened_module_inputs(tiny_llama):
    units = [u for u in llm_units(tiny_llama) if u.block == 1]
    seen = {}
    h = tiny_llama.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].clone()))
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    try:
        got = _collect(tiny_llama, units, lambda: forward_logits(tiny_llama, ids))
    finally:
        h.remove()
    torch.testing.assert_close(got["model.layers.1.mlp.down_proj"], seen["x"].reshape(-1, 128))
    assert got["model.layers.1.self_attn.q_proj"].shape == (20, 64)


def test_expert_inputs_are_the_routed_tokens(tiny_moe):
    units = llm_units(tiny_moe)
    moe = tiny_moe.model.layers[0].mlp
    seen = {}
    h = moe.experts.register_forward_pre_hook(lambda m, a: seen.update(h=a[0].clone(), idx=a[1].clone()))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    try:
        got = _collect(tiny_moe, [u for u in units if u.block == 0], lambda: forward_logits(tiny_moe, ids))
    finally:
        h.remove()
    total = 0
    for e in range(4):
        routed = (seen["idx"] == e).any(-1)
        x = got.get(f"model.layers.0.mlp.experts.gate_up_proj.{e}", torch.zeros(0, 64))
        torch.testing.assert_close(x, seen["h"][routed])
        total += x.shape[0]
        if routed.any():
            gate, up = F.linear(x, moe.experts.gate_up_proj[e]).chunk(2, -1)
            torch.testing.assert_close(got[f"model.layers.0.mlp.experts.down_proj.{e}"], F.silu(gate) * up)
    assert total == 2 * 12 * 2  # every token goes to top-2 experts


def test_block_replay_matches_full_forward(tiny_llama):
    name, blocks = find_blocks(tiny_llama)
    assert name == "model.layers" and len(blocks) == 2
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    replay = BlockReplay(tiny_llama)
    with torch.no_grad():
        with replay.recording():
            replay.set_batch(0)
            ref = forward_logits(tiny_llama, ids)
        for b in range(3):
            with replay.from_block(b, 0):
                torch.testing.assert_close(forward_logits(tiny_llama, ids), ref, rtol=0, atol=0)
        # a weight change in a replayed block has no effect; in a run block it does
        w = tiny_llama.model.layers[0].mlp.up_proj.weight
        saved = w.detach().clone()
        try:
            w.mul_(3.0)
            with replay.from_block(1, 0):
                torch.testing.assert_close(forward_logits(tiny_llama, ids), ref, rtol=0, atol=0)
            assert not torch.allclose(forward_logits(tiny_llama, ids), ref)
        finally:
            w.copy_(saved)
    assert all(type(m).__name__ == "LlamaDecoderLayer" for m in blocks)
    units = llm_units(tiny_llama)
    assert [replay.block_of(u) for u in units] == [u.block for u in units]

"""Text generation with a (quantized) causal LM through Hugging Face's `model.generate`."""

from __future__ import annotations

import torch

from mixq.errors import DataError, MixqError
from mixq.eval.common import model_device
from mixq.models.load import LoadedModel


@torch.no_grad()
def generate_ids(model: torch.nn.Module, ids: list[int] | torch.Tensor, max_new_tokens: int = 32,
                 greedy: bool = True, *, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> list[int]:
    """The new token ids (at most `max_new_tokens`) `model.generate` appends to the prompt
    `ids` (1-D): greedy, or sampled with `temperature` / `top_p` under `seed`."""
    prompt = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    if prompt.shape[1] == 0:
        raise DataError("generate: the prompt has no tokens")
    if max_new_tokens < 1:
        raise DataError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not hasattr(model, "generate"):
        raise MixqError(f"generate: a {type(model).__name__} is not a Hugging Face generation model")
    device = model_device(model)
    prompt = prompt.to(device)
    kwargs = {"max_new_tokens": int(max_new_tokens), "do_sample": not greedy,
              "attention_mask": torch.ones_like(prompt)}
    if not greedy:
        kwargs.update(temperature=float(temperature), top_p=float(top_p))
    if eos_token_id is not None:
        kwargs["eos_token_id"] = eos_token_id
    gen_cfg = getattr(model, "generation_config", None)
    pad = pad_token_id
    if pad is None and gen_cfg is not None:
        pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else gen_cfg.eos_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    if pad is not None:
        kwargs["pad_token_id"] = pad
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(prompt, **kwargs)
    return out[0, prompt.shape[1]:].tolist()


def generate(loaded: LoadedModel, prompt: str | list[int], max_new_tokens: int = 32, greedy: bool = True, *,
             chat: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> str:
    """The text `loaded`'s model generates after `prompt` (a string, or token ids), decoded
    without special tokens. chat=True wraps a string prompt in the tokenizer's chat template
    as one user turn."""
    if loaded.kind != "causal_lm":
        raise MixqError(f"generate: model {loaded.name!r} is a {loaded.kind}, not a causal LM")
    tok = loaded.tokenizer
    if isinstance(prompt, str):
        if tok is None:
            raise MixqError(f"generate: model {loaded.name!r} has no tokenizer; pass token ids instead of text")
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            from mixq.data.tokenize import hf_encoder

            enc = hf_encoder(tok)  # the tokenizer's BOS first, where it adds one
            ids = ([enc.bos_id] if enc.bos_id is not None else []) + enc(prompt)
    else:
        ids = list(prompt)
    new = generate_ids(loaded.model, ids, max_new_tokens, greedy, temperature=temperature, top_p=top_p, seed=seed)
    if tok is None:
        return " ".join(str(i) for i in new)
    return tok.decode(new, skip_special_tokens=True)

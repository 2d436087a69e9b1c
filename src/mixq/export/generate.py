"""Text generation with a (quantized) causal LM: on a CUDA device, Llama-family models run
mixq's own decode loop (`export.decoder.StaticDecoder`: static KV cache, one CUDA graph per
decode step); other models, and the CPU, Hugging Face's `model.generate`."""

from __future__ import annotations

import torch

from mixq.errors import DataError, MixqError
from mixq.eval.common import model_device
from mixq.export import decoder
from mixq.models.load import LoadedModel


ENGINES = ("auto", "static", "hf")


@torch.no_grad()
def generate_ids(model: torch.nn.Module, ids: list[int] | torch.Tensor, max_new_tokens: int = 32,
                 greedy: bool = True, *, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 engine: str = "auto") -> list[int]:
    """The new token ids (at most `max_new_tokens`) the model appends to the prompt `ids`
    (1-D): greedy, or sampled with `temperature` / `top_p` under `seed`. engine: "static"
    (mixq's decode loop, `StaticDecoder`), "hf" (`model.generate`) or "auto" (static on a
    CUDA device for the architectures it knows, else hf)."""
    prompt = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    if prompt.shape[1] == 0:
        raise DataError("generate: the prompt has no tokens")
    if max_new_tokens < 1:
        raise DataError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if engine not in ENGINES:
        raise DataError(f"generate: engine must be one of {ENGINES}, got {engine!r}")
    device = model_device(model)
    if engine == "static" or (engine == "auto" and device.type == "cuda" and decoder.supports(model)):
        if eos_token_id is None:
            gen_cfg = getattr(model, "generation_config", None)
            eos = getattr(gen_cfg, "eos_token_id", None)
            eos_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        dec = decoder.StaticDecoder(model, max_len=prompt.shape[1] + max_new_tokens)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            new = dec.generate(prompt, max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p,
                               seed=seed, eos_token_id=eos_token_id)
        return new[0].tolist()
    if not hasattr(model, "generate"):
        raise MixqError(f"generate: a {type(model).__name__} is not a Hugging Face generation model")
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
             chat: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             engine: str = "auto") -> str:
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
    new = generate_ids(loaded.model, ids, max_new_tokens, greedy, temperature=temperature, top_p=top_p, seed=seed,
                       engine=engine)
    if tok is None:
        return " ".join(str(i) for i in new)
    return tok.decode(new, skip_special_tokens=True)

"""A GGUF file run by llama.cpp itself (through the `llama-cpp-python` package), scored on the
same windows and by the same rules as mixq's own evaluation (`eval.perplexity`): token t of
a window is predicted from tokens 0..t-1 of that window (the window's ids as they are, no
BOS added), so the two are comparable position by position.

    with GGUFRunner("model.gguf") as run:
        logp = run.log_probs(window)               # (L-1, V) float32
    compare_gguf("model.gguf", windows, {"float": float_log_probs})   # per reference: ppl, KL, top-1

llama.cpp computes a quantized weight's dot products on activations it rounds to 8 bits
(Q8_0 / Q8_K blocks), and accumulates in its own order, so its distribution differs a little
from a float evaluation of the very same weights; `compare_gguf` measures that difference.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import torch

from mixq.errors import NotFoundError
from mixq.eval.perplexity import _kl_and_agree, _window_nll


def require_llama_cpp():
    """The `llama_cpp` module; NotFoundError naming the extra that installs it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise NotFoundError("running a GGUF needs llama.cpp's Python package: pip install 'mixq[llamacpp]' "
                            "(llama-cpp-python, built from source)") from e
    return llama_cpp


class GGUFRunner:
    """One GGUF model loaded in llama.cpp (CPU), evaluating windows of token ids."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None):
        llama_cpp = require_llama_cpp()
        if not os.path.isfile(path):
            raise NotFoundError(f"{path}: no such GGUF file")
        threads = n_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
        self.n_ctx = n_ctx
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)

    def logits(self, ids: Iterable[int]) -> torch.Tensor:
        """(L, V) float32 logits of every position of one window."""
        ids = [int(t) for t in ids]
        if len(ids) > self.n_ctx:
            raise ValueError(f"window of {len(ids)} tokens is longer than the context {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(self.llm.scores[: len(ids)].copy())

    def log_probs(self, ids: Iterable[int]) -> torch.Tensor:
        """(L-1, V) float32 log-probabilities of the tokens after positions 0..L-2."""
        return torch.log_softmax(self.logits(ids)[:-1].float(), dim=-1)

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "GGUFRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def compare_gguf(path: str | os.PathLike, windows: torch.Tensor,
                 references: dict[str, Callable[[int], torch.Tensor]], n_threads: int | None = None) -> dict:
    """Perplexity of the GGUF at `path` on `windows` (n, L) LongTensor, and per reference its KL
    to and top-1 agreement with it: `references[name](i)` gives the (L-1, V) log-probabilities
    of window i (e.g. the float model's, or mixq's evaluation of the same checkpoint). Returns
    {"nll", "ppl", "n_windows", "seqlen", "n_tokens", name: {"kl", "top1_agree"}, ...}."""
    n, seqlen = windows.shape
    nll = 0.0
    sums = {name: [0.0, 0] for name in references}
    with GGUFRunner(path, n_ctx=seqlen, n_threads=n_threads) as run:
        for i in range(n):
            logp = run.log_probs(windows[i].tolist())  # (L-1, V)
            nll += float(_window_nll(logp[None], windows[i : i + 1]).sum())
            for name, reference in references.items():
                k, a = _kl_and_agree(reference(i)[None].float(), logp[None])
                sums[name][0] += k
                sums[name][1] += a
    n_tok = n * (seqlen - 1)
    out = {"nll": nll / n_tok, "ppl": float(torch.exp(torch.tensor(nll / n_tok))), "n_windows": n, "seqlen": seqlen,
           "n_tokens": n_tok}
    for name, (k, a) in sums.items():
        out[name] = {"kl": k / n_tok, "top1_agree": a / n_tok}
    return out

"""Perplexity and KL divergence to the float model, over fixed token windows.

For windows (n, L), token t of each window (t = 1..L-1) is predicted from tokens 0..t-1 of
the same window, so a run scores exactly n * (L - 1) tokens with one forward pass per
window. `nll` is the mean negative log-likelihood per token (nats), `ppl = exp(nll)`.

With a reference (the float model), the same positions also give
`kl = mean_t KL(P_ref,t || P_model,t)` (nats per token) and `top1_agree`, the fraction of
positions where both models' most likely next token is the same. Everything is computed
in float32 from `log_softmax` of the logits, sums accumulated in float64.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from mixq.errors import DataError
from mixq.eval.common import logits_of, model_device
from mixq.progress import Progress, track

# Positions per chunk when forming the (positions, vocab) KL terms, to bound temporaries.
_KL_CHUNK = 256


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise DataError("windows must be a LongTensor (n_windows, seqlen); see mixq.data.token_windows")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise DataError(f"windows {tuple(windows.shape)}: need at least one window of at least 2 tokens")
    return windows


def _next_token_log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities (B, L-1, V) of the tokens after positions 0..L-2."""
    logits = logits_of(model, ids)[:, :-1]  # (B, L-1, V)
    return torch.log_softmax(logits.float(), dim=-1)


def _window_nll(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL per window, float64 (B,), of targets ids[:, 1:] under logp (B, L-1, V)."""
    target_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
    return -target_logp.double().sum(-1)


def _kl_and_agree(ref_logp: torch.Tensor, logp: torch.Tensor) -> tuple[float, int]:
    """Sum over positions of KL(ref || model) and count of argmax agreements."""
    if ref_logp.shape != logp.shape:
        raise DataError(f"reference log-probs {tuple(ref_logp.shape)} and model log-probs {tuple(logp.shape)} differ (vocab size?)")
    kl_sum = 0.0
    agree = 0
    ref_flat, flat = ref_logp.flatten(0, 1), logp.flatten(0, 1)  # (B*(L-1), V)
    for s in range(0, ref_flat.shape[0], _KL_CHUNK):
        r, m = ref_flat[s : s + _KL_CHUNK], flat[s : s + _KL_CHUNK]
        # KL(P_ref || P) = sum_v p_ref(v) * (log p_ref(v) - log p(v)); 0 * (-inf) counts as 0.
        kl = torch.nn.functional.kl_div(m, r, reduction="none", log_target=True).sum(-1)  # (chunk,)
        kl_sum += kl.double().sum().item()
        agree += int((r.argmax(-1) == m.argmax(-1)).sum().item())
    return kl_sum, agree


def _fingerprint(model: torch.nn.Module) -> list[tuple[str, float, float]]:
    """Names, sums and norms of every parameter: changes when the weights change."""
    with torch.inference_mode():
        return [
            (name, p.detach().float().sum().item(), torch.linalg.vector_norm(p.detach().float()).item())
            for name, p in model.named_parameters()
        ]


class FloatReference:
    """The float model's next-token log-probs on a fixed set of windows, computed once.

    `log_probs(indices)` returns float32 log-probs (B, L-1, V) for windows `indices`. Each
    window is computed on first use; its log-probs are kept (on `cache_device`, default the
    model's device) while the cache stays under `cache_bytes`, and recomputed on demand
    beyond that. A window costs (seqlen - 1) * vocab * 4 bytes (SmolLM2 at seqlen 2048:
    0.4 GB). The float model's own NLL is recorded on the first pass over each window, so
    `metrics()` plus evaluating N other models costs 1 + N forward passes per cached window.

    Recomputing needs the float model unchanged: every recomputation checks its weights
    against those seen at construction and raises `DataError` if they differ (e.g. the
    model was fake-quantized in place). To quantize the same module in place with windows
    beyond the cache, pass `copy_model=True` (a private deep copy on the same device).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        windows: torch.Tensor,
        cache_bytes: float = 6e9,
        cache_device: str | torch.device | None = None,
        batch_size: int = 1,
        copy_model: bool = False,
    ) -> None:
        self.model = copy.deepcopy(model) if copy_model else model
        self.windows = _check_windows(windows).cpu()
        self.cache_bytes = float(cache_bytes)
        self.cache_device = torch.device(cache_device) if cache_device is not None else model_device(model)
        self.batch_size = int(batch_size)
        self.n_forward = 0  # forward passes run on the float model (each of one batch)
        self._cache: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0
        self._nll: dict[int, float] = {}
        self._bytes_per_window = 0
        self._weights = _fingerprint(self.model)

    @classmethod
    def from_log_probs(cls, windows: torch.Tensor, log_probs: torch.Tensor) -> FloatReference:
        """A reference whose log-probs (n, L-1, V) were computed elsewhere (e.g. block by
        block, `eval.streamed.streamed_log_probs`); every window is cached, none recomputed."""
        windows = _check_windows(windows).cpu()
        n, seqlen = windows.shape
        if log_probs.dim() != 3 or tuple(log_probs.shape[:2]) != (n, seqlen - 1):
            raise DataError(f"log-probs {tuple(log_probs.shape)} do not fit windows {tuple(windows.shape)}")
        ref = cls.__new__(cls)
        ref.model = None
        ref.windows = windows
        ref.cache_bytes = float("inf")
        ref.cache_device = log_probs.device
        ref.batch_size = 1
        ref.n_forward = 0
        ref._cache = {i: log_probs[i] for i in range(n)}
        ref._bytes_per_window = log_probs[0].numel() * log_probs.element_size()
        ref._cached_bytes = n * ref._bytes_per_window
        nll = _window_nll(log_probs, windows[:, :].to(log_probs.device))
        ref._nll = {i: float(nll[i]) for i in range(n)}
        ref._weights = None
        return ref

    @property
    def n_cached(self) -> int:
        """How many windows' log-probs are held in the cache."""
        return len(self._cache)

    def check_windows(self, windows: torch.Tensor) -> None:
        """Raise `DataError` unless `windows` are the windows this reference was built on."""
        if windows.shape != self.windows.shape or not torch.equal(windows.cpu(), self.windows):
            raise DataError(
                f"windows {tuple(windows.shape)} are not the windows {tuple(self.windows.shape)} "
                "this FloatReference was built on"
            )

    def _compute(self, indices: list[int]) -> torch.Tensor:
        if self.n_forward and _fingerprint(self.model) != self._weights:
            n, seqlen = self.windows.shape
            raise DataError(
                "the float reference model's weights changed since FloatReference was built, "
                f"and window(s) {indices} must be recomputed ({self.n_cached} of {n} windows cached in "
                f"cache_bytes={self.cache_bytes:.3g}; all need {n * self._bytes_per_window:.3g}); "
                "pass copy_model=True or a larger cache_bytes"
            )
        device = model_device(self.model)
        ids = self.windows[indices].to(device)  # (B, L)
        with torch.inference_mode():
            logp = _next_token_log_probs(self.model, ids)  # (B, L-1, V)
            nll = _window_nll(logp, ids)
        self.n_forward += 1
        self._bytes_per_window = logp[0].numel() * logp.element_size()
        for j, i in enumerate(indices):
            self._nll.setdefault(i, float(nll[j]))
            if i not in self._cache and self._cached_bytes + self._bytes_per_window <= self.cache_bytes:
                self._cache[i] = logp[j].to(self.cache_device, copy=True)
                self._cached_bytes += self._bytes_per_window
        return logp

    def log_probs(self, indices: int | Sequence[int]) -> torch.Tensor:
        """float32 log-probs (B, L-1, V) of windows `indices` (an int gives (L-1, V)), on
        the model's device."""
        single = isinstance(indices, int)
        idx = [indices] if single else [int(i) for i in indices]
        device = model_device(self.model) if self.model is not None else self.cache_device
        missing = [i for i in idx if i not in self._cache]
        fresh = dict(zip(missing, self._compute(missing))) if missing else {}
        out = torch.stack([fresh[i] if i in fresh else self._cache[i].to(device) for i in idx])
        return out[0] if single else out

    def metrics(self, progress: Progress | None = None) -> dict:
        """The float model's own `ppl`, `nll`, `n_tokens`, `seqlen`, `n_windows`, computing
        (and caching) the windows not seen yet."""
        todo = [i for i in range(len(self.windows)) if i not in self._nll]
        batches = [todo[s : s + self.batch_size] for s in range(0, len(todo), self.batch_size)]
        for batch in track(batches, "float reference", len(batches), progress):
            self._compute(batch)
        n, seqlen = self.windows.shape
        return _summary(sum(self._nll[i] for i in range(n)), n, seqlen)


def _summary(nll_sum: float, n_windows: int, seqlen: int) -> dict:
    n_tokens = n_windows * (seqlen - 1)
    nll = nll_sum / n_tokens
    return {
        "ppl": float(torch.tensor(nll, dtype=torch.float64).exp()),
        "nll": nll,
        "n_tokens": n_tokens,
        "seqlen": seqlen,
        "n_windows": n_windows,
    }


def lm_eval(
    model: torch.nn.Module,
    windows: torch.Tensor,
    reference: FloatReference | torch.nn.Module | None = None,
    progress: Progress | None = None,
    batch_size: int = 1,
) -> dict:
    """Token-level perplexity of `model` on `windows` (n, L), with one forward per window.

    Returns `ppl`, `nll` (mean nats per token), `n_tokens` (= n * (L-1)), `seqlen`,
    `n_windows`; with a `reference` (a `FloatReference` on the same windows, or the float
    model itself, evaluated without caching) also `kl` (mean KL(P_ref || P_model) per
    token, nats), `top1_agree` (fraction of positions with the same argmax) and `ref_ppl`.
    Raises `DataError` if the model produces non-finite log-probabilities.
    """
    windows = _check_windows(windows)
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    if reference is not None and not isinstance(reference, FloatReference):
        reference = FloatReference(reference, windows, cache_bytes=0)
    if reference is not None:
        reference.check_windows(windows)
    device = model_device(model)
    n, seqlen = windows.shape
    nll_sum, kl_sum, agree = 0.0, 0.0, 0
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    with torch.inference_mode():
        for idx in track(batches, "perplexity", len(batches), progress):
            ids = windows[idx].to(device)  # (B, L)
            logp = _next_token_log_probs(model, ids)  # (B, L-1, V)
            nll = _window_nll(logp, ids)
            if not torch.isfinite(nll).all():
                raise DataError(f"model gives non-finite log-probabilities on window(s) {idx}")
            nll_sum += nll.sum().item()
            if reference is not None:
                kl, a = _kl_and_agree(reference.log_probs(idx).to(logp.device), logp)
                kl_sum += kl
                agree += a
    out = _summary(nll_sum, n, seqlen)
    if reference is not None:
        out["kl"] = kl_sum / out["n_tokens"]
        out["top1_agree"] = agree / out["n_tokens"]
        out["ref_ppl"] = reference.metrics()["ppl"]
    return out

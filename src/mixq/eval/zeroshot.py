"""Zero-shot multiple-choice and last-word accuracy, scored as lm-evaluation-harness does.

Tokenization of a (context, continuation) pair: the context's trailing whitespace is moved
to the front of the continuation (lm-evaluation-harness's `_encode_pair`), then
`whole = encode(context + continuation)`, `n_ctx = len(encode(context))`, and the
continuation's tokens are `whole[n_ctx:]`. The model reads `whole` and each continuation
token is scored from the logits at the position before it. (A tokenizer that merges
across the boundary shifts one token between the two parts; the harness accepts the same.)

Multiple choice: `acc` picks the choice with the largest summed log-probability; `acc_norm`
the largest summed log-probability divided by the UTF-8 byte length of the choice text
(the continuation without its separating leading whitespace: the harness divides by the
character length of the choice, the same for ASCII text). Ties go to the first choice.
LAMBADA: `acc` is the fraction of examples whose every target token is the greedy argmax;
`ppl` is exp of minus the mean per-example target log-likelihood; `acc_norm` is None.

The choices of one example (or of `examples_per_batch` examples) run as one forward,
right-padded: a causal model's logits at real positions never see the padding after them.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from mixq.data.tasks import TASK_NAMES, Example, LastWordExample, MCExample, load_task
from mixq.errors import DataError
from mixq.eval.common import logits_of, model_device
from mixq.progress import Progress, track

TASKS: tuple[str, ...] = TASK_NAMES
Encode = Callable[[str], Sequence[int]]

_PAD_ID = 0  # any valid id: padding only ever follows the real tokens (causal model)


def encode_pair(encode: Encode, context: str, continuation: str, max_length: int | None = None) -> tuple[list[int], int]:
    """Token ids of `context + continuation` and how many of them belong to the context.

    With `max_length`, tokens are dropped from the left of the context to fit; at least one
    context token must remain. Raises `DataError` for an empty context or a continuation
    that adds no tokens.
    """
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    n_ctx = len(list(encode(context)))
    whole = list(encode(context + continuation))
    if n_ctx == 0:
        raise DataError("empty context: there is nothing to predict the first continuation token from")
    if len(whole) <= n_ctx:
        raise DataError(f"continuation {continuation!r} adds no tokens after its context")
    if max_length is not None and len(whole) > max_length:
        cut = len(whole) - max_length
        if cut >= n_ctx:
            raise DataError(f"continuation of {len(whole) - n_ctx} tokens does not fit max_length={max_length} with context")
        whole, n_ctx = whole[cut:], n_ctx - cut
    return whole, n_ctx


def _score(model: torch.nn.Module, pairs: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, all continuation tokens greedy) for each pair, in one
    right-padded forward."""
    device = model_device(model)
    max_len = max(len(ids) for ids, _ in pairs)
    batch = torch.full((len(pairs), max_len), _PAD_ID, dtype=torch.long)  # (B, Lmax)
    for i, (ids, _) in enumerate(pairs):
        batch[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    batch = batch.to(device)
    logits = logits_of(model, batch)  # (B, Lmax, V)
    out = []
    for i, (ids, n_ctx) in enumerate(pairs):
        # Logits at position t predict token t+1: the continuation ids[n_ctx:] is predicted
        # from positions n_ctx-1 .. len(ids)-2.
        logp = torch.log_softmax(logits[i, n_ctx - 1 : len(ids) - 1].float(), dim=-1)  # (n_cont, V)
        target = batch[i, n_ctx : len(ids)]  # (n_cont,)
        ll = logp.gather(-1, target[:, None]).double().sum().item()
        greedy = bool((logp.argmax(-1) == target).all().item())
        out.append((ll, greedy))
    return out


def continuation_logprobs(
    model: torch.nn.Module,
    encode: Encode,
    contexts: Sequence[str],
    continuations: Sequence[str],
    max_length: int | None = None,
) -> list[tuple[float, bool]]:
    """For each (context, continuation): the summed log-probability of the continuation's
    tokens given the context, and whether greedy decoding reproduces them all. One forward."""
    pairs = [encode_pair(encode, c, x, max_length) for c, x in zip(contexts, continuations, strict=True)]
    with torch.inference_mode():
        return _score(model, pairs)


def _choice_bytes(continuation: str) -> int:
    return max(1, len(continuation.lstrip().encode("utf-8")))


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def zero_shot(
    model: torch.nn.Module,
    encode: Encode,
    task: str | Sequence[Example],
    limit: int | None = None,
    progress: Progress | None = None,
    examples_per_batch: int = 1,
    max_length: int | None = None,
) -> dict:
    """Zero-shot accuracy of `model` on `task` (a name in `TASKS`, or a list of examples).

    Returns `{"task", "acc", "acc_norm", "n"}` (LAMBADA: `acc_norm` None, plus `ppl`).
    `limit` takes the first examples (deterministic); `examples_per_batch` examples share
    one padded forward; `max_length` truncates long contexts from the left.
    """
    name = task if isinstance(task, str) else "custom"
    examples = load_task(task, limit) if isinstance(task, str) else list(task)[:limit]
    if not examples:
        raise DataError(f"task {name!r}: no examples to evaluate")
    kinds = {type(e) for e in examples}
    if len(kinds) != 1 or not kinds <= {MCExample, LastWordExample}:
        raise DataError(f"task {name!r}: expected only MCExample or only LastWordExample, got {sorted(k.__name__ for k in kinds)}")
    if examples_per_batch < 1:
        raise DataError(f"examples_per_batch must be positive, got {examples_per_batch}")
    batches = [examples[s : s + examples_per_batch] for s in range(0, len(examples), examples_per_batch)]
    correct = correct_norm = 0
    ll_total = 0.0
    with torch.inference_mode():
        for batch in track(batches, f"zero-shot {name}", len(batches), progress):
            pairs: list[tuple[list[int], int]] = []
            for ex in batch:
                if isinstance(ex, LastWordExample):
                    pairs.append(encode_pair(encode, ex.context, ex.target, max_length))
                else:
                    pairs += [encode_pair(encode, c, x, max_length) for c, x in zip(ex.contexts, ex.continuations)]
            scores = _score(model, pairs)
            pos = 0
            for ex in batch:
                if isinstance(ex, LastWordExample):
                    ll, greedy = scores[pos]
                    pos += 1
                    correct += greedy
                    ll_total += ll
                    continue
                k = len(ex.contexts)
                lls = [s[0] for s in scores[pos : pos + k]]
                pos += k
                correct += _argmax(lls) == ex.gold
                normed = [ll / _choice_bytes(x) for ll, x in zip(lls, ex.continuations)]
                correct_norm += _argmax(normed) == ex.gold
    n = len(examples)
    if isinstance(examples[0], LastWordExample):
        return {"task": name, "acc": correct / n, "acc_norm": None, "n": n, "ppl": math.exp(-ll_total / n)}
    return {"task": name, "acc": correct / n, "acc_norm": correct_norm / n, "n": n}

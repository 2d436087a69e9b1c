"""Zero-shot multiple-choice and last-word accuracy, scored as lm-evaluation-harness does.

Two steps with a seam between them:

1. `task_requests` (pure: text and a tokenizer in, token ids out) turns each example into
   `Request`s, one per choice: the context ids the model reads (the tokenizer's BOS first
   where it adds one) and the continuation ids that are scored.
2. `score_requests` asks a `LogprobFn` -- `requests -> [(sum of continuation log-probs,
   all continuation tokens greedy)]` -- for the scores and turns them into metrics.
   `model_logprobs(model)` is the plain one (right-padded forwards of the whole model); a
   block-streaming executor plugs in the same way.

Tokenization of a (context, continuation) pair: the context's trailing whitespace is moved
to the front of the continuation (lm-evaluation-harness's `_encode_pair`), then
`whole = encode(context + continuation)`, `n_ctx = len(encode(context))`, and the
continuation's tokens are `whole[n_ctx:]`. With a BOS, both are preceded by it. (A
tokenizer that merges across the boundary shifts one token between the two parts; the
harness accepts the same.)

Metrics: `acc` picks the choice with the largest summed log-probability; `acc_norm` the
largest summed log-probability divided by the UTF-8 byte length of the choice text (the
continuation without its separating whitespace: the harness divides by the character
length, the same for ASCII). Ties go to the first choice. `acc_norm` is reported only where
the harness reports it (`HARNESS_METRICS`): not for BoolQ, COPA, WinoGrande, nor for a
custom task whose choices are all single words (" yes"/" no": the length normalisation
would only add a bias towards the shorter word); it is None there. `metric` names the
harness's headline metric of the task. LAMBADA: `acc` is the fraction of examples whose
every target token is the greedy argmax; `ppl` is exp of minus the mean per-example target
log-likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from mixq.data.tasks import TASK_NAMES, Example, LastWordExample, MCExample, load_task
from mixq.data.tokenize import bos_of
from mixq.errors import DataError
from mixq.eval.common import logits_of, model_device
from mixq.models.support import context_length
from mixq.progress import Progress, track

TASKS: tuple[str, ...] = TASK_NAMES
Encode = Callable[[str], Sequence[int]]

# The metrics lm-evaluation-harness reports per task (its task configs' metric_list),
# headline first.
HARNESS_METRICS: dict[str, tuple[str, ...]] = {
    "piqa": ("acc_norm", "acc"),
    "arc_easy": ("acc_norm", "acc"),
    "arc_challenge": ("acc_norm", "acc"),
    "hellaswag": ("acc_norm", "acc"),
    "openbook_qa": ("acc_norm", "acc"),
    "boolq": ("acc",),
    "copa": ("acc",),
    "winogrande": ("acc",),
    "lambada": ("acc",),
}

_PAD_ID = 0  # any valid id: padding only ever follows the real tokens (causal model)


@dataclass(frozen=True)
class Request:
    """One scoring request: the model reads `context + continuation`; the continuation's
    tokens are scored, each from the position before it."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class ExampleRequests:
    """The requests of one example: one per choice (one for a last-word example), the gold
    choice (None for last-word) and each choice's byte length (for acc_norm)."""

    requests: tuple[Request, ...]
    gold: int | None
    choice_bytes: tuple[int, ...]


# requests -> [(sum of continuation log-probs, every continuation token greedy)]
LogprobFn = Callable[[list[Request]], list[tuple[float, bool]]]


def encode_pair(encode: Encode, context: str, continuation: str, max_length: int | None = None) -> tuple[list[int], int]:
    """Token ids of `context + continuation` and how many of them are context.

    Where the tokenizer adds a BOS (`bos_of(encode)`), the ids start with it and it counts
    as context. With `max_length`, tokens are dropped from the left of the context (after
    the BOS) to fit; at least one context token must remain. Raises `DataError` for an empty
    context (without a BOS) or a continuation that adds no tokens.
    """
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    bos = bos_of(encode)
    head = [bos] if bos is not None else []
    n_ctx = len(head) + len(list(encode(context)))
    whole = head + list(encode(context + continuation))
    if n_ctx == 0:
        raise DataError("empty context: there is nothing to predict the first continuation token from")
    if len(whole) <= n_ctx:
        raise DataError(f"continuation {continuation!r} adds no tokens after its context")
    if max_length is not None and len(whole) > max_length:
        cut = len(whole) - max_length
        if cut >= n_ctx:  # at least one context token (the BOS, where there is one) stays
            raise DataError(f"continuation of {len(whole) - n_ctx} tokens does not fit max_length={max_length} with context")
        whole, n_ctx = head + whole[len(head) + cut:], n_ctx - cut
    return whole, n_ctx


def _request(encode: Encode, context: str, continuation: str, max_length: int | None) -> Request:
    ids, n_ctx = encode_pair(encode, context, continuation, max_length)
    return Request(tuple(ids[:n_ctx]), tuple(ids[n_ctx:]))


def _choice_bytes(continuation: str) -> int:
    return max(1, len(continuation.lstrip().encode("utf-8")))


def task_examples(task: str | Sequence[Example], limit: int | None = None) -> tuple[str, list[Example]]:
    """(name, the first `limit` examples) of a task name or an example list, checked to be
    all `MCExample` or all `LastWordExample`."""
    name = task if isinstance(task, str) else "custom"
    examples = load_task(task, limit) if isinstance(task, str) else list(task)[:limit]
    if not examples:
        raise DataError(f"task {name!r}: no examples to evaluate")
    kinds = {type(e) for e in examples}
    if len(kinds) != 1 or not kinds <= {MCExample, LastWordExample}:
        raise DataError(f"task {name!r}: expected only MCExample or only LastWordExample, got {sorted(k.__name__ for k in kinds)}")
    return name, examples


def task_requests(encode: Encode, examples: Sequence[Example], max_length: int | None = None) -> list[ExampleRequests]:
    """Pure: the token requests of each example (see the module docstring)."""
    out = []
    for ex in examples:
        if isinstance(ex, LastWordExample):
            out.append(ExampleRequests((_request(encode, ex.context, ex.target, max_length),), None, (1,)))
        else:
            reqs = tuple(_request(encode, c, x, max_length) for c, x in zip(ex.contexts, ex.continuations))
            out.append(ExampleRequests(reqs, ex.gold, tuple(_choice_bytes(x) for x in ex.continuations)))
    return out


def task_metrics(name: str, examples: Sequence[Example]) -> tuple[str, ...]:
    """The metrics reported for task `name`, headline first: the harness's for built-in
    tasks; for a custom multiple-choice task acc_norm and acc, or acc alone when every
    choice is a single word."""
    if name in HARNESS_METRICS:
        return HARNESS_METRICS[name]
    if isinstance(examples[0], LastWordExample):
        return ("acc",)
    single = all(len(x.split()) == 1 for ex in examples for x in ex.continuations)
    return ("acc",) if single else ("acc_norm", "acc")


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_requests(name: str, items: Sequence[ExampleRequests], logprobs: LogprobFn, metrics: Sequence[str],
                   progress: Progress | None = None, examples_per_batch: int = 1) -> dict:
    """Metrics of a task from its requests and a `LogprobFn`: `{"task", "acc", "acc_norm",
    "metric", "n"}` (+ `ppl` for last-word tasks). `examples_per_batch` examples' requests
    go to `logprobs` in one call."""
    if examples_per_batch < 1:
        raise DataError(f"examples_per_batch must be positive, got {examples_per_batch}")
    batches = [items[s : s + examples_per_batch] for s in range(0, len(items), examples_per_batch)]
    correct = correct_norm = 0
    ll_total = 0.0
    for batch in track(batches, f"zero-shot {name}", len(batches), progress):
        scores = logprobs([r for item in batch for r in item.requests])
        pos = 0
        for item in batch:
            k = len(item.requests)
            lls = [s[0] for s in scores[pos : pos + k]]
            if item.gold is None:  # last word: right when every target token is greedy
                correct += scores[pos][1]
                ll_total += lls[0]
            else:
                correct += _argmax(lls) == item.gold
                correct_norm += _argmax([ll / b for ll, b in zip(lls, item.choice_bytes)]) == item.gold
            pos += k
    n = len(items)
    out = {"task": name, "acc": correct / n, "acc_norm": correct_norm / n if "acc_norm" in metrics else None,
           "metric": metrics[0], "n": n}
    if items[0].gold is None:
        out["ppl"] = math.exp(-ll_total / n)
    return out


def _score(model: torch.nn.Module, requests: Sequence[Request]) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, all continuation tokens greedy) for each request, in
    one right-padded forward: a causal model's logits at real positions never see the
    padding after them."""
    device = model_device(model)
    seqs = [r.context + r.continuation for r in requests]
    batch = torch.full((len(seqs), max(map(len, seqs))), _PAD_ID, dtype=torch.long)  # (B, Lmax)
    for i, ids in enumerate(seqs):
        batch[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    batch = batch.to(device)
    logits = logits_of(model, batch)  # (B, Lmax, V)
    out = []
    for i, r in enumerate(requests):
        n_ctx, n = len(r.context), len(seqs[i])
        # Logits at position t predict token t+1: the continuation is predicted from
        # positions n_ctx-1 .. n-2.
        logp = torch.log_softmax(logits[i, n_ctx - 1 : n - 1].float(), dim=-1)  # (n_cont, V)
        target = batch[i, n_ctx:n]  # (n_cont,)
        ll = logp.gather(-1, target[:, None]).double().sum().item()
        greedy = bool((logp.argmax(-1) == target).all().item())
        out.append((ll, greedy))
    return out


def model_logprobs(model: torch.nn.Module) -> LogprobFn:
    """The plain `LogprobFn` of a whole model: one right-padded forward per call."""

    def logprobs(requests: list[Request]) -> list[tuple[float, bool]]:
        with torch.inference_mode():
            return _score(model, requests)

    return logprobs


def continuation_logprobs(
    model: torch.nn.Module,
    encode: Encode,
    contexts: Sequence[str],
    continuations: Sequence[str],
    max_length: int | None = None,
) -> list[tuple[float, bool]]:
    """For each (context, continuation): the summed log-probability of the continuation's
    tokens given the context, and whether greedy decoding reproduces them all. One forward."""
    reqs = [_request(encode, c, x, max_length) for c, x in zip(contexts, continuations, strict=True)]
    return model_logprobs(model)(reqs)


def zero_shot(
    model: torch.nn.Module,
    encode: Encode,
    task: str | Sequence[Example],
    limit: int | None = None,
    progress: Progress | None = None,
    examples_per_batch: int = 1,
    max_length: int | None = None,
    logprobs: LogprobFn | None = None,
) -> dict:
    """Zero-shot accuracy of `model` on `task` (a name in `TASKS`, or a list of examples).

    Returns `{"task", "acc", "acc_norm", "metric", "n"}` (LAMBADA: `acc_norm` None, plus
    `ppl`); `acc_norm` is None where the harness does not report it, and `metric` names the
    headline. `limit` takes the first examples (deterministic); `examples_per_batch`
    examples share one padded forward; `max_length` (default: the model's context)
    truncates long contexts from the left. `logprobs` replaces the plain whole-model scorer.
    """
    name, examples = task_examples(task, limit)
    if max_length is None:
        max_length = context_length(model)
    items = task_requests(encode, examples, max_length)
    return score_requests(name, items, logprobs or model_logprobs(model), task_metrics(name, examples), progress,
                          examples_per_batch)

"""mixq.eval: perplexity, KL to the float model, FloatReference, zero-shot scoring, top-1."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mixq.data import LastWordExample, MCExample, load_text, token_windows
from mixq.errors import DataError
from mixq.eval import FloatReference, continuation_logprobs, encode_pair, lm_eval, logits_of, top1, zero_shot
from mixq.eval.zeroshot import Request, score_requests, task_metrics, task_requests

TEXT = "".join(chr(32 + (i * 7919 + i * i) % 95) for i in range(2000))  # printable ASCII, varied


@pytest.fixture(scope="module")
def windows(char_encode):
    return token_windows(char_encode, TEXT, seqlen=32, n_windows=6)  # (6, 32)


def perturbed(model: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """A copy of `model` with every weight matrix multiplied by (1 + scale * noise)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(1 + scale * torch.randn(p.shape, generator=g))
    return m


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, task, done, total):
        self.calls.append((task, done, total))


# ---------------------------------------------------------------- perplexity


def test_ppl_matches_hand_computed_cross_entropy(tiny_llama, windows):
    r = lm_eval(tiny_llama, windows[:1])
    with torch.no_grad():
        logits = tiny_llama(windows[:1]).logits[0]  # (L, V)
    ce = torch.nn.functional.cross_entropy(logits[:-1].double(), windows[0, 1:])
    assert r["n_tokens"] == 31 and r["seqlen"] == 32 and r["n_windows"] == 1
    assert r["nll"] == pytest.approx(ce.item(), rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(ce.item()), rel=1e-5)


def test_token_counts_and_batching(tiny_llama, windows):
    prog = Recorder()
    a = lm_eval(tiny_llama, windows, progress=prog)
    b = lm_eval(tiny_llama, windows, batch_size=4)
    assert a["n_tokens"] == 6 * 31 and a["n_windows"] == 6
    assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-5)
    assert prog.calls[0] == ("perplexity", 0, 6) and prog.calls[-1] == ("perplexity", 6, 6)
    # mean NLL over windows = mean of per-window NLLs (equal token counts)
    per_window = [lm_eval(tiny_llama, windows[i : i + 1])["nll"] for i in range(6)]
    assert a["nll"] == pytest.approx(sum(per_window) / 6, rel=1e-6)


def test_kl_to_itself_is_zero(tiny_llama, windows):
    r = lm_eval(tiny_llama, windows, reference=tiny_llama)
    assert abs(r["kl"]) < 1e-6 and r["top1_agree"] == 1.0
    assert r["ref_ppl"] == pytest.approx(r["ppl"], rel=1e-6)
    ref = FloatReference(tiny_llama, windows)
    r2 = lm_eval(tiny_llama, windows, reference=ref)
    assert abs(r2["kl"]) < 1e-6 and r2["top1_agree"] == 1.0


def test_kl_grows_with_perturbation(tiny_llama, windows):
    ref = FloatReference(tiny_llama, windows)
    small = lm_eval(perturbed(tiny_llama, 0.05), windows, reference=ref)
    large = lm_eval(perturbed(tiny_llama, 0.5), windows, reference=ref)
    assert 0 < small["kl"] < large["kl"]
    assert large["top1_agree"] < 1.0
    # the same KL computed by hand for one window
    m = perturbed(tiny_llama, 0.5)
    with torch.no_grad():
        p_ref = torch.log_softmax(tiny_llama(windows[:1]).logits[0, :-1].float(), -1)
        p_q = torch.log_softmax(m(windows[:1]).logits[0, :-1].float(), -1)
    kl = (p_ref.exp() * (p_ref - p_q)).sum(-1).mean()
    one = lm_eval(m, windows[:1], reference=tiny_llama)
    assert one["kl"] == pytest.approx(kl.item(), rel=1e-4)
    agree = (p_ref.argmax(-1) == p_q.argmax(-1)).float().mean()
    assert one["top1_agree"] == pytest.approx(agree.item())


def test_float_reference_cache_gives_same_numbers(tiny_llama, windows):
    q = perturbed(tiny_llama, 0.2)
    per_window_bytes = 31 * 128 * 4
    refs = {
        "none": FloatReference(tiny_llama, windows, cache_bytes=0),
        "part": FloatReference(tiny_llama, windows, cache_bytes=2.5 * per_window_bytes),
        "all": FloatReference(tiny_llama, windows),
    }
    results = {k: lm_eval(q, windows, reference=r) for k, r in refs.items()}
    assert refs["none"].n_cached == 0 and refs["part"].n_cached == 2 and refs["all"].n_cached == 6
    for k in ("none", "part"):
        for key in ("kl", "top1_agree", "ppl", "ref_ppl"):
            assert results[k][key] == pytest.approx(results["all"][key], rel=1e-6, abs=1e-9)
    float_metrics = lm_eval(tiny_llama, windows)
    for r in refs.values():
        assert r.metrics()["ppl"] == pytest.approx(float_metrics["ppl"], rel=1e-6)
    # fully cached: float + N formats cost 1 + N passes per window
    assert refs["all"].n_forward == 6
    lm_eval(perturbed(tiny_llama, 0.1), windows, reference=refs["all"])
    assert refs["all"].n_forward == 6
    # uncached windows are recomputed on demand
    lm_eval(q, windows, reference=refs["part"])
    assert refs["part"].n_forward == 6 + 4


def test_float_reference_batched(tiny_llama, windows):
    ref = FloatReference(tiny_llama, windows, batch_size=4)
    prog = Recorder()
    m = ref.metrics(progress=prog)
    assert ref.n_forward == 2 and prog.calls[-1] == ("float reference", 2, 2)
    assert m["n_tokens"] == 6 * 31
    r = lm_eval(perturbed(tiny_llama, 0.1), windows, reference=ref, batch_size=3)
    assert ref.n_forward == 2 and r["kl"] > 0


def test_float_reference_detects_changed_model(tiny_llama, windows):
    model = copy.deepcopy(tiny_llama)
    ref = FloatReference(model, windows, cache_bytes=0)
    ref.metrics()
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    with pytest.raises(DataError, match="changed.*copy_model=True"):
        lm_eval(tiny_llama, windows, reference=ref)
    # a private copy keeps the reference valid while the caller's module changes in place
    model = copy.deepcopy(tiny_llama)
    ref = FloatReference(model, windows, cache_bytes=0, copy_model=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    r = lm_eval(model, windows, reference=ref)
    assert r["ref_ppl"] == pytest.approx(lm_eval(tiny_llama, windows)["ppl"], rel=1e-6) and r["kl"] > 0


def test_reference_windows_must_match(tiny_llama, windows):
    ref = FloatReference(tiny_llama, windows)
    with pytest.raises(DataError, match="not the windows"):
        lm_eval(tiny_llama, windows[:3], reference=ref)


class Constant(torch.nn.Module):
    """Returns fixed logits (as a tensor, or a tuple) whatever the input."""

    def __init__(self, row: torch.Tensor, as_tuple: bool = False):
        super().__init__()
        self.row = torch.nn.Parameter(row)
        self.as_tuple = as_tuple

    def forward(self, ids):
        out = self.row.expand(*ids.shape, -1)
        return (out,) if self.as_tuple else out


def test_plain_modules_and_uniform_model(windows):
    uniform = Constant(torch.zeros(128))
    r = lm_eval(uniform, windows)
    assert r["ppl"] == pytest.approx(128.0, rel=1e-6)  # uniform over the vocabulary
    assert logits_of(Constant(torch.zeros(128), as_tuple=True), windows).shape == (6, 32, 128)
    with pytest.raises(DataError, match="non-finite"):
        lm_eval(Constant(torch.full((128,), float("nan"))), windows)


# ---------------------------------------------------------------- zero-shot

BIG = 10.0
V = 128
L_HIT = BIG - math.log(math.exp(BIG) + V - 1)  # log p of the predicted next token
L_MISS = -math.log(math.exp(BIG) + V - 1)  # log p of any other token


class Counting(torch.nn.Module):
    """Predicts next token = current token + 1 with logit BIG, all others 0."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return BIG * torch.nn.functional.one_hot((ids + 1) % V, V).float() + self.dummy


def test_continuation_logprobs_exact():
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    scores = continuation_logprobs(Counting(), enc, ["abc", "abc", "ab", "az"], [" def", "def", "cde", "cde"])
    assert scores[0][0] == pytest.approx(2 * L_MISS + 2 * L_HIT)  # ' '|c, d|' ' miss; e|d, f|e hit
    assert scores[1] == (pytest.approx(3 * L_HIT), True)
    assert scores[2] == (pytest.approx(3 * L_HIT), True)
    assert scores[3] == (pytest.approx(L_MISS + 2 * L_HIT), False)


def test_encode_pair_moves_trailing_space(char_encode):
    ids, n_ctx = encode_pair(char_encode, "Answer: ", "yes")
    assert n_ctx == len("Answer:") and ids == char_encode("Answer: yes")
    ids, n_ctx = encode_pair(char_encode, "abcdefgh", " ij", max_length=5)
    assert ids == char_encode("fgh ij") [-5:] and n_ctx == 2
    with pytest.raises(DataError):
        encode_pair(char_encode, "", " x")
    with pytest.raises(DataError):
        encode_pair(char_encode, "abc", "")


def test_zero_shot_acc_and_acc_norm():
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    model = Counting()
    examples = [
        MCExample(["abc"] * 2, [" def", " dxq"], 0),  # 2 miss + 2 hit beats 4 miss: right
        # sum prefers the short choice, the byte-normalised score the long one (gold)
        # (a two-word choice: a custom task with multi-word choices reports acc_norm)
        MCExample(["abc"] * 2, [" de", " defg hij"], 1),
        MCExample(["ab", "az"], ["cde", "cde"], 0),  # WinoGrande-style partial scoring
    ]
    prog = Recorder()
    r = zero_shot(model, enc, examples, progress=prog)
    assert r == {"task": "custom", "acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(1.0), "metric": "acc_norm",
                 "n": 3}
    assert prog.calls[-1] == ("zero-shot custom", 3, 3)
    assert zero_shot(model, enc, examples, examples_per_batch=2) == r
    assert zero_shot(model, enc, examples, limit=1)["n"] == 1


def test_zero_shot_single_word_choices_report_acc_only():
    """BoolQ-like choices (" no"/" yes"): the byte normalisation would favour the shorter word,
    so only acc is reported, as lm-evaluation-harness does; the built-in tasks follow the
    harness's metric lists."""
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    # " yes" after "abc" is 4 misses; " no" 3 misses: acc picks " no" on the summed log-prob.
    examples = [MCExample(["abc"] * 2, [" no", " yes"], 0), MCExample(["abc"] * 2, [" no", " yes"], 1)]
    r = zero_shot(Counting(), enc, examples)
    assert r["acc"] == 0.5 and r["acc_norm"] is None and r["metric"] == "acc"
    assert task_metrics("boolq", examples) == ("acc",) and task_metrics("copa", examples) == ("acc",)
    assert task_metrics("winogrande", examples)[0] == "acc"
    assert task_metrics("hellaswag", examples)[0] == "acc_norm" and task_metrics("arc_challenge", examples)[0] == "acc_norm"


def test_zero_shot_requests_and_scorer_are_separate(char_encode):
    """task_requests is pure (ids only); score_requests takes any LogprobFn: a fake one that
    prefers the longest continuation decides acc without a model."""
    examples = [MCExample(["Q:"] * 3, [" a", " bbb", " cc"], 1), MCExample(["Q:"] * 2, [" xx yy", " z"], 1)]
    items = task_requests(char_encode, examples)
    assert items[0].requests[1] == Request(tuple(char_encode("Q:")), tuple(char_encode(" bbb")))
    assert items[0].gold == 1 and items[0].choice_bytes == (1, 3, 2)
    seen = []

    def longest(requests):
        seen.append(len(requests))
        return [(float(len(r.continuation)), False) for r in requests]

    r = score_requests("custom", items, longest, ("acc_norm", "acc"), examples_per_batch=2)
    assert seen == [5]  # both examples' requests in one call
    assert r["acc"] == 0.5 and r["n"] == 2  # example 1 right, example 2 wrong (" xx yy" is longer)
    # acc_norm divides by the choice's bytes (without the space): 2/1 > 4/3, 3/2 picks " a" (wrong);
    # 2/1 > 6/5 picks " z" (right): the opposite of acc on both examples
    assert r["acc_norm"] == 0.5


def test_zero_shot_bos_leads_every_request(tiny_llama, char_encode, bos_encode):
    """With a tokenizer that adds a BOS, each request's context starts with it, and the
    scores are those of the model reading BOS + context + continuation."""
    enc = bos_encode
    ids, n_ctx = encode_pair(enc, "The cat", " sat")
    assert ids == [1] + char_encode("The cat sat") and n_ctx == 1 + len("The cat")
    # an empty context is fine after a BOS: the BOS predicts the first token
    assert encode_pair(enc, "", " x") == ([1] + char_encode(" x"), 1)
    # truncation from the left keeps the BOS
    ids, n_ctx = encode_pair(enc, "abcdefgh", " ij", max_length=6)
    assert ids == [1] + char_encode("gh ij") and n_ctx == 3
    with torch.no_grad():
        full = torch.tensor([[1] + char_encode("The cat sat")])
        logp = torch.log_softmax(tiny_llama(full).logits[0].float(), -1)  # (L, V)
    n_ctx = 1 + len("The cat")
    direct = sum(logp[t - 1, full[0, t]].item() for t in range(n_ctx, full.shape[1]))
    (ll, _), = continuation_logprobs(tiny_llama, enc, ["The cat"], [" sat"])
    assert ll == pytest.approx(direct, rel=1e-5)


def test_zero_shot_last_word():
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    examples = [LastWordExample("abc", "def"), LastWordExample("abc", "dxf")]
    r = zero_shot(Counting(), enc, examples, examples_per_batch=2)
    assert r["acc"] == 0.5 and r["acc_norm"] is None and r["n"] == 2
    mean_ll = (3 * L_HIT + (L_HIT + 2 * L_MISS)) / 2
    assert r["ppl"] == pytest.approx(math.exp(-mean_ll))


def test_zero_shot_on_llama_matches_unpadded_direct_scores(tiny_llama, char_encode):
    ex = MCExample(["The cat sat on the"] * 3, [" mat.", " hat that was red.", " dog"], 0)
    direct = []
    with torch.no_grad():
        for ctx, cont in zip(ex.contexts, ex.continuations):
            ids = torch.tensor([char_encode(ctx + cont)])
            logp = torch.log_softmax(tiny_llama(ids).logits[0].float(), -1)  # (L, V)
            n_ctx = len(char_encode(ctx))
            direct.append(sum(logp[t - 1, ids[0, t]].item() for t in range(n_ctx, ids.shape[1])))
    scores = [s for s, _ in continuation_logprobs(tiny_llama, char_encode, ex.contexts, ex.continuations)]
    assert scores == pytest.approx(direct, rel=1e-4)
    best = max(range(3), key=lambda i: direct[i])
    best_norm = max(range(3), key=lambda i: direct[i] / len(ex.continuations[i].lstrip()))
    for gold in range(3):
        r = zero_shot(tiny_llama, char_encode, [MCExample(ex.contexts, ex.continuations, gold)])
        assert r["acc"] == float(gold == best) and r["acc_norm"] == float(gold == best_norm)


def test_zero_shot_rejects_mixed_examples():
    with pytest.raises(DataError):
        zero_shot(Counting(), list, [MCExample(["a", "a"], ["b", "c"], 0), LastWordExample("a", "b")])


# ---------------------------------------------------------------- vision


def test_top1_on_tiny_cnn():
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1, bias=False), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with torch.no_grad():
        cnn[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))  # logits = per-channel means
    g = torch.Generator().manual_seed(0)
    images = torch.rand(10, 3, 8, 8, generator=g)
    cls = torch.arange(10) % 3
    images[torch.arange(10), cls] += 1.0  # the brightest channel is the class
    labels = cls.clone()
    labels[[1, 4, 7]] = (labels[[1, 4, 7]] + 1) % 3  # three wrong labels
    prog = Recorder()
    assert top1(cnn, images, labels, batch_size=3, progress=prog) == {"top1": 0.7, "n": 10}
    assert prog.calls[-1] == ("top-1", 4, 4)
    with pytest.raises(DataError):
        top1(cnn, images, labels[:5])


# ---------------------------------------------------------------- real data, small limits


@pytest.fixture
def real_data(data_dir, monkeypatch):
    monkeypatch.setenv("MIXQ_DATA_DIR", str(data_dir))
    return data_dir


@pytest.mark.real
def test_wikitext2_perplexity_runs(real_data, tiny_llama, char_encode):
    w = token_windows(char_encode, load_text("wikitext2"), seqlen=64, n_windows=2)
    r = lm_eval(perturbed(tiny_llama, 0.1), w, reference=FloatReference(tiny_llama, w))
    assert r["n_tokens"] == 126 and r["kl"] > 0 and r["ppl"] > 1


@pytest.mark.real
@pytest.mark.parametrize("task", ["piqa", "hellaswag", "winogrande", "lambada"])
def test_zero_shot_real_tasks_run(real_data, tiny_llama, char_encode, task):
    r = zero_shot(tiny_llama, char_encode, task, limit=3)
    assert r["task"] == task and r["n"] == 3 and 0 <= r["acc"] <= 1

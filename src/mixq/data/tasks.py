"""Zero-shot evaluation tasks, normalised to two example types.

`MCExample`: choice i is the text `contexts[i] + continuations[i]`, scored on the
continuation only. Most tasks share one context across choices; WinoGrande has one context
per choice and a shared continuation (partial scoring). `LastWordExample` (LAMBADA): predict
`target`, the last word, after `context`.

Continuations start with the space that separates them from the context, so that the
joined text reads naturally and tokenizers see the usual " word" tokens. Prompt templates
follow lm-evaluation-harness where llm-foundry's files allow:

| task | context | continuation |
| --- | --- | --- |
| arc_easy, arc_challenge | `Question: <q>\\nAnswer:` | ` <choice>` |
| piqa | `Question: <goal>\\nAnswer:` | ` <solution>` |
| boolq | `Passage: <p>\\nQuestion: <q>?\\nAnswer:` | ` no` / ` yes` |
| copa | `<premise>, because` / `, therefore` | ` <choice>` |
| openbook_qa | `<question stem>` | ` <choice>` |
| winogrande | sentence up to the blank, option filled in | ` <rest of sentence>` |
| hellaswag | `<activity>: <context>` | ` <ending>` (as llama.cpp joins them) |
| lambada | text before the last word | ` <last word>` |
"""

from __future__ import annotations

import bz2
import json
from dataclasses import dataclass
from typing import Iterator, Union

from mixq.data.paths import data_file
from mixq.errors import DataError, NotFoundError


@dataclass(frozen=True)
class MCExample:
    """A multiple-choice example: choice i is `contexts[i] + continuations[i]`."""

    contexts: list[str]
    continuations: list[str]
    gold: int

    def __post_init__(self) -> None:
        if len(self.contexts) != len(self.continuations) or len(self.contexts) < 2:
            raise DataError(
                f"MCExample needs >= 2 choices and as many contexts as continuations, got "
                f"{len(self.contexts)} contexts and {len(self.continuations)} continuations"
            )
        if not 0 <= self.gold < len(self.contexts):
            raise DataError(f"MCExample gold {self.gold} out of range for {len(self.contexts)} choices")


@dataclass(frozen=True)
class LastWordExample:
    """A LAMBADA example: predict `target` (with its leading space) after `context`."""

    context: str
    target: str


Example = Union[MCExample, LastWordExample]

# name -> file inside the shared data directory.
TASK_FILES: dict[str, str] = {
    "piqa": "llmfoundry/piqa.jsonl",
    "arc_easy": "llmfoundry/arc_easy.jsonl",
    "arc_challenge": "llmfoundry/arc_challenge.jsonl",
    "winogrande": "llmfoundry/winogrande.jsonl",
    "boolq": "llmfoundry/boolq.jsonl",
    "copa": "llmfoundry/copa.jsonl",
    "openbook_qa": "llmfoundry/openbook_qa.jsonl",
    "lambada": "llmfoundry/lambada_openai.jsonl",
    "hellaswag": "hellaswag/hellaswag_val_full.txt.bz2",
}
TASK_NAMES: tuple[str, ...] = tuple(TASK_FILES)

# Tasks whose llm-foundry `query` is a question that gets lm-evaluation-harness's "\nAnswer:".
_ANSWER_PROMPT = frozenset({"piqa", "arc_easy", "arc_challenge", "boolq"})


def _jsonl(name: str) -> Iterator[dict]:
    path = data_file(TASK_FILES[name])
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e})") from e


def _query_example(name: str, row: dict) -> MCExample:
    context = row["query"].rstrip()  # PIQA queries end with "\n"
    if name in _ANSWER_PROMPT:
        context += "\nAnswer:"
    choices = [" " + c.strip() for c in row["choices"]]
    return MCExample([context] * len(choices), choices, int(row["gold"]))


def _winogrande_example(row: dict) -> MCExample:
    contexts = [c.rstrip() for c in row["context_options"]]
    cont = " " + row["continuation"].strip()
    return MCExample(contexts, [cont] * len(contexts), int(row["gold"]))


def _hellaswag(limit: int | None) -> Iterator[MCExample]:
    path = data_file(TASK_FILES["hellaswag"])
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines, expected 6 per task (context, gold label, 4 endings)")
    n = len(lines) // 6 if limit is None else min(limit, len(lines) // 6)
    for i in range(n):
        context, gold, *endings = lines[6 * i : 6 * i + 6]
        yield MCExample([context.rstrip()] * 4, [" " + e.strip() for e in endings], int(gold))


def iter_task(name: str, limit: int | None = None) -> Iterator[Example]:
    """Yield the first `limit` examples (all when None) of task `name`, in file order."""
    if name not in TASK_FILES:
        raise NotFoundError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    if name == "hellaswag":
        yield from _hellaswag(limit)
        return
    for i, row in enumerate(_jsonl(name)):
        if limit is not None and i >= limit:
            return
        try:
            if name == "lambada":
                # " " + continuation restores the original text exactly (lm-evaluation-harness
                # splits on the last " "); 7 targets hold line breaks ("of\n\nPower").
                yield LastWordExample(row["context"].rstrip(), " " + row["continuation"])
            elif name == "winogrande":
                yield _winogrande_example(row)
            else:
                yield _query_example(name, row)
        except KeyError as e:
            raise DataError(f"{TASK_FILES[name]} row {i}: missing field {e}") from e


def load_task(name: str, limit: int | None = None) -> list[Example]:
    """The first `limit` examples (all when None) of task `name` (one of `TASK_NAMES`).

    Deterministic: file order, no shuffling. Returns `MCExample`s, or `LastWordExample`s
    for `lambada`.
    """
    return list(iter_task(name, limit))

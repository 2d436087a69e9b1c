"""Text corpora and their cutting into token windows.

Perplexity is measured on fixed, non-overlapping windows cut from the start of the whole
tokenized text (`token_windows`); calibration draws random windows from a calibration text
with a seed (`calibration_windows`, the GPTQ recipe). Tokenization is a plain callable
`encode(text) -> list[int]`, so any tokenizer (or a byte-level stand-in in tests) works.
When `encode` is a `TextEncoder` whose tokenizer adds a BOS token, every window starts with
that BOS followed by `seqlen - 1` text tokens: the model sees what it was trained on, and
the scored tokens of a window are exactly its text tokens (the BOS is never predicted).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Callable, Sequence

import torch

from mixq.data.paths import data_file
from mixq.data.tokenize import bos_of
from mixq.errors import DataError, NotFoundError

log = logging.getLogger(__name__)

Encode = Callable[[str], Sequence[int]]

# name -> file inside the shared data directory.
TEXT_DATASETS: dict[str, str] = {
    "wikitext2": "wikitext2_raw/wiki.test.raw",
    "wikitext2-valid": "wikitext2_tok/valid.txt",
    "wikitext2-tok": "wikitext2_tok/test.txt",
    "ptb": "ptb/ptb.test.txt",
    "ptb-valid": "ptb/ptb.valid.txt",
}
# Evaluation splits: calibrating on these leaks the test set into the quantizer.
TEST_SPLITS: frozenset[str] = frozenset({"wikitext2", "wikitext2-tok", "ptb"})
DEFAULT_CALIBRATION = "wikitext2-valid"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                        "give a UTF-8 text file (e.g. iconv -f latin1 -t utf-8)") from e


def load_text(name_or_path: str | os.PathLike) -> str:
    """The text of a built-in corpus (a key of `TEXT_DATASETS`) or of a UTF-8 text file.

    `wikitext2` (raw test split) is stored one paragraph per line with CRLF ends; it is
    normalised to `\\n` and its lines are joined with `"\\n\\n"`, as the usual
    `"\\n\\n".join(test["text"])` recipe does. Other files are returned as they are (CRLF
    normalised to LF).
    """
    key = str(name_or_path)
    if key in TEXT_DATASETS:
        text = _read(data_file(TEXT_DATASETS[key]))
        if key == "wikitext2":
            lines = text.split("\n")
            if lines and lines[-1] == "":
                lines.pop()  # the file ends with a line end, not an empty paragraph
            text = "\n\n".join(lines)
        return text
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _read(path)
    raise NotFoundError(
        f"{key!r} is neither a built-in text ({', '.join(TEXT_DATASETS)}) nor a text file "
        f"(looked at {path.resolve()})"
    )


def _check_seqlen(seqlen: int) -> None:
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2 (one context token and one predicted token), got {seqlen}")


def check_context(seqlen: int, context_length: int | None, what: str = "seqlen") -> None:
    """Refuse windows longer than the model's context (`context_length` positions; None:
    unknown, not checked): positions past it give numbers without meaning."""
    if context_length is not None and seqlen > context_length:
        raise DataError(f"{what} {seqlen} is longer than the model's context of {context_length} positions "
                        f"(max_position_embeddings); use at most {context_length}")


def _with_bos(rows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """(n, L) text tokens -> (n, L + 1) with `bos_id` first; unchanged when bos_id is None."""
    if bos_id is None:
        return rows
    bos = torch.full((rows.shape[0], 1), int(bos_id), dtype=rows.dtype)
    return torch.cat([bos, rows], dim=1)


def token_windows(encode: Encode, text: str, seqlen: int, n_windows: int | None = None) -> torch.Tensor:
    """Tokenize `text` once and cut fixed non-overlapping windows from its start.

    Returns a LongTensor (n_windows, seqlen): window i holds tokens [i*seqlen, (i+1)*seqlen).
    With a BOS (`bos_of(encode)`), window i is BOS + text tokens [i*(seqlen-1), (i+1)*(seqlen-1)).
    `n_windows=None` takes every full window (the tail shorter than a window is dropped).
    Raises `DataError` when the text has fewer tokens than the windows need.
    """
    _check_seqlen(seqlen)
    bos_id = bos_of(encode)
    span = seqlen - (bos_id is not None)  # text tokens per window
    ids = list(encode(text))
    n_tokens = len(ids)
    n_full = n_tokens // span
    if n_windows is None:
        if n_full == 0:
            raise DataError(f"text has {n_tokens} tokens, fewer than one window of {seqlen}")
        n_windows = n_full
    elif n_windows < 1:
        raise DataError(f"n_windows must be positive, got {n_windows}")
    elif n_windows > n_full:
        raise DataError(
            f"text has {n_tokens} tokens; {n_windows} windows of {span}{' (after the BOS)' if bos_id is not None else ''} "
            f"need {n_windows * span} "
            f"(at most {n_full} full windows fit)"
        )
    flat = torch.tensor(ids[: n_windows * span], dtype=torch.long)
    return _with_bos(flat.view(n_windows, span), bos_id)  # (n_windows, seqlen)


def sample_windows(ids: Sequence[int], seqlen: int, n_samples: int, seed: int,
                   bos_id: int | None = None) -> torch.Tensor:
    """`n_samples` windows of `seqlen` tokens at random starts in `ids` (may overlap).

    Starts are drawn with `random.Random(seed).randint(0, len(ids) - span)`, where span is
    `seqlen` (or `seqlen - 1` text tokens after `bos_id` when one is given), so the same
    tokens and seed give the same windows on every platform. Returns (n_samples, seqlen).
    """
    _check_seqlen(seqlen)
    if n_samples < 1:
        raise DataError(f"n_samples must be positive, got {n_samples}")
    span = seqlen - (bos_id is not None)
    if len(ids) < span:
        raise DataError(f"calibration text has {len(ids)} tokens, fewer than one window of {span}")
    rng = random.Random(seed)
    flat = torch.as_tensor(list(ids), dtype=torch.long)
    starts = [rng.randint(0, len(ids) - span) for _ in range(n_samples)]
    return _with_bos(torch.stack([flat[s : s + span] for s in starts]), bos_id)  # (n_samples, seqlen)


def calibration_windows(
    encode: Encode, name: str | os.PathLike = DEFAULT_CALIBRATION, seqlen: int = 2048, n_samples: int = 128, seed: int = 0
) -> torch.Tensor:
    """Random calibration windows (GPTQ recipe) from a built-in text or a text file.

    The whole text is tokenized once and `n_samples` windows start at seeded random offsets
    (see `sample_windows`). Calibrating on a test split (`TEST_SPLITS`) is allowed but logged
    as a warning: the caller decides. Windows start with the tokenizer's BOS where it adds
    one (`bos_of(encode)`). Returns (n_samples, seqlen).
    """
    if str(name) in TEST_SPLITS:
        log.warning("calibrating on %r, a test split: evaluation on it will be optimistic", str(name))
    return sample_windows(encode(load_text(name)), seqlen, n_samples, seed, bos_id=bos_of(encode))

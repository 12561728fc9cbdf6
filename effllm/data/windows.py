"""Calibration windows (Wanda / SparseGPT style): a capped corpus, its tokens, seeded windows of them."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from effllm.data.catalogue import (
    BUILTIN,
    CALIBRATION_MAX_CHARS,
    DOCUMENT_SEPARATOR,
    HELD_OUT_SPLITS,
    HUB,
)
from effllm.data.loading import canonical_name, default_split, documents, standins_on

# --------------------------------------------------------------------------------------------------
# Calibration windows (Wanda / SparseGPT style)


def _capped_documents(name: str, split: str | None, max_chars: int) -> list[str]:
    """All documents when they fit in ``max_chars``; else a fixed seeded choice of whole documents that
    fits, kept in corpus order (the choice does not depend on the calibration seed)."""
    docs = documents(name, split)
    if sum(len(d) + len(DOCUMENT_SEPARATOR) for d in docs) <= max_chars:
        return docs
    order = list(range(len(docs)))
    random.Random(0).shuffle(order)
    chosen, total = [], 0
    for index in order:
        size = len(docs[index]) + len(DOCUMENT_SEPARATOR)
        if total + size <= max_chars:
            chosen.append(index)
            total += size
    return [docs[i] for i in sorted(chosen)]


def held_out_text(corpus: str) -> str:
    """The validation and test documents of a corpus (those of its splits it has: a hub set such as
    ``wikitext2`` or ``c4``), joined as :func:`corpus_text`."""
    spec = BUILTIN.get(corpus) or HUB.get(corpus)
    splits = [s for s in HELD_OUT_SPLITS if spec is None or s in spec.splits] or ["test"]
    return DOCUMENT_SEPARATOR.join(doc for split in splits for doc in documents(corpus, split))


def calibration_text(name: str, split: str | None = None, max_chars: int = CALIBRATION_MAX_CHARS) -> str:
    """The text :func:`calibration` tokenizes: the corpus, capped at ``max_chars`` characters."""
    return DOCUMENT_SEPARATOR.join(_capped_documents(name, split, max_chars))


_TOKEN_MEMO: dict[tuple[Any, ...], torch.Tensor] = {}


def calibration_tokens(
    name: str, tokenizer: Any, split: str | None = None, max_chars: int = CALIBRATION_MAX_CHARS
) -> torch.Tensor:
    """Token ids of :func:`calibration_text` as one 1-D LongTensor (memoized per corpus and tokenizer).

    Documents are tokenized separately (in parallel) without special tokens and joined with the
    tokens of the blank-line separator; for a byte-level tokenizer this equals tokenizing the text.
    """
    name = canonical_name(name)
    # stand-in data and the hub set share a name: the memo must not hand one out for the other
    memo_key = (name, split or default_split(name), type(tokenizer).__name__,
                getattr(tokenizer, "name_or_path", ""), len(tokenizer), max_chars, standins_on())
    if memo_key not in _TOKEN_MEMO:
        docs = _capped_documents(name, split, max_chars)
        encoded = tokenizer(docs, add_special_tokens=False, return_attention_mask=False, verbose=False)
        separator = tokenizer(DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"]
        pieces: list[list[int]] = []
        for index, ids in enumerate(encoded["input_ids"]):
            if index:
                pieces.append(separator)
            pieces.append(ids)
        flat = np.fromiter((t for piece in pieces for t in piece), dtype=np.int64)
        _TOKEN_MEMO[memo_key] = torch.from_numpy(flat)
    return _TOKEN_MEMO[memo_key]


def calibration(
    name: str, tokenizer: Any, n_samples: int, seq_len: int, seed: int = 0, split: str | None = None
) -> torch.Tensor:
    """``n_samples`` random windows of exactly ``seq_len`` tokens from corpus ``name``: LongTensor
    [n_samples, seq_len]. Window starts come from ``torch.Generator().manual_seed(seed)``, so the
    same seed gives the same tensor. The corpus is capped at ``CALIBRATION_MAX_CHARS`` characters."""
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples and seq_len must be >= 1; got n_samples={n_samples}, seq_len={seq_len}.")
    tokens = calibration_tokens(name, tokenizer, split)
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"Calibration data set {name!r} (split {split or default_split(name)!r}) has {len(tokens)} tokens "
            f"with this tokenizer, fewer than seq_len + 1 = {seq_len + 1} for the requested seq_len={seq_len}. "
            "Use a shorter seq_len or a larger corpus (e.g. 'python-code')."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (n_samples,), generator=generator)
    return tokens[starts[:, None] + torch.arange(seq_len)]  # [n_samples, seq_len]



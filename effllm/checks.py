"""Argument checks shared by every module: one wording for one kind of mistake.

Each check returns the value it accepted (converted where that is safe: an int threshold becomes a
float) or raises ``ValueError`` with a message that says what was given, what is allowed, and where
that helps, what to do:

    threshold = checks.number("exit_conf_threshold", 0.9, low=0)
    layer = checks.layer("shallow_exit_layer", 20, n_layers=30)      # 1-based, 1..30
    mode = checks.choice("skip_mode", "static", ("static", "random"))
    ids = checks.token_ids("input_ids", ids, vocab_size=49152)

Booleans are never numbers here (``True`` is an ``int`` in Python, and ``layer=True`` is a bug).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))


def number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """A real number in [low, high] (an end is open with ``low_open`` / ``high_open``; None: unbounded)."""
    if low is not None and high is not None:
        allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        allowed = f"{'<' if high_open else '<='} {high:g}"
    else:
        allowed = "(any real number)"
    ok = _is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be a number {allowed}{hint}; got {value!r}")
    return float(value)


def fraction(name: str, value: Any, *, zero: bool = True, one: bool = True, hint: str = "") -> float:
    """A fraction in [0, 1]; ``zero=False`` / ``one=False`` exclude an end."""
    return number(name, value, 0.0, 1.0, low_open=not zero, high_open=not one, hint=hint)


def integer(name: str, value: Any, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """An integer in [low, high] (None: unbounded). Floats are refused, even 2.0: a count is a count."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        if low is not None and high is not None:
            allowed = f"an integer in [{low}, {high}]"
        elif low is not None:
            allowed = f"an integer >= {low}"
        elif high is not None:
            allowed = f"an integer <= {high}"
        else:
            allowed = "an integer"
        raise ValueError(f"{name} must be {allowed}{hint}; got {value!r}")
    return int(value)


def positive_int(name: str, value: Any, hint: str = "") -> int:
    """An integer >= 1."""
    return integer(name, value, low=1, hint=hint)


def layer(name: str, value: Any, n_layers: int, *, low: int = 1, high: int | None = None) -> int:
    """A 1-based layer number in ``low``..``high`` (default 1..n_layers), as the seeds number exits."""
    high = n_layers if high is None else high
    if high < low:
        raise ValueError(f"{name}: this model ({n_layers} layers) has no layer between {low} and {high}; got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a layer between {low} and {high} (1-based; the model has {n_layers} "
                         f"layers); got {value!r}")
    return int(value)


def choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """One of ``allowed``."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    return value


def token_ids(name: str, ids: Any, vocab_size: int | None = None, *, batch: int | None = None) -> torch.LongTensor:
    """Token ids as an integer tensor [batch, length >= 1], every id in 0..vocab_size - 1.

    Float tensors are refused (``torch.tensor([[1., 2.]])`` is almost always a mistake upstream), as are ids
    outside the vocabulary, which an embedding lookup would turn into an index error deep inside the model
    or, on some devices, into silent garbage."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.LongTensor [batch, length]; got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids (torch.long); got dtype {ids.dtype}. Tokenize with "
                         "return_tensors='pt', or convert with .long() if the values are ids")
    if ids.dim() != 2 or ids.shape[1] < 1 or ids.shape[0] < 1:
        raise ValueError(f"{name} must be [batch >= 1, length >= 1]; got shape {tuple(ids.shape)}")
    if batch is not None and ids.shape[0] != batch:
        raise ValueError(f"{name} must have batch {batch}; got shape {tuple(ids.shape)}")
    if vocab_size is not None and ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} holds ids {low}..{high}, outside this model's vocabulary 0..{vocab_size - 1}: "
                             "ids from another tokenizer?")
    return ids.long()

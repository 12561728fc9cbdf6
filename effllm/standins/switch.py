"""The stand-ins switch: the ``EFFLLM_STANDINS`` environment variable (inherited by notebook kernels), read and
set here, and the error for a name that has no stand-in."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

ENV_VAR = "EFFLLM_STANDINS"
_TRUE = ("1", "true", "yes", "on")

logger = logging.getLogger(__name__)


class NoStandInError(LookupError):
    """Stand-ins are on and a hub name has no stand-in."""


def enabled() -> bool:
    """True when stand-ins are on (``EFFLLM_STANDINS`` is 1 / true / yes / on)."""
    return os.environ.get(ENV_VAR, "").strip().lower() in _TRUE


def enable(on: bool = True) -> None:
    """Turn stand-ins on (or off) for this process and the processes it starts (notebook kernels): the
    switch is the environment variable, so there is one source of truth."""
    if on:
        os.environ[ENV_VAR] = "1"
    else:
        os.environ.pop(ENV_VAR, None)


@contextmanager
def active(on: bool = True) -> Iterator[None]:
    """``with standins.active(): ...`` turns stand-ins on inside the block and restores the previous state."""
    previous = os.environ.get(ENV_VAR)
    enable(on)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous


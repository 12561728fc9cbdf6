"""A notebook's set-up in one call: the model in the notebook's precision on the device it asked for, its
tokenizer, the device, and the machine line every figure's provenance carries.

    model, tokenizer, device, machine = open_session(model_name, device="auto", dtype=None)

``device``: ``"auto"`` (a CUDA GPU if there is one, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, or a
``torch.device``. ``dtype``: None for :func:`effllm.models.load_model`'s precision rule (``EFFLLM_DTYPE``, else
bfloat16 where the hardware computes in it, else float32), or a dtype or its name; a notebook with a rule of its
own (notebook 05: CSR has no bfloat16 on a CPU, :func:`effllm.sparse.default_dtype`) passes its choice here.
``device_map`` (e.g. ``"auto"``) spreads a model larger than one device with accelerate instead; the session's
device is then where the first parameter went. ``profile=profile`` (the notebook's parameter) names the profile in
the stamp of every artefact the notebook saves (:mod:`effllm.stamps`) when it runs outside run_all.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from effllm import stamps
from effllm.experiments.timing import device_description
from effllm.models import load_model

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


@dataclass(frozen=True)
class Session:
    """What :func:`open_session` gives a notebook; unpacks as ``model, tokenizer, device, machine``."""

    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    machine: str  # the machine line of figure provenance: the GPU's name, or the CPU's with its threads

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer, self.device, self.machine))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` / None: the CUDA GPU if there is one, else the CPU; otherwise the device named, which must exist
    here (an error says what there is)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}; allowed: {', '.join(DEVICE_CHOICES)} or a torch.device") \
            from error
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={str(device)!r} was asked for, but torch {torch.__version__} sees no CUDA GPU "
                             f"on this machine; use device='auto' or 'cpu', or run on a GPU machine")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device={str(device)!r} was asked for, but this machine has {count} CUDA GPU(s) "
                             f"(cuda:0..cuda:{count - 1})")
    elif resolved.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; allowed: {', '.join(DEVICE_CHOICES)}")
    return resolved


def open_session(model_name: str, device: str | torch.device | None = "auto",
                 dtype: torch.dtype | str | None = None, *, device_map: str | dict[str, Any] | None = None,
                 profile: str | None = None) -> Session:
    """Load ``model_name`` (:func:`effllm.models.load_model`) in ``dtype`` on ``device`` (see the module
    docstring) and describe the machine it runs on. ``profile`` (the notebook's parameter) and the model's dtype go
    into the stamp of every artefact the notebook saves (:func:`effllm.stamps.set_context`; under run_all.py the
    profile it sets wins)."""
    if device_map is not None:
        model, tokenizer = load_model(model_name, dtype=dtype, device_map=device_map)
        resolved = next(model.parameters()).device
    else:
        resolved = resolve_device(device)
        model, tokenizer = load_model(model_name, dtype=dtype, device=str(resolved))
    session = Session(model, tokenizer, resolved, device_description(resolved))
    stamps.set_context(profile=profile, model_dtype=session.dtype)
    return session

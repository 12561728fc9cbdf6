"""Model stand-ins: a tiny random model of the original's family that keeps every structural feature that
changes a code path, and a byte-level tokenizer with the original's special tokens at the original's ids."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from effllm import records
from effllm.standins.switch import ENV_VAR, NoStandInError

logger = logging.getLogger("effllm.standins")  # the name it had before the split: log filters keep working


# ==================================================================================================
# Models


@dataclass(frozen=True)
class TokenizerSpec:
    """How a stand-in tokenizer behaves: its special tokens (text -> the original's id), which it adds around
    a text, and its chat template (None: a base model's tokenizer, which has none)."""

    specials: dict[str, int]
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


@dataclass(frozen=True)
class ModelStandIn:
    """A tiny random model in place of ``hub_id``: ``config`` goes to ``AutoConfig.for_model(model_type)``."""

    hub_id: str
    model_type: str
    config: dict[str, Any]
    tokenizer: TokenizerSpec
    original: str  # the original's structure that the stand-in keeps, and where those facts come from
    seq2seq: bool = False


GEMMA_CHAT_TEMPLATE = (  # Gemma 1.1's turn format (the same as Gemma 3's)
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA2_CHAT_TEMPLATE = (  # CodeLlama-Instruct's [INST] format
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (  # Qwen2.5's
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_T5_TOKENS = TokenizerSpec({"<pad>": 0, "</s>": 1, "<unk>": 2}, eos="</s>", pad="<pad>", unk="<unk>", add_eos=True)
_OPT_TOKENS = TokenizerSpec({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}, bos="</s>", eos="</s>", pad="<pad>",
                            unk="<unk>", add_bos=True)  # OPT prepends "</s>" (id 2) as its BOS
_LLAMA2_TOKENS = {"<unk>": 0, "<s>": 1, "</s>": 2}
_LLAMA3_TOKENS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001}

# T5-large (google-t5/t5-large config.json, and T5Config's documented T5-large sizes): 24 + 24 layers, d 1024,
# 16 heads of 64, d_ff 4096, ReLU MLP, vocabulary 32128, no `tie_word_embeddings` key (so tied, and the decoder
# output is scaled by d_model**-0.5), 32 relative-position buckets up to distance 128.
_T5_LARGE = dict(vocab_size=32128, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=24, num_decoder_layers=24,
                 feed_forward_proj="relu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 layer_norm_epsilon=1e-6, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
_T5_ORIGINAL = ("T5-large: encoder and decoder of 24 layers, ReLU MLP, vocabulary 32128, tied embeddings with the "
                "decoder output scaled by d_model**-0.5 (google-t5/t5-large config.json)")
_OPT_13B = dict(vocab_size=50272, hidden_size=64, ffn_dim=128, num_hidden_layers=24, num_attention_heads=4,
                max_position_embeddings=2048, word_embed_proj_dim=64, do_layer_norm_before=True, enable_bias=True,
                pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True)

STANDIN_MODELS: dict[str, ModelStandIn] = {
    spec.hub_id: spec
    for spec in [
        ModelStandIn("google-t5/t5-large", "t5", _T5_LARGE, _T5_TOKENS, _T5_ORIGINAL, seq2seq=True),
        # The seed-000 checkpoints are T5-large fine-tuned on SQuAD and SAMSum (seed 000's README); their
        # config.json could not be read from this machine, so the stand-in assumes T5-large's.
        ModelStandIn("jvelja/t5-squad", "t5", _T5_LARGE, _T5_TOKENS, _T5_ORIGINAL + "; fine-tuned on SQuAD",
                     seq2seq=True),
        ModelStandIn("jvelja/t5-samsum", "t5", _T5_LARGE, _T5_TOKENS, _T5_ORIGINAL + "; fine-tuned on SAMSum",
                     seq2seq=True),
        ModelStandIn("facebook/opt-iml-1.3b", "opt", _OPT_13B, _OPT_TOKENS,
                     "OPT-1.3B layout: 24 pre-norm layers, d 2048 = word_embed_proj_dim (no project_in/out), "
                     "vocabulary 50272, tied, learned positions up to 2048; no chat template (OPT-IML config.json)"),
        ModelStandIn("facebook/opt-350m", "opt",
                     {**_OPT_13B, "word_embed_proj_dim": 32, "do_layer_norm_before": False}, _OPT_TOKENS,
                     "OPT-350m: post-norm layers (do_layer_norm_before False) and project_in/out between the "
                     "512-wide embeddings and the 1024-wide layers (facebook/opt-350m config.json)"),
        ModelStandIn("google/gemma-1.1-7b-it", "gemma",
                     dict(vocab_size=256000, hidden_size=64, intermediate_size=128, num_hidden_layers=28,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=24, hidden_act="gelu_pytorch_tanh",
                          max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          pad_token_id=0, eos_token_id=1, bos_token_id=2),
                     TokenizerSpec({"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}, bos="<bos>", eos="<eos>",
                                   pad="<pad>", unk="<unk>", add_bos=True, chat_template=GEMMA_CHAT_TEMPLATE),
                     "Gemma-7B: 28 layers, 16 query and 16 K/V heads of head_dim 256 (4096 > d = 3072), "
                     "GELU-tanh MLP, vocabulary 256000, tied; Gemma chat format (GemmaConfig's defaults are "
                     "the 7B's; google/gemma-1.1-7b-it config.json)"),
        ModelStandIn("codellama/CodeLlama-13b-Instruct-hf", "llama",
                     dict(vocab_size=32016, hidden_size=64, intermediate_size=128, num_hidden_layers=40,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16384,
                          rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
                     TokenizerSpec(_LLAMA2_TOKENS, bos="<s>", eos="</s>", unk="<unk>", add_bos=True,
                                   chat_template=LLAMA2_CHAT_TEMPLATE),
                     "CodeLlama-13B: 40 layers, 40 heads and 40 K/V heads (no GQA), vocabulary 32016, untied, "
                     "rope theta 1e6; [INST] chat format, no pad token (codellama/CodeLlama-13b-Instruct-hf)"),
        ModelStandIn("meta-llama/Meta-Llama-3-8B", "llama",
                     dict(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=32,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192,
                          rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
                          tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
                     TokenizerSpec(_LLAMA3_TOKENS, bos="<|begin_of_text|>", eos="<|end_of_text|>", add_bos=True),
                     "Llama-3-8B: 32 layers, 32 heads over 8 K/V heads (GQA 4:1), vocabulary 128256, untied, "
                     "rope theta 5e5; base model (no chat template, no pad token) (meta-llama/Meta-Llama-3-8B)"),
        ModelStandIn("mistralai/Mistral-7B-v0.1", "mistral",
                     dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=32,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
                          sliding_window=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          bos_token_id=1, eos_token_id=2),
                     TokenizerSpec(_LLAMA2_TOKENS, bos="<s>", eos="</s>", unk="<unk>", add_bos=True),
                     "Mistral-7B-v0.1: 32 layers, 32 heads over 8 K/V heads (GQA 4:1), sliding window 4096, "
                     "vocabulary 32000, untied; base model (MistralConfig's defaults are this model's)"),
        ModelStandIn("meta-llama/Llama-3.2-1B", "llama",
                     dict(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=16,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=131072,
                          rms_norm_eps=1e-5, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192},
                          bos_token_id=128000, eos_token_id=128001),
                     TokenizerSpec(_LLAMA3_TOKENS, bos="<|begin_of_text|>", eos="<|end_of_text|>", add_bos=True),
                     "Llama-3.2-1B: 16 layers, 32 heads over 8 K/V heads (GQA 4:1), tied embeddings, "
                     "vocabulary 128256, llama3 rope scaling (factor 32); base model (meta-llama/Llama-3.2-1B)"),
        ModelStandIn("Qwen/Qwen2.5-0.5B", "qwen2",
                     dict(vocab_size=151936, hidden_size=112, intermediate_size=128, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                          rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                          bos_token_id=151643, eos_token_id=151643),
                     TokenizerSpec({"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
                                   eos="<|endoftext|>", pad="<|endoftext|>", chat_template=CHATML_TEMPLATE),
                     "Qwen2.5-0.5B: 24 layers, 14 heads over 2 K/V heads (GQA 7:1), q/k/v biases, tied, "
                     "vocabulary 151936, no BOS added, ChatML template (Qwen/Qwen2.5-0.5B config.json)"),
    ]
}


def find_model_standin(hub_id: str) -> ModelStandIn:
    """The stand-in of ``hub_id`` (case-insensitive); :class:`NoStandInError` names those there are."""
    # hub ids resolve case-insensitively on the hub (seed 003 writes facebook/opt-350M)
    by_lower = {key.lower(): spec for key, spec in STANDIN_MODELS.items()}
    spec = by_lower.get(hub_id.lower())
    if spec is None:
        raise NoStandInError(
            f"Stand-ins are on ({ENV_VAR}=1) and {hub_id!r} has no stand-in model. Hub models with stand-ins: "
            f"{', '.join(STANDIN_MODELS)}. Add one to effllm.standins.STANDIN_MODELS, or turn stand-ins off "
            f"(unset {ENV_VAR}) to load the real model from the hub."
        )
    return spec


def standin_tokenizer(spec: TokenizerSpec) -> Any:
    """A byte-level tokenizer built in memory with ``spec``'s special tokens at their ids (the 256 byte
    symbols take the lowest free ids; ids no token has decode to nothing, as ids beyond a real tokenizer do)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = dict(spec.specials)
    taken = set(vocab.values())
    free = (i for i in range(1 << 30) if i not in taken)
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = next(free)
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    before = [spec.bos] if spec.add_bos else []
    after = [spec.eos] if spec.add_eos else []
    if before or after:
        single = " ".join([*before, "$A", *after])
        pair = " ".join([*before, "$A", *after, *before, "$B", *after])
        used = {t: spec.specials[t] for t in [*before, *after]}
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                               special_tokens=list(used.items()))
    roles = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad, "unk_token": spec.unk}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in roles.items() if v})
    extra = [t for t in spec.specials if t not in roles.values()]
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.chat_template = spec.chat_template
    return tokenizer


def load_standin_model(hub_id: str, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """The stand-in of ``hub_id`` (eval mode, float32, on the CPU) and its tokenizer; the weights depend only on
    ``seed``. The model carries ``records.STANDIN`` (the hub id it stands in for) and its config's
    ``_name_or_path`` and the tokenizer's ``name_or_path`` read ``standin:<hub_id>``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    spec = find_model_standin(hub_id)
    config = AutoConfig.for_model(spec.model_type, **spec.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        auto = AutoModelForSeq2SeqLM if spec.seq2seq else AutoModelForCausalLM
        model = auto.from_config(config, dtype=torch.float32)
    name = f"standin:{spec.hub_id}"
    model.config._name_or_path = name
    records.STANDIN.set(model, spec.hub_id)
    tokenizer = standin_tokenizer(spec.tokenizer)
    tokenizer.name_or_path = name
    logger.warning("effllm stand-in: %r is a tiny random %s model (%d layers, %s; the original: %s). Numbers "
                   "measured on it mean nothing.", spec.hub_id, spec.model_type,
                   config.get_text_config().num_hidden_layers, f"d={config.get_text_config().hidden_size}",
                   spec.original)
    return model.eval(), tokenizer



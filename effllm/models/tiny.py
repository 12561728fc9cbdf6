"""Tiny randomly initialised models built from configs (Llama, Mistral, Qwen2, Gemma, Gemma 3, OPT, GPT-2, T5)
and a byte-level tokenizer built in memory: what unit tests use (seconds, no files)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

from effllm.models.sources import ModelNotAvailableError


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

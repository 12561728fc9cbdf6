"""Small conveniences used by the notebooks: a chat prompt's ids, a greedy chat reply (HF ``generate``, the
reference for decoding), a loaded model's architecture facts and its parameters by component.

effllm.adapters is imported where it is used (about 1 s of import time: see effllm.models.identity)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerFast


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

"""The logit lens: what each layer would predict if the final norm and LM head were applied to it.

Early exits only work where intermediate layers already predict the final token; this measures how
often they do, with no training (Nostalgebraist 2020; Din et al. 2023 fit linear maps to do better).
"""

from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

from effllm.adapters import get_adapter


@torch.no_grad()
def logit_lens_agreement(
    model: torch.nn.Module, token_ids: torch.LongTensor, batch_size: int = 4, top_k: int = 5, progress: bool = True
) -> pd.DataFrame:
    """Per layer, how often the logit lens agrees with the model's final prediction.

    ``token_ids`` is [n_sequences, seq_len]. Every position of every sequence counts once. Returns a tidy
    table with one row per layer (1-based; the last layer agrees with itself by definition): ``layer``,
    ``agreement`` (argmax at the layer == final argmax), ``final_in_top_k`` (the final argmax is among the
    layer's ``top_k``), ``tokens``.
    """
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    n_layers = adapter.num_layers
    agree = torch.zeros(n_layers, dtype=torch.long)
    in_top_k = torch.zeros(n_layers, dtype=torch.long)
    total = 0
    batches = range(0, token_ids.shape[0], batch_size)
    for start in tqdm(batches, desc="logit lens", disable=not progress):
        batch = token_ids[start : start + batch_size].to(device)
        final_logits, states = adapter.forward(batch, output_hidden_states=True)
        final = final_logits.argmax(-1)  # [b, s]
        for layer in range(1, n_layers + 1):
            logits = adapter.logits(states[layer])
            agree[layer - 1] += (logits.argmax(-1) == final).sum()
            top = logits.topk(top_k, dim=-1).indices  # [b, s, k]
            in_top_k[layer - 1] += (top == final.unsqueeze(-1)).any(-1).sum()
        total += final.numel()
    return pd.DataFrame(
        {
            "layer": range(1, n_layers + 1),
            "agreement": (agree.double() / total).numpy(),
            f"final_in_top_{top_k}": (in_top_k.double() / total).numpy(),
            "tokens": total,
        }
    )

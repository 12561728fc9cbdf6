"""Layer-by-layer calibration: the loop shared by pruning (Wanda, SparseGPT), slicing (SliceGPT) and
layer scores (layer redundancy, ShortGPT block influence).

    runner = LayerByLayer(model, calibration_ids)            # embeds every sample once
    for i in range(runner.num_layers):
        with capture_inputs(adapter.linears(i), on_input):   # on_input(name, x): x = the linear's input
            runner.run(i)                                    # layer i on the current states
        ...modify layer i...
        runner.advance(i)                                    # its outputs become layer i+1's inputs

Each layer is calibrated on the outputs of the already modified layers below it, as in Wanda's
``prune_wanda`` and SparseGPT's sequential mode. States are kept per batch on ``store_device``
(the CPU by default) and moved to the layer's own device to run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from effllm.adapters import get_adapter


@contextmanager
def capture_inputs(modules: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``on_input(name, x)`` with the input ``x`` of each module every time it runs."""
    handles = [
        module.register_forward_pre_hook(lambda _module, args, name=name: on_input(name, args[0].detach()))
        for name, module in modules.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class LayerByLayer:
    """Feeds calibration samples through a decoder one layer at a time, with no KV cache."""

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.LongTensor,
        batch_size: int = 8,
        store_device: str | torch.device = "cpu",
        **context_kwargs,
    ):
        if input_ids.dim() != 2:
            raise ValueError(f"calibration ids must be [n_samples, seq_len]; got shape {tuple(input_ids.shape)}")
        self.adapter = get_adapter(model)
        self.store_device = torch.device(store_device)
        self.context_kwargs = context_kwargs
        device = self.adapter.embed_tokens.weight.device
        with torch.no_grad():
            self.states = [
                self.adapter.embed(batch.to(device)).to(self.store_device)
                for batch in input_ids.split(batch_size)
            ]

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @torch.no_grad()
    def run(self, i: int) -> list[torch.Tensor]:
        """Layer ``i``'s outputs on the current states (one tensor per batch, on ``store_device``)."""
        device = next(self.adapter.layer(i).parameters()).device
        outputs = []
        for hidden in self.states:
            hidden = hidden.to(device)
            context = self.adapter.context(hidden, **self.context_kwargs)
            outputs.append(self.adapter.run_layer(i, hidden, context).to(self.store_device))
        return outputs

    def advance(self, i: int, outputs: list[torch.Tensor] | None = None) -> None:
        """Make layer ``i``'s outputs the next layer's inputs: ``outputs`` if given, else run layer ``i`` now
        (so a layer changed after :meth:`run` passes on its changed outputs)."""
        self.states = outputs if outputs is not None else self.run(i)

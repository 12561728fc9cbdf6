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
(the CPU by default) and moved to the layer's compute device to run.

Models larger than the compute device (Wanda's and SparseGPT's own set-up): a layer lives on the CPU, or
is offloaded by accelerate (``load_model(..., device_map="auto")`` with CPU or disk offload: its
parameters are on "meta" and an ``AlignDevicesHook`` holds the weights). From :meth:`LayerByLayer.run`
of layer i until :meth:`LayerByLayer.advance` (or the run of another layer), layer i is *on the compute
device*: every tensor is there as a real parameter, so a method can read and change the weights between
the two calls (Wanda zeroes them, SparseGPT updates them, SliceGPT rotates them). ``advance`` puts the
layer back where it lives: CPU-resident tensors move back; offloaded tensors are written back into
the hook's weights map (disk offload: the ``.dat`` file in the offload folder is rewritten; CPU offload
and weights that accelerate reads straight from a checkpoint file: kept in CPU memory, never written into
the checkpoint) and the parameters return to "meta". Tensors a method adds to an offloaded layer (new
modules) stay CPU-resident.

    runner = LayerByLayer(model, ids, exec_device="cuda")   # or use_exec_device(model, "cuda")

The compute device is ``exec_device``, else :func:`use_exec_device`'s for this model, else each layer's
own (its accelerate hook's execution device when it is offloaded), so an offloaded model needs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from effllm import checks, records
from effllm.adapters import get_adapter


def check_calibration(model: nn.Module, input_ids: torch.Tensor, name: str = "calibration") -> torch.LongTensor:
    """Calibration token ids for ``model``: an integer tensor [n_samples >= 1, seq_len >= 1] whose ids all lie
    in the model's embedding table (:func:`effllm.checks.token_ids`), else a ``ValueError`` that says what was
    given. Pruning, slicing and layer scores check theirs here, before any weight changes."""
    vocab_size = get_adapter(model).embed_tokens.weight.shape[0]
    return checks.token_ids(f"{name} (token ids [n_samples, seq_len])", input_ids, vocab_size=vocab_size)


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


@contextmanager
def use_exec_device(model: nn.Module, device: str | torch.device | None) -> Iterator[None]:
    """Within the block, :class:`LayerByLayer` (and so ``prune``, ``slice_model``, ``layer_scores``) moves each
    layer of ``model`` to ``device`` for its computation and back, e.g. a CPU-resident model on one GPU."""
    previous = records.EXEC_DEVICE.get(model)
    records.EXEC_DEVICE.set(model, None if device is None else torch.device(device))
    try:
        yield
    finally:
        records.EXEC_DEVICE.set(model, previous)


def _offload_hook(module: nn.Module):
    """The module's accelerate hook when it keeps the weights offloaded (parameters on "meta"), else None."""
    hook = getattr(module, "_hf_hook", None)
    return hook if hook is not None and getattr(hook, "offload", False) else None


def _own_tensors(module: nn.Module, buffers: bool = True) -> list[tuple[str, torch.Tensor]]:
    items = list(module._parameters.items()) + (list(module._buffers.items()) if buffers else [])
    return [(name, tensor) for name, tensor in items if tensor is not None]


def _write_back(hook, name: str, tensor: torch.Tensor) -> None:
    """Store ``tensor`` as the offloaded value of ``name`` in an accelerate hook's weights map."""
    from accelerate.utils import offload_weight
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    weights = hook.weights_map
    key, store = name, weights
    if isinstance(weights, PrefixedDataset):
        key, store = weights.prefix + name, weights.dataset
    value = tensor.detach().to("cpu", copy=True)
    if isinstance(store, OffloadedWeightsLoader):
        entry = store.index.get(key)
        if key not in store.state_dict and store.save_folder and entry is not None and "safetensors_file" not in entry:
            offload_weight(value, key, store.save_folder, index=store.index)  # rewrite its .dat file
            return
        store.state_dict[key] = value  # CPU offload, or a checkpoint file that must not be written
        if key not in store.all_keys:
            store.all_keys.append(key)
    elif isinstance(store, dict):
        store[key] = value
    else:
        raise TypeError(f"cannot write the offloaded weight {key!r} back into a {type(store).__name__}")


@dataclass
class _Onloaded:
    """How to put one layer back: its offloaded modules and the home of every resident tensor."""

    layer: int
    device: torch.device
    offloaded: list[tuple[nn.Module, object, list[str], bool, object]] = field(default_factory=list)
    homes: dict[tuple[int, str], torch.device] = field(default_factory=dict)
    hooks: list[tuple[object, object]] = field(default_factory=list)
    resident: torch.device = torch.device("cpu")


class LayerByLayer:
    """Feeds calibration samples through a decoder one layer at a time, with no KV cache.

    ``exec_device``: where each layer computes (see the module docstring); None = :func:`use_exec_device`'s
    device for this model, else the layer's own.
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.LongTensor,
        batch_size: int = 8,
        store_device: str | torch.device = "cpu",
        exec_device: str | torch.device | None = None,
        **context_kwargs,
    ):
        input_ids = check_calibration(model, input_ids)
        if exec_device is None:
            exec_device = records.EXEC_DEVICE.get(model)
        self.exec_device = None if exec_device is None else torch.device(exec_device)
        if self.exec_device is not None and self.exec_device.type == "meta":
            raise ValueError("exec_device 'meta' cannot compute; give a real device such as 'cuda' or 'cpu'")
        self.adapter = get_adapter(model)
        self.store_device = torch.device(store_device)
        self.context_kwargs = context_kwargs
        self._onloaded: _Onloaded | None = None
        with torch.no_grad():
            self.states = [
                self.adapter.embed(batch).to(self.store_device)  # the adapter moves ids to the embeddings
                for batch in input_ids.split(batch_size)
            ]

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @torch.no_grad()
    def run(self, i: int) -> list[torch.Tensor]:
        """Layer ``i``'s outputs on the current states (one tensor per batch, on ``store_device``). Layer
        ``i`` stays on the compute device until :meth:`advance`."""
        device = self.onload(i)
        outputs = []
        for hidden in self.states:
            hidden = hidden.to(device)
            context = self.adapter.context(hidden, **self.context_kwargs)
            outputs.append(self.adapter.run_layer(i, hidden, context).to(self.store_device))
        return outputs

    def advance(self, i: int, outputs: list[torch.Tensor] | None = None) -> None:
        """Make layer ``i``'s outputs the next layer's inputs: ``outputs`` if given, else run layer ``i`` now
        (so a layer changed after :meth:`run` passes on its changed outputs); then put layer ``i`` back."""
        self.states = outputs if outputs is not None else self.run(i)
        self.offload()

    # ---- placement -------------------------------------------------------------------------------
    @torch.no_grad()
    def onload(self, i: int) -> torch.device:
        """Put layer ``i`` on its compute device (once; another layer there goes back first); return it."""
        if self._onloaded is not None and self._onloaded.layer == i:
            self._move_new_tensors(self._onloaded)  # a method may have added modules since
            return self._onloaded.device
        self.offload()
        layer = self.adapter.layer(i)
        device = self.exec_device or self.adapter.layer_device(i)
        from accelerate.utils import set_module_tensor_to_device

        state = _Onloaded(i, device)
        resident: dict[torch.device, int] = {}
        for module in layer.modules():
            hook = _offload_hook(module)
            names: list[str] = []
            if hook is not None:
                names = [n for n, _ in _own_tensors(module, buffers=getattr(hook, "offload_buffers", False))]
                for name in names:
                    # a copy: a disk-offloaded value is a read-only memory map of its file
                    value = hook.weights_map[name].to(device, copy=True)
                    set_module_tensor_to_device(module, name, device, value=value)
                state.offloaded.append((module, hook, names, hook.offload, hook.execution_device))
                hook.offload = False  # the hook must not reload (and so undo changes) or drop the weights
            any_hook = getattr(module, "_hf_hook", None)
            if any_hook is not None and hasattr(any_hook, "execution_device"):
                if hook is None:
                    state.hooks.append((any_hook, any_hook.execution_device))
                any_hook.execution_device = device  # where the hook sends this module's inputs
            for name, tensor in _own_tensors(module):
                if name in names or tensor.device.type == "meta":
                    continue
                state.homes[(id(module), name)] = tensor.device
                resident[tensor.device] = resident.get(tensor.device, 0) + tensor.numel()
                _set_device(module, name, device)
        state.resident = max(resident, key=resident.get) if resident else torch.device("cpu")
        self._onloaded = state
        return device

    @torch.no_grad()
    def offload(self) -> None:
        """Put the layer that is on the compute device back where it lives (no-op when none is)."""
        state, self._onloaded = self._onloaded, None
        if state is None:
            return
        from accelerate.utils import set_module_tensor_to_device

        for module, hook, names, offload, execution_device in state.offloaded:
            for name in names:
                _write_back(hook, name, getattr(module, name))
                set_module_tensor_to_device(module, name, "meta")
            hook.offload, hook.execution_device = offload, execution_device
        for hook, execution_device in state.hooks:
            hook.execution_device = execution_device
        offloaded = {(id(module), name) for module, _, names, _, _ in state.offloaded for name in names}
        for module in self.adapter.layer(state.layer).modules():
            for name, tensor in _own_tensors(module):
                key = (id(module), name)
                if key not in offloaded and tensor.device.type != "meta":
                    _set_device(module, name, state.homes.get(key, state.resident))

    def _move_new_tensors(self, state: _Onloaded) -> None:
        for module in self.adapter.layer(state.layer).modules():
            for name, tensor in _own_tensors(module):
                if tensor.device.type != "meta" and tensor.device != state.device:
                    _set_device(module, name, state.device)


def _set_device(module: nn.Module, name: str, device: torch.device) -> None:
    """Move one parameter or buffer in place (the Parameter object stays; references to it stay valid)."""
    tensor = module._parameters.get(name)
    if tensor is not None:
        tensor.data = tensor.data.to(device)
    else:
        module._buffers[name] = module._buffers[name].to(device)

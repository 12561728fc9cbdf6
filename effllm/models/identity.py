"""Identity and integrity of a loaded model: :func:`fingerprint` (SHA-256 of the weights pruning leaves
alone: embeddings, norms), and the mark that pruning or slicing stopped on a model part-way
(:func:`mark_incomplete`), which :func:`check_complete` refuses with the message that says what happened.

effllm.adapters is imported where it is used: it imports transformers' masking utilities, which import
torch._dynamo (about 1 s), and ``import effllm.models`` should not pay for that."""

from __future__ import annotations

import hashlib

import torch

from effllm import records


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

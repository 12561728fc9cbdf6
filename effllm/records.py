"""Everything effllm records on a model object, in one place, each with a typed get / set / clear.

A method that changes a model (slicing, pruning, exit training, sparse kernels) or a loader that builds one (stand-ins)
leaves a note on it that later code reads: the slicing settings to save beside the weights, the trained exits that
decoding uses by default, the hub id a stand-in replaces. Each note is a plain attribute ``_effllm_<name>`` set with
``object.__setattr__``, so that an ``nn.Module`` does not register it as a submodule (it stays out of ``state_dict``
and ``.to()``), and ``copy.deepcopy`` carries it along. Nothing outside this module spells those attribute names.

    from effllm import records
    records.EXITS.get(model)              # the trained exits, or None
    records.SLICING.set(model, settings)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Record(Generic[T]):
    """One note effllm keeps on a model: ``name`` (the attribute is ``_effllm_<name>``) and what it holds."""

    name: str
    holds: str

    @property
    def attribute(self) -> str:
        return f"_effllm_{self.name}"

    def get(self, model: Any, default: T | None = None) -> T | None:
        return getattr(model, self.attribute, default)

    def set(self, model: Any, value: T | None) -> None:
        object.__setattr__(model, self.attribute, value)  # not a submodule: out of state_dict, kept by deepcopy

    def clear(self, model: Any) -> None:
        model.__dict__.pop(self.attribute, None)

    def present(self, model: Any) -> bool:
        return hasattr(model, self.attribute)


ADAPTER = Record("adapter", "the model's cached architecture adapter (effllm.adapters.get_adapter)")
EXEC_DEVICE = Record("exec_device", "the device layer-by-layer capture runs on (effllm.capture.execution_device)")
EXITS = Record("exits", "trained exit modules, exit_transform(layer, hidden) -> hidden (effllm.training)")
EXIT_TRAINING = Record("exit_training", "the exit-training result dict: config, curves, minutes (effllm.training)")
INCOMPLETE = Record("incomplete", "why an interrupted in-place method left the model unusable (effllm.models)")
PRUNING = Record("pruning", "method, sparsity and pattern of the masks applied (effllm.pruning)")
SLICING = Record("slicing", "the slicing settings: fractions, kept widths, calibration (effllm.slicing)")
SPARSE = Record("sparse", "the sparse format and backend the linears were converted to (effllm.sparse)")
STANDIN = Record("standin", "the hub id a tiny random stand-in replaces (effllm.standins)")

RECORDS = (ADAPTER, EXEC_DEVICE, EXITS, EXIT_TRAINING, INCOMPLETE, PRUNING, SLICING, SPARSE, STANDIN)

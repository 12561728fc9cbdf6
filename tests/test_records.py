"""effllm.records: the notes effllm keeps on a model live in one module, stay out of the state dict and travel with
copy.deepcopy."""

import copy
import re

import torch

from effllm import records
from effllm.models import tiny_model
from effllm.paths import REPO_ROOT


def test_a_record_is_a_plain_attribute_kept_by_deepcopy_and_out_of_the_state_dict():
    model, _ = tiny_model("llama")
    keys = set(model.state_dict())
    assert records.SLICING.get(model) is None and not records.SLICING.present(model)
    settings = {"fractions": [0.25, 0.5]}
    records.SLICING.set(model, settings)
    assert records.SLICING.get(model) is settings and records.SLICING.present(model)
    exits = torch.nn.Linear(2, 2)  # a module: recorded, never registered as a submodule
    records.EXITS.set(model, exits)
    assert set(model.state_dict()) == keys and records.EXITS.attribute not in dict(model.named_modules())
    copied = copy.deepcopy(model)
    assert records.SLICING.get(copied) == settings and records.SLICING.get(copied) is not settings
    records.SLICING.clear(model)
    assert records.SLICING.get(model, "none") == "none" and records.SLICING.get(copied) == settings
    records.SLICING.clear(model)  # clearing twice is fine


def test_every_record_has_its_own_attribute():
    attributes = [record.attribute for record in records.RECORDS]
    assert len(set(attributes)) == len(attributes) and all(a.startswith("_effllm_") for a in attributes)


def test_no_code_outside_records_spells_a_record_attribute():
    pattern = re.compile(r"[\"'.]_effllm_[a-z]")
    sources = [*REPO_ROOT.glob("effllm/**/*.py"), *REPO_ROOT.glob("notebooks/*.py"), *REPO_ROOT.glob("tools/*.py")]
    offenders = [f"{path.relative_to(REPO_ROOT)}:{number}" for path in sources if path.name != "records.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == [], f"read and write model records through effllm.records: {offenders}"

"""The design goals of issue 28 hold for the whole package (measured by tools/design_metrics.py)."""

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "design_metrics", Path(__file__).resolve().parents[1] / "tools" / "design_metrics.py")
design = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(design)


@pytest.fixture(scope="module")
def measured():
    return design.measure()


def test_no_import_cycles(measured):
    assert measured["import_cycles"] == []


def test_module_function_and_signature_sizes(measured):
    lines, name = measured["largest_modules"][0]
    assert lines <= design.GOALS["largest_module"], name
    lines, name = measured["longest_functions"][0]
    assert lines <= design.GOALS["longest_function"], name
    params, name = measured["widest_signatures"][0]
    assert params <= design.GOALS["widest_signature"], name


def test_the_cycle_finder_finds_a_function_level_cycle(tmp_path):
    """A check that could fail: a cycle made only by an import inside a function is found."""
    pkg = tmp_path / "effllm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from effllm import b\n")
    (pkg / "b.py").write_text("def f():\n    from effllm.a import x\n")
    (pkg / "c.py").write_text("from effllm import a\n")
    known = design.modules(pkg)
    assert design.cycles(design.import_graph(known), list(known)) == [["effllm.a", "effllm.b"]]


# Calls of the adapter's head that are not exits: the final layer's logits of a skipping forward (controllers' loss),
# and the timed statement of the vocabulary check's benchmark (a string handed to torch.utils.benchmark).
NOT_EXITS = {"controllers.py": 1, "vocab.py": 2}


def test_exit_logits_are_computed_in_one_place():
    """Only effllm/decoding/exits.py turns a hidden state into exit logits through the adapter's head."""
    root = design.ROOT
    found = {}
    for path in root.rglob("*.py"):
        if "adapters" in path.parts:
            continue
        text = path.read_text()
        count = text.count("adapter.logits(") + text.count(".head_logits(")
        if count:
            found[str(path.relative_to(root))] = count
    assert found.pop("decoding/exits.py") == 1
    assert found == NOT_EXITS

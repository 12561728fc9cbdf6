"""effllm.io: staging folders that never leak, sealed folders that refuse any change, and the guard that
keeps a save from deleting a folder of other files."""

import json
import os
import time

import pytest
import torch

from effllm import io


def test_staging_is_removed_on_ctrl_c_and_replaces_only_on_success(tmp_path):
    final = tmp_path / "artefact"
    with pytest.raises(KeyboardInterrupt), io.staging(final) as folder:
        (folder / "weights.bin").write_bytes(b"x" * 1024)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with io.staging(final) as folder:
        (folder / "weights.bin").write_bytes(b"new")
        io.seal(folder, "test-kind", {"n": 1})
    assert io.verify(final, "test-kind") == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artefact"]


def test_leftovers_of_killed_writers_are_removed(tmp_path):
    final = tmp_path / "artefact"
    fresh, old, retired = (tmp_path / ".artefact.staging-fresh", tmp_path / ".artefact.staging-old",
                           tmp_path / ".artefact.old-x")
    for leftover in (fresh, old, retired):
        leftover.mkdir()
    hours_ago = time.time() - 2 * io.STALE_STAGING_SECONDS
    os.utime(old, (hours_ago, hours_ago))
    os.utime(retired, (hours_ago, hours_ago))
    with io.staging(final) as folder:  # a concurrent writer's recent folder is left alone
        io.seal(folder, "test-kind", {})
    assert not old.exists() and not retired.exists() and fresh.exists()
    with io.staging(final, stale_after=0) as folder:  # a writer holding the target's lock removes them all
        io.seal(folder, "test-kind", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artefact"]


def test_sealed_folder_refuses_changed_added_and_removed_files(tmp_path):
    with io.staging(tmp_path / "a") as folder:
        (folder / "config.json").write_text('{"rope_theta": 10000.0}')
        (folder / "sub").mkdir()
        (folder / "sub" / "w.bin").write_bytes(b"w")
        io.seal(folder, "test-kind", {"eps": 1e-5})
    folder = tmp_path / "a"
    with pytest.raises(io.ArtifactError, match="describes a 'test-kind', not a 'other'"):
        io.verify(folder, "other")
    (folder / "config.json").write_text('{"rope_theta": 500000.0}')
    with pytest.raises(io.ArtifactError, match="config.json does not match the checksum"):
        io.verify(folder, "test-kind")
    (folder / "config.json").write_text('{"rope_theta": 10000.0}')
    (folder / "extra").write_text("x")
    with pytest.raises(io.ArtifactError, match="holds files the test-kind was not saved with"):
        io.verify(folder, "test-kind")
    (folder / "extra").unlink()
    seal = json.loads((folder / io.SEAL_FILE).read_text())
    seal["meta"]["eps"] = 1e-2
    (folder / io.SEAL_FILE).write_text(json.dumps(seal))
    with pytest.raises(io.ArtifactError, match="changed after it was written"):
        io.verify(folder, "test-kind")


def test_tensor_file_with_a_flipped_byte_is_refused(tmp_path):
    path = io.save_tensors(tmp_path / "t.safetensors", {"x": torch.arange(8.0)}, {"m": 1}, "test-tensors")
    tensors, meta = io.load_tensors(path, "test-tensors")
    assert torch.equal(tensors["x"], torch.arange(8.0)) and meta == {"m": 1}
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(io.ArtifactError, match="does not match the checksum"):
        io.load_tensors(path, "test-tensors")


def test_check_replaceable_protects_folders_of_other_files(tmp_path):
    assert io.check_replaceable(tmp_path / "new", "test-kind") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    io.check_replaceable(tmp_path / "empty", "test-kind")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already holds files that are not a saved test-kind"):
        io.check_replaceable(tmp_path / "mine", "test-kind")
    with io.staging(tmp_path / "sealed") as folder:
        io.seal(folder, "test-kind", {})
    io.check_replaceable(tmp_path / "sealed", "test-kind")
    with pytest.raises(ValueError, match="not a saved other-kind"):
        io.check_replaceable(tmp_path / "sealed", "other-kind")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        io.check_replaceable(tmp_path / "a-file", "test-kind")


def test_check_writable_finds_an_unwritable_output_first(tmp_path):
    assert io.check_writable(tmp_path / "sub" / "r.json") == tmp_path / "sub" / "r.json"
    with pytest.raises(ValueError, match="is a folder"):
        io.check_writable(tmp_path)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="cannot write"):
        io.check_writable(tmp_path / "a-file" / "r.json")

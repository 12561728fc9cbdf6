"""Saved artefacts: one format, written atomically, read back only when whole and unchanged.

Two shapes of artefact, one rule: a JSON sidecar names what the artefact is (``kind``), carries its
metadata, the SHA-256 of every file it consists of, and one checksum over all of that. A reader checks the
kind, every file's hash and the checksum before it trusts a byte, so a torn write, a flipped byte, an edited
sidecar or a file from another artefact is refused with :class:`ArtifactError`, never half-loaded.

- A tensor file: ``save_tensors(path, tensors, meta, kind)`` writes ``path`` (safetensors) and
  ``path.json``; ``load_tensors(path, kind)`` returns ``(tensors, meta)``.
- A folder (a model with its config, tokenizer and extras): write the files into
  ``with staging(folder) as tmp: ...; seal(tmp, kind, meta)``; the staging folder replaces ``folder`` in
  one rename only when the block finishes, and is removed when it does not (also on Ctrl-C). A process
  killed outright leaves a ``.NAME.staging-*`` folder behind; the next ``staging`` of the same target
  removes such leftovers. ``verify(folder, kind)`` returns the metadata.

Files are written through :func:`effllm.paths.write_atomic` (temporary file + rename), the sidecar last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from effllm.paths import write_atomic

SEAL_FILE = "effllm-artifact.json"
STALE_STAGING_SECONDS = 6 * 3600  # a staging folder this old belongs to no running process


class ArtifactError(ValueError):
    """A saved artefact that is missing, of another kind, incomplete or changed since it was written."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksum(kind: str, meta: Any, files: dict[str, str]) -> str:
    canonical = json.dumps({"kind": kind, "meta": meta, "files": files}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


def write_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` as JSON to ``path`` atomically (readers see the old file or the whole new one)."""
    path = Path(path)
    write_atomic(path, _json_bytes(value))
    return path


def check_writable(path: str | Path) -> Path:
    """Raise ``ValueError`` now, before any work, when ``path`` cannot be written: its folder cannot be created
    or written, or ``path`` is a folder. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output path {path} is a folder; give a file name")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".effllm-probe-")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"cannot write {path}: {error.strerror or error} (folder {folder}); choose another "
                         "output path") from None
    return path


def check_replaceable(folder: str | Path, kind: str) -> Path:
    """Raise ``ValueError`` unless ``folder`` may be replaced by a new ``kind`` artefact: it does not exist, is
    empty, or is an earlier artefact of that kind (its seal says so). Saving over a folder of other files
    would delete them. Returns the path."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; give a folder to save the {kind} in")
    if not folder.is_dir() or not any(folder.iterdir()):
        return folder
    try:
        found = json.loads((folder / SEAL_FILE).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != kind:
        raise ValueError(f"{folder} already holds files that are not a saved {kind}; saving replaces the whole "
                         "folder, so choose a new or empty folder (or remove this one)")
    return folder


# ---- tensor files ---------------------------------------------------------------------------------


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], kind: str) -> Path:
    """Write ``tensors`` to ``path`` (safetensors) and the sidecar ``path.json`` (kind, meta, checksums)."""
    from safetensors.torch import save

    path = Path(path)
    payload = save({name: t.detach().contiguous().cpu() for name, t in tensors.items()})
    write_atomic(path, payload)
    files = {path.name: hashlib.sha256(payload).hexdigest()}
    write_atomic(_sidecar(path), _json_bytes({"kind": kind, "meta": meta, "files": files,
                                              "checksum": _checksum(kind, meta, files)}))
    return path


def _read_sidecar(path: Path, kind: str) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: not a saved {kind} (or only partly written)")
    try:
        sidecar = json.loads(path.read_text())
        found_kind, meta, files, checksum = sidecar["kind"], sidecar["meta"], sidecar["files"], sidecar["checksum"]
    except (ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{path} is unreadable or incomplete ({error!r}); save the {kind} again") from None
    if found_kind != kind:
        raise ArtifactError(f"{path} describes a {found_kind!r}, not a {kind!r}")
    if not isinstance(files, dict) or _checksum(kind, meta, files) != checksum:
        raise ArtifactError(f"{path} was changed after it was written (its checksum does not match); save the "
                            f"{kind} again")
    return sidecar


def _check_files(folder: Path, files: dict[str, str], kind: str) -> None:
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            raise ArtifactError(f"{file} is missing: the {kind} at {folder} is incomplete")
        if sha256_file(file) != expected:
            raise ArtifactError(f"{file} does not match the checksum it was saved with: the file is corrupt or was "
                                f"replaced; save the {kind} again")


def load_tensors(path: str | Path, kind: str, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a tensor file written by :func:`save_tensors` after checking kind and checksums."""
    from safetensors.torch import load_file

    path = Path(path)
    sidecar = _read_sidecar(_sidecar(path), kind)
    if set(sidecar["files"]) != {path.name}:
        raise ArtifactError(f"{_sidecar(path)} describes {sorted(sidecar['files'])}, not {path.name}")
    _check_files(path.parent, sidecar["files"], kind)
    return load_file(str(path), device=str(device)), sidecar["meta"]


# ---- folders --------------------------------------------------------------------------------------


def seal(folder: str | Path, kind: str, meta: dict[str, Any]) -> Path:
    """Record every file of ``folder`` (recursively, except the seal itself) with its SHA-256, ``meta`` and one
    checksum over all of it, in ``folder/effllm-artifact.json``. Call it after the last file is written."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256_file(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SEAL_FILE}
    write_atomic(folder / SEAL_FILE, _json_bytes({"kind": kind, "meta": meta, "files": files,
                                                 "checksum": _checksum(kind, meta, files)}))
    return folder


def verify(folder: str | Path, kind: str) -> dict[str, Any]:
    """The metadata of a folder sealed by :func:`seal`, after checking its kind, that every recorded file is
    there with its recorded hash, and that no file was added beside them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder: no saved {kind} there")
    sidecar = _read_sidecar(folder / SEAL_FILE, kind)
    _check_files(folder, sidecar["files"], kind)
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != SEAL_FILE}
    added = sorted(present - set(sidecar["files"]))
    if added:
        raise ArtifactError(f"{folder} holds files the {kind} was not saved with ({', '.join(added[:3])}); save it again")
    return sidecar["meta"]


def is_sealed(folder: str | Path, kind: str) -> bool:
    """True when :func:`verify` accepts ``folder``."""
    try:
        verify(folder, kind)
    except ArtifactError:
        return False
    return True


def _remove_stale_stagings(final: Path, stale_after: float) -> None:
    now = time.time()
    # .staging-*: a writer killed before the rename; .old-*: one killed between its two renames
    for pattern in (f".{final.name}.staging-*", f".{final.name}.old-*"):
        for leftover in final.parent.glob(pattern):
            try:
                if now - leftover.stat().st_mtime >= stale_after:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                pass


@contextmanager
def staging(final: str | Path, stale_after: float = STALE_STAGING_SECONDS) -> Iterator[Path]:
    """A fresh folder beside ``final`` to write an artefact into; it replaces ``final`` when the block ends
    normally and is removed when it raises (KeyboardInterrupt included). Leftovers of killed writers older
    than ``stale_after`` seconds (default a few hours, so a concurrent writer's folder is left alone) are
    removed first; a writer that holds a lock on ``final`` passes 0."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_stagings(final, stale_after)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        yield temporary
        if final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, retired / "old")
            os.replace(temporary, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, final)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)

"""Placement of a model larger than one device: the ``device_map`` / ``max_memory`` / offload options
:func:`effllm.models.load_model` gives ``from_pretrained`` (checked, with their environment defaults), and the
same placement for in-memory models (tiny models and stand-ins, through accelerate)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from effllm.models.embedded import EMBEDDED_MODELS
from effllm.models.sources import TINY_PREFIX
from effllm.paths import cache_dir

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map_options(
    name: str,
    device: str | torch.device | None,
    device_map: str | dict[str, Any] | None,
    max_memory: dict[int | str, int | str] | None,
    offload_folder: str | Path | None,
) -> dict[str, Any]:
    """The from_pretrained placement options, checked; {} for a plain load on one device.

    Hub ids default to ``device_map="auto"`` when a CUDA GPU is present (the ``paper`` profile: models
    larger than one GPU spread over all GPUs, then CPU, then disk); ``EFFLLM_MAX_MEMORY``
    (``"0=70GiB,1=70GiB,cpu=200GiB"``) and ``EFFLLM_OFFLOAD_FOLDER`` give the limits without code.
    """
    if device == "auto":  # the older spelling
        device, device_map = None, device_map or "auto"
    if device_map is not None and device is not None:
        raise ValueError(f"give either device={device!r} or device_map={device_map!r}, not both")
    if device_map is None and device is None and is_hub_id(name) and torch.cuda.is_available():
        device_map = "auto"
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory and offload_folder need a device_map (e.g. device_map='auto')")
        return {}
    if isinstance(device_map, str) and device_map not in DEVICE_MAP_STRATEGIES:
        raise ValueError(f"device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a dict of module "
                         f"name -> device (an int GPU index, 'cpu' or 'disk'); got {device_map!r}")
    if not isinstance(device_map, str | dict):
        raise ValueError(f"device_map must be a strategy name or a dict; got {type(device_map).__name__}")
    if max_memory is None and os.environ.get("EFFLLM_MAX_MEMORY"):
        max_memory = parse_max_memory(os.environ["EFFLLM_MAX_MEMORY"])
    offload_folder = offload_folder or os.environ.get("EFFLLM_OFFLOAD_FOLDER") or None
    needs_disk = isinstance(device_map, dict) and "disk" in device_map.values()
    if needs_disk and offload_folder is None:
        offload_folder = cache_dir() / "offload" / re.sub(r"[^A-Za-z0-9_.-]+", "--", name)
    options: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        options["max_memory"] = max_memory
    if offload_folder is not None:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        options["offload_folder"] = str(offload_folder)
    return options


def parse_max_memory(text: str) -> dict[int | str, str]:
    """``"0=70GiB,cpu=200GiB"`` -> ``{0: "70GiB", "cpu": "200GiB"}`` (EFFLLM_MAX_MEMORY)."""
    limits: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise ValueError(f"EFFLLM_MAX_MEMORY must look like '0=70GiB,cpu=200GiB'; got {text!r}")
        key = key.strip()
        limits[int(key) if key.isdigit() else key] = value.strip()
    return limits


def is_hub_id(name: str) -> bool:
    return (name not in EMBEDDED_MODELS and not name.startswith(TINY_PREFIX) and name.count("/") == 1
            and not name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir())


def dispatch_in_memory(model: torch.nn.Module, options: dict[str, Any]) -> torch.nn.Module:
    """Place an in-memory model as from_pretrained would (accelerate's dispatch_model), for tests."""
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = options["device_map"]
    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, max_memory=options.get("max_memory"),
                                           no_split_module_classes=model._no_split_modules)
    return dispatch_model(model, device_map=device_map, offload_dir=options.get("offload_folder"))

"""This project's weight files: one safetensors file each, its header carrying JSON metadata.

kind "adapter": LoRA matrices (peft names; none for a head-only adapter) + head, applied on a base checkpoint
                identified by its SHA256.
kind "model": a whole backbone + head (models trained with medsapiens), no base needed.
kind "atlas-refiner": networks that refine the atlas + the atlas cases themselves (detectors/refiner.py).
kind "state": the optimizer state beside a model in training (`<model>.state`), to resume it.
Metadata: landmark names, flip pairs, input size, sigma, architecture, base identity, training cases, date.
Written atomically: a temporary file in the same folder, fsync, then rename over the target.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from ..io.atomic import atomic_write
from ..io.checksum import sha256_of

if TYPE_CHECKING:  # reading a header (kind_of, read_metadata) needs no torch
    import torch

FORMAT = "medsapiens-weights/1"
KINDS = ("adapter", "model", "state", "atlas-refiner")


def save_weights(path, tensors: dict[str, torch.Tensor], metadata: dict, kind: str) -> Path:
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    meta = {"kind": kind, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **metadata}
    header = {"format": FORMAT, "metadata": json.dumps(meta)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def _header(path) -> dict | None:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100_000_000:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return meta if meta.get("format") == FORMAT else None


def is_weights_file(path) -> bool:
    """True for a safetensors file written by save_weights."""
    return _header(path) is not None


def read_metadata(path) -> dict | None:
    """The metadata of a file written by save_weights, read from its header only (no tensors, no torch); else
    None."""
    meta = _header(path)
    try:
        return json.loads(meta["metadata"]) if meta else None
    except (KeyError, ValueError):
        return None


def kind_of(path) -> str | None:
    """The kind of a file written by save_weights (read from its header only), else None."""
    meta = read_metadata(path)
    return meta.get("kind") if isinstance(meta, dict) else None


def load_weights(path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["metadata"])
    return load_file(str(path)), meta


def save_trained(path, model, names: list[str], input_hw, sigma: float, base=None, **extra) -> Path:
    """Save a model trained with medsapiens: kind "adapter" (its LoRA, if any, + head, on the frozen `base`), else "model".

    An adapter records its base file's name and SHA256, to check it at load time.
    """
    from .lora import has_lora, lora_state_dict

    if len(names) != model.num_keypoints:
        raise ValueError(f"{len(names)} names for {model.num_keypoints} heatmaps")
    meta = {"landmark_names": list(names), "input_hw": list(input_hw), "sigma": float(sigma),
            "architecture": model.config(), "pos_grid": list(model.backbone.pos_grid), **extra}
    head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    if base is not None:
        meta["base"] = {"name": Path(base).name, "sha256": sha256_of(base)}
        meta.pop("pos_grid")  # the base's grid applies
        return save_weights(path, {**lora_state_dict(model), **head}, meta, "adapter")
    if has_lora(model):
        raise ValueError("an adapter needs the base checkpoint it was trained on")
    return save_weights(path, model.state_dict(), meta, "model")

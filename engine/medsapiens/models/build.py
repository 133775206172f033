"""Tensors + metadata read by checkpoints.py -> the SapiensPose model they describe (eval mode, CPU).

The architecture comes from the embedding width and depth, the number of landmarks from the head; LoRA files
are applied on their base; `channels` keeps only some of the head's landmarks (one region of a generalist).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..errors import InputError, describe_mismatch
from ..io.checksum import sha256_of
from . import lora
from .checkpoints import BASE_LAYOUTS, NEEDS_BASE, Checkpoint
from .sapiens import SapiensPose, arch_name_for


def backbone_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """`backbone.*` tensors of a base checkpoint, the pretrain cls token and cls position slot removed."""
    if ckpt.layout == "pretrain":
        t = {f"backbone.{k}": v for k, v in ckpt.tensors.items() if k != "cls_token"}
        pos = t["backbone.pos_embed"]
        if "cls_token" in ckpt.tensors or not _is_square(pos.shape[1]):
            t["backbone.pos_embed"] = pos[:, 1:]
        return t
    return {k: v for k, v in ckpt.tensors.items() if k.startswith("backbone.")}


def head_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt.tensors.items() if k.startswith("head.")}


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def pos_grid_for(tokens: int, meta: dict) -> tuple[int, int]:
    """Grid of a stored position embedding: from metadata, else 4:3 portrait (pose) or square (pretrain)."""
    if "pos_grid" in meta:
        return tuple(meta["pos_grid"])
    h = math.isqrt(tokens * 4 // 3)
    if h * (h * 3 // 4) == tokens and h % 4 == 0:
        return h, h * 3 // 4
    if _is_square(tokens):
        return math.isqrt(tokens), math.isqrt(tokens)
    raise InputError(f"cannot tell the grid of a {tokens}-token position embedding")


def build_model(ckpt: Checkpoint, base: Checkpoint | None = None, channels=None) -> SapiensPose:
    """The model (eval mode, on the CPU) that the checkpoint describes; adapters need their base.

    channels: the head outputs to keep, in this order (default all): the final 1x1 conv's rows are sliced.
    """
    if ckpt.layout in NEEDS_BASE:
        if base is None:
            raise InputError(f"{ckpt.path}: a {ckpt.layout} checkpoint holds only LoRA weights and a head; give the "
                             "Sapiens checkpoint it was trained on: `detect LORA --base BASE` or `detect BASE "
                             "--adapter LORA`")
        if base.layout not in BASE_LAYOUTS:
            raise InputError(f"{base.path}: a {base.layout} checkpoint cannot serve as a base")
        _check_base_identity(ckpt, base)
        backbone, source = backbone_tensors(base), base
        if ckpt.layout == "medsapiens":
            lora_weights = lora.from_medsapiens(ckpt.tensors)
        else:
            lora_weights = {k: v for k, v in ckpt.tensors.items() if ".lora_" in k}
    else:
        if base is not None:
            raise InputError(f"{ckpt.path}: a {ckpt.layout} checkpoint is complete and takes no base")
        backbone, source, lora_weights = backbone_tensors(ckpt), ckpt, {}
    head = head_tensors(ckpt)
    if not head:
        raise InputError(f"{ckpt.path}: a {ckpt.layout} checkpoint has no heatmap head, so it cannot detect "
                         "landmarks; use it as --base of an adapter, or fine-tune one on it")
    if "head.final_layer.weight" not in head:
        raise InputError(describe_mismatch(f"{ckpt.path}: incomplete checkpoint", missing=["head.final_layer.weight"]))
    if channels is not None:
        head = select_channels(head, channels, ckpt)
    tensors = {**backbone, **head}
    arch, grid, head_width = architecture_of(tensors, source)
    model = SapiensPose(arch, head["head.final_layer.weight"].shape[0], grid, head_width)
    _load_strict(model, tensors, ckpt.path)
    if lora_weights:
        lora.add_lora(model, lora.lora_blocks(lora_weights))
        try:
            lora.load_lora(model, lora_weights)
        except InputError as e:
            raise InputError(f"{ckpt.path}: {e}") from None
    return model.eval()


def select_channels(head: dict, channels, ckpt: Checkpoint) -> dict:
    """The head with only the final layer's outputs `channels` (a generalist restricted to one region)."""
    k = head["head.final_layer.weight"].shape[0]
    channels = list(channels)
    if not channels or min(channels) < 0 or max(channels) >= k:
        raise InputError(f"{ckpt.path}: the head has {k} outputs; channels {channels[:1]}..{channels[-1:]} do not fit")
    index = torch.tensor(channels)
    return {**head, **{f"head.final_layer.{p}": head[f"head.final_layer.{p}"][index] for p in ("weight", "bias")
                       if f"head.final_layer.{p}" in head}}


def base_for_training(ckpt: Checkpoint, names: list[str], head_channels: int | None = None) -> SapiensPose:
    """A model for `names` on a base checkpoint: its backbone, and its head where it has one.

    The head's final layer is kept only when the base detects exactly these landmarks; otherwise it starts
    afresh, as MedSapiens re-initialises the final conv for a new task. head_channels: the width of a head the
    base does not bring (default the architecture's).
    """
    require_base(ckpt)
    head = head_tensors(ckpt)
    if ckpt.landmark_names != list(names):
        head = {k: v for k, v in head.items() if not k.startswith("head.final_layer.")}
    tensors = {**backbone_tensors(ckpt), **head}
    arch, grid, head_width = architecture_of(tensors, ckpt)
    model = SapiensPose(arch, len(names), grid, head_width or head_channels)
    expected = model.state_dict()
    kept = {k: v for k, v in tensors.items() if k in expected and v.shape == expected[k].shape}
    absent = [k for k in expected if k.startswith("backbone.") and k not in kept]
    if absent:
        raise InputError(describe_mismatch(f"{ckpt.path}: the backbone does not fit a {model.arch_name} model",
                                           missing=absent))
    model.load_state_dict({k: v.float() for k, v in kept.items()}, strict=False)
    return model


def require_base(ckpt: Checkpoint) -> None:
    if ckpt.layout not in BASE_LAYOUTS:
        raise InputError(f"{ckpt.path}: holds {ckpt.layout} weights, which cannot serve as a base; give the "
                         "base model they were trained on")


def architecture_of(tensors: dict, source: Checkpoint) -> tuple[str, tuple[int, int], int | None]:
    """(architecture name, position grid, head width or None without a head) that the tensors describe."""
    required = ("backbone.patch_embed.projection.weight", "backbone.pos_embed")
    absent = [k for k in required if k not in tensors]
    if absent:
        raise InputError(describe_mismatch(f"{source.path}: incomplete checkpoint", missing=absent))
    width = tensors["backbone.patch_embed.projection.weight"].shape[0]
    depth = len({k.split(".")[2] for k in tensors if re.match(r"backbone\.layers\.\d+\.", k)})
    head_width = tensors["head.deconv_layers.0.weight"].shape[1] if "head.deconv_layers.0.weight" in tensors else None
    try:
        return (arch_name_for(width, depth), pos_grid_for(tensors["backbone.pos_embed"].shape[1], source.meta),
                head_width)
    except (KeyError, InputError) as e:
        raise InputError(f"{source.path}: {e.args[0]}") from None


def _load_strict(model: SapiensPose, tensors: dict, path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise InputError(describe_mismatch(f"{path}: weights do not fit a {model.arch_name} model",
                                           missing, unexpected, wrong))
    model.load_state_dict({k: v.float() for k, v in tensors.items()})


def _check_base_identity(ckpt: Checkpoint, base: Checkpoint) -> None:
    want = ckpt.meta.get("base", {}).get("sha256")
    if not want:
        return
    have = sha256_of(base.path)
    if have != want:
        raise InputError(f"{ckpt.path}: adapter was trained on base {ckpt.meta['base'].get('name', '?')} "
                         f"(sha256 {want[:12]}...), but {base.path} has sha256 {have[:12]}...")

"""Read any supported weight file and build the model from it, with no conversion step.

Layouts, recognised from the file's content (not its name):
  pose         Sapiens pose `.pth`: {'state_dict', 'meta'}, keys `backbone.*` and `head.*`
  pretrain     Sapiens pretrain `.pth`: flat backbone keys, `cls_token`, (1, 1 + 64*64, C) `pos_embed`
  torchscript  Sapiens "lite" TorchScript `.pt2` (a traced model; its state dict has the pose names)
  export       torch.export `.pt2` (the bfloat16 lite files)
  medsapiens   MedSapiens LoRA checkpoint: `backbone.module.layers.{i}.attn.{qkv,proj}.lora_{down,up}` + `head.*`
  adapter      this project's LoRA + head file (adapter_file.py); `model` the same with a whole backbone
The architecture comes from the embedding width and depth, the number of landmarks from the head.
"""
from __future__ import annotations

import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, describe_mismatch
from . import adapter_file, lora
from .sapiens import SapiensPose, arch_name_for

BASE_LAYOUTS = ("pose", "pretrain", "torchscript", "export", "model")
NEEDS_BASE = ("medsapiens", "adapter")


@dataclass
class Checkpoint:
    path: Path
    layout: str
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def landmark_names(self) -> list[str] | None:
        names = self.meta.get("landmark_names")
        if names is None and isinstance(self.meta.get("dataset_meta"), dict):  # mmpose checkpoints
            id2name = self.meta["dataset_meta"].get("keypoint_id2name")
            if isinstance(id2name, dict):
                names = [id2name[i] for i in sorted(id2name)]
        return list(names) if names is not None else None


def read_checkpoint(path) -> Checkpoint:
    """Open a weight file of any supported layout; a clear InputError names the file for anything else."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    if adapter_file.is_weights_file(path):
        tensors, meta = adapter_file.load_weights(path)
        if meta["kind"] == "state":
            raise InputError(f"{path}: an optimizer state for resuming training, not model weights")
        return Checkpoint(path, meta["kind"], tensors, meta)
    if zipfile.is_zipfile(path):
        names = zipfile.ZipFile(path).namelist()
        if any(re.search(r"(^|/)code/", n) or n.endswith("/constants.pkl") for n in names):
            return _read_torchscript(path)
        if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
            return _read_export(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: no state dict of tensors found (top-level keys: {_first(obj)})")
    return Checkpoint(path, _layout_of(path, state), dict(state), meta)


def _torch_load(path: Path):
    # Official checkpoints may carry numpy arrays in their metadata: allow exactly those, nothing else.
    safe = [np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.float32)),
            type(np.dtype(np.int64)), type(np.dtype(np.float64))]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a non-checkpoint file breaks the unpickler in many ways (IndexError, EOFError...)
        if "Unsupported global" in str(e):
            names = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)[:5])
            raise InputError(f"{path}: stores Python objects ({names}) that a weights-only load refuses; "
                             "save its state_dict alone") from None
        raise InputError(f"{path}: not a PyTorch checkpoint, or a truncated one ({type(e).__name__})") from None


def _read_torchscript(path: Path) -> Checkpoint:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as e:
        raise InputError(f"{path}: unreadable TorchScript file ({str(e).splitlines()[0]})") from None
    state = {k: v for k, v in module.state_dict().items()}
    return Checkpoint(path, "torchscript", _pose_only(state), {})


def _read_export(path: Path) -> Checkpoint:
    try:
        program = torch.export.load(str(path))
    except Exception as e:  # torch.export raises many types for a bad archive
        raise InputError(f"{path}: unreadable torch.export file ({str(e).splitlines()[0]})") from None
    state = {k: v.float() for k, v in program.module().state_dict().items()}
    return Checkpoint(path, "export", _pose_only(state), {})


def _pose_only(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith(("backbone.", "head."))}


def _layout_of(path: Path, state: dict) -> str:
    keys = list(state)
    if any(lora.is_medsapiens_key(k) for k in keys):
        return "medsapiens"
    if "backbone.patch_embed.projection.weight" in state and "head.final_layer.weight" in state:
        return "pose"
    if "patch_embed.projection.weight" in state and "pos_embed" in state:
        return "pretrain"
    raise InputError(f"{path}: not a Sapiens or MedSapiens checkpoint: none of the layouts pose, pretrain, "
                     f"MedSapiens LoRA matches (first keys: {_first(state)})")


def _first(d: dict, n: int = 5) -> str:
    keys = list(d)
    return ", ".join(map(str, keys[:n])) + (" ..." if len(keys) > n else "") if keys else "none"


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


def build_model(ckpt: Checkpoint, base: Checkpoint | None = None) -> SapiensPose:
    """The model (eval mode, on the CPU) that the checkpoint describes; adapters need their base."""
    if ckpt.layout in NEEDS_BASE:
        if base is None:
            raise InputError(f"{ckpt.path}: a {ckpt.layout} checkpoint holds only LoRA weights and a head; "
                             "give the Sapiens checkpoint it was trained on as the base (--base)")
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
    tensors = {**backbone, **head}
    model = _empty_model(tensors, source, head["head.final_layer.weight"].shape[0])
    _load_strict(model, tensors, ckpt.path)
    if lora_weights:
        lora.add_lora(model, lora.lora_blocks(lora_weights))
        try:
            lora.load_lora(model, lora_weights)
        except InputError as e:
            raise InputError(f"{ckpt.path}: {e}") from None
    return model.eval()


def base_for_training(ckpt: Checkpoint, names: list[str]) -> SapiensPose:
    """A model for `names` on a base checkpoint: its backbone, and its head where it has one.

    The head's final layer is kept only when the base detects exactly these landmarks; otherwise it starts
    afresh, as MedSapiens re-initialises the final conv for a new task.
    """
    if ckpt.layout not in BASE_LAYOUTS:
        raise InputError(f"{ckpt.path}: holds {ckpt.layout} weights, which cannot serve as a base; give the "
                         "base model they were trained on")
    head = head_tensors(ckpt)
    if ckpt.landmark_names != list(names):
        head = {k: v for k, v in head.items() if not k.startswith("head.final_layer.")}
    tensors = {**backbone_tensors(ckpt), **head}
    model = _empty_model(tensors, ckpt, len(names))
    expected = model.state_dict()
    kept = {k: v for k, v in tensors.items() if k in expected and v.shape == expected[k].shape}
    absent = [k for k in expected if k.startswith("backbone.") and k not in kept]
    if absent:
        raise InputError(describe_mismatch(f"{ckpt.path}: the backbone does not fit a {model.arch_name} model",
                                           missing=absent))
    model.load_state_dict({k: v.float() for k, v in kept.items()}, strict=False)
    return model


def _empty_model(tensors: dict, source: Checkpoint, num_keypoints: int) -> SapiensPose:
    """The architecture the tensors describe (width and depth of the backbone, head width where present)."""
    required = ("backbone.patch_embed.projection.weight", "backbone.pos_embed")
    absent = [k for k in required if k not in tensors]
    if absent:
        raise InputError(describe_mismatch(f"{source.path}: incomplete checkpoint", missing=absent))
    width = tensors["backbone.patch_embed.projection.weight"].shape[0]
    depth = len({k.split(".")[2] for k in tensors if re.match(r"backbone\.layers\.\d+\.", k)})
    head_width = tensors["head.deconv_layers.0.weight"].shape[1] if "head.deconv_layers.0.weight" in tensors else None
    try:
        arch = arch_name_for(width, depth, head_width)
        grid = pos_grid_for(tensors["backbone.pos_embed"].shape[1], source.meta)
    except (KeyError, InputError) as e:
        raise InputError(f"{source.path}: {e.args[0]}") from None
    return SapiensPose(arch, num_keypoints, grid)


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
    have = adapter_file.sha256_of(base.path)
    if have != want:
        raise InputError(f"{ckpt.path}: adapter was trained on base {ckpt.meta['base'].get('name', '?')} "
                         f"(sha256 {want[:12]}...), but {base.path} has sha256 {have[:12]}...")

"""Read a weight file of any supported layout into tensors + metadata, with no conversion step and no code run.

Layouts, recognised from the file's content (not its name):
  pose         Sapiens pose `.pth`: {'state_dict', 'meta'}, keys `backbone.*` and `head.*`
  pretrain     Sapiens pretrain `.pth`: flat backbone keys, `cls_token`, (1, 1 + 64*64, C) `pos_embed`
  torchscript  Sapiens "lite" TorchScript `.pt2` (a traced model; its state dict has the pose names)
  export       torch.export `.pt2` (the bfloat16 lite files)
  medsapiens   MedSapiens LoRA checkpoint: `backbone.module.layers.{i}.attn.{qkv,proj}.lora_{down,up}` + `head.*`
  adapter      this project's LoRA + head file (weight_files.py); `model` the same with a whole backbone
Pickled `.pth` files are read by torch's weights-only unpickler. Besides tensors and plain containers it accepts
exactly what official files carry: numpy arrays and scalars in metadata; in files written by mmengine's
CheckpointHook also `collections.Counter` in scheduler state and mmengine's `HistoryBuffer` log records, read
into an inert stand-in (with `getattr`, which they pickle, only naming their statistics), so mmengine is
neither imported nor needed. Anything else is refused by name.
Building the model from what is read is build.py's job.
"""
from __future__ import annotations

import collections
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from . import lora, weight_files

BASE_LAYOUTS = ("pose", "pretrain", "torchscript", "export", "model")
NEEDS_BASE = ("medsapiens", "adapter")


class LogRecord:
    """Stands in for mmengine's HistoryBuffer (training-log scalars in `message_hub`): holds its fields, runs nothing."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


def _log_record_method(owner, name: str) -> str:
    """Stands in for `getattr`, which HistoryBuffer records use to name their statistics (HistoryBuffer.min ...):
    only the name is kept, and only for a log record; anything else is refused."""
    if owner is not LogRecord:
        raise pickle.UnpicklingError(f"GLOBAL builtins.getattr applied to {getattr(owner, '__name__', owner)!r}")
    return f"HistoryBuffer.{name}"


def _numpy_globals() -> list:
    core = np._core if hasattr(np, "_core") else np.core
    dtypes = {type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_)}
    names = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *dtypes]
    # numpy 1.x files name numpy.core, numpy 2.x files numpy._core: accept both spellings
    aliases = [(core.multiarray._reconstruct, f"{other}.multiarray._reconstruct") for other in ("numpy.core", "numpy._core")]
    aliases += [(core.multiarray.scalar, f"{other}.multiarray.scalar") for other in ("numpy.core", "numpy._core")]
    return names + aliases


SAFE_GLOBALS = [*_numpy_globals(), collections.Counter,
                (LogRecord, "mmengine.logging.history_buffer.HistoryBuffer"), (_log_record_method, "builtins.getattr")]


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

    @property
    def flip_pairs(self) -> list[tuple[int, int]]:
        pairs = self.meta.get("flip_pairs")
        if pairs is None and isinstance(self.meta.get("dataset_meta"), dict):  # mmpose checkpoints
            pairs = self.meta["dataset_meta"].get("flip_pairs")
        return [tuple(int(i) for i in p) for p in pairs or ()]


def read_checkpoint(path) -> Checkpoint:
    """Open a weight file of any supported layout; a clear InputError names the file for anything else."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    if weight_files.is_weights_file(path):
        tensors, meta = weight_files.load_weights(path)
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
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a non-checkpoint file breaks the unpickler in many ways (IndexError, EOFError...)
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        if unsafe:
            raise InputError(f"{path}: refused by the weights-only load: it names the Python global {unsafe.group(1)}, "
                             "which is not on the allow-list (tensors, plain data, numpy, mmengine log records)") from None
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



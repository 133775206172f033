"""One factory for every detector kind; all share `detect(case, progress=None, cancel=None) -> Landmarks`, `names`
and `dim` (2: images, 3: volumes). Callers give resolved files (medsapiens.api resolves names, once)."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..case import Case, Landmarks, Volume, require_detectable
from ..errors import InputError, short_list
from ..models.build import build_model
from ..models.catalogue import Choice
from ..models.checkpoints import NEEDS_BASE, read_checkpoint
from ..models.lora import has_lora, merge_lora
from ..settings import HEATMAP_SIGMA, SAPIENS_INPUT_HW, AtlasSettings
from .heatmap import HeatmapDetector


class Detector(Protocol):
    names: list[str]
    dim: int  # 2: detects on images (Case), 3: on volumes (Volume)

    def detect(self, case, progress=None, cancel=None) -> Landmarks: ...


def is_refined_atlas(path) -> bool:
    """True for an adapter file written by fine-tuning on the atlas (no base model)."""
    from ..models.weight_files import kind_of
    from .refiner import KIND

    return path is not None and Path(path).is_file() and kind_of(path) == KIND


def atlas_detector(cases: list, deformable: bool | None = None, source="the atlas") -> Detector:
    """The weight-free atlas of annotated cases: 2D images, or volumes (the 3D atlas). deformable: the 2D atlas's
    B-spline stage always (True), never (False), or where its cases show it clearly better (None)."""
    if cases and isinstance(cases[0], Volume):
        if deformable:
            raise InputError(f"{source}: the deformable stage is for 2D atlases; this atlas holds volumes")
        from .atlas3d import Atlas3DDetector

        return Atlas3DDetector(cases)
    from .atlas import AtlasDetector

    return AtlasDetector(cases, AtlasSettings(deformable=bool(deformable)), choose_stage=deformable is None)


def refined_atlas_detector(path) -> Detector:
    """The detector an adapter fine-tuned on the atlas describes (it carries its atlas cases)."""
    from .refiner import load_refined_atlas

    return load_refined_atlas(path)


def heatmap_detector(path: Path, choice: Choice | None, base: Path | None, *, lora_on_base: bool = False,
                     device=None, precision="auto", input_size=None, flip_test=None) -> HeatmapDetector:
    """A MedSapiens / Sapiens model: `path` (a catalogue model when `choice` says which), on `base` where it is a
    LoRA file. lora_on_base: `path` was given as an adapter for the base (it must be a LoRA file then)."""
    ckpt = read_checkpoint(path)
    if lora_on_base and ckpt.layout not in NEEDS_BASE:
        raise InputError(f"{ckpt.path}: --adapter takes a LoRA file, but this is a complete {ckpt.layout} "
                         "checkpoint; give it as MODEL")
    net = build_model(ckpt, read_checkpoint(base) if base else None, choice.channels if choice else None)
    if has_lora(net):
        merge_lora(net)
    names, pairs = (choice.landmark_names, choice.flip_pairs) if choice is not None and choice.landmark_names \
        else (ckpt.landmark_names, ckpt.flip_pairs)
    names = names or [f"L{i}" for i in range(net.num_keypoints)]
    if len(names) != net.num_keypoints:
        raise InputError(f"{ckpt.path}: {len(names)} landmark names for a head with {net.num_keypoints} outputs")
    entry = choice.entry if choice else None
    hw = input_size or (entry and entry.input_hw) or ckpt.meta.get("input_hw", SAPIENS_INPUT_HW)
    sigma = (entry and entry.sigma) or ckpt.meta.get("sigma", HEATMAP_SIGMA)
    if flip_test is None:
        flip_test = entry.flip_test if entry else ckpt.meta.get("flip_test", ckpt.layout == "medsapiens")
    try:
        return HeatmapDetector(net, names, tuple(hw), sigma, pairs, flip_test, device, precision)
    except ValueError as e:
        raise InputError(str(e)) from None


def check_landmarks(detector: Detector, expected) -> None:
    """Refuse a detector whose landmark set is not the one the caller expects (None: any)."""
    if expected is not None and list(expected) != detector.names:
        raise InputError(f"the model detects {len(detector.names)} landmarks ({short_list(detector.names)}), not "
                         f"the expected set of {len(expected)} ({short_list(expected)})")


def check_kind(detector: Detector, case) -> None:
    """A volume needs a 3D detector and an image a 2D one of at least MIN_IMAGE_SIDE px a side; one line
    otherwise."""
    if isinstance(case, Volume) and detector.dim != 3:
        raise InputError(f"{case.label}: a 3D volume; models and adapters detect on 2D images, volumes need an "
                         "atlas of annotated volumes")
    if isinstance(case, Case) and detector.dim != 2:
        raise InputError(f"{case.label}: a 2D image; this atlas is of 3D volumes")
    if isinstance(case, Case):
        require_detectable(case)

"""One factory for every detector kind; all share `detect(case) -> Landmarks` and `names`."""
from __future__ import annotations

from typing import Protocol

from ..case import Case, Landmarks
from ..errors import InputError, short_list
from ..models.catalogue import catalogue, resolve
from ..models.checkpoints import NEEDS_BASE, build_model, read_checkpoint
from ..models.codec import DEFAULT_SIGMA
from ..models.lora import has_lora, merge_lora
from .heatmap import DEFAULT_INPUT_HW, HeatmapDetector


class Detector(Protocol):
    names: list[str]

    def detect(self, case: Case) -> Landmarks: ...


def load_detector(model=None, *, adapter=None, base=None, atlas=None, atlas_cases=None, atlas_deformable=False,
                  device=None, precision="auto", input_size=None, flip_test=False, landmarks=None,
                  progress=True) -> Detector:
    """Build a detector.

    model: a weight file or catalogue name (any layout of checkpoints.py). adapter: a LoRA file applied on
    `model`; base: the Sapiens checkpoint under a MedSapiens/adapter file given as `model`. atlas: a data set
    (landmarks.csv or folder of .mrk.json + images) for the weight-free atlas detector; atlas_cases: the
    rows of a landmarks.csv atlas to use (image stems; default all); atlas_deformable: AtlasSettings.deformable.
    landmarks: the landmark names the caller expects; anything else is refused. precision: "auto" (bf16 where the
    device computes it natively and faster, see heatmap.pick_precision), "fp32" or "bf16".
    An atlas-refiner adapter (`finetune` without a base) carries its atlas cases: give it as `adapter` (or
    `model`) alone.
    """
    refined = [p for p in (model, adapter) if p is not None and is_refined_atlas(p)]
    if refined:
        if atlas is not None or base is not None or (model is not None and adapter is not None):
            raise InputError(f"{refined[0]}: an atlas-refiner adapter carries its own atlas; give it alone")
        from .refiner import load_refined_atlas

        detector = load_refined_atlas(refined[0])
    elif atlas is not None:
        if model is not None or adapter is not None or base is not None:
            raise InputError("--atlas works without model weights; give either an atlas or a model")
        from .atlas import AtlasDetector, AtlasSettings

        detector = AtlasDetector.from_path(atlas, atlas_cases, AtlasSettings(deformable=atlas_deformable))
    else:
        if model is None:
            raise InputError("no model given: pass a weight file, a catalogue name, or --atlas")
        if adapter is not None and base is not None:
            raise InputError("give the base either as MODEL with --adapter, or as --base of a MedSapiens file")
        first = read_checkpoint(resolve(str(model), progress=progress))
        other = read_checkpoint(resolve(str(adapter or base), progress=progress)) if (adapter or base) else None
        ckpt, base_ckpt = (other, first) if adapter is not None else (first, other)
        if adapter is not None and ckpt.layout not in NEEDS_BASE:
            raise InputError(f"{ckpt.path}: a {ckpt.layout} checkpoint, not an adapter")
        net = build_model(ckpt, base_ckpt)
        if has_lora(net):
            merge_lora(net)
        names = ckpt.landmark_names or _catalogue_names(model) or [f"L{i}" for i in range(net.num_keypoints)]
        if len(names) != net.num_keypoints:
            raise InputError(f"{ckpt.path}: metadata names {len(names)} landmarks but the head has "
                             f"{net.num_keypoints}")
        hw = tuple(input_size) if input_size else tuple(ckpt.meta.get("input_hw", DEFAULT_INPUT_HW))
        try:
            detector = HeatmapDetector(net, names, hw, ckpt.meta.get("sigma", DEFAULT_SIGMA),
                                       ckpt.meta.get("flip_pairs", ()), flip_test, device, precision)
        except ValueError as e:
            raise InputError(str(e)) from None
    if landmarks is not None and list(landmarks) != detector.names:
        raise InputError(f"the model detects {len(detector.names)} landmarks ({short_list(detector.names)}), not the "
                         f"expected set of {len(landmarks)} ({short_list(landmarks)})")
    return detector


def is_refined_atlas(path) -> bool:
    """True for an adapter file written by `finetune` on the atlas (no base model)."""
    from ..models.adapter_file import kind_of
    from .refiner import KIND

    return kind_of(path) == KIND


def _catalogue_names(model) -> list[str] | None:
    entry = catalogue().get(str(model))
    return entry.landmarks if entry else None


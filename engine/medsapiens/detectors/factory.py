"""One factory for every detector kind; all share `detect(case) -> Landmarks` and `names`."""
from __future__ import annotations

from typing import Protocol

from ..case import Case, Landmarks
from ..errors import InputError, short_list
from ..models.build import build_model
from ..models.checkpoints import NEEDS_BASE, read_checkpoint
from ..models.codec import DEFAULT_SIGMA
from ..models.download import resolve
from ..models.lora import has_lora, merge_lora
from .heatmap import DEFAULT_INPUT_HW, HeatmapDetector


class Detector(Protocol):
    names: list[str]
    dim: int  # 2: detects on images (Case), 3: on volumes (Volume)

    def detect(self, case: Case) -> Landmarks: ...


def load_detector(model=None, *, adapter=None, base=None, atlas=None, atlas_cases=None, atlas_deformable=False,
                  device=None, precision="auto", input_size=None, flip_test=None, landmarks=None,
                  progress=True) -> Detector:
    """Build a detector.

    model: a weight file or catalogue name (`NAME`, or `NAME:SET` for one landmark set of a multi-set model).
    A LoRA file (a MedSapiens checkpoint or an adapter trained here) runs on a base, given one of two ways:
      model=LORA, base=BASE      the LoRA file is the model, BASE the Sapiens checkpoint under it
                                 (catalogue MedSapiens models name their base, fetched with them);
      model=BASE, adapter=LORA   the base is the model, the LoRA file is applied on it.
    atlas: a data set (landmarks.csv or folder of .mrk.json + images) for the weight-free atlas detector, in 2D
    or, when the atlas holds volumes, in 3D; atlas_cases: the cases of the atlas to use (case ids; default all);
    atlas_deformable: AtlasSettings.deformable (2D only). flip_test: None for the model's own test-time setting (on for the MedSapiens
    release, as in its test config). landmarks: the landmark names the caller expects; anything else is refused.
    precision: "auto" (bf16 where the device computes it natively and faster, see heatmap.pick_precision), "fp32"
    or "bf16".
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
        from ..case import Volume
        from ..io.datasets import load_cases

        cases = load_cases(atlas, atlas_cases)
        if isinstance(cases[0], Volume):
            from .atlas3d import Atlas3DDetector

            if atlas_deformable:
                raise InputError(f"{atlas}: the deformable stage is for 2D atlases; this atlas holds volumes")
            detector = Atlas3DDetector(cases)
        else:
            from .atlas import AtlasDetector, AtlasSettings

            detector = AtlasDetector(cases, AtlasSettings(deformable=atlas_deformable))
    else:
        detector = _heatmap_detector(model, adapter, base, device, precision, input_size, flip_test, progress)
    if landmarks is not None and list(landmarks) != detector.names:
        raise InputError(f"the model detects {len(detector.names)} landmarks ({short_list(detector.names)}), not the "
                         f"expected set of {len(landmarks)} ({short_list(landmarks)})")
    return detector


def is_refined_atlas(path) -> bool:
    """True for an adapter file written by `finetune` on the atlas (no base model)."""
    from ..models.weight_files import kind_of
    from .refiner import KIND

    return kind_of(path) == KIND


def _heatmap_detector(model, adapter, base, device, precision, input_size, flip_test, progress) -> HeatmapDetector:
    if model is None:
        raise InputError("no model given: pass a weight file, a catalogue name, or --atlas")
    if adapter is not None and base is not None:
        raise InputError("give a LoRA file either as MODEL with --base BASE, or as --adapter on the base MODEL; "
                         "not --adapter and --base together")
    path, choice = resolve(str(adapter if adapter is not None else model), progress)
    base_name = model if adapter is not None else base if base is not None else choice and choice.entry.base
    base_path = resolve(str(base_name), progress)[0] if base_name else None
    ckpt = read_checkpoint(path)
    base_ckpt = read_checkpoint(base_path) if base_path else None
    if adapter is not None and ckpt.layout not in NEEDS_BASE:
        raise InputError(f"{ckpt.path}: --adapter takes a LoRA file, but this is a complete {ckpt.layout} "
                         "checkpoint; give it as MODEL")
    net = build_model(ckpt, base_ckpt, choice.channels if choice else None)
    if has_lora(net):
        merge_lora(net)
    if choice is not None and choice.landmark_names:
        names, pairs = choice.landmark_names, choice.flip_pairs
    else:
        names, pairs = ckpt.landmark_names, ckpt.flip_pairs
    names = names or [f"L{i}" for i in range(net.num_keypoints)]
    if len(names) != net.num_keypoints:
        raise InputError(f"{ckpt.path}: {len(names)} landmark names for a head with {net.num_keypoints} outputs")
    entry = choice.entry if choice else None
    hw = input_size or (entry and entry.input_hw) or ckpt.meta.get("input_hw", DEFAULT_INPUT_HW)
    sigma = (entry and entry.sigma) or ckpt.meta.get("sigma", DEFAULT_SIGMA)
    if flip_test is None:
        flip_test = entry.flip_test if entry else ckpt.meta.get("flip_test", ckpt.layout == "medsapiens")
    try:
        return HeatmapDetector(net, names, tuple(hw), sigma, pairs, flip_test, device, precision)
    except ValueError as e:
        raise InputError(str(e)) from None


"""Every tunable setting of the engine, as data: frozen dataclasses with their defaults, defined once.

The detectors and trainers take these; the command line's help, the worker and the Slicer panel read their
defaults from here (through `medsapiens.api`), and `override` is the one way to change a few fields by name, from
command-line flags or a JSON request alike. Plain Python: importing it loads no torch.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace

from .errors import InputError

SAPIENS_INPUT_HW = (1024, 768)  # (H, W) the Sapiens / MedSapiens models' own input
TRAIN_INPUT_HW = (256, 192)     # (H, W) what models trained with medsapiens on a CPU default to
DEFAULT_ARCH = "tiny"           # the architecture `train` builds by default (the best size for a CPU)
DEFAULT_ANALYSIS = "isbi2015"   # the cephalometric analysis `analyze` and the panel show by default
MIN_IMAGE_SIDE = 32             # px: a detector needs at least this much image along each side
REVIEW_BELOW = 0.5              # a point less confident than this is flagged for checking (where its detector
                                # has no review rule of its own)
HEATMAP_SIGMA = 3.0             # heatmap Gaussian, MedSapiens's (the human-pose models use 6)
CEPH_RADII = (2.0, 2.5, 3.0, 4.0)  # SDR radii (mm) for images, as the cephalometric challenges report them
HAND_RADII = (2.0, 4.0, 10.0)      # ... for hands (Payer et al.)
VOLUME_RADII = (0.5, 1.0, 2.0)     # ... for volumes (the micro-CT set: 0.14 mm voxels)


@dataclass(frozen=True)
class Stage:
    """One multi-resolution SimpleITK registration stage (regular-step gradient descent unless said otherwise)."""

    shrink: tuple[int, ...]       # shrink factor per resolution level
    smooth: tuple[float, ...]     # Gaussian sigma per level, in voxels of the working grid
    iterations: int
    step: float = 1.0             # first optimiser step, physical units
    min_step: float = 1e-3
    relaxation: float = 0.6


@dataclass(frozen=True)
class LocalStage:
    """The last stage of both atlases: every landmark's window aligned by its own affine map, coarse to fine
    (detectors/ncc_align.py), then the atlases' votes on each landmark fused."""

    levels: tuple        # (step, half window in steps), coarse to fine; steps in px (2D) or voxels (3D)
    level_side: int      # the steps hold for atlases up to this longest side; larger ones scale them
    iterations: int      # Adam steps per level
    spread_mm: float     # atlas disagreement at which confidence drops to 0.61 (one sigma)
    rate: float = 0.05   # Adam step, in steps (window shift) and window edges (affine part)
    fusion_ncc: float = 0.1  # an atlas whose local NCC is this much below the best one's counts e^-1 as much


@dataclass(frozen=True)
class AtlasSettings:
    """The weight-free 2D atlas (detectors/atlas.py)."""

    global_side: int = 256  # working size (longest side, px) of the similarity / affine stages
    deformable: bool = False  # add a B-spline stage: better on hands (fingers), worse and slower on skulls
    bspline_side: int = 512  # working size (longest side, px) of the B-spline stage
    bspline_mesh: int = 4  # B-spline control-point mesh per side
    similarity: Stage = Stage((4, 2, 1), (2, 1, 0), 150)
    affine: Stage = Stage((2, 1), (1, 0), 100, step=0.5, min_step=1e-4)
    bspline: Stage = Stage((4, 2), (2, 1), 60)  # L-BFGS-B: iterations; at most 200 function evaluations
    histogram_bins: int = 32  # Mattes mutual information
    sampling: float = 0.25  # share of the metric region sampled (randomly, seeded) per iteration
    local: LocalStage = LocalStage(((8, 15), (4, 15), (2, 15), (1, 15)), 1000, 30, 2.0)
    mask_margin: float = 0.15  # metric region: landmark box grown by this share of its size
    seed: int = 7
    max_atlases: int = 5  # an image is registered to this many of the cases, the most similar: cost stops growing
    calibration_cases: int = 10  # the atlas's error (for its calibrated confidence) is measured on this many cases


@dataclass(frozen=True)
class Atlas3DSettings:
    """The weight-free 3D atlas (detectors/atlas3d.py)."""

    work_side: int = 256  # volumes with a longer side are resampled to this many voxels (memory and time bound)
    coarse_side: int = 48  # grid (voxels along the longest side) of the orientation search and similarity stage
    mid_side: int = 72  # grid of the affine stage
    keep: int = 3  # orientation hypotheses taken through the similarity stage
    distinct_deg: float = 45.0  # ... each at least this far from the others
    similarity: Stage = Stage((2, 1), (1, 0), 100)
    affine: Stage = Stage((2, 1), (1, 0), 100, step=0.5, min_step=1e-4)
    local: LocalStage = LocalStage(((4, 4), (2, 4), (1, 4)), 200, 20, 1.0)
    mask_margin: float = 0.15  # metric region: landmark box grown by this share of its size
    disagree_mm: float = 3.0  # weighted spread of the votes beyond which a landmark is reported missing


@dataclass(frozen=True)
class RefineSettings:
    """Fine-tuning on top of the atlas (training/refine.py): a patch refiner learned from a few cases."""

    steps: int = 600             # optimiser steps per fold (a warm start takes half)
    time_budget: float = 540.0   # seconds for the whole run, atlas phases included: training is cut short (and
                                 # says so) past it; 9 minutes, so that a user waits at most about 10
    batch: int = 32
    lr: float = 2e-3
    patch: int = 64
    width: int = 12
    max_rotation: float = 15.0   # degrees
    scale: tuple[float, float] = (0.9, 1.1)
    target_sigma: float = 1.0    # output cells
    offset_spread: float = 1.25  # training offsets ~ N(0, this x the atlas's error per axis)
    min_sigma_px: float = 2.0
    case_weight: float = 5.0     # an annotated case is sampled this many times as often as an image the atlas
                                 # labelled (3 cases + 47 images: 3/4 of each batch from the labelled images)
    try_deformable: bool = True  # try the atlas's B-spline stage on held-out cases, keep it where clearly better
    max_unannotated: int = 50    # at most this many of them (evenly spaced): about 2.5 s of atlas each
    prior_scales: tuple[float, ...] = (1.0, 2.0, 4.0)  # prior spreads (x the atlas's error) tried on held-out cases
    seed: int = 0
    atlas: AtlasSettings = AtlasSettings()


@dataclass(frozen=True)
class Augment:
    """Training-view augmentation: probabilities and ranges; the defaults are the MedSapiens recipe's."""

    flip: float = 0.5              # used only when flip pairs are given
    shift: float = 0.16            # of the box size
    shift_p: float = 0.3
    scale: tuple[float, float] = (0.5, 1.5)
    rotation: float = 80.0         # degrees
    rotation_p: float = 0.6
    photometric_p: float = 0.5     # brightness and contrast, each with this probability
    blur_p: float = 0.1
    median_blur_p: float = 0.1
    dropout_p: float = 0.5         # one hole of 20-40 % of each side
    dropout_size: tuple[float, float] = (0.2, 0.4)


REFERENCE = Augment()
MILD = Augment(scale=(0.8, 1.25), rotation=15.0)  # for data sets imaged in one standard pose (cephalograms)
NO_AUGMENT = Augment(flip=0, shift_p=0, scale=(1.0, 1.0), rotation_p=0, photometric_p=0, blur_p=0,
                     median_blur_p=0, dropout_p=0)
AUGMENT_PRESETS = {"reference": REFERENCE, "mild": MILD}


@dataclass(frozen=True)
class TrainSettings:
    """The heatmap training loop (training/loops.py), for whole models and LoRA adapters alike."""

    input_hw: tuple[int, int] = TRAIN_INPUT_HW
    sigma: float = HEATMAP_SIGMA
    lr: float = 5e-4
    weight_decay: float = 0.1
    layer_decay: float = 0.85
    clip: float = 1.0
    warmup: float = 0.05          # share of the run
    batch: int = 8
    steps: int | None = None
    time_budget: float | None = None  # seconds
    seed: int = 0
    augment: Augment = field(default=REFERENCE)


@dataclass(frozen=True)
class LoraSettings:
    """A few-shot LoRA adapter on a base model (training/loops.py `finetune`). Few-shot: 5 minutes for the whole
    run and mild augmentation, measured better than the reference's on both data sets (docs/benchmarks.md)."""

    train: TrainSettings = TrainSettings(lr=1e-3, time_budget=300.0, augment=MILD)
    views_per_case: int = 64
    lora_blocks: int | None = None  # LoRA on the last N blocks, 0: head only (None: planned, training/schedule.py)
    min_steps: int = 500            # the plan keeps at least this many optimiser steps within the time budget
    head_channels: int | None = None  # width of a head the base does not bring (None: planned, or the arch's)


@dataclass(frozen=True)
class WebSettings:
    """`medsapiens web`, the browser front end (medsapiens/web): its limits on what one client can make it do."""

    upload_mb: float = 200.0    # largest file accepted by an upload, in MB (a CT series comes as several files)
    max_sessions: int = 4       # browser sessions at once: each is a process with its own scene and engine worker
    idle_seconds: int = 60      # a session's process ends this long after its last page closed
    poll_seconds: float = 0.1   # how often a session applies the engine worker's replies to its page


REFINE_DEFAULTS = RefineSettings()
LORA_DEFAULTS = LoraSettings()
TRAIN_DEFAULTS = TrainSettings()
WEB_DEFAULTS = WebSettings()


def override(defaults, what: str | None = None, /, **changes):
    """`defaults` with fields changed by name; a name may be a field of a nested settings object (`deformable`
    reaches RefineSettings.atlas.deformable, `time_budget` LoraSettings.train.time_budget); the outer field wins
    where both have one. Values as JSON or a command line gives them are converted: lists to tuples, an
    augmentation preset's name to its Augment. None leaves a field as it is; an unknown name is one line
    ("unknown <what>: ...")."""
    changes = {k: v for k, v in changes.items() if v is not None}
    own = {f.name: f for f in fields(defaults)}
    mine = {k: _converted(getattr(defaults, k), v, k) for k, v in changes.items() if k in own}
    rest = {k: v for k, v in changes.items() if k not in own}
    for name, f in own.items():
        value = getattr(defaults, name)
        if rest and is_dataclass(value) and name not in mine:
            inner = {k: v for k, v in rest.items() if k in _names(value)}
            if inner:
                mine[name] = override(value, what, **inner)
                rest = {k: v for k, v in rest.items() if k not in inner}
    if rest:
        raise InputError(f"unknown {what or 'settings of ' + type(defaults).__name__}: {', '.join(sorted(rest))}")
    return replace(defaults, **mine)


def _names(settings) -> set[str]:
    """Every field name of a settings object and of the settings objects nested in it."""
    out = set()
    for f in fields(settings):
        out.add(f.name)
        value = getattr(settings, f.name)
        if is_dataclass(value):
            out |= _names(value)
    return out


def _converted(current, value, name: str):
    """A value as JSON or a command line gives it, in the form of the field's current value."""
    if isinstance(current, Augment) and isinstance(value, str):
        if value not in AUGMENT_PRESETS:
            raise InputError(f"{name} {value!r}: not an augmentation preset ({', '.join(AUGMENT_PRESETS)})")
        return AUGMENT_PRESETS[value]
    if is_dataclass(current) and isinstance(value, dict):
        return from_dict(type(current), value)
    if isinstance(value, list):
        return tuple(_converted(None, v, name) for v in value)
    if not _same_kind(current, value):
        raise InputError(f"{name} {value!r}: expected {_kind(current)}")
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
        if not value.is_integer():
            raise InputError(f"{name} {value!r}: expected a whole number")
        return int(value)
    return value


def _kind(value) -> str:
    return "true or false" if isinstance(value, bool) else "a number" if isinstance(value, (int, float)) else \
        f"a {type(value).__name__}"


def _same_kind(current, value) -> bool:
    """Whether `value` may replace `current` (a number for a number, a bool for a bool, ...); None: any."""
    if current is None or value is None:
        return True
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, (int, float)):
        return isinstance(value, (int, float))
    return isinstance(value, type(current))


def from_dict(cls, data: dict):
    """A settings object from its `asdict` form (as adapter files store it), nested settings and tuples restored;
    a name this version does not know is one line."""
    own = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(own)
    if unknown:
        raise InputError(f"settings written by another version of medsapiens ({', '.join(sorted(unknown))} "
                         f"unknown in {cls.__name__})")
    return cls(**{k: _converted(_default(own[k]), v, k) for k, v in data.items()})


def _default(f):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None

"""`medsapiens` command line: stdout carries results (written file paths, figures), stderr progress and errors.

Exit status: 0 success, 1 some inputs failed, 2 bad usage or input (one line on stderr, no traceback).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from .analysis.metrics import CEPH_RADII, VOLUME_RADII
from .errors import InputError
from .models.sapiens import ARCHS
from .training.augment import PRESETS
from .training.loops import DEFAULT_ARCH, FINETUNE_DEFAULTS, FinetuneSettings, Settings
from .training.refine import REFINE_DEFAULTS

ARCH_NAMES = list(ARCHS)
TRAIN_DEFAULTS = Settings()


def _preset_name(augment) -> str:
    return next(name for name, preset in PRESETS.items() if preset == augment)


class _IntermixedParser(argparse.ArgumentParser):
    """Options may come between positionals: `detect MODEL --base B IMAGE...` as well as `detect MODEL IMAGE... --base B`."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back here for its two passes
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="LORA", help="LoRA file (an adapter trained here, or a MedSapiens "
                   "checkpoint) applied on MODEL; MODEL is then its base")
    p.add_argument("--base", metavar="BASE", help="the Sapiens checkpoint under MODEL, when MODEL is a LoRA file "
                   "(catalogue MedSapiens models fetch their base themselves)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA when present)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="inference precision (default auto: bf16 on GPUs that support it and on CPUs with native "
                        "bf16 instructions (AVX512-BF16 or AMX: AMD Zen 4/5, Intel Xeon since Sapphire Rapids) where "
                        "it measures faster than fp32; fp32 elsewhere)")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                   help="network input size (default: the model's, 1024 768 for Sapiens)")
    p.add_argument("--flip-test", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the mirrored image, symmetric landmarks swapped (default: the model's own "
                        "setting, on for the MedSapiens release as in its test config)")


def _add_training_options(p: argparse.ArgumentParser, defaults: Settings, lr_help: str | None = None) -> None:
    hw = defaults.input_hw
    augment = _preset_name(defaults.augment)
    p.add_argument("--lr", type=float, default=defaults.lr,
                   help=f"peak learning rate (default {lr_help or format(defaults.lr, 'g')})")
    p.add_argument("--input-size", nargs=2, type=int, default=list(hw), metavar=("H", "W"),
                   help=f"network input size (default {hw[0]} {hw[1]})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA when present)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 autocast (pays off on GPUs; this kind of CPU has no bf16 units)")
    p.add_argument("--augment", choices=list(PRESETS), default=augment,
                   help="augmentation: the MedSapiens recipe (rotation up to 80 degrees, scale 0.5-1.5) or mild "
                        f"(15 degrees, scale 0.8-1.25) for images taken in a standard pose (default {augment})")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsapiens", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_IntermixedParser)

    p = sub.add_parser("detect", help="detect landmarks on images or volumes, write .mrk.json files and "
                                      "landmarks.csv",
                       description="Detect landmarks on 2D images, or on 3D volumes with an atlas of volumes. MODEL "
                                   "is a weight file or a catalogue name (see `medsapiens models`; NAME:SET picks one "
                                   "landmark set of the generalist); with --atlas no MODEL is given. A LoRA file "
                                   "needs its base: `detect LORA --base BASE IMAGE...` or `detect BASE --adapter "
                                   "LORA IMAGE...`.")
    p.add_argument("inputs", nargs="+", metavar="[MODEL] IMAGE",
                   help="model (unless --atlas), then images; with a 3D atlas, volumes (NIfTI, NRRD, MHA, DICOM "
                        "file or series folder)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--atlas", help="weight-free detection from annotated cases: a landmarks.csv (2D or 3D) or a "
                                   "folder of .mrk.json + image or volume pairs")
    p.add_argument("--atlas-cases", metavar="ID,ID,...", help="the atlas cases to use (case ids: file names "
                                                               "without .png, .nii.gz...; default all)")
    p.add_argument("--atlas-deformable", action="store_true", help="with --atlas: add a B-spline stage "
                   "(better for articulated anatomy such as hands; slower)")
    p.add_argument("--spacing", type=float, metavar="MM", help="pixel size for images whose file has none "
                                                             "(default: the file's, else 1 mm)")
    p.add_argument("--landmarks", help="expected landmark names (comma separated, or a landmarks.csv to take "
                                       "them from); another set is refused")
    p.add_argument("--analyze", action="store_true", help="also run the cephalometric analysis (needs the ISBI "
                                                          "landmark names): DIR/analysis.csv and a report")
    _add_model_options(p)
    p.set_defaults(run=_detect)

    p = sub.add_parser("analyze", help="cephalometric analysis of landmarks: ANB, SNB, SNA, ODI, APDI, FHI, FHA, MW",
                       description="Cephalometric measurements and classes of the ISBI 2015 challenge (Wang et al., "
                                   "Medical Image Analysis 2016, Table 2) from landmarks with the ISBI names (S, N, "
                                   "Or, Po, A, B, Pog, Me, Gn, Go, LIT, UIT, ..., PNS, ANS). Writes one row per "
                                   "image to --out and prints a report (class names, normal ranges).")
    p.add_argument("landmarks", type=Path, metavar="landmarks.csv|DIR",
                   help="a landmarks CSV (as `detect` writes), or a folder with one or with .mrk.json + images")
    p.add_argument("--out", required=True, type=Path, help="analysis CSV to write")
    p.set_defaults(run=_analyze)

    p = sub.add_parser("finetune", help="train an adapter for a landmark set from a few annotated cases",
                       description="Fine-tune an adapter from a few annotated cases; written atomically to OUT. "
                                   "Without --base (the default): a patch refiner on top of the weight-free atlas of "
                                   "the cases, with its error and the atlas's estimated on held-out cases; the file "
                                   "carries the atlas, so `detect --adapter OUT IMAGE...` needs nothing else. With "
                                   "--base: LoRA on the frozen base + a head for the cases' landmarks.")
    p.add_argument("--base", help="base model: weight file or catalogue name; or an architecture "
                                  f"({', '.join(ARCH_NAMES)}) to train every weight from scratch (default: none, "
                                  "refine the atlas)")
    p.add_argument("--data", required=True, type=Path, help="landmarks.csv, or a folder of .mrk.json + images")
    p.add_argument("--cases", metavar="ID,ID,...", help="the annotated cases to learn from (image stems; default "
                                                         "all of --data)")
    p.add_argument("--out", required=True, type=Path, help="adapter file to write (.safetensors)")
    p.add_argument("--time-budget", type=float, metavar="S",
                   help=f"the whole run's time in seconds (default {REFINE_DEFAULTS.time_budget:g} on the atlas, "
                        f"its leave-one-out and labelling included; {FINETUNE_DEFAULTS.time_budget:g} with --base, "
                        "views and cached tokens included)")
    p.add_argument("--steps", type=int, help=f"optimiser steps (default {REFINE_DEFAULTS.steps} per fold on the "
                                             "atlas; with --base the time budget decides)")
    p.add_argument("--unannotated", nargs="+", type=Path, metavar="IMAGE", help="without --base: more images of the "
                   "task without landmarks (files or folders; the images to detect on are fine): the atlas labels "
                   f"them and the refiner learns from them too (at most {REFINE_DEFAULTS.max_unannotated}, evenly "
                   "spaced; about 2.5 s each on 3 cases)")
    p.add_argument("--atlas-deformable", action="store_true", help="without --base: the atlas adds a B-spline "
                   "stage (better for articulated anatomy such as hands; slower)")
    p.add_argument("--keep-worse", action="store_true", help="without --base: write the adapter even when it was "
                   "worse than the atlas on the held-out cases (default: say so and write nothing)")
    p.add_argument("--fresh", action="store_true", help="without --base: do not warm-start from the adapter "
                   "already at OUT")
    views = FinetuneSettings.views_per_case
    p.add_argument("--views", type=int, default=views, help=f"with --base: augmented views per case, made once "
                                                            f"(default {views})")
    p.add_argument("--lora-blocks", type=int, metavar="N", help="with --base: LoRA on the last N blocks only, 0 "
                   "for the head alone; the blocks below run once per view (default: all on a GPU; on a CPU, planned "
                   f"so that {FinetuneSettings.min_steps} steps fit in the time budget)")
    p.add_argument("--flip-pairs", metavar="A:B,...", help="with --base: symmetric landmark pairs (names); enables "
                                                           "mirroring")
    _add_training_options(p, FINETUNE_DEFAULTS, f"{REFINE_DEFAULTS.lr:g}; {FINETUNE_DEFAULTS.lr:g} with --base")
    p.set_defaults(run=_finetune, lr=None)  # each kind of fine-tuning has its own default


    p = sub.add_parser("train", help="train a whole model on one data set (specialist) or several (generalist)",
                       description="Train a model from scratch on annotated data sets; several --data make a "
                                   "generalist with one head over the union of their landmarks. Runs data-parallel "
                                   "under `torchrun --nproc_per_node N`.")
    p.add_argument("--arch", default=DEFAULT_ARCH, choices=ARCH_NAMES,
                   help=f"architecture (default {DEFAULT_ARCH}, the best size for a CPU)")
    p.add_argument("--data", required=True, type=Path, action="append", help="landmarks.csv (repeat for several)")
    p.add_argument("--rows", metavar="A:B", help="rows of each data set to train on, 0-based slice (default all)")
    p.add_argument("--out", required=True, type=Path, help="model file to write (.safetensors); the optimizer "
                                                           "state goes beside it as OUT.state")
    p.add_argument("--epochs", type=float, help="passes over the training images (default: the time budget decides)")
    p.add_argument("--time-budget", type=float, metavar="S", help="training time in seconds")
    p.add_argument("--resume", type=Path, help="continue a model written by train (and its .state)")
    p.add_argument("--batch", type=int, default=TRAIN_DEFAULTS.batch,
                   help=f"images per step and process (default {TRAIN_DEFAULTS.batch})")
    _add_training_options(p, TRAIN_DEFAULTS)
    p.set_defaults(run=_train)

    p = sub.add_parser("evaluate", help="score a model on an annotated data set: MRE, SDR, per landmark, plots",
                       description="Detect on an annotated data set and write report.json, report.md and plots "
                                   "(per-landmark errors, SDR curve, the worst cases) to --out.")
    p.add_argument("model", nargs="?", metavar="MODEL", help="weight file or catalogue name (or give --atlas)")
    p.add_argument("--data", required=True, type=Path, help="landmarks.csv with the truth")
    p.add_argument("--rows", metavar="A:B", help="rows to score, 0-based slice (default all)")
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument("--radii", nargs="+", type=float, metavar="MM",
                   help=f"SDR radii in mm (default {' '.join(f'{r:g}' for r in CEPH_RADII)} for images, "
                        f"{' '.join(f'{r:g}' for r in VOLUME_RADII)} for volumes)")
    p.add_argument("--atlas", help="evaluate the weight-free atlas detector from this data set instead")
    p.add_argument("--atlas-cases", metavar="ID,ID,...", help="the atlas rows to use (image stems)")
    p.add_argument("--atlas-deformable", action="store_true", help="with --atlas: add a B-spline stage")
    _add_model_options(p)
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("models", help="list the model catalogue, or add a model file or the release zip",
                       description="`models` lists the catalogue (name, display name, SHA256 state); `models add "
                                   "FILE|ZIP [--name NAME]` brings a downloaded file or the MedSapiens release zip "
                                   "into the cache, for sites without network.")
    p.add_argument("action", nargs="?", choices=("list", "add"), default="list")
    p.add_argument("file", nargs="?", type=Path, metavar="FILE|ZIP", help="with add: the model file or zip")
    p.add_argument("--name", help="with add: the catalogue name the file is, or the name of a new model "
                                  "(default: recognised from the file name, else the file's stem)")
    p.set_defaults(run=_models)

    p = sub.add_parser("demo", help="atlas detection on unseen cases from 3 annotated ones, offline, ~1 minute",
                       description="Detect landmarks on unseen cases from 3 annotated ones with the weight-free "
                                   "atlas detector; print MRE/SDR; write .mrk.json files and an overlay PNG.")
    p.add_argument("--data", type=Path, help="a data set folder with landmarks.csv (default: a generated "
                                             "radiograph-like phantom set)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--atlases", type=int, default=3, help="annotated cases to learn from (default 3)")
    p.add_argument("--cases", type=int, default=4, help="unseen cases to detect on (default 4)")
    p.set_defaults(run=_demo)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _expected_landmarks(spec: str | None):
    if spec is None:
        return None
    if spec.endswith(".csv"):
        from .io.datasets import Dataset

        return Dataset(spec).names
    return [s.strip() for s in spec.split(",") if s.strip()]


def _detect(args) -> int:
    from tqdm import tqdm

    from .detectors.factory import is_refined_atlas, load_detector
    from .io.datasets import square_pixels, write_landmarks_csv, write_volume_landmarks_csv
    from .io.images import case_id, read_image, read_volume
    from .io.markups import write_markups

    if args.atlas or (args.adapter and is_refined_atlas(args.adapter)):
        model, images = None, args.inputs  # the atlas, or an adapter that carries its atlas
    else:
        if len(args.inputs) < 2:
            raise InputError("detect needs MODEL and at least one IMAGE (or --atlas and images)")
        model, images = args.inputs[0], args.inputs[1:]
    if args.spacing is not None and not (math.isfinite(args.spacing) and args.spacing > 0):
        raise InputError(f"--spacing {args.spacing:g}: must be a positive number of mm")
    images = [Path(i) for i in images]
    if not any(i.exists() for i in images):  # a DICOM series is a folder
        more = f" (nor the {len(images) - 1} others)" if len(images) > 1 else ""
        raise InputError(f"{images[0]}: no such image file{more}")
    ids = [case_id(i) for i in images]
    clash = {s for s in ids if ids.count(s) > 1}
    if clash:
        raise InputError(f"several images share the name {sorted(clash)[0]}; their outputs would overwrite each other")
    detector = load_detector(model, adapter=args.adapter, base=args.base, atlas=args.atlas, device=args.device,
                             atlas_cases=args.atlas_cases.split(",") if args.atlas_cases else None,
                             atlas_deformable=args.atlas_deformable,
                             precision=args.precision, input_size=args.input_size, flip_test=args.flip_test,
                             landmarks=_expected_landmarks(args.landmarks))
    if args.analyze:
        _check_cephalometric(detector.names, "the model")
    volumes = detector.dim == 3
    if volumes and args.spacing is not None:
        raise InputError("--spacing is for 2D images without one; volumes keep their files' spacing")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], 0
    # one image that cannot be read or detected on is reported in one line; the others go on (exit status 1)
    for path, name in tqdm(list(zip(images, ids)), desc="detect", unit="volume" if volumes else "image",
                           file=sys.stderr, disable=len(images) < 2):
        try:
            case = read_volume(path) if volumes else read_image(path, spacing=args.spacing)
            result = detector.detect(case)
        except (InputError, RuntimeError) as e:  # RuntimeError: ITK or torch failing on this image's content
            reason = str(e) if isinstance(e, InputError) else f"{path}: detection failed ({_first_line(e)})"
            tqdm.write(f"medsapiens: error: {reason}", file=sys.stderr)
            failed += 1
            continue
        print(write_markups(args.out / f"{name}.mrk.json", result, case))
        image = os.path.relpath(path.resolve(), args.out.resolve())
        if volumes:
            rows.append((image, result))
            continue
        if not square_pixels(case.spacing):  # the .mrk.json holds the result; the CSV's one spacing_mm cannot
            tqdm.write(f"medsapiens: error: {path}: its pixels are {case.spacing[0]:g} x {case.spacing[1]:g} mm, "
                       "which the one spacing_mm of landmarks.csv cannot describe; left out of it", file=sys.stderr)
            failed += 1
            continue
        rows.append((image, *case.size, case.spacing, result))
    if rows and volumes:
        print(write_volume_landmarks_csv(args.out / "landmarks.csv", rows))
    elif rows:
        print(write_landmarks_csv(args.out / "landmarks.csv", rows))
        if args.analyze:
            _write_analysis([(image, lm, spacing) for image, _, _, spacing, lm in rows],
                            args.out / "analysis.csv", "the model")
    return 1 if failed else 0


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def _analyze(args) -> int:
    from .io.datasets import landmark_sets

    items = landmark_sets(args.landmarks)
    _check_cephalometric(items[0][1].names, args.landmarks)
    _write_analysis(items, args.out, args.landmarks)
    return 0


def _check_cephalometric(names, source) -> None:
    """Refuse a landmark set from which no measure can be computed; warn once for measures it cannot give."""
    from .analysis.cephalometry import MEASURES, USED_LANDMARKS
    from .errors import short_list

    absent = [n for n in USED_LANDMARKS if n not in names]
    if all(set(m.landmarks) & set(absent) for m in MEASURES):
        raise InputError(f"{source}: no cephalometric measure can be computed from landmarks {short_list(names)}: "
                         f"the analysis needs {', '.join(USED_LANDMARKS)} (ISBI 2015 names)")
    lost = [m.name for m in MEASURES if set(m.landmarks) & set(absent)]
    if lost:
        print(f"medsapiens: warning: {source}: no {', '.join(absent)} in the landmark set, so "
              f"{', '.join(lost)} stay empty", file=sys.stderr)


def _write_analysis(items, out: Path, source) -> None:
    """Analyse (image, landmarks, spacing) items: the CSV to `out`, its path and a report to stdout."""
    from .analysis.cephalometry import analyze, class_legend, format_report, write_analysis_csv

    rows = [(image, analyze(lm, spacing)) for image, lm, spacing in items]
    for (image, measurements), (_, lm, _) in zip(rows, items):
        for r in measurements:
            lacking = [n for n in r.missing if n in lm.names]  # not the set's own gaps, warned about once
            if lacking:
                print(f"medsapiens: warning: {image}: {r.name} not computed (missing {', '.join(lacking)})",
                      file=sys.stderr)
    print(write_analysis_csv(out, rows))
    print(class_legend())
    for image, measurements in rows:
        print(format_report(image, measurements))


def _rows(spec: str | None, n: int, what) -> list[int]:
    if spec is None:
        return list(range(n))
    try:
        a, b = (int(v) if v.strip() else None for v in spec.split(":"))
    except ValueError:
        raise InputError(f"--rows {spec}: expected A:B (0-based slice of the rows, like 0:50)") from None
    rows = list(range(n))[a:b]
    if not rows:
        raise InputError(f"--rows {spec}: selects no rows of {what} ({n} rows)")
    return rows


class _Bar:
    """A tqdm bar on stderr driven by training.Progress: phase, percent of it, step / total, time left, loss."""

    def __init__(self, header: str):
        self.header, self.bar, self.phase = header, None, None

    def __call__(self, p) -> None:
        if self.bar is None:  # on the first report, so that input errors come alone
            from tqdm import tqdm

            print(self.header, file=sys.stderr)
            self.bar = tqdm(total=100, unit="%", file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed} {postfix}")
        if p.phase != self.phase:
            self.phase = p.phase
            self.bar.set_description(p.phase)
        self.bar.n = round(100 * p.fraction, 1)
        parts = [f"step {p.step}" + (f"/{p.total}" if p.total else "")] if p.phase.startswith("train") else []
        if p.remaining is not None:
            parts.append(f"{p.remaining:.0f} s left")
        if p.loss == p.loss:  # not NaN
            parts.append(f"loss {p.loss:.3f}")
        self.bar.set_postfix_str(" ".join(parts), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _flip_pairs(spec: str | None, names: list[str]) -> list[tuple[int, int]]:
    pairs = []
    for item in (spec.split(",") if spec else []):
        a, _, b = item.partition(":")
        if a not in names or b not in names:
            raise InputError(f"--flip-pairs {item}: both names must be landmarks of the data ({', '.join(names)})")
        pairs.append((names.index(a), names.index(b)))
    return pairs


def _positive(**options) -> None:
    """--time-budget 0, --steps 0 and the like would mean "train for no time at all": refused in one line."""
    for name, value in options.items():
        if value is not None and not value > 0:
            raise InputError(f"--{name.replace('_', '-')} {value:g}: must be more than 0")


def _finetune(args) -> int:
    from .io.datasets import load_cases
    from .models.weight_files import load_weights
    from .training.loops import check_cases, finetune
    from .training.schedule import Plan

    _positive(time_budget=args.time_budget, steps=args.steps, views=args.views)
    if args.base is not None and args.unannotated:
        raise InputError("--unannotated is for fine-tuning on the atlas (without --base)")
    if args.lora_blocks is not None and args.lora_blocks < 0:
        raise InputError(f"--lora-blocks {args.lora_blocks}: must be 0 (head only) or more")
    cases = load_cases(args.data, args.cases.split(",") if args.cases else None)
    names = check_cases(cases)
    if args.base is None:
        return _finetune_on_atlas(args, cases)
    settings = FinetuneSettings(replace(FINETUNE_DEFAULTS, input_hw=tuple(args.input_size),
                                        lr=args.lr or FINETUNE_DEFAULTS.lr, steps=args.steps, seed=args.seed,
                                        augment=PRESETS[args.augment], time_budget=args.time_budget or FINETUNE_DEFAULTS.time_budget),
                                args.views, args.lora_blocks)
    bar = _Bar(f"fine-tuning on {len(cases)} cases: {', '.join(c.label for c in cases)}")
    t0 = time.monotonic()
    try:
        out = finetune(args.base, cases, args.out, flip_pairs=_flip_pairs(args.flip_pairs, names),
                       settings=settings, device=args.device, precision=args.precision, progress=bar)
    finally:
        bar.close()
    meta = load_weights(out)[1]
    if "schedule" in meta:
        print(f"schedule: {Plan(**meta['schedule']).describe(meta['architecture']['depth'])}", file=sys.stderr)
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in meta["phase_seconds"].items())
    print(f"{out}  {meta['steps']} steps  {time.monotonic() - t0:.1f} s  {phases}")
    return 0


def _finetune_on_atlas(args, cases) -> int:
    from .detectors.atlas import AtlasSettings
    from .io.images import image_files, read_image
    from .training.refine import NotBetter, finetune_on_atlas

    settings = replace(REFINE_DEFAULTS, seed=args.seed, lr=args.lr or REFINE_DEFAULTS.lr, atlas=AtlasSettings(deformable=args.atlas_deformable),
                       steps=args.steps or REFINE_DEFAULTS.steps,
                       time_budget=args.time_budget or REFINE_DEFAULTS.time_budget)
    unannotated = [read_image(p) for p in image_files(args.unannotated or [])]
    if args.unannotated and not unannotated:
        raise InputError(f"--unannotated {' '.join(map(str, args.unannotated))}: no image files there")
    bar = _Bar(f"fine-tuning on the atlas of {len(cases)} cases: {', '.join(c.label for c in cases)}"
               + (f" and {len(unannotated)} unannotated images" if unannotated else ""))
    try:
        result = finetune_on_atlas(cases, args.out, unannotated=unannotated, settings=settings, progress=bar,
                                   warm_start=not args.fresh, keep_worse=args.keep_worse)
    except NotBetter as e:
        bar.close()
        print(f"medsapiens: {e}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    est = result.estimate
    print(f"held-out error ({est['method']}): atlas {est['atlas_mre_mm']:.2f} mm, refined {est['refined_mre_mm']:.2f}"
          f" mm; refining {sum(est['use_refined'])} of {len(est['use_refined'])} landmarks", file=sys.stderr)
    if not result.better:
        print("medsapiens: warning: the adapter was worse than the atlas on the held-out cases (written anyway: "
              "--keep-worse)", file=sys.stderr)
    print(result.line())
    return 0


def _train(args) -> int:
    from .io.datasets import Dataset
    from .training.loops import train, union_names

    if args.epochs is None and args.time_budget is None:
        raise InputError("give --epochs, --time-budget or both")
    _positive(epochs=args.epochs, time_budget=args.time_budget, batch=args.batch)
    sets = [Dataset(d) for d in args.data]
    names = union_names([d.names for d in sets])
    cases = [d.case(i) for d in sets for i in _rows(args.rows, len(d), d.path)]
    world = int(os.environ.get("WORLD_SIZE", 1))
    steps = None if args.epochs is None else max(1, round(args.epochs * len(cases) / (args.batch * world)))
    settings = replace(TRAIN_DEFAULTS, input_hw=tuple(args.input_size), lr=args.lr, batch=args.batch, steps=steps,
                       time_budget=args.time_budget, seed=args.seed, augment=PRESETS[args.augment])
    rank0 = int(os.environ.get("RANK", 0)) == 0
    bar = _Bar(f"training {args.arch} on {len(cases)} images, {len(names)} landmarks, {world} process(es)") \
        if rank0 else None
    try:
        out = train(cases, names, args.out, arch=args.arch, settings=settings, resume=args.resume,
                    device=args.device, precision=args.precision, progress=bar)
    finally:
        if bar:
            bar.close()
    if rank0:
        print(out)
    return 0


def _evaluate(args) -> int:
    from tqdm import tqdm

    from .analysis.evaluation import evaluate, write_report
    from .analysis.metrics import format_summary
    from .detectors.factory import load_detector
    from .io.datasets import Dataset

    if (args.model is None) == (args.atlas is None):
        raise InputError("give either MODEL or --atlas")
    ds = Dataset(args.data)
    rows = _rows(args.rows, len(ds), ds.path)
    detector = load_detector(args.model, adapter=args.adapter, base=args.base, atlas=args.atlas,
                             atlas_cases=args.atlas_cases.split(",") if args.atlas_cases else None,
                             atlas_deformable=args.atlas_deformable,
                             device=args.device, precision=args.precision, input_size=args.input_size,
                             flip_test=args.flip_test)
    radii = args.radii or (VOLUME_RADII if ds.dim == 3 else CEPH_RADII)
    bar = tqdm(total=len(rows), desc="evaluate", unit="image", file=sys.stderr)
    try:
        ev = evaluate(detector, ds, rows, radii, progress=lambda n, total: bar.update(1))
    finally:
        bar.close()
    title = f"{args.model or 'atlas ' + args.atlas}{' + ' + args.adapter if args.adapter else ''} on {ds.path}"
    for path in write_report(ev, ds, args.out, title):
        print(path)
    print(f"{format_summary(ev.summary())}; {ev.seconds_per_image:.2f} s/image", file=sys.stderr)
    return 0


def _models(args) -> int:
    from .models.catalogue import PIN_ON_FIRST_DOWNLOAD, cache_dir, catalogue
    from .models.download import add_local, cached_path, pinned_sha256

    if args.action == "add":
        if args.file is None:
            raise InputError("models add needs FILE (a model file or the release zip)")
        for name in add_local(args.file, args.name):
            print(f"{name}\t{cached_path(catalogue()[name])}")
        return 0
    if args.file is not None or args.name is not None:
        raise InputError("FILE and --name go with `models add`")
    for entry in catalogue().values():
        sha = pinned_sha256(entry)
        if entry.sha256 != PIN_ON_FIRST_DOWNLOAD:
            state = f"sha256 {sha} (catalogue)"
        elif sha:
            state = f"sha256 {sha} (pinned at first download)"
        else:
            state = "sha256 pinned at first download (not downloaded yet)"
        sets = ",".join(s.name for s in entry.landmark_sets) if len(entry.landmark_sets) > 1 else ""
        where = "cached" if cached_path(entry).is_file() else entry.source.url
        print("\t".join([entry.name, entry.display, f"sets: {sets}" if sets else "-", state, where]))
    print(f"cache: {cache_dir()}", file=sys.stderr)
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.data, args.out, n_atlases=args.atlases, n_cases=args.cases)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except InputError as e:
        print(f"medsapiens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medsapiens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

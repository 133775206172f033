"""`medsapiens` command line: stdout carries results (written file paths, figures), stderr progress and errors.

Exit status: 0 success, 1 some inputs failed, 2 bad usage or input (one line on stderr, no traceback). Every
command is one parser function and one handler; the work is `medsapiens.api`'s.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import api
from .errors import InputError, NotBetter
from .progress import Progress
from .settings import AUGMENT_PRESETS, CEPH_RADII, LORA_DEFAULTS, REFINE_DEFAULTS, TRAIN_DEFAULTS, VOLUME_RADII


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsapiens", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_IntermixedParser)
    for add in (_detect_parser, _analyze_parser, _finetune_parser, _train_parser, _evaluate_parser, _models_parser,
                _demo_parser, _web_parser):
        add(sub)
    return parser


# ----------------------------------------------------------------------------------------------- options
def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="LORA", help="LoRA file (an adapter trained with medsapiens, or a MedSapiens "
                   "checkpoint) applied on MODEL; MODEL is then its base")
    p.add_argument("--base", metavar="BASE", help="the Sapiens checkpoint under MODEL, when MODEL is a LoRA file "
                   "(catalogue MedSapiens models fetch their base themselves)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA when present)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="inference precision (default auto: bf16 on GPUs that support it and on CPUs with native "
                        "bf16 instructions (AVX512-BF16 or AMX) where it measures faster than fp32; fp32 elsewhere)")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                   help="network input size (default: the model's, 1024 768 for Sapiens)")
    p.add_argument("--flip-test", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the mirrored image, symmetric landmarks swapped (default: the model's own "
                        "setting, on for the MedSapiens release as in its test config)")


def _atlas_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--atlas", help=f"{what} the weight-free atlas of annotated cases: a landmarks.csv (2D or 3D) or "
                                   "a folder of .mrk.json + image or volume pairs")
    p.add_argument("--atlas-cases", metavar="ID,ID,...", help="the atlas cases to use (case ids: file names "
                                                               "without .png, .nii.gz...; default all)")
    p.add_argument("--atlas-deformable", action="store_true", help="with --atlas: always add the B-spline stage "
                   "(without this option it is tried on the atlas's cases, each held out, and kept where it is "
                   "clearly better, as on hands: for articulated anatomy; slower)")


def _training_options(p: argparse.ArgumentParser, lr_help: str, hw: tuple, augment_default: str) -> None:
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {lr_help})")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                   help=f"network input size (default {hw[0]} {hw[1]})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA when present)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 autocast (pays off on GPUs; CPUs without bf16 units gain nothing)")
    p.add_argument("--augment", choices=list(AUGMENT_PRESETS), help="augmentation: the MedSapiens recipe "
                   "(rotation up to 80 degrees, scale 0.5-1.5) or mild (15 degrees, scale 0.8-1.25) for images taken "
                   f"in a standard pose (default {augment_default})")
    p.add_argument("--seed", type=int, help="random seed (default 0)")


def _preset_name(augment) -> str:
    return next(name for name, preset in AUGMENT_PRESETS.items() if preset == augment)


def _ids(spec: str | None) -> list[str] | None:
    return [s.strip() for s in spec.split(",") if s.strip()] if spec else None


def _rows(spec: str | None) -> slice | None:
    if spec is None:
        return None
    try:
        a, b = (int(v) if v.strip() else None for v in spec.split(":"))
    except ValueError:
        raise InputError(f"--rows {spec}: expected A:B (0-based slice of the rows, like 0:50)") from None
    return slice(a, b)


def _positive(**options) -> None:
    """--time-budget 0, --steps 0 and the like would mean "train for no time at all": refused in one line."""
    for name, value in options.items():
        if value is not None and not value > 0:
            raise InputError(f"--{name.replace('_', '-')} {value:g}: must be more than 0")


class _Bar:
    """A tqdm bar on stderr driven by Progress: percent of the whole job, elapsed time, what it does now."""

    def __init__(self, header: str | None = None):
        self.header, self.bar = header, None

    def __call__(self, p: Progress) -> None:
        if self.bar is None:  # on the first report, so that input errors come alone
            from tqdm import tqdm

            if self.header:
                print(self.header, file=sys.stderr)
            self.bar = tqdm(total=100, unit="%", file=sys.stderr, bar_format="{percentage:3.0f}%|{bar}| {elapsed} "
                                                                              "{desc}")
        self.bar.n = round(100 * p.fraction, 1)
        self.bar.set_description_str(p.message, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _with_bar(bar: _Bar | None, job):
    try:
        return job()
    finally:
        if bar is not None:
            bar.close()


# ----------------------------------------------------------------------------------------------- detect
def _detect_parser(sub) -> None:
    p = sub.add_parser("detect", help="detect landmarks on images or volumes, write .mrk.json files and "
                                      "landmarks.csv",
                       description="Detect landmarks on 2D images, or on 3D volumes with an atlas of volumes. MODEL "
                                   "is a weight file or a catalogue name (see `medsapiens models`; NAME:SET picks one "
                                   "landmark set of the generalist); with --atlas no MODEL is given. A LoRA file "
                                   "needs its base: `detect LORA --base BASE IMAGE...` or `detect BASE --adapter "
                                   "LORA IMAGE...`. A folder stands for its images and every DICOM series in it "
                                   "and its subfolders. Under `torchrun --nproc_per_node N medsapiens detect ...` "
                                   "each process detects on its share of the images and one landmarks.csv is "
                                   "written.")
    p.add_argument("inputs", nargs="+", metavar="[MODEL] IMAGE",
                   help="model (unless --atlas), then images or folders; with a 3D atlas, volumes (NIfTI, NRRD, MHA, "
                        "DICOM file or series folder)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    _atlas_options(p, "detect with")
    p.add_argument("--spacing", type=float, metavar="MM", help="pixel size for images whose file has none "
                                                             "(default: the file's, else 1 mm)")
    p.add_argument("--landmarks", help="expected landmark names (comma separated, or a landmarks.csv to take "
                                       "them from); another set is refused")
    p.add_argument("--analyze", action="store_true", help="also run the cephalometric analysis (needs the ISBI "
                                                          "landmark names): DIR/analysis.csv and a report")
    _model_options(p)
    p.set_defaults(run=_detect)


def _detect(args) -> int:
    from .detectors.factory import is_refined_atlas

    if args.atlas or is_refined_atlas(args.adapter):
        model, images = None, args.inputs  # the atlas, or an adapter that carries its atlas
    elif len(args.inputs) < 2:
        raise InputError("detect needs MODEL and at least one IMAGE (or --atlas and images)")
    else:
        model, images = args.inputs[0], args.inputs[1:]
    inputs = api.check_images(images, args.spacing, args.out)  # before the model or the atlas loads
    rank0 = _rank() == 0  # under torchrun, one bar and one list of files: rank 0's
    bar = _Bar() if rank0 else None
    detector = _with_bar(bar, lambda: api.load_detector(
        model, adapter=args.adapter, base=args.base, atlas=args.atlas, atlas_cases=_ids(args.atlas_cases),
        atlas_deformable=args.atlas_deformable or None, device=args.device, precision=args.precision,
        input_size=args.input_size,
        flip_test=args.flip_test, landmarks=_expected_landmarks(args.landmarks), progress=bar))
    bar = _Bar() if rank0 and len(inputs) > 1 else None
    batch = _with_bar(bar, lambda: api.detect_files(
        detector, inputs, args.out, spacing=args.spacing, analyze_out=args.out / "analysis.csv" if args.analyze
        else None, on_error=lambda line: _tqdm_write(f"medsapiens: error: {line}"), progress=bar))
    if not rank0:
        return 0  # rank 0 gives the status of the whole batch
    for path in batch.written:
        print(path)
    if batch.report:
        print(batch.report)
    if batch.failed and batch.images > 1:
        print(f"medsapiens: {batch.failed} of {batch.images} images failed (each named above); the others were "
              "written", file=sys.stderr)
    return 1 if batch.failed else 0


def _rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    import os

    return int(os.environ.get("RANK", 0))


def _tqdm_write(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def _expected_landmarks(spec: str | None):
    if spec is None:
        return None
    if spec.endswith(".csv"):
        return api.landmark_names(spec)
    return [s.strip() for s in spec.split(",") if s.strip()]


# ---------------------------------------------------------------------------------------------- analyze
def _analyze_parser(sub) -> None:
    names = api.analyses()
    p = sub.add_parser("analyze", help="cephalometric analyses of landmarks: the ISBI 2015 classes, Steiner, Downs, "
                                       "Björk-Jarabak, McNamara, Tweed",
                       description="Cephalometric measurements from landmarks with the ISBI names (S, N, Or, Po, A, "
                                   "B, Pog, Me, Gn, Go, LIT, UIT, ..., PNS, ANS, Ar): the ISBI 2015 challenge's "
                                   "classes (Wang et al., Medical Image Analysis 2016, Table 2) and the named "
                                   "analyses with their norms. Writes one row per image to --out (ISBI 2015 columns "
                                   "as ANB,ANB_class,...; the others ANALYSIS.MEASURE) and prints a report.")
    p.add_argument("landmarks", type=Path, metavar="landmarks.csv|DIR",
                   help="a landmarks CSV (as `detect` writes), or a folder with one or with .mrk.json + images")
    p.add_argument("--out", required=True, type=Path, help="analysis CSV to write")
    p.add_argument("--analysis", default=api.DEFAULT_ANALYSIS, metavar="NAME,...",
                   help=f"comma separated: {', '.join(f'{n} ({t})' for n, t in names.items())}, or all "
                        f"(default {api.DEFAULT_ANALYSIS})")
    p.add_argument("--report", type=Path, metavar="DIR", help="also one HTML + PDF report per image in DIR: the "
                                                              "radiograph with the tracing, the tables, the points "
                                                              "flagged for checking")
    p.set_defaults(run=_analyze)


def _analyze(args) -> int:
    done = api.analyze_files(args.landmarks, args.out, analysis=args.analysis, report=args.report)
    for path in done.written:
        print(path)
    print(done.report)
    return 1 if done.failed else 0


# --------------------------------------------------------------------------------------------- finetune
def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="train an adapter for a landmark set from a few annotated cases",
                       description="Fine-tune an adapter from a few annotated cases; written atomically to OUT. "
                                   "Without --base (the default): a patch refiner on top of the weight-free atlas of "
                                   "the cases, with its error and the atlas's estimated on held-out cases; the file "
                                   "carries the atlas, so `detect --adapter OUT IMAGE...` needs nothing else. With "
                                   "--base: LoRA on the frozen base + a head for the cases' landmarks.")
    p.add_argument("--base", help="base model: weight file or catalogue name; or an architecture "
                                  f"({', '.join(api.architectures())}) to train every weight from scratch "
                                  "(default: none, refine the atlas)")
    p.add_argument("--data", required=True, type=Path, help="landmarks.csv, or a folder of .mrk.json + images")
    p.add_argument("--cases", metavar="ID,ID,...", help="the annotated cases to learn from (image stems; default "
                                                         "all of --data)")
    p.add_argument("--out", required=True, type=Path, help="adapter file to write (.safetensors)")
    p.add_argument("--time-budget", type=float, metavar="S",
                   help=f"the whole run's time in seconds (default {REFINE_DEFAULTS.time_budget:g} on the atlas, "
                        f"its leave-one-out and labelling included; {LORA_DEFAULTS.train.time_budget:g} with "
                        "--base, views and cached tokens included)")
    p.add_argument("--steps", type=int, help=f"optimiser steps (default {REFINE_DEFAULTS.steps} per fold on the "
                                             "atlas; with --base the time budget decides)")
    p.add_argument("--unannotated", nargs="+", type=Path, metavar="IMAGE", help="without --base: more images of the "
                   "task without landmarks (files or folders; the images to detect on are fine): the atlas labels "
                   f"them and the refiner learns from them too (at most {REFINE_DEFAULTS.max_unannotated}, evenly "
                   "spaced; about 2.5 s each on 3 cases)")
    p.add_argument("--atlas-deformable", action="store_true", help="without --base: the atlas always adds its "
                   "B-spline stage (without this option it is tried on the held-out cases and kept where it is "
                   "clearly better, as on hands)")
    p.add_argument("--keep-worse", action="store_true", help="without --base: write the adapter even when it was "
                   "worse than the atlas on the held-out cases (default: say so and write nothing)")
    p.add_argument("--fresh", action="store_true", help="without --base: do not warm-start from the adapter "
                   "already at OUT")
    p.add_argument("--views", type=int, help="with --base: augmented views per case, made once (default "
                                             f"{LORA_DEFAULTS.views_per_case})")
    p.add_argument("--lora-blocks", type=int, metavar="N", help="with --base: LoRA on the last N blocks only, 0 "
                   "for the head alone; the blocks below run once per view (default: all on a GPU; on a CPU, planned "
                   f"so that {LORA_DEFAULTS.min_steps} steps fit in the time budget)")
    p.add_argument("--flip-pairs", metavar="A:B,...", help="with --base: symmetric landmark pairs (names); enables "
                                                           "mirroring")
    _training_options(p, f"{REFINE_DEFAULTS.lr:g}; {LORA_DEFAULTS.train.lr:g} with --base",
                      LORA_DEFAULTS.train.input_hw, _preset_name(LORA_DEFAULTS.train.augment) + " with --base")
    p.set_defaults(run=_finetune)


def _finetune(args) -> int:
    _positive(time_budget=args.time_budget, steps=args.steps, views=args.views)
    if args.base is not None and args.unannotated:
        raise InputError("--unannotated is for fine-tuning on the atlas (without --base)")
    if args.lora_blocks is not None and args.lora_blocks < 0:
        raise InputError(f"--lora-blocks {args.lora_blocks}: must be 0 (head only) or more")
    cases = api.load_cases(args.data, _ids(args.cases))
    unannotated = api.read_images(args.unannotated, "--unannotated") if args.unannotated else []
    atlas = args.base is None
    settings = {"time_budget": args.time_budget, "steps": args.steps, "lr": args.lr, "seed": args.seed}
    settings |= {"deformable": args.atlas_deformable or None} if atlas else {
        "input_hw": args.input_size, "augment": args.augment, "views_per_case": args.views,
        "lora_blocks": args.lora_blocks}
    what = "fine-tuning on the atlas of" if atlas else "fine-tuning on"
    more = f" and {len(unannotated)} unannotated images" if unannotated else ""
    bar = _Bar(f"{what} {len(cases)} cases: {', '.join(c.label for c in cases)}{more}")
    try:
        result = _with_bar(bar, lambda: api.finetune(
            args.base, cases, args.out, unannotated=unannotated, flip_pairs=_flip_pairs(args.flip_pairs),
            device=args.device, precision=args.precision, warm_start=not args.fresh, keep_worse=args.keep_worse,
            progress=bar, **settings))
    except NotBetter as e:
        print(f"medsapiens: {e}", file=sys.stderr)
        return 1
    for line in result.notes():
        print(line, file=sys.stderr)
    print(result.line())
    return 0


def _flip_pairs(spec: str | None) -> list[tuple[str, str]]:
    pairs = []
    for item in (spec.split(",") if spec else []):
        a, _, b = item.partition(":")
        pairs.append((a.strip(), b.strip()))
    return pairs


# ------------------------------------------------------------------------------------------------ train
def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a whole model on one data set (specialist) or several (generalist)",
                       description="Train a model from scratch on annotated data sets; several --data make a "
                                   "generalist with one head over the union of their landmarks. Runs data-parallel "
                                   "under `torchrun --nproc_per_node N`.")
    p.add_argument("--arch", default=api.DEFAULT_ARCH, choices=api.architectures(),
                   help=f"architecture (default {api.DEFAULT_ARCH}, the best size for a CPU)")
    p.add_argument("--data", required=True, type=Path, action="append", help="landmarks.csv (repeat for several)")
    p.add_argument("--rows", metavar="A:B", help="rows of each data set to train on, 0-based slice (default all)")
    p.add_argument("--out", required=True, type=Path, help="model file to write (.safetensors); the optimizer "
                                                           "state goes beside it as OUT.state")
    p.add_argument("--epochs", type=float, help="passes over the training images (default: the time budget decides)")
    p.add_argument("--time-budget", type=float, metavar="S", help="training time in seconds")
    p.add_argument("--resume", type=Path, help="continue a model written by train (and its .state)")
    p.add_argument("--batch", type=int, help=f"images per step and process (default {TRAIN_DEFAULTS.batch})")
    _training_options(p, f"{TRAIN_DEFAULTS.lr:g}", TRAIN_DEFAULTS.input_hw, _preset_name(TRAIN_DEFAULTS.augment))
    p.set_defaults(run=_train)


def _train(args) -> int:
    if args.epochs is None and args.time_budget is None:
        raise InputError("give --epochs, --time-budget or both")
    _positive(epochs=args.epochs, time_budget=args.time_budget, batch=args.batch)
    rank0 = _rank() == 0
    bar = _Bar() if rank0 else None
    out = _with_bar(bar, lambda: api.train(
        args.data, args.out, rows=_rows(args.rows), arch=args.arch, epochs=args.epochs, resume=args.resume,
        device=args.device, precision=args.precision, progress=bar, time_budget=args.time_budget,
        input_hw=args.input_size, lr=args.lr, batch=args.batch, seed=args.seed, augment=args.augment))
    if rank0:
        print(out)
    return 0


# --------------------------------------------------------------------------------------------- evaluate
def _evaluate_parser(sub) -> None:
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
    _atlas_options(p, "evaluate")
    _model_options(p)
    p.set_defaults(run=_evaluate)


def _evaluate(args) -> int:
    if (args.model is None) == (args.atlas is None):
        raise InputError("give either MODEL or --atlas")
    detector = api.load_detector(args.model, adapter=args.adapter, base=args.base, atlas=args.atlas,
                                 atlas_cases=_ids(args.atlas_cases), atlas_deformable=args.atlas_deformable or None,
                                 device=args.device, precision=args.precision, input_size=args.input_size,
                                 flip_test=args.flip_test)
    bar = _Bar()
    evaluation, dataset = _with_bar(bar, lambda: api.evaluate(detector, args.data, _rows(args.rows), args.radii,
                                                              progress=bar))
    title = f"{args.model or 'atlas ' + args.atlas}{' + ' + args.adapter if args.adapter else ''} on {dataset.path}"
    for path in api.write_evaluation(evaluation, dataset, args.out, title):
        print(path)
    print(evaluation.describe(), file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------- models
def _models_parser(sub) -> None:
    p = sub.add_parser("models", help="list the model catalogue, or add a model file or the release zip",
                       description="`models` lists the catalogue (name, display name, SHA256 state); `models add "
                                   "FILE|ZIP [--name NAME]` brings a downloaded file or the MedSapiens release zip "
                                   "into the cache, for sites without network.")
    p.add_argument("action", nargs="?", choices=("list", "add"), default="list")
    p.add_argument("file", nargs="?", type=Path, metavar="FILE|ZIP", help="with add: the model file or zip")
    p.add_argument("--name", help="with add: the catalogue name the file is, or the name of a new model "
                                  "(default: recognised from the file name, else the file's stem)")
    p.set_defaults(run=_models)


def _models(args) -> int:
    if args.action == "add":
        if args.file is None:
            raise InputError("models add needs FILE (a model file or the release zip)")
        for name, path in api.add_model(args.file, args.name):
            print(f"{name}\t{path}")
        return 0
    if args.file is not None or args.name is not None:
        raise InputError("FILE and --name go with `models add`")
    for row in api.catalogue_rows():
        sets = f"sets: {','.join(row['sets'])}" if row["sets"] else "-"
        print("\t".join([row["name"], row["display"], sets, row["state"], row["where"]]))
    print(f"cache: {api.cache_dir()}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------- demo
def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="atlas detection on unseen cases from 3 annotated ones, offline, ~1 minute",
                       description="Detect landmarks on unseen cases from 3 annotated ones with the weight-free "
                                   "atlas detector; print MRE/SDR; write .mrk.json files and an overlay PNG.")
    p.add_argument("--data", type=Path, help="a data set folder with landmarks.csv (default: a generated "
                                             "radiograph-like phantom set)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--atlases", type=int, default=3, help="annotated cases to learn from (default 3)")
    p.add_argument("--cases", type=int, default=4, help="unseen cases to detect on (default 4)")
    p.set_defaults(run=_demo)


def _demo(args) -> int:
    return api.demo(args.data, args.out, n_atlases=args.atlases, n_cases=args.cases)


# -------------------------------------------------------------------------------------------------- web
def _web_parser(sub) -> None:
    p = sub.add_parser("web", help="the Slicer panel's session in a web browser (the `web` extra)",
                       description="Serve the panel's session to web browsers (trame-slicer): upload images and "
                                   "points, add cases, fine-tune, detect, drag the points, download them. Each "
                                   "browser gets its own scene, cases and engine worker. Needs "
                                   "pip install 'medsapiens[web]'.")
    p.add_argument("--data", type=Path, help="a server folder whose images the page may open by name")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any other lets anyone who can "
                        "reach the port use it)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.set_defaults(run=_web)


def _web(args) -> int:
    from .web.server import serve

    return serve(args.host, args.port, args.data)


def _version() -> str:
    from . import __version__

    return __version__


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

"""`medsapiens` command line: stdout carries results (written file paths, figures), stderr progress and errors.

Exit status: 0 success, 1 some inputs failed, 2 bad usage or input (one line on stderr, no traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import InputError


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="LoRA adapter file applied on MODEL (this project's format)")
    p.add_argument("--base", help="Sapiens checkpoint under a MedSapiens LoRA file given as MODEL")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA when present)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="inference precision (default fp32; bf16 pays off on GPUs and CPUs with bf16 units)")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                   help="network input size (default: the model's, 1024 768 for Sapiens)")
    p.add_argument("--flip-test", action="store_true", help="average with the mirrored image (slower)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsapiens", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("detect", help="detect landmarks on images, write .mrk.json files and landmarks.csv",
                       description="Detect landmarks on 2D images. MODEL is a weight file or a catalogue name "
                                   "(see `medsapiens models`); with --atlas no MODEL is given.")
    p.add_argument("inputs", nargs="+", metavar="[MODEL] IMAGE", help="model (unless --atlas), then images")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--atlas", help="weight-free detection from annotated cases: a landmarks.csv or a folder of "
                                   ".mrk.json + image pairs")
    p.add_argument("--atlas-cases", metavar="ID,ID,...", help="with a landmarks.csv atlas: the rows to use "
                                                               "(image stems; default all)")
    p.add_argument("--spacing", type=float, metavar="MM", help="pixel size for images whose file has none "
                                                             "(default: the file's, else 1 mm)")
    p.add_argument("--landmarks", help="expected landmark names (comma separated, or a landmarks.csv to take "
                                       "them from); another set is refused")
    _add_model_options(p)
    p.set_defaults(run=_detect)

    p = sub.add_parser("models", help="list the model catalogue and the cache folder")
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
        from .datasets import Dataset

        return Dataset(spec).names
    return [s.strip() for s in spec.split(",") if s.strip()]


def _detect(args) -> int:
    from tqdm import tqdm

    from .datasets import write_landmarks_csv
    from .detectors import load_detector
    from .images import read_image
    from .markups import write_markups

    if args.atlas:
        model, images = None, args.inputs
    else:
        if len(args.inputs) < 2:
            raise InputError("detect needs MODEL and at least one IMAGE (or --atlas and images)")
        model, images = args.inputs[0], args.inputs[1:]
    images = [Path(i) for i in images]
    missing = [str(i) for i in images if not i.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"{missing[0]}: no such image file{more}")
    stems = [i.name.split(".")[0] for i in images]
    clash = {s for s in stems if stems.count(s) > 1}
    if clash:
        raise InputError(f"several images share the name {sorted(clash)[0]}; their outputs would overwrite each other")
    detector = load_detector(model, adapter=args.adapter, base=args.base, atlas=args.atlas, device=args.device,
                             atlas_cases=args.atlas_cases.split(",") if args.atlas_cases else None,
                             precision=args.precision, input_size=args.input_size, flip_test=args.flip_test,
                             landmarks=_expected_landmarks(args.landmarks))
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], 0
    for path, stem in tqdm(list(zip(images, stems)), desc="detect", unit="image", file=sys.stderr,
                           disable=len(images) < 2):
        try:
            case = read_image(path, spacing=args.spacing)
        except InputError as e:
            print(f"medsapiens: error: {e}", file=sys.stderr)
            failed += 1
            continue
        result = detector.detect(case)
        out = write_markups(args.out / f"{stem}.mrk.json", result, case)
        print(out)
        rows.append((os.path.relpath(path.resolve(), args.out.resolve()), *case.size, case.spacing[0], result))
    if rows:
        print(write_landmarks_csv(args.out / "landmarks.csv", rows))
    return 1 if failed else 0


def _models(args) -> int:
    from .catalogue import cache_dir, catalogue

    for entry in catalogue().values():
        print(f"{entry.name}\t{entry.layout}\t{entry.url}")
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

"""`evaluate`: a detector on an annotated data set (images or volumes) -> MRE / SDR in mm, per landmark, JSON +
Markdown + plots."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..case import Landmarks, Volume
from ..errors import InputError, short_list
from ..io.atomic import atomic_write, atomic_write_text
from ..io.datasets import Dataset
from ..progress import Callback, report
from ..settings import CEPH_RADII
from .metrics import format_summary, radial_errors, summary

WORST_SHOWN = 3


@dataclass
class Evaluation:
    ids: list[str]
    names: list[str]
    errors: np.ndarray            # (images, K) mm; NaN = not annotated, inf = not found
    predictions: list[Landmarks]
    seconds_per_image: float
    radii: tuple[float, ...]

    def summary(self) -> dict:
        return summary(self.errors, self.radii)

    def describe(self) -> str:
        """'MRE 1.92 mm; SDR 2 mm 66.5%, ...; 2.58 s/image'."""
        return f"{format_summary(self.summary())}; {self.seconds_per_image:.2f} s/image"

    def per_landmark(self) -> list[dict]:
        rows = []
        for k, name in enumerate(self.names):
            e = self.errors[:, k]
            found = e[np.isfinite(e)]
            scored = e[~np.isnan(e)]
            rows.append({"name": name, "mre_mm": float(found.mean()) if found.size else None,
                         "sd_mm": float(found.std()) if found.size else None,
                         "sdr": {str(r): float(np.mean(scored < r)) if scored.size else None for r in self.radii},
                         "scored": int(scored.size), "not_found": int(np.isinf(scored).sum())})
        return rows

    def image_means(self) -> np.ndarray:
        """(images,) mean error over each image's found landmarks; inf where none was found."""
        return np.array([r[np.isfinite(r)].mean() if np.isfinite(r).any() else np.inf for r in self.errors])

    def worst(self, n: int = WORST_SHOWN) -> list[int]:
        """Image indices by mean error over found landmarks, worst first."""
        return [int(i) for i in np.argsort(-self.image_means(), kind="stable")[:n]]


def evaluate(detector, dataset: Dataset, rows=None, radii=CEPH_RADII, progress: Callback = None) -> Evaluation:
    """Detect on the data set's `rows` (default all) and score against its annotations."""
    rows = list(range(len(dataset)) if rows is None else rows)
    if not rows:
        raise InputError(f"{dataset.path}: no rows selected to evaluate")
    if detector.dim != dataset.dim:
        kinds = {2: "2D images", 3: "3D volumes"}
        raise InputError(f"{dataset.path}: a set of {kinds[dataset.dim]}, but the detector works on "
                         f"{kinds[detector.dim]}")
    if not set(dataset.names) & set(detector.names):
        raise InputError(f"{dataset.path}: its landmarks ({short_list(dataset.names)}) are none of those the model "
                         f"detects ({short_list(detector.names)})")
    errors, predictions, seconds = [], [], 0.0
    for n, i in enumerate(rows):
        case = dataset.case(i)
        t = time.perf_counter()
        found = detector.detect(case)
        seconds += time.perf_counter() - t
        errors.append(radial_errors(found, case.landmarks, case.spacing))
        predictions.append(found.subset(dataset.names))
        report(progress, (n + 1) / len(rows), f"scored {case.label}: {n + 1} of {len(rows)}", step=n + 1,
               total=len(rows))
    return Evaluation([dataset.rows[i].id for i in rows], list(dataset.names), np.array(errors), predictions,
                      seconds / len(rows), tuple(float(r) for r in radii))


def write_report(ev: Evaluation, dataset: Dataset, out: Path, title: str) -> list[Path]:
    """report.json, report.md, per_landmark.png, sdr_curve.png, worst_cases.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    s = ev.summary()
    doc = {"title": title, "data": str(dataset.path), "images": ev.ids, "summary": s,
           "seconds_per_image": ev.seconds_per_image, "per_landmark": ev.per_landmark(),
           "errors_mm": [[None if np.isnan(v) else (v if np.isfinite(v) else "not found") for v in map(float, r)]
                         for r in ev.errors]}
    paths = [atomic_write_text(out / "report.json", json.dumps(doc, indent=1) + "\n"),
             atomic_write_text(out / "report.md", _markdown(ev, s, title))]
    return paths + _plots(ev, dataset, out)


def _markdown(ev: Evaluation, s: dict, title: str) -> str:
    radii = " | ".join(f"SDR {r:g} mm" for r in ev.radii)
    lines = [f"# {title}", "", f"{len(ev.ids)} images, {ev.seconds_per_image:.2f} s per image.", "",
             format_summary(s), "", f"| landmark | MRE mm | SD mm | {radii} | not found |",
             "| --- | --- | --- | " + " | ".join("---" for _ in ev.radii) + " | --- |"]
    for row in ev.per_landmark():
        mre = "-" if row["mre_mm"] is None else f"{row['mre_mm']:.2f}"
        sd = "-" if row["sd_mm"] is None else f"{row['sd_mm']:.2f}"
        sdr = " | ".join("-" if v is None else f"{100 * v:.1f}%" for v in row["sdr"].values())
        lines.append(f"| {row['name']} | {mre} | {sd} | {sdr} | {row['not_found']} |")
    lines += ["", "Worst images (mean error): " + ", ".join(ev.ids[i] for i in ev.worst()), ""]
    return "\n".join(lines)


def _plots(ev: Evaluation, dataset: Dataset, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.intensity import to_rgb255

    paths = []
    rows = ev.per_landmark()
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 3.5))
    x = np.arange(len(rows))
    ax.bar(x, [r["mre_mm"] or 0 for r in rows], yerr=[r["sd_mm"] or 0 for r in rows], capsize=2, color="#4c72b0")
    ax.set_xticks(x, [r["name"] for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("radial error (mm)")
    ax.set_title("Per-landmark error (mean and SD)")
    paths.append(_save(fig, out / "per_landmark.png"))

    scored = ev.errors[~np.isnan(ev.errors)]
    r = np.linspace(0, max(10.0, 1.2 * max(ev.radii)), 200)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(r, [100 * np.mean(scored < v) for v in r])
    for v in ev.radii:
        ax.axvline(v, color="grey", lw=0.5)
    ax.set_xlabel("radius (mm)")
    ax.set_ylabel("landmarks within radius (%)")
    ax.set_title("Successful detection rate")
    paths.append(_save(fig, out / "sdr_curve.png"))

    worst, means = ev.worst(), ev.image_means()
    fig, axes = plt.subplots(1, len(worst), figsize=(4 * len(worst), 5.6))
    index = {rid: i for i, rid in enumerate(dataset.ids())}
    for ax, i in zip(np.atleast_1d(axes), worst):
        case = dataset.case(index[ev.ids[i]])
        t, p = case.landmarks, ev.predictions[i]
        if isinstance(case, Volume):  # maximum-intensity projection along the voxel z axis, points projected too
            ax.imshow(case.voxels.max(axis=0), cmap="gray")
            t_xy, p_xy = case.to_index(t.points)[:, :2], case.to_index(p.points)[:, :2]
        else:
            ax.imshow(to_rgb255(case.image).astype(np.uint8))
            t_xy, p_xy = t.points, p.points
        ax.scatter(*t_xy[t.present].T, s=10, c="lime", label="truth")
        ax.scatter(*p_xy[p.present].T, s=10, c="red", marker="x", label="detected")
        for a, b, ok in zip(t_xy, p_xy, t.present & p.present):
            if ok:
                ax.plot([a[0], b[0]], [a[1], b[1]], c="yellow", lw=0.7)
        ax.set_title(f"{ev.ids[i]}: mean {means[i]:.2f} mm", fontsize=9)
        ax.axis("off")
    np.atleast_1d(axes)[0].legend(loc="lower left", fontsize=7)
    paths.append(_save(fig, out / "worst_cases.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path

"""A report to hand over, per image: the radiograph with the tracing of the chosen analyses, their tables against
the norms, where the landmarks came from, and the points flagged for checking.

One self-contained HTML file (the picture embedded as a PNG) and, beside it, a PDF of the same picture and tables
drawn by matplotlib's own PDF backend (no HTML renderer needed); both written atomically.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from ..case import Landmarks
from ..io.atomic import atomic_write, atomic_write_text
from .results import ISBI, choices

LINE_COLOUR = "#00e5ff"   # the tracing's lines and angles
POINT_COLOUR = "#ffd400"  # a landmark
CHECK_COLOUR = "#ff2d2d"  # a landmark flagged for checking


def _pixel(landmarks: Landmarks, spec) -> np.ndarray | None:
    """A drawn point's pixel position (a tuple of names: their midpoint), None when a landmark is missing."""
    names = spec if isinstance(spec, tuple) else (spec,)
    index = {n: i for i, n in enumerate(landmarks.names)}
    if not all(n in index and landmarks.present[index[n]] for n in names):
        return None
    return np.mean([landmarks.points[index[n]] for n in names], axis=0)


def tracing_segments(landmarks: Landmarks, by_analysis: dict) -> list[np.ndarray]:
    """The tracing as pixel polylines (2 points for a line, 3 for an angle through its vertex), each once, of
    the measures that were computed."""
    seen, out = set(), []
    for results in by_analysis.values():
        for r in results:
            for item in r.drawn if not r.missing else ():
                pts = [_pixel(landmarks, s) for s in item]
                if item in seen or any(p is None for p in pts):
                    continue
                seen.add(item)
                out.append(np.array(pts))
    return out


def figure(image: np.ndarray, landmarks: Landmarks, by_analysis: dict, title: str):
    """The radiograph (grey) with the tracing, the landmarks and, ringed in red, the points flagged for checking."""
    from matplotlib.figure import Figure

    image = image.mean(axis=2) if image.ndim == 3 else image  # grey: RGB copies of raw intensities too
    h, w = image.shape[:2]
    fig = Figure(figsize=(8.0, 8.0 * h / w + 0.4), dpi=100)
    ax = fig.add_axes((0, 0, 1, h / (h + 0.05 * w)))
    ax.imshow(image, cmap="gray", interpolation="bilinear")
    for seg in tracing_segments(landmarks, by_analysis):
        ax.plot(seg[:, 0], seg[:, 1], color=LINE_COLOUR, linewidth=1.6)
    for i, name in enumerate(landmarks.names):
        if landmarks.present[i]:
            x, y = landmarks.points[i]
            colour = CHECK_COLOUR if landmarks.check[i] else POINT_COLOUR
            ax.plot([x], [y], "o", color=colour, markersize=4 if not landmarks.check[i] else 7,
                    markerfacecolor=colour if not landmarks.check[i] else "none", markeredgewidth=1.5)
            ax.annotate(name, (x, y), xytext=(4, -4), textcoords="offset points", color=colour, fontsize=7)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.axis("off")
    fig.suptitle(title, fontsize=10, y=0.995)
    return fig


def _rows(by_analysis: dict) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """(analysis title, [(measure, value, norm, reading)]) per analysis."""
    titles = choices()
    return [(titles[a], [(f"{r.name}: {r.title}", r.text() or "-", r.normal_range, r.reading) for r in results])
            for a, results in by_analysis.items()]


def _checked(landmarks: Landmarks) -> list[str]:
    return [f"{n} (confidence {landmarks.confidence[i]:.3f})" for i, n in enumerate(landmarks.names)
            if landmarks.check[i]]


def report_html(title: str, png: bytes, landmarks: Landmarks, by_analysis: dict, source: str) -> str:
    esc = html.escape
    checked = _checked(landmarks)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
             "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #bbb;padding:2px 8px;text-align:left}</style></head><body>",
             f"<h1>{esc(title)}</h1>", f"<p><b>Landmarks:</b> {esc(source)}</p>",
             f"<p><b>Points to check:</b> {esc(', '.join(checked)) if checked else 'none flagged'}</p>",
             f"<img alt='tracing' style='max-width:100%' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"]
    for analysis, rows in _rows(by_analysis):
        parts.append(f"<h2>{esc(analysis)}</h2><table><tr><th>Measure</th><th>Value</th><th>"
                     f"{'Normal range' if analysis == choices()[ISBI] else 'Norm'}</th><th>Reading</th></tr>")
        parts += [f"<tr>{''.join(f'<td>{esc(c)}</td>' for c in row)}</tr>" for row in rows]
        parts.append("</table>")
    return "".join(parts) + "</body></html>\n"


def _text_page(fig, title: str, lines: list[str]) -> None:
    fig.text(0.04, 0.97, title, fontsize=11, va="top", weight="bold")
    fig.text(0.04, 0.94, "\n".join(lines), fontsize=6.5, va="top", family="monospace")


def write_report(html_path, title: str, image: np.ndarray, landmarks: Landmarks, by_analysis: dict, source: str,
                 pdf: bool = True) -> list[Path]:
    """`html_path` (and the .pdf beside it): the report of one image; returns the files written."""
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    fig = figure(image, landmarks, by_analysis, title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    written = [atomic_write_text(html_path, report_html(title, buffer.getvalue(), landmarks, by_analysis, source))]
    if pdf:
        lines = [f"Landmarks: {source}", f"Points to check: {', '.join(_checked(landmarks)) or 'none flagged'}", ""]
        for analysis, rows in _rows(by_analysis):
            lines += [analysis] + [f"  {m[:58]:<58} {v:>10}  {n:<16} {r}" for m, v, n, r in rows] + [""]

        def write(tmp):
            with PdfPages(tmp) as pages:
                pages.savefig(fig)
                text = Figure(figsize=(8.27, 11.69))
                _text_page(text, title, lines)
                pages.savefig(text)

        written.append(atomic_write(Path(html_path).with_suffix(".pdf"), write))
    return written

"""The named analyses (Steiner, Downs, Björk-Jarabak, McNamara, Tweed) against plain-numpy re-statements on the
shared cephalograms and hand-made cases with exact angles; mirrored images; missing landmarks; the report's picture."""
import base64
import csv
import io
import math
import re

import numpy as np
import pytest
from medsapiens import Landmarks, api
from medsapiens.cli import main

CASES = ("images/001.png", "images/003.png", "images/005.png")


@pytest.fixture(scope="module")
def table(data_dir):
    with open(data_dir / "ceph_hamedan" / "landmarks.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ an independent statement of the constructions
def angle_at(vertex, a, b) -> float:
    """Angle a-vertex-b by the law of cosines."""
    p, q, r = np.linalg.norm(a - vertex), np.linalg.norm(b - vertex), np.linalg.norm(a - b)
    return math.degrees(math.acos((p * p + q * q - r * r) / (2 * p * q)))


def direction(a, b) -> float:
    d = b - a
    return math.degrees(math.atan2(d[1], d[0]))


def between(a, b) -> float:
    """The unsigned angle between two directions given in degrees."""
    return abs((b - a + 180.0) % 360.0 - 180.0)


def ahead(point, a, b) -> float:
    """The distance of `point` from line a-b, positive when it lies to the right of its foot (the face's side)."""
    d = (b - a) / np.linalg.norm(b - a)
    foot = a + np.dot(point - a, d) * d
    return math.copysign(np.linalg.norm(point - foot), point[0] - foot[0])


def along_fh(point, through, po, orb) -> float:
    """Rotate FH (Po -> Or) onto the x axis; the x distance from `through` to `point`."""
    t = -math.radians(direction(po, orb))
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return float((rot @ (point - through))[0])


def expected(p) -> dict:
    fh, go_me = direction(p["Po"], p["Or"]), direction(p["Go"], p["Me"])
    convexity = 180.0 - angle_at(p["A"], p["N"], p["Pog"])
    ab = between(direction(p["N"], p["Pog"]), direction(p["A"], p["B"]))
    parallel_foot = p["A"] + (p["Pog"] - p["N"])
    saddle, articular, gonial = (angle_at(p["S"], p["N"], p["Ar"]), angle_at(p["Ar"], p["S"], p["Go"]),
                                 angle_at(p["Go"], p["Ar"], p["Me"]))
    dist = lambda a, b: float(np.linalg.norm(p[a] - p[b]))  # noqa: E731
    return {
        "steiner.SNA": angle_at(p["N"], p["S"], p["A"]), "steiner.SNB": angle_at(p["N"], p["S"], p["B"]),
        "steiner.ANB": angle_at(p["N"], p["S"], p["A"]) - angle_at(p["N"], p["S"], p["B"]),
        "steiner.SN-GoGn": between(direction(p["S"], p["N"]), direction(p["Go"], p["Gn"])),
        "steiner.U1-NA_mm": ahead(p["UIT"], p["N"], p["A"]), "steiner.L1-NB_mm": ahead(p["LIT"], p["N"], p["B"]),
        "steiner.Pog-NB_mm": ahead(p["Pog"], p["N"], p["B"]),
        "downs.facial": between(direction(p["Or"], p["Po"]), direction(p["N"], p["Pog"])),
        "downs.convexity": math.copysign(convexity, ahead(p["A"], p["N"], p["Pog"])),
        "downs.AB-plane": math.copysign(ab, ahead(p["B"], p["A"], parallel_foot)),
        "downs.FH-MP": between(fh, go_me), "downs.Y-axis": between(fh, direction(p["S"], p["Gn"])),
        "downs.U1-APog_mm": ahead(p["UIT"], p["A"], p["Pog"]),
        "bjork.saddle": saddle, "bjork.articular": articular, "bjork.gonial": gonial,
        "bjork.sum": saddle + articular + gonial, "bjork.upper_gonial": angle_at(p["Go"], p["Ar"], p["N"]),
        "bjork.lower_gonial": angle_at(p["Go"], p["N"], p["Me"]), "bjork.S-Go/N-Me": 100 * dist("S", "Go") /
        dist("N", "Me"), "bjork.S-N": dist("S", "N"), "bjork.S-Ar": dist("S", "Ar"), "bjork.Ar-Go": dist("Ar", "Go"),
        "bjork.Go-Me": dist("Go", "Me"), "bjork.S-Go": dist("S", "Go"), "bjork.N-Me": dist("N", "Me"),
        "mcnamara.A-Nperp": along_fh(p["A"], p["N"], p["Po"], p["Or"]),
        "mcnamara.Pog-Nperp": along_fh(p["Pog"], p["N"], p["Po"], p["Or"]),
        "mcnamara.ANS-Me": dist("ANS", "Me"), "tweed.FMA": between(fh, go_me),
    }


NOT_COMPUTABLE = {"steiner.U1-NA_deg": "UIA", "steiner.L1-NB_deg": "LIA", "steiner.U1-L1": "UIA, LIA",
                  "steiner.OP-SN": "U6, L6", "downs.OP-FH": "U6, L6", "downs.U1-L1": "UIA, LIA", "mcnamara.Co-A": "Co",
                  "mcnamara.Co-Gn": "Co", "mcnamara.facial_axis": "Ba, Pt", "tweed.IMPA": "LIA", "tweed.FMIA": "LIA"}


def mm(row, name):
    return np.array([float(row[f"{name}_x"]), float(row[f"{name}_y"])]) * float(row["spacing_mm"])


def landmarks_of(row):
    names = [k[:-2] for k in row if k.endswith("_x")]
    return Landmarks(names, np.array([[float(row[f"{n}_x"] or "nan"), float(row[f"{n}_y"] or "nan")]
                                      for n in names])), float(row["spacing_mm"])


def read_csv(path):
    with open(path, newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------------------------------- tests
def test_every_measure_matches_an_independent_computation(tmp_path, table, data_dir, capsys):
    out = tmp_path / "all.csv"
    assert main(["analyze", str(data_dir / "ceph_hamedan" / "landmarks.csv"), "--out", str(out), "--analysis",
                 "all"]) == 0
    err = capsys.readouterr().err
    assert err.count("no UIA, LIA, U6, L6, Co, Ba, Pt in the landmark set") == 1, err
    result = read_csv(out)
    with open(out, newline="") as f:
        header = next(csv.reader(f))
    assert header[:17] == ["image"] + [c for m in ("ANB", "SNB", "SNA", "ODI", "APDI", "FHI", "FHA", "MW")
                                       for c in (m, f"{m}_class")]
    for row in (r for r in table if r["image"] in CASES):
        want = expected({n: mm(row, n) for n in ("S", "N", "Or", "Po", "A", "B", "Pog", "Me", "Gn", "Go", "LIT",
                                                  "UIT", "ANS", "Ar")})
        assert set(header[17:]) == set(want) | set(NOT_COMPUTABLE)
        got = result[row["image"]]
        for column, value in want.items():
            assert float(got[column]) == pytest.approx(value, abs=6e-4), (row["image"], column)
        assert all(got[c] == "" for c in NOT_COMPUTABLE)


def test_hand_made_cases_give_the_exact_angles_and_distances():
    r3 = math.sqrt(3.0)
    points = {"S": (0, 0), "N": (10, 0), "A": (10 - 5, 5 * r3),  # S-N-A 60 degrees
              "B": (10 - 5 * r3, 5),                          # S-N-B 30
              "Po": (0, 20), "Or": (10, 20),                  # FH horizontal
              "Go": (0, 40), "Me": (r3 * 10, 50),             # Go -> Me 30 degrees down from FH
              "Ar": (0, 10), "Pog": (13, 30), "UIT": (9, 10), "Gn": (10, 40)}
    lm = Landmarks(list(points), np.array(list(points.values()), float))
    by = {a: {m.name: m for m in api.analyze(lm, 0.5, a)} for a in ("steiner", "downs", "bjork", "mcnamara",
                                                                      "tweed")}
    assert by["steiner"]["SNA"].value == pytest.approx(60.0, abs=1e-9)
    assert by["steiner"]["SNB"].value == pytest.approx(30.0, abs=1e-9)
    assert by["steiner"]["ANB"].value == pytest.approx(30.0, abs=1e-9)
    assert by["tweed"]["FMA"].value == pytest.approx(30.0, abs=1e-9)
    assert by["downs"]["FH-MP"].value == pytest.approx(30.0, abs=1e-9)
    assert by["bjork"]["saddle"].value == pytest.approx(90.0, abs=1e-9)       # N-S-Ar: SN right, Ar straight down
    assert by["bjork"]["articular"].value == pytest.approx(180.0, abs=1e-6)   # S, Ar, Go on one vertical line
    assert by["bjork"]["S-Ar"].value == pytest.approx(5.0)                     # 10 px at 0.5 mm
    assert by["bjork"]["S-Go/N-Me"].value == pytest.approx(100 * 40 / math.hypot(r3 * 10 - 10, 50))
    assert by["mcnamara"]["Pog-Nperp"].value == pytest.approx(1.5)            # 3 px ahead of N along FH
    assert by["mcnamara"]["A-Nperp"].value == pytest.approx(-2.5)             # 5 px behind
    assert by["steiner"]["U1-NA_mm"].value == pytest.approx(0.5 * ahead(np.array([9.0, 10]), np.array([10.0, 0]),
                                                                        np.array([5, 5 * r3])))
    assert by["steiner"]["SNA"].reading == "retrognathic maxilla" and by["steiner"]["ANB"].reading == \
        "Class II skeletal tendency"
    assert by["steiner"]["U1-NA_deg"].reading == "not computed (missing UIA)"


def test_a_mirrored_image_gives_the_same_values(table):
    row = next(r for r in table if r["image"] == CASES[1])
    lm, spacing = landmarks_of(row)
    mirrored = Landmarks(lm.names, lm.points * [-1, 1] + [int(row["width"]) - 1, 0])
    for analysis in api.analyses():
        for a, b in zip(api.analyze(lm, spacing, analysis), api.analyze(mirrored, spacing, analysis)):
            assert (math.isnan(a.value) and math.isnan(b.value)) or b.value == pytest.approx(a.value, abs=1e-9), \
                (analysis, a.name)


def test_a_missing_landmark_empties_only_its_measures_with_one_line(tmp_path, table, capsys):
    rows = [dict(r) for r in table if r["image"] in CASES]
    rows[0]["Gn_x"] = rows[0]["Gn_y"] = ""
    for r in rows:
        r["image"] = str(tmp_path / "missing" / r["image"])  # the CSV alone is analysed: no image is read
    with open(tmp_path / "gaps.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "gaps_out.csv"
    assert main(["analyze", str(tmp_path / "gaps.csv"), "--out", str(out), "--analysis", "steiner,downs,tweed"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "001.png" in line]
    assert err == [f"medsapiens: warning: {rows[0]['image']}: steiner.SN-GoGn, downs.Y-axis not computed (missing "
                   "Gn)"]
    result = read_csv(out)
    first = result[rows[0]["image"]]
    assert first["steiner.SN-GoGn"] == first["downs.Y-axis"] == ""
    assert all(first[c] != "" for c in ("steiner.SNA", "downs.FH-MP", "tweed.FMA", "downs.facial"))
    assert result[rows[1]["image"]]["downs.Y-axis"] != ""
    assert "ANB_class" not in first  # isbi2015 only where asked


def test_an_unknown_analysis_is_one_line(tmp_path, data_dir, capsys):
    assert main(["analyze", str(data_dir / "ceph_hamedan" / "landmarks.csv"), "--out", str(tmp_path / "x.csv"),
                 "--analysis", "steiner,ricketts"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown analysis ricketts" in err and "bjork" in err
    assert not (tmp_path / "x.csv").exists()


def picture(html_text: str) -> np.ndarray:
    import matplotlib.image

    png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html_text).group(1))
    return matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]


def near(rgb: np.ndarray, xy, width: int, colour, radius=2) -> bool:
    """Whether a figure pixel within `radius` of image pixel xy has `colour` (the figure: 800 px wide, the image
    at its bottom below a 40 px title band)."""
    scale = 800 / width
    c, r = (int(round((v + 0.5) * scale)) for v in xy)
    r += 40
    patch = rgb[r - radius:r + radius + 1, c - radius:c + radius + 1]
    return bool((np.abs(patch - np.array(colour)).max(axis=-1) < 0.12).any())


@pytest.mark.slow
def test_the_report_shows_the_tracing_and_the_points_to_check(tmp_path, table, data_dir, capsys):
    import matplotlib.colors
    from medsapiens.analysis.report import CHECK_COLOUR, LINE_COLOUR

    row = next(r for r in table if r["image"] == CASES[0])
    lm, spacing = landmarks_of(row)
    lm.check[lm.names.index("Pog")] = True
    image = api.read_image(data_dir / "ceph_hamedan" / row["image"]).image
    cyan, red = matplotlib.colors.to_rgb(LINE_COLOUR), matplotlib.colors.to_rgb(CHECK_COLOUR)
    sn_middle = (lm.points[lm.names.index("S")] + lm.points[lm.names.index("N")]) / 2
    fh_middle = (lm.points[lm.names.index("Po")] + lm.points[lm.names.index("Or")]) / 2
    pog = lm.points[lm.names.index("Pog")] + [4, 0]  # on the ring around the point
    width = int(row["width"])
    files = api.write_report(tmp_path / "steiner.html", "001", image, lm, spacing, "steiner", "annotator 1")
    assert [f.name for f in files] == ["steiner.html", "steiner.pdf"]
    assert files[1].read_bytes()[:5] == b"%PDF-"
    text = files[0].read_text(encoding="utf-8")
    assert "annotator 1" in text and "Pog (confidence" in text and "82 ± 2°" in text and "src='http" not in text
    steiner = picture(text)
    assert near(steiner, sn_middle, width, cyan) and not near(steiner, fh_middle, width, cyan)
    assert near(steiner, pog, width, red, radius=4)
    tweed = picture(api.write_report(tmp_path / "tweed.html", "001", image, lm, spacing, "tweed")[0].read_text())
    assert near(tweed, fh_middle, width, cyan) and not near(tweed, sn_middle, width, cyan)


@pytest.mark.slow
def test_analyze_report_writes_one_per_image_and_names_an_unreadable_one(tmp_path, table, data_dir, capsys):
    rows = [dict(r) for r in table if r["image"] in CASES[:2]]
    rows[0]["image"] = str(data_dir / "ceph_hamedan" / rows[0]["image"])
    rows[1]["image"] = str(tmp_path / "gone.png")
    with open(tmp_path / "two.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["analyze", str(tmp_path / "two.csv"), "--out", str(tmp_path / "a.csv"), "--report",
                 str(tmp_path / "reports")]) == 1
    captured = capsys.readouterr()
    assert sum("gone.png" in line for line in captured.err.splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["001.html", "001.pdf"]
    assert str(tmp_path / "reports" / "001.html") in captured.out
    assert "annotated in" in (tmp_path / "reports" / "001.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_report_from_markups_files_names_them_and_the_points_to_check(tmp_path, table, data_dir, capsys):
    from medsapiens.io.markups import write_markups

    row = next(r for r in table if r["image"] == CASES[0])
    lm, _ = landmarks_of(row)
    confidence = np.full(len(lm), 0.9)
    confidence[lm.names.index("B")] = 0.4  # below REVIEW_BELOW: to check
    folder = tmp_path / "detected"
    folder.mkdir()
    (folder / "001.png").symlink_to(data_dir / "ceph_hamedan" / row["image"])
    case = api.read_image(folder / "001.png", spacing=float(row["spacing_mm"]))
    write_markups(folder / "001.mrk.json", Landmarks(lm.names, lm.points, confidence), case)
    assert main(["analyze", str(folder), "--out", str(tmp_path / "a.csv"), "--analysis", "mcnamara", "--report",
                 str(tmp_path / "reports")]) == 0
    text = (tmp_path / "reports" / "001.html").read_text(encoding="utf-8")
    assert "detected, confidences in 001.mrk.json" in text and "B (confidence 0.400)" in text
    assert "McNamara" in text and "ISBI 2015" not in text

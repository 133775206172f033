"""`medsapiens analyze` and the cephalometric measures against values computed here by hand on real cephalograms."""
import csv
import math
from pathlib import Path

import numpy as np
import pytest
from medsapiens.analysis.cephalometry import ISBI_19, analyze
from medsapiens.case import Landmarks
from medsapiens.cli import main

COLUMNS = ("image,ANB,ANB_class,SNB,SNB_class,SNA,SNA_class,ODI,ODI_class,APDI,APDI_class,FHI,FHI_class,"
           "FHA,FHA_class,MW,MW_class")
CASES = ("images/001.png", "images/003.png", "images/005.png")


@pytest.fixture(scope="module")
def ceph_dir(data_dir) -> Path:
    return data_dir / "ceph_hamedan"


@pytest.fixture(scope="module")
def table(ceph_dir):
    """The annotator-1 CSV as plain rows: {column: text}."""
    with open(ceph_dir / "landmarks.csv", newline="") as f:
        return list(csv.DictReader(f))


def point(row, name) -> np.ndarray:
    return np.array([float(row[f"{name}_x"]), float(row[f"{name}_y"])]) * float(row["spacing_mm"])


def angle_at(vertex, a, b) -> float:
    """Angle a-vertex-b in degrees, by the law of cosines on the three side lengths."""
    p, q, r = np.linalg.norm(a - vertex), np.linalg.norm(b - vertex), np.linalg.norm(a - b)
    return math.degrees(math.acos((p * p + q * q - r * r) / (2 * p * q)))


def direction(a, b) -> float:
    """Screen direction of a -> b in degrees (x right, y down: positive turns clockwise)."""
    d = b - a
    return math.degrees(math.atan2(d[1], d[0]))


def turn(a, b) -> float:
    """Signed turn from direction a to direction b, in (-180, 180]."""
    return (b - a + 180.0) % 360.0 - 180.0


def expected(row) -> dict:
    """Table 2 of Wang et al. 2016, written out independently of the engine (triangle sides, line directions)."""
    p = {n: point(row, n) for n in ("S", "N", "Or", "Po", "A", "B", "Pog", "Me", "Gn", "Go", "LIT", "UIT", "PNS",
                                    "ANS")}
    sna, snb = angle_at(p["N"], p["S"], p["A"]), angle_at(p["N"], p["S"], p["B"])
    fh, pp = direction(p["Po"], p["Or"]), direction(p["PNS"], p["ANS"])
    palatal = turn(fh, pp)  # ANS below the Frankfort direction: positive
    ab_mp = abs(turn(direction(p["Me"], p["Go"]), direction(p["B"], p["A"])))
    facial = direction(p["N"], p["Pog"])
    facial_angle = abs(turn(direction(p["Or"], p["Po"]), facial))
    ab_facial = -turn(facial, direction(p["A"], p["B"]))  # B ahead of the facial line: positive
    d = p["UIT"] - p["LIT"]
    return {"SNA": sna, "SNB": snb, "ANB": sna - snb, "ODI": ab_mp + palatal,
            "APDI": facial_angle + ab_facial + palatal,
            "FHI": np.linalg.norm(p["Go"] - p["S"]) / np.linalg.norm(p["Me"] - p["N"]),
            "FHA": abs(turn(direction(p["S"], p["N"]), direction(p["Go"], p["Gn"]))),
            "MW": math.copysign(np.linalg.norm(d), d[0])}


def expected_class(name, v) -> int:
    """The class numbers of Table 2 (MW: the gap 0-2 mm, which the table leaves open, as edge to edge)."""
    low, high, below, above = {"ANB": (3.2, 5.7, 3, 2), "SNB": (74.6, 78.7, 2, 3), "SNA": (79.4, 83.2, 3, 2),
                               "ODI": (68.4, 80.5, 3, 2), "APDI": (77.6, 85.2, 2, 3), "FHI": (0.65, 0.75, 3, 2),
                               "FHA": (26.8, 31.4, 3, 2), "MW": (2.0, 4.5, None, 4)}[name]
    if name == "MW" and v < 2.0:
        return 3 if v < 0 else 2
    return below if v < low else above if v > high else 1


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def read_output(path):
    with open(path, newline="") as f:
        text = f.read()
    return text.splitlines()[0], {r["image"]: r for r in csv.DictReader(text.splitlines())}


def test_analyze_reproduces_hand_computed_measures_on_three_cases(tmp_path, table, ceph_dir, capsys):
    rows = [r for r in table if r["image"] in CASES]
    assert len(rows) == 3
    out = tmp_path / "analysis.csv"
    assert main(["analyze", str(ceph_dir / "landmarks.csv"), "--out", str(out)]) == 0
    header, result = read_output(out)
    assert header == COLUMNS
    assert len(result) == len(table)
    for row in rows:
        want = expected(row)
        got = result[row["image"]]
        for name, value in want.items():
            assert float(got[name]) == pytest.approx(value, abs=6e-4), (row["image"], name)
            assert int(got[f"{name}_class"]) == expected_class(name, value), (row["image"], name)
    report = capsys.readouterr().out
    assert str(out) in report
    assert "images/001.png:" in report and "normal 3.2-5.7°" in report and "open bite tendency" in report
    assert "FHA   SN to mandibular plane (Go-Gn) angle [S, N, Go, Gn]: 1 normal (26.8-31.4°)" in report


def test_facing_left_gives_the_same_analysis(table):
    """A mirrored cephalogram (face to the left) is read in the ISBI orientation: signed measures keep their sign."""
    row = next(r for r in table if r["image"] == CASES[0])
    names = list(ISBI_19)
    points = np.array([[float(row[f"{n}_x"]), float(row[f"{n}_y"])] for n in names])
    spacing = float(row["spacing_mm"])
    mirrored = points * [-1, 1] + [int(row["width"]) - 1, 0]
    right = analyze(Landmarks(names, points), spacing)
    left = analyze(Landmarks(names, mirrored), spacing)
    for a, b in zip(right, left):
        assert b.value == pytest.approx(a.value, abs=1e-9) and b.band == a.band, a.name


def test_missing_landmarks_leave_only_their_measures_empty(tmp_path, table, capsys):
    header = list(table[0])
    rows = [dict(r) for r in table if r["image"] in CASES]
    rows[0]["Gn_x"] = rows[0]["Gn_y"] = ""          # FHA needs Gn
    rows[1]["UIT_x"] = rows[1]["UIT_y"] = ""        # MW needs UIT
    write_csv(tmp_path / "gaps.csv", header, rows)
    out = tmp_path / "gaps_analysis.csv"
    assert main(["analyze", str(tmp_path / "gaps.csv"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "images/001.png: FHA not computed (missing Gn)" in err
    assert "images/003.png: MW not computed (missing UIT)" in err
    _, result = read_output(out)
    assert result["images/001.png"]["FHA"] == result["images/001.png"]["FHA_class"] == ""
    assert result["images/003.png"]["MW"] == result["images/003.png"]["MW_class"] == ""
    for image, row in zip(CASES, rows):
        want = expected(next(r for r in table if r["image"] == image))
        for name in ("ANB", "SNB", "SNA", "ODI", "APDI", "FHI"):
            assert float(result[image][name]) == pytest.approx(want[name], abs=6e-4)
    assert result["images/005.png"]["FHA"] != "" and result["images/001.png"]["MW"] != ""

    # a set without Gn at all: one warning for the set, FHA empty everywhere, the rest computed
    no_gn = [h for h in header if not h.startswith("Gn_")]
    write_csv(tmp_path / "no_gn.csv", no_gn, [{h: r[h] for h in no_gn} for r in rows])
    assert main(["analyze", str(tmp_path / "no_gn.csv"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("no Gn in the landmark set, so FHA stay empty") == 1 and "not computed" in err  # UIT of 003
    _, result = read_output(out)
    assert all(r["FHA"] == "" and r["SNA"] != "" for r in result.values())

    found = analyze(Landmarks(["S", "N", "A"], np.array([[0.0, 0.0], [10.0, 0.0], [9.0, 8.0]])), 0.1)
    by_name = {m.name: m for m in found}
    assert by_name["SNA"].class_number is not None and by_name["SNA"].measure.landmarks == ("S", "N", "A")
    assert math.isnan(by_name["SNB"].value) and by_name["SNB"].missing == ("B",)


def test_bad_input_is_one_line(tmp_path, capsys):
    write_csv(tmp_path / "hand.csv", ["image", "width", "height", "spacing_mm", "L0_x", "L0_y"],
              [{"image": "a.png", "width": 10, "height": 10, "spacing_mm": 0.1, "L0_x": 1, "L0_y": 2}])
    assert main(["analyze", str(tmp_path / "hand.csv"), "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "hand.csv" in err and "no cephalometric measure" in err
    assert not (tmp_path / "x.csv").exists()
    assert main(["analyze", str(tmp_path / "none.csv"), "--out", str(tmp_path / "x.csv")]) == 2
    assert "none.csv: cannot read" in capsys.readouterr().err


def test_detect_analyze_refuses_a_model_for_other_landmarks(tmp_path, data_dir, capsys):
    hands = data_dir / "hand_dha"
    first = next(csv.DictReader(open(hands / "landmarks.csv", newline="")))
    assert main(["detect", "--atlas", str(hands / "landmarks.csv"), "--atlas-cases", Path(first["image"]).stem,
                 str(hands / first["image"]), "--out", str(tmp_path / "out"), "--analyze"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the model: no cephalometric measure" in err
    assert not (tmp_path / "out").exists()  # refused before any detection


@pytest.mark.slow
def test_detect_analyze_writes_the_analysis_of_its_detections(tmp_path, table, ceph_dir, capsys):
    image = ceph_dir / "images" / "051.png"
    assert main(["detect", "--atlas", str(ceph_dir / "landmarks.csv"), "--atlas-cases", "001", str(image),
                 "--out", str(tmp_path), "--analyze"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "analysis.csv") in out and "051.png:" in out
    detected = next(csv.DictReader(open(tmp_path / "landmarks.csv", newline="")))
    header, result = read_output(tmp_path / "analysis.csv")
    assert header == COLUMNS and list(result) == [detected["image"]]
    want = expected(detected)  # from the CSV's points, rounded to 0.001 px: up to ~8e-4 degrees on 100 px arms
    for name in ("SNA", "SNB", "ANB", "FHI", "FHA"):   # plus 5e-4 from the value's own rounding
        assert float(result[detected["image"]][name]) == pytest.approx(want[name], abs=1.5e-3)

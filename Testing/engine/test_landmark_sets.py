"""Landmark sets as data: the shipped ISBI 2015 and hand sets agree with the data sets and the catalogue, the hand
set's descriptions say what the annotated radiographs show, a set is read from a user's CSV or JSON and from a
model's, an adapter's or an annotated case's names, and every bad file is one line naming it and the problem."""
import json
import subprocess
import sys

import numpy as np
import pytest
from medsapiens import InputError, api
from medsapiens.io.datasets import Dataset
from medsapiens.io.markups import write_markups

FINGERS = {"thumb": (17, 18, 19, 20), "index finger": (21, 22, 23, 24), "middle finger": (25, 26, 27, 28),
           "ring finger": (29, 30, 31, 32), "little finger": (33, 34, 35, 36)}


def test_the_shipped_sets_are_those_of_the_data_and_the_catalogue(ceph, data_dir):
    assert api.landmark_sets() == {"isbi2015": "ISBI 2015 cephalometric (19)", "hand37": "Hand, Payer et al. 2019 (37)"}
    isbi, hand = api.landmark_set("isbi2015"), api.landmark_set("hand37")
    assert isbi.names == tuple(ceph.names) == ("S", "N", "Or", "Po", "A", "B", "Pog", "Me", "Gn", "Go", "LIT", "UIT",
                                               "UL", "LL", "Sn", "Pog'", "PNS", "ANS", "Ar")
    assert hand.names == tuple(Dataset(data_dir / "hand_dha" / "landmarks.csv").names)
    assert api.landmark_set("medsapiens-head").names == isbi.names  # the catalogue's head model
    for s in (isbi, hand):
        assert all(d and "\n" not in d and len(d) <= 110 for d in s.descriptions)
        assert len(set(s.descriptions)) == len(s.names), "one description per landmark"
    assert isbi.description("S") == "Sella: centre of the sella turcica"
    assert isbi.description("LIT").startswith("Lower incisal incision: incisal tip")
    assert isbi.description("UIT").startswith("Upper incisal incision: incisal tip")


def test_the_hand_descriptions_say_what_the_radiographs_show(data_dir):
    """Each finger's four points run joint after joint to the fingertip, the fingers lie thumb to little finger from
    the image's right to its left (the thumb on the right), L1 (ulnar styloid) is left of L5 (radial styloid) and
    the wrist is below the fingers: on every one of the 92 annotated radiographs."""
    hand, data = api.landmark_set("hand37"), Dataset(data_dir / "hand_dha" / "landmarks.csv")
    for finger, chain in FINGERS.items():
        words = ("base of the 1st metacarpal", "metacarpophalangeal", "interphalangeal", "tip") if finger == "thumb" \
            else ("metacarpophalangeal", "proximal interphalangeal", "distal interphalangeal", "tip")
        for i, word in zip(chain, words):
            assert hand.description(f"L{i}").startswith(finger) and word in hand.description(f"L{i}"), i
    for row in data.rows:
        p = row.landmarks.points
        wrist = p[[1, 5]].mean(axis=0)
        for chain in FINGERS.values():
            from_wrist = np.linalg.norm(p[list(chain)] - wrist, axis=1)
            assert (np.diff(from_wrist) > 0).all(), row.image
        tips = [p[chain[-1], 0] for chain in FINGERS.values()]
        assert (np.diff(tips) < 0).all(), row.image  # thumb, index, middle, ring, little: right to left
        assert p[1, 0] < p[5, 0] and p[:21, 1].mean() > p[21:, 1].mean(), row.image


def test_a_set_from_a_user_csv_or_json(tmp_path):
    (tmp_path / "plain.csv").write_text("Tip,\"the tip, of the nose\"\nChin\n")
    (tmp_path / "headed.csv").write_text("\ufeffname,description\nA,first\n\nB,second\n", encoding="utf-8")
    picture = tmp_path / "ref.png"
    picture.write_bytes(b"\x89PNG")
    (tmp_path / "set.json").write_text(json.dumps({"title": "Mine", "picture": "ref.png",
                                                   "landmarks": ["X", {"name": "Y", "description": "why"}]}))
    plain = api.landmark_set(tmp_path / "plain.csv")
    assert plain.names == ("Tip", "Chin") and plain.descriptions == ("the tip, of the nose", "")
    assert plain.title == "plain (2)" and plain.picture is None
    assert api.landmark_set(str(tmp_path / "headed.csv")).descriptions == ("first", "second")
    mine = api.landmark_set(tmp_path / "set.json")
    assert (mine.title, mine.names, mine.descriptions, mine.picture) == ("Mine", ("X", "Y"), ("", "why"), picture)


def test_a_set_from_a_models_an_adapters_or_a_cases_names(tmp_path, micro_file, ceph):
    """The names come from the file, the descriptions from the shipped set holding all of them."""
    isbi = api.landmark_set("isbi2015")
    model = api.landmark_set(micro_file)  # a model file made by medsapiens: its header names the landmarks
    assert model.names == isbi.names and model.descriptions == isbi.descriptions
    case = api.phantom_case(0)
    write_markups(tmp_path / "case.mrk.json", case.landmarks, case)
    annotated = api.landmark_set(tmp_path / "case.mrk.json")
    assert annotated.names == tuple(case.landmarks.names) and set(annotated.descriptions) == {""}
    assert api.landmark_set(ceph.path).names == isbi.names  # a data set's landmarks.csv
    subset = api.landmark_set(["N", "S"])  # names in memory (a markups node's)
    assert subset.names == ("N", "S") and subset.descriptions == (isbi.description("N"), isbi.description("S"))


@pytest.mark.parametrize("name, content, says", [
    ("empty.csv", "", "empty.csv: no landmarks (one line per landmark: name,description)"),
    ("wide.csv", "A,b,c\n", "wide.csv: 3 columns in the line of 'A'; a landmark set has two"),
    ("twice.csv", "A\nB\nA\n", "twice.csv: 'A' appears twice (points 1 and 3); each landmark once"),
    ("unnamed.csv", "A\n,nameless\n", "unnamed.csv: point 2 has no name"),
    ("latin1.csv", "Sell\xe9\n".encode("latin-1"), "latin1.csv: not UTF-8 text"),
    ("broken.json", "{", "broken.json: not valid JSON"),
    ("nolist.json", "{\"names\": []}", "nolist.json: a JSON landmark set needs \"landmarks\""),
    ("badpoint.json", "{\"landmarks\": [{\"description\": \"x\"}]}", "badpoint.json: every landmark needs a name"),
    ("nopicture.json", "{\"landmarks\": [\"A\"], \"picture\": \"gone.png\"}", "nopicture.json: its picture"),
    ("notes.txt", "A\n", "notes.txt: not a landmark set (CSV name,description or JSON), a .mrk.json"),
    ("plain.safetensors", "not weights", "plain.safetensors: not a model or adapter file made by medsapiens"),
    ("bad.mrk.json", "{}", "bad.mrk.json: not a Slicer markups file"),
])
def test_a_bad_set_file_is_one_line_naming_it(tmp_path, name, content, says):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError) as e:
        api.landmark_set(path)
    assert str(e.value).startswith(f"{tmp_path}/{says}") and "\n" not in str(e.value)


def test_a_name_that_is_no_set_model_or_file_is_one_line():
    with pytest.raises(InputError, match=r"^isbi: not a landmark set \(isbi2015, hand37\), a catalogue model or a "
                                         r"file$"):
        api.landmark_set("isbi")


def test_names_checked_against_a_set_in_one_line():
    isbi = api.landmark_set("isbi2015")
    api.check_landmark_names(reversed(isbi.names), "points 1", isbi)  # any order
    api.check_landmark_names(["F-1", "F-2"], "points 1")  # no set: only repeats are refused
    cases = [(["S", "N", "S"], "points 1: 'S' appears twice (points 1 and 3); each landmark once"),
             ([*isbi.names, "F-1"], "points 1: 'F-1' is not a landmark of ISBI 2015 cephalometric (19) (S, N, Or, Po, "
                                    "A, ...)"),
             (isbi.names[:-1], "points 1: 18 points for the 19 landmarks of ISBI 2015 cephalometric (19); Ar is not "
                               "there (keep a landmark you cannot place as an unplaced or missing point instead of "
                               "deleting it)")]
    for names, says in cases:
        with pytest.raises(InputError) as e:
            api.check_landmark_names(names, "points 1", isbi)
        assert str(e.value) == says


def test_reading_sets_loads_no_torch(tmp_path):
    """The Slicer module's own process reads sets before any engine install."""
    (tmp_path / "s.csv").write_text("A,a\n")
    code = ("import sys; from medsapiens import api; api.landmark_set('hand37'); api.landmark_set('medsapiens-head');"
            f"api.landmark_set({str(tmp_path / 's.csv')!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

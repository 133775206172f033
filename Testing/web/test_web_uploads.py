"""Uploads are checked before anything reads them: size, type from the content (not the name), no NRRD that
points at another file; a landmark set file is text or a markups file, and never a JSON set naming a picture
(a path on the server); they are stored under names the server makes, and the client's name is only a label.
And `medsapiens web` says in one line when it listens beyond this machine."""
import gzip
import struct

import pytest
from medsapiens import InputError
from medsapiens.web.server import exposure_warning
from medsapiens.web.uploads import (
    IMAGE,
    LANDMARK_SET,
    MARKUPS,
    UploadFolder,
    content_type,
    display_name,
    landmark_set_type,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
NIFTI = struct.pack("<i", 348) + b"\0" * 340 + b"n+1\0" + b"\0" * 200
MARKUPS_JSON = b'{"@schema": "x", "markups": [{"type": "Fiducial", "controlPoints": []}]}'


@pytest.mark.parametrize("content, suffix", [
    (PNG, ".png"), (b"\xff\xd8\xff\xe0" + b"\0" * 16, ".jpg"), (b"NRRD0004\ntype: uchar\n\n\0\0", ".nrrd"),
    (b"\0" * 128 + b"DICM" + b"\0" * 16, ".dcm"), (NIFTI, ".nii"), (gzip.compress(NIFTI, mtime=0), ".nii.gz"),
    (MARKUPS_JSON, ".mrk.json"),
    (b"NRRD0004\ntype: uchar\ndata file: /etc/passwd\n\n", None),  # a header naming another file
    (b"NRRD0004\ndatafile: LIST\n\n", None), (gzip.compress(b"not nifti" * 100, mtime=0), None),
    (b'{"markups": "no"}', None), (b"<html></html>", None), (b"%PDF-1.4", None),
], ids=["png", "jpeg", "nrrd", "dicom", "nifti", "nifti-gz", "markups", "nrrd-data-file", "nrrd-list",
        "gzip-not-nifti", "json-not-markups", "html", "pdf"])
def test_the_type_comes_from_the_content(content, suffix):
    assert content_type(content) == suffix


@pytest.mark.parametrize("content, suffix", [
    (b"name,description\nS,Sella\n", ".csv"), ("\ufeffS,\u00e9\n".encode("utf-8"), ".csv"),
    (b'{"landmarks": ["S", "N"]}', ".json"), (b"{not json", ".json"), (MARKUPS_JSON, ".mrk.json"),
    (b'{"landmarks": ["S"], "picture": "/etc/hostname"}', None), (PNG, None), (b"NRRD0004\ntype: uchar\n\n", None),
    (b"S,\xff\xfe\n", None), (b"S\0N", None),
], ids=["csv", "csv-bom", "json", "bad-json", "markups", "json-picture", "png", "nrrd-header", "not-utf8", "nul"])
def test_a_landmark_set_file_is_text_or_markups(content, suffix):
    assert landmark_set_type(content) == suffix  # a bad JSON is stored: the set's reader says what is wrong


def test_uploads_are_stored_under_server_names_and_refused_in_one_line(tmp_path):
    folder = UploadFolder(tmp_path / "uploads", limit_mb=0.001)
    image = folder.store("../../etc/phantom0.png", PNG)
    assert (image.kind, image.name) == (IMAGE, "phantom0.png")
    assert image.path == tmp_path / "uploads" / "1" / "upload.png" and image.path.read_bytes() == PNG
    points = folder.store("C:\\cases\\p0.mrk.json", MARKUPS_JSON)
    assert (points.kind, points.name, points.path.name) == (MARKUPS, "p0.mrk.json", "upload.mrk.json")
    assert points.path.parent.name == "2"  # a folder each: never read with a neighbour as one series
    for name, content, line in [
        ("notes.txt", b"hello", "notes.txt: not an image (PNG, JPEG, NRRD, NIfTI, DICOM) or a Slicer markups file "
                                "(.mrk.json)"),
        ("big.png", PNG + b"\0" * 2000, "big.png: 0.0 MB, more than the upload limit of 0.001 MB"),
        ("empty.nrrd", b"", "empty.nrrd: the file is empty"),
        ("<script>x.png", b"NRRD0004\ndata file: ../x.raw\n\n", "_script_x.png: not an image (PNG, JPEG, NRRD, "
                                                                "NIfTI, DICOM) or a Slicer markups file (.mrk.json)"),
    ]:
        with pytest.raises(InputError) as refused:
            folder.store(name, content)
        assert str(refused.value) == line
    assert sorted(p.name for p in (tmp_path / "uploads").iterdir()) == ["1", "2"]  # nothing of the refused
    landmarks = folder.store("../my set.csv", b"S,Sella\n", landmark_set=True)
    assert (landmarks.kind, landmarks.name, landmarks.path.name) == (LANDMARK_SET, "my set.csv", "landmark set.csv")
    with pytest.raises(InputError) as refused:
        folder.store("set.csv", PNG, landmark_set=True)
    assert str(refused.value) == ('set.csv: not a landmark set file (UTF-8 text: CSV name,description, or JSON '
                                  'without a "picture"; or a Slicer markups file)')
    folder.remove(landmarks)
    assert sorted(p.name for p in (tmp_path / "uploads").iterdir()) == ["1", "2"]


def test_a_client_name_is_only_a_label():
    assert display_name("/home/u/../../etc/passwd") == "passwd"
    assert display_name(None) == "upload" and len(display_name("a" * 300)) == 80


def test_listening_beyond_this_machine_is_said_in_one_line():
    assert exposure_warning("127.0.0.1", 8080) is None
    line = exposure_warning("0.0.0.0", 8080)
    assert line.startswith("medsapiens web: listening on 0.0.0.0:8080: anyone who can reach this port") and \
        "\n" not in line


def test_a_bad_server_folder_is_one_line(tmp_path, capsys):
    pytest.importorskip("trame_slicer", reason="the web extra (pip install 'medsapiens[web]') is not installed")
    from medsapiens import cli

    assert cli.main(["web", "--data", str(tmp_path / "none"), "--port", "1"]) == 2
    assert capsys.readouterr().err == f"medsapiens: error: --data {tmp_path / 'none'}: not a folder\n"

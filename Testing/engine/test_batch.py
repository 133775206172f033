"""`detect` on a batch: a folder stands for its images and every DICOM series below it (a PACS export of several
studies), one bad image is named in one line while the others are written (exit 1), Cancel stops between
images, an image's own points are never overwritten, and under torchrun two processes write the very
landmarks.csv one process writes."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from medsapiens import Cancelled, InputError, api
from medsapiens.cli import main
from medsapiens.io.datasets import Dataset
from medsapiens.io.markups import read_markups

SERIES = "1.2.826.0.1.3680043.2.1125.9"  # UIDs of the DICOM files written here


def write_dicom(path: Path, pixels: np.ndarray, series: str, spacing=0.5, z=0.0, number=1) -> Path:
    """One DICOM image file of a series (a radiograph, or a slice at height z), named as PACS exports do."""
    image = sitk.GetImageFromArray(np.asarray(pixels, np.uint16))
    image.SetSpacing((spacing, spacing))
    for tag, value in [("0008|0060", "DX"), ("0020|000d", series + ".0"), ("0020|000e", series),
                       ("0020|0013", str(number)), ("0020|0032", f"0\\0\\{z:g}"), ("0020|0037", "1\\0\\0\\0\\1\\0")]:
        image.SetMetaData(tag, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # whatever the name says
    writer.SetFileName(str(path))
    writer.Execute(image)
    return path


@pytest.fixture(scope="module")
def atlas(phantom_files, tmp_path_factory) -> Path:
    """The atlas: two annotated phantom radiographs, a folder of .nrrd + .mrk.json pairs."""
    folder = tmp_path_factory.mktemp("atlas")
    for seed in (0, 1):
        for path in phantom_files(seed):
            shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def folder(phantom_files, tmp_path_factory) -> Path:
    """A morning's images: 3 phantom NRRDs, one damaged file (second by name), a DICOM export of two studies
    (a radiograph each, files without a suffix), and files that are no images."""
    folder = tmp_path_factory.mktemp("batch")
    for seed in (10, 12, 13):
        shutil.copy(phantom_files(seed)[0], folder / f"p{seed}.nrrd")
    (folder / "p11.nrrd").write_bytes(b"NRRD0004\ntype: nonsense\n\n")
    (folder / "notes.txt").write_text("not an image")
    for study, seed in (("studyA", 14), ("studyB", 15)):
        write_dicom(folder / "dicom" / study / "IM0001", api.phantom_case(seed).image, f"{SERIES}.{seed}")
    return folder


def test_a_folder_is_its_images_and_every_dicom_series_below_it(tmp_path):
    pixels = np.arange(40 * 50).reshape(40, 50) % 97
    (tmp_path / "001.png").write_bytes(b"")  # a file is itself, whatever it holds: its line comes on reading
    (tmp_path / "001.mrk.json").write_text("{}")
    (tmp_path / "DICOMDIR").write_bytes(bytes(128) + b"DICM" + bytes(20))  # DICOM, but no image
    for study in ("a", "b"):
        write_dicom(tmp_path / "export" / study / "IM0001", pixels, f"{SERIES}.{ord(study)}")
    for k in range(3):  # two series of slices in one folder
        for n, uid in enumerate((f"{SERIES}.1", f"{SERIES}.2")):
            write_dicom(tmp_path / "export" / "ct" / f"{n}-{k}.dcm", pixels + k, uid, z=2.0 * k, number=k + 1)
    inputs = api.check_images([tmp_path])
    ids = ["001", "export_a_IM0001", "export_b_IM0001", f"export_ct_{SERIES}.1", f"export_ct_{SERIES}.2"]
    assert [i.id for i in inputs] == ids, "files, then the series folder by folder, named by their path below"
    by_id = {i.id: i for i in inputs}
    ct = by_id[ids[3]]
    assert [f.name for f in ct.files] == ["0-0.dcm", "0-1.dcm", "0-2.dcm"], "slices in order, one series each"
    from medsapiens.batch import read_input

    volume = read_input(ct, volumes=True)
    assert volume.name == ids[3] and volume.voxels.shape == (3, 40, 50)
    assert np.allclose(volume.index_to_lps[:3, 2], [0, 0, 2.0])
    with pytest.raises(InputError, match=rf"export/ct \(series {SERIES}.2\): a DICOM series of 3 slices \(a "
                                         r"volume\); this detector works on 2D images"):
        read_input(by_id[ids[4]], volumes=False)
    radiograph = read_input(by_id[ids[1]], volumes=False)
    assert radiograph.name == ids[1] and radiograph.spacing == (0.5, 0.5)
    assert np.array_equal(radiograph.image, pixels)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=f"^{empty}: no image files there$"):
        api.check_images([empty])


@pytest.mark.slow
def test_one_bad_image_of_a_folder_is_named_and_the_others_are_written(atlas, folder, tmp_path, capsys):
    out = tmp_path / "found"
    assert main(["detect", "--atlas", str(atlas), str(folder), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("medsapiens: error:")]
    assert errors == [f"medsapiens: error: {folder / 'p11.nrrd'}: not a readable NRRD file "
                      f"({errors[0].split('(', 1)[1]}"] and "Traceback" not in captured.err
    assert "medsapiens: 1 of 6 images failed (each named above); the others were written" in captured.err
    names = ["p10", "p12", "p13", "dicom_studyA_IM0001", "dicom_studyB_IM0001"]
    assert [Path(p).name for p in captured.out.split()] == [f"{n}.mrk.json" for n in names] + ["landmarks.csv"]
    table = Dataset(out / "landmarks.csv")
    assert [row.image for row in table.rows] == [os.path.relpath(folder / f, out) for f in (
        "p10.nrrd", "p12.nrrd", "p13.nrrd", "dicom/studyA/IM0001", "dicom/studyB/IM0001")]
    truth = api.phantom_case(14).landmarks
    found = table.rows[3].landmarks  # the DICOM radiograph, read back through the CSV's relative path
    assert table.case(3).image.shape == (400, 320) and found.names == truth.names
    assert np.median(np.linalg.norm(found.points - truth.points, axis=1)) < 6.0  # pixels of 0.5 mm
    assert read_markups(out / "dicom_studyB_IM0001.mrk.json")[0] == truth.names


def test_cancel_stops_between_images_and_keeps_what_was_written(atlas, folder, tmp_path):
    detector = api.load_detector(atlas=str(atlas))
    seen = []
    with pytest.raises(Cancelled):
        api.detect_files(detector, [folder / "p10.nrrd", folder / "p12.nrrd", folder / "p13.nrrd"], tmp_path,
                         progress=lambda p: seen.append(p.message), cancel=lambda: len(seen) > 1,
                         on_image=lambda item, path: seen.append(path))
    assert seen == ["detecting on p10: 1 of 3", tmp_path / "p10.mrk.json"], "stopped before the second image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p10.mrk.json"], "no landmarks.csv for half a batch"


def test_detecting_into_the_folder_of_annotated_images_is_refused(phantom_files, tmp_path, capsys):
    image, points = phantom_files(2)
    shutil.copy(image, tmp_path / image.name)
    shutil.copy(points, tmp_path / points.name)
    before = (tmp_path / points.name).read_bytes()
    assert main(["detect", "--atlas", str(tmp_path), str(tmp_path), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"medsapiens: error: {tmp_path / points.name}: the points beside the image {image.name}; detecting into "
        "this folder would overwrite them: choose another output folder")
    assert (tmp_path / points.name).read_bytes() == before


@pytest.mark.slow
def test_torchrun_two_processes_write_the_landmarks_csv_of_one(atlas, folder, tmp_path):
    """Each process takes every second image (the damaged one falls to rank 1), rank 0 writes the one table:
    byte for byte the table of a single process; the failure counts in torchrun's exit status."""
    medsapiens = Path(sys.executable).with_name("medsapiens")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
    args = ["detect", "--atlas", str(atlas), str(folder)]
    one = subprocess.run([str(medsapiens), *args, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         encoding="utf-8", timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "--no-python", str(medsapiens), *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, encoding="utf-8", timeout=300)
    assert one.returncode == 1 and two.returncode == 1, (one.stderr[-2000:], two.stderr[-2000:])
    # rank 0 says the batch had a failure (torchrun's summary; it may also list rank 1, stopped as it ended)
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s+exitcode\s*: 1 ", two.stderr), two.stderr[-2000:]
    assert "terminate called" not in two.stderr and "SIGABRT" not in two.stderr, "the processes left cleanly"
    assert (tmp_path / "two" / "landmarks.csv").read_bytes() == (tmp_path / "one" / "landmarks.csv").read_bytes()
    assert two.stdout.split() == [str(p).replace(str(tmp_path / "one"), str(tmp_path / "two"))
                                  for p in one.stdout.split()], "rank 0 lists every process's files, once"
    assert two.stderr.count(f"medsapiens: error: {folder / 'p11.nrrd'}: not a readable NRRD file") == 1
    assert "medsapiens: 1 of 6 images failed" in two.stderr
    for name in ("p10", "p12", "p13", "dicom_studyA_IM0001", "dicom_studyB_IM0001"):
        assert (tmp_path / "two" / f"{name}.mrk.json").read_bytes() == \
            (tmp_path / "one" / f"{name}.mrk.json").read_bytes()

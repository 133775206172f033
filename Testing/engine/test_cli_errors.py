"""The command line on bad input: one line on stderr naming the problem, exit status 2 (1 when only some images
of a batch fail, the others being written), never a traceback; and landmarks.csv's one spacing per row."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from medsapiens import InputError
from medsapiens.cli import main
from medsapiens.io.datasets import Dataset, landmarks_csv, load_cases
from medsapiens.io.markups import read_markups, write_markups


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.slow
def test_one_unreadable_image_in_a_batch_is_reported_and_the_others_are_detected(tmp_path, ceph, capsys):
    folder = tmp_path / "batch"
    folder.mkdir()
    images = []
    for i in range(5):
        image = folder / f"{i:03d}.png"
        image.write_bytes((ceph.root / ceph.rows[i % 3].image).read_bytes())
        images.append(image)
    images[2].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))  # corrupt
    images.insert(4, folder / "gone.png")  # named, but not there
    out = tmp_path / "out"
    assert main(["detect", "--atlas", str(ceph.path), "--atlas-cases", "001", *map(str, images),
                 "--out", str(out), "--spacing", "0.1"]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("medsapiens: error:")]
    assert len(errors) == 2 and "Traceback" not in captured.err
    assert "002.png: not a readable image" in errors[0] and "gone.png: no such image file" in errors[1]
    assert sorted(p.name for p in out.glob("*.mrk.json")) == ["000.mrk.json", "001.mrk.json", "003.mrk.json",
                                                                "004.mrk.json"]
    assert Dataset(out / "landmarks.csv").ids() == ["000", "001", "003", "004"]


@pytest.mark.slow
def test_nothing_to_read_at_all_is_bad_input(tmp_path, ceph, capsys):
    assert main(["detect", "--atlas", str(ceph.path), str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                 "--out", str(tmp_path / "o")]) == 2
    assert one_line(capsys) == f"medsapiens: error: {tmp_path / 'a.png'}: no such image file (nor the 1 others)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_finetune_on_cuda_without_cuda(tmp_path, ceph, capsys):
    assert main(["finetune", "--base", str(tmp_path / "base.safetensors"), "--data", str(ceph.path), "--cases", "001",
                 "--out", str(tmp_path / "a.safetensors"), "--device", "cuda"]) == 2
    assert one_line(capsys) == ("medsapiens: error: device 'cuda': this PyTorch sees no CUDA GPU (a CPU build, or no "
                                "NVIDIA driver); use cpu or auto")
    assert not (tmp_path / "a.safetensors").exists()


def test_no_training_time_is_refused(tmp_path, ceph, capsys):
    base = ["--base", str(tmp_path / "base.safetensors"), "--data", str(ceph.path), "--cases", "001",
            "--out", str(tmp_path / "a")]
    assert main(["finetune", *base, "--time-budget", "0"]) == 2
    assert one_line(capsys) == "medsapiens: error: --time-budget 0: must be more than 0"
    assert main(["finetune", *base, "--steps", "0"]) == 2
    assert one_line(capsys) == "medsapiens: error: --steps 0: must be more than 0"
    assert main(["train", "--data", str(ceph.path), "--time-budget", "-5", "--out", str(tmp_path / "m")]) == 2
    assert one_line(capsys) == "medsapiens: error: --time-budget -5: must be more than 0"


def test_unannotated_images_with_a_base_missing_or_none_are_refused(tmp_path, ceph, capsys):
    args = ["finetune", "--data", str(ceph.path), "--cases", "001,002", "--out", str(tmp_path / "a.safetensors")]
    assert main([*args, "--base", "tiny", "--unannotated", str(ceph.root / ceph.rows[3].image)]) == 2
    assert one_line(capsys) == "medsapiens: error: --unannotated is for fine-tuning on the atlas (without --base)"
    assert main([*args, "--unannotated", str(tmp_path / "gone")]) == 2
    assert one_line(capsys) == f"medsapiens: error: {tmp_path / 'gone'}: no such image file or folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert main([*args, "--unannotated", str(empty)]) == 2
    assert one_line(capsys) == f"medsapiens: error: --unannotated {empty}: no image files there"
    assert not (tmp_path / "a.safetensors").exists()


def test_training_loop_refuses_a_zero_budget(ceph):
    from medsapiens.settings import TrainSettings
    from medsapiens.training.loops import train

    with pytest.raises(InputError, match="time budget above 0"):
        train([ceph.case(0)], ceph.names, "unused.safetensors", arch="micro",
              settings=TrainSettings(input_hw=(64, 48), time_budget=0.0), device="cpu")


def anisotropic_nrrd(ceph, path):
    """Case 001 of the ceph set as an NRRD with 0.1 x 0.12 mm pixels (rows stretched by the file's geometry)."""
    case = ceph.case(0)
    image = sitk.GetImageFromArray(np.asarray(case.image if case.image.ndim == 2 else case.image[..., 0]))
    image.SetSpacing((0.1, 0.12))
    sitk.WriteImage(image, str(path))
    return case


@pytest.mark.slow
def test_landmarks_csv_spacing_is_per_row_and_square(tmp_path, ceph, capsys):
    case = ceph.case(0)
    text = landmarks_csv([("a.png", *case.size, (0.1, 0.1), case.landmarks)])
    assert text.splitlines()[1].split(",")[3] == "0.1"
    with pytest.raises(InputError, match=r"a.png: its pixels are 0.1 x 0.12 mm"):
        landmarks_csv([("a.png", *case.size, (0.1, 0.12), case.landmarks)])

    folder = tmp_path / "set"
    folder.mkdir()
    anisotropic_nrrd(ceph, folder / "001.nrrd")
    header, first = ceph.path.read_text().splitlines()[:2]
    (folder / "landmarks.csv").write_text(f"{header}\n{first.replace(ceph.rows[0].image, '001.nrrd')}\n")
    with pytest.raises(InputError, match=r"001.nrrd: its pixels are 0.1 x 0.12 mm, which the one spacing_mm of "):
        Dataset(folder).case(0)

    # detect writes the case's markups (exact, through the file's geometry) but cannot put it in landmarks.csv
    out = tmp_path / "out"
    png = folder / "002.png"
    png.write_bytes((ceph.root / ceph.rows[1].image).read_bytes())
    assert main(["detect", "--atlas", str(ceph.path), "--atlas-cases", "003", str(folder / "001.nrrd"), str(png),
                 "--out", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "001.nrrd: its pixels are 0.1 x 0.12 mm" in err[0] and "left out" in err[0]
    names, lps, _, present, _ = read_markups(out / "001.mrk.json")
    assert present.any() and Dataset(out / "landmarks.csv").ids() == ["002"]


def test_markups_folder_pairs_by_case_id(tmp_path, ceph):
    from medsapiens.io.images import read_image

    truth = ceph.rows[0].landmarks
    for name in ("ceph.1", "ceph.10"):  # "ceph" would have paired both images with both files
        (tmp_path / f"{name}.png").write_bytes((ceph.root / ceph.rows[0].image).read_bytes())
        write_markups(tmp_path / f"{name}.mrk.json", truth, read_image(tmp_path / f"{name}.png"))
    cases = load_cases(tmp_path)
    assert [c.name for c in cases] == ["ceph.1", "ceph.10"]
    assert all(np.allclose(c.landmarks.points, truth.points, atol=1e-3) for c in cases)


def test_markups_files_keep_the_review_flag(tmp_path):
    from medsapiens import Case, Landmarks

    case = Case(np.zeros((50, 60), np.uint8), 0.5)
    marks = Landmarks(["a", "b", "c"], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [0.3, 0.95, 0.8], check=[True, False, True])
    write_markups(tmp_path / "x.mrk.json", marks, case)
    names, lps, confidence, present, check = read_markups(tmp_path / "x.mrk.json")
    assert check.tolist() == [True, False, True] and np.allclose(confidence, [0.3, 0.95, 0.8])
    assert Landmarks(["a"], [[1.0, 1.0]], [0.3]).check.tolist() == [True], "by default: below REVIEW_BELOW"

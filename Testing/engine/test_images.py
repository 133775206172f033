"""Every supported image format reads into a Case with the file's spacing and pixel -> LPS geometry."""
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from medsapiens import InputError
from medsapiens.io.images import read_image
from medsapiens.io.intensity import to_rgb255


def ramp(dtype, h=40, w=30):
    return (np.arange(h * w).reshape(h, w) % 250).astype(dtype)


@pytest.mark.parametrize("suffix,dtype", [(".png", np.uint8), (".png", np.uint16), (".tif", np.float32),
                                          (".bmp", np.uint8), (".jpg", np.uint8), (".nii.gz", np.int16),
                                          (".mha", np.float32), (".dcm", np.uint16)])
def test_formats(tmp_path, suffix, dtype):
    image = sitk.GetImageFromArray(ramp(dtype))
    if suffix not in (".png", ".bmp", ".jpg", ".tif"):
        image.SetSpacing((0.2, 0.3))
        image.SetOrigin((5.0, -7.0))
    path = tmp_path / f"img{suffix}"
    sitk.WriteImage(image, str(path))
    case = read_image(path)
    assert case.size == (30, 40) and case.name == "img"
    if suffix in (".png", ".bmp", ".jpg", ".tif"):
        assert np.allclose(case.spacing, (1.0, 1.0))
        assert np.allclose(case.to_lps([[10, 20]]), [[10, 20, 0]], atol=1e-6)
    else:
        assert np.allclose(case.spacing, (0.2, 0.3))
    if suffix in (".nii.gz", ".mha"):  # 2D DICOM stores no origin
        assert np.allclose(case.to_lps([[10, 20]]), [[5 + 2.0, -7 + 6.0, 0]])
    if suffix != ".jpg":  # lossy
        assert np.array_equal(case.image.astype(np.float64), ramp(dtype).astype(np.float64))


def test_spacing_option_overrides_and_rgb(tmp_path):
    rgb = np.stack([ramp(np.uint8), ramp(np.uint8)[::-1], ramp(np.uint8)], axis=-1)
    path = tmp_path / "photo.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    case = read_image(path, spacing=0.1)
    assert case.image.shape == (40, 30, 3) and case.spacing == (0.1, 0.1)
    assert np.allclose(case.to_lps([[10, 20]]), [[1.0, 2.0, 0]])


def test_nrrd_with_flipped_direction(tmp_path):
    data = ramp(np.int16)
    path = tmp_path / "flip.nrrd"
    header = {"space": "right-anterior-superior", "space directions": [[-0.5, 0, 0], [0, 0.25, 0]],
              "space origin": [1.0, 2.0, 3.0], "kinds": ["domain", "domain"]}
    nrrd.write(str(path), data, header, index_order="C")
    case = read_image(path)
    assert case.size == (30, 40) and np.allclose(case.spacing, (0.5, 0.25))
    # RAS (1 - 0.5 x, 2 + 0.25 y, 3) -> LPS
    assert np.allclose(case.to_lps([[4, 8]]), [[-(1 - 2.0), -(2 + 2.0), 3.0]])
    assert np.array_equal(case.image, data)


def test_bad_images_give_one_clear_error(tmp_path):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(InputError, match="broken.png: not a readable image"):
        read_image(corrupt)
    nan_spacing = tmp_path / "nan.nrrd"
    nrrd.write(str(nan_spacing), ramp(np.int16), {"spacings": [float("nan"), float("nan")]}, index_order="C")
    with pytest.raises(InputError, match="nan.nrrd"):
        read_image(nan_spacing)
    with pytest.raises(InputError, match="spacing must be a positive"):
        read_image(corrupt, spacing=float("nan"))
    volume = tmp_path / "ct.nrrd"
    nrrd.write(str(volume), np.zeros((5, 40, 30), np.int16), index_order="C")
    with pytest.raises(InputError, match="3D volume"):
        read_image(volume)


def test_intensity_rules():
    u8 = ramp(np.uint8)
    assert np.array_equal(to_rgb255(u8)[..., 1], u8.astype(np.float32))  # 8-bit as it is
    wide = ramp(np.uint16) * 200 + 1000
    wide[0, 0] = 65535  # one hot pixel does not squash the window
    out = to_rgb255(wide)
    assert out.shape == (40, 30, 3) and out.min() == 0 and out.max() == 255
    assert np.percentile(out, 50) > 100


def test_case_ids_from_file_names_and_folders(tmp_path):
    from medsapiens.io.images import case_id

    for name in ("001.png", "001.nii.gz", "001.NII.GZ", "001.nrrd", "001.mha", "001.mrk.json", "001.dcm", "001"):
        assert case_id(tmp_path / name) == "001", name
    series = tmp_path / "patient 7"
    series.mkdir()
    assert case_id(series) == "patient 7"  # a DICOM series folder is its name
    assert case_id("ceph.001.png") == "ceph.001"  # only the format's suffix goes
    assert case_id("1.2.840.113619.2.55") == "1.2.840.113619.2.55"  # a DICOM file named by its UID keeps it
    sitk.WriteImage(sitk.GetImageFromArray(ramp(np.int16)), str(tmp_path / "scan.2.nii.gz"))
    assert read_image(tmp_path / "scan.2.nii.gz").name == "scan.2"

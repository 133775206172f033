"""Every supported checkpoint layout, written in its official form from a small model, loads back and gives
the same heatmaps as the in-memory model; malformed files give one clear error naming the file."""
import argparse

import numpy as np
import pytest
import torch
from medsapiens import InputError, load_detector
from medsapiens.models.weight_files import save_trained
from medsapiens.models.build import build_model
from medsapiens.models.checkpoints import read_checkpoint
from medsapiens.models.lora import add_lora, lora_state_dict, to_medsapiens
from medsapiens.models.sapiens import SapiensPose

X = torch.randn(2, 3, 256, 192, generator=torch.Generator().manual_seed(0))


def heatmaps(model):
    with torch.no_grad():
        return model.eval()(X)


@pytest.fixture
def pose_model():
    torch.manual_seed(1)
    return SapiensPose("micro", 7, (16, 12)).eval()


@pytest.fixture
def pretrain_file(tmp_path):
    """A flat pretrain state dict with cls token and a (1, 1 + 16*16, C) position embedding."""
    torch.manual_seed(2)
    backbone = SapiensPose("micro", 1, (16, 16)).backbone
    state = {k: v for k, v in backbone.state_dict().items()}
    state["pos_embed"] = torch.cat([torch.randn(1, 1, 64), state["pos_embed"]], dim=1)
    state["cls_token"] = torch.randn(1, 1, 64)
    path = tmp_path / "sapiens_micro_epoch_1600_clean.pth"
    torch.save(state, path)
    return path, backbone


def test_pose_pth(tmp_path, pose_model):
    path = tmp_path / "pose.pth"
    torch.save({"state_dict": pose_model.state_dict(), "meta": {"epoch": 210, "scale": np.array([1.0, 2.0]),
                "dataset_meta": {"keypoint_id2name": {i: f"P{i}" for i in range(7)}}}}, path)
    ckpt = read_checkpoint(path)
    assert ckpt.layout == "pose" and ckpt.landmark_names == [f"P{i}" for i in range(7)]
    assert torch.allclose(heatmaps(build_model(ckpt)), heatmaps(pose_model), atol=1e-5)


def test_torchscript_pt2(tmp_path, pose_model):
    path = tmp_path / "sapiens_micro_torchscript.pt2"
    torch.jit.save(torch.jit.trace(pose_model, X[:1]), str(path))
    ckpt = read_checkpoint(path)
    assert ckpt.layout == "torchscript"
    assert torch.allclose(heatmaps(build_model(ckpt)), heatmaps(pose_model), atol=1e-5)


def test_pretrain_alone_cannot_detect_but_serves_as_base(pretrain_file):
    path, _ = pretrain_file
    ckpt = read_checkpoint(path)
    assert ckpt.layout == "pretrain"
    with pytest.raises(InputError, match="no heatmap head"):
        build_model(ckpt)


@pytest.mark.slow
def test_medsapiens_lora_on_pretrain_base(tmp_path, pretrain_file):
    base_path, backbone = pretrain_file
    torch.manual_seed(3)
    head = SapiensPose("micro", 5, (16, 16)).head
    # LoRA matrices as MedSapiens stores them (lora_down = A [r, C], lora_up = B [out, r])
    lora = {}
    for i in range(2):
        for name, out, r in (("qkv", 192, 4), ("proj", 64, 8)):
            lora[f"backbone.module.layers.{i}.attn.{name}.lora_down.weight"] = torch.randn(r, 64) * 0.1
            lora[f"backbone.module.layers.{i}.attn.{name}.lora_up.weight"] = torch.randn(out, r) * 0.1
    path = tmp_path / "best_EPE_epoch_210.pth"
    torch.save({"state_dict": {**lora, **{f"head.{k}": v for k, v in head.state_dict().items()}},
                "meta": {}}, path)
    ckpt = read_checkpoint(path)
    assert ckpt.layout == "medsapiens"
    with pytest.raises(InputError, match="--base"):
        build_model(ckpt)
    model = build_model(ckpt, read_checkpoint(base_path))
    # independent reference: fold W + up @ down (scaling alpha / r = 1) into a plain model
    ref = SapiensPose("micro", 5, (16, 16))
    ref.backbone.load_state_dict(backbone.state_dict())
    ref.head.load_state_dict(head.state_dict())
    with torch.no_grad():
        for i in range(2):
            for name in ("qkv", "proj"):
                lin = getattr(ref.backbone.layers[i].attn, name)
                p = f"backbone.module.layers.{i}.attn.{name}"
                lin.weight += lora[f"{p}.lora_up.weight"] @ lora[f"{p}.lora_down.weight"]
    assert torch.allclose(heatmaps(model), heatmaps(ref), atol=1e-5)
    # and the conversion back gives the original MedSapiens tensors
    back = to_medsapiens(lora_state_dict(model))
    assert set(back) == set(lora) and all(torch.equal(back[k], lora[k]) for k in lora)


@pytest.mark.slow
def test_project_adapter_and_model_files(tmp_path, pretrain_file):
    base_path, backbone = pretrain_file
    torch.manual_seed(4)
    model = SapiensPose("micro", 3, (16, 16))
    model.backbone.load_state_dict(backbone.state_dict())
    add_lora(model)
    with torch.no_grad():
        for k, v in model.named_parameters():
            if "lora_B" in k:
                v.normal_(0, 0.1)
    names = ["A", "B", "C"]
    adapter = save_trained(tmp_path / "task.safetensors", model, names, (256, 192), 3.0, base=base_path,
                           cases=["001", "002", "003"])
    ckpt = read_checkpoint(adapter)
    assert ckpt.layout == "adapter" and ckpt.meta["cases"] == ["001", "002", "003"]
    assert not any(k.startswith("backbone.patch_embed") for k in ckpt.tensors)  # LoRA + head only
    loaded = build_model(ckpt, read_checkpoint(base_path))
    assert torch.allclose(heatmaps(loaded), heatmaps(model), atol=1e-5)
    detector = load_detector(base_path, adapter=adapter, device="cpu", precision="fp32")
    assert detector.names == names and detector.input_hw == (256, 192)
    # merged for inference: same heatmaps without the LoRA wrappers (in fp32, as the model they are compared with)
    assert torch.allclose(heatmaps(detector.model), heatmaps(model), atol=1e-4)

    plain = SapiensPose("micro", 3, (16, 12))
    whole = read_checkpoint(save_trained(tmp_path / "whole.safetensors", plain, names, (256, 192), 2.0))
    assert whole.layout == "model"
    assert torch.allclose(heatmaps(build_model(whole)), heatmaps(plain), atol=1e-6)


def test_adapter_refuses_another_base(tmp_path, pretrain_file):
    base_path, backbone = pretrain_file
    model = SapiensPose("micro", 2, (16, 16))
    add_lora(model)
    adapter = save_trained(tmp_path / "a.safetensors", model, ["x", "y"], (256, 192), 3.0, base=base_path)
    other = tmp_path / "other.pth"
    state = torch.load(base_path, weights_only=True)
    state["cls_token"] = state["cls_token"] + 1
    torch.save(state, other)
    with pytest.raises(InputError, match="trained on base"):
        load_detector(other, adapter=adapter)


def test_adapter_for_another_landmark_set_is_refused(tmp_path, pretrain_file):
    base_path, _ = pretrain_file
    model = SapiensPose("micro", 2, (16, 16))
    add_lora(model)
    adapter = save_trained(tmp_path / "a.safetensors", model, ["x", "y"], (256, 192), 3.0, base=base_path)
    with pytest.raises(InputError, match="not the expected set"):
        load_detector(base_path, adapter=adapter, landmarks=["S", "N"])


def test_malformed_files_name_the_file_and_the_problem(tmp_path, pose_model):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(InputError, match="notes.pth: not a"):
        read_checkpoint(text)

    good = tmp_path / "good.pth"
    torch.save({"state_dict": pose_model.state_dict()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated.pth"):
        read_checkpoint(truncated)

    state = pose_model.state_dict()
    del state["backbone.layers.1.attn.qkv.weight"], state["head.conv_layers.3.bias"]
    holes = tmp_path / "holes.pth"
    torch.save({"state_dict": state}, holes)
    with pytest.raises(InputError) as e:
        build_model(read_checkpoint(holes))
    assert "holes.pth" in str(e.value) and "backbone.layers.1.attn.qkv.weight" in str(e.value)
    assert "head.conv_layers.3.bias" in str(e.value)

    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, other)
    with pytest.raises(InputError, match="resnet.pth: not a Sapiens"):
        read_checkpoint(other)

    unsafe = tmp_path / "unsafe.pth"  # pickled Python objects are refused by the weights-only load
    torch.save({"state_dict": state, "obj": argparse.Namespace(run="code")}, unsafe)
    with pytest.raises(InputError, match="weights-only"):
        read_checkpoint(unsafe)


@pytest.mark.slow
def test_torch_export_pt2(tmp_path, pose_model):
    path = tmp_path / "sapiens_micro_bfloat16.pt2"
    torch.export.save(torch.export.export(pose_model, (X[:1],)), str(path))
    ckpt = read_checkpoint(path)
    assert ckpt.layout == "export"
    assert torch.allclose(heatmaps(build_model(ckpt)), heatmaps(pose_model), atol=1e-5)

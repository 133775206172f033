"""Training: the recipe's optimiser rules, augmentation geometry, few-shot fine-tuning, cancel, train / resume,
DDP with two CPU processes, and `evaluate` reports; real radiographs and real training steps throughout."""
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from medsapiens.analysis.metrics import radial_errors
from medsapiens.cli import main
from medsapiens import load_detector
from medsapiens.models.weight_files import load_weights
from medsapiens.models.checkpoints import read_checkpoint
from medsapiens.models.sapiens import SapiensPose
from medsapiens import Cancelled
from medsapiens.settings import NO_AUGMENT, LoraSettings, TrainSettings
from medsapiens.training.augment import random_view
from medsapiens.training.loops import (
    Tail,
    finetune,
    lr_factor,
    param_groups,
    train,
)

HW = (256, 192)


def test_layer_decay_and_no_weight_decay_rules():
    model = SapiensPose("micro", 5, (16, 12))
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, layer_decay=0.85)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = model.arch.depth
    assert len(by_param) == len(named), "every trainable parameter in exactly one group"
    assert by_param[id(named["head.final_layer.weight"])]["lr"] == pytest.approx(1e-3)
    assert by_param[id(named["backbone.layers.0.attn.qkv.weight"])]["lr"] == pytest.approx(1e-3 * 0.85 ** depth)
    assert by_param[id(named["backbone.pos_embed"])]["lr"] == pytest.approx(1e-3 * 0.85 ** (depth + 1))
    for name in ("backbone.pos_embed", "backbone.layers.1.ln1.weight", "backbone.layers.1.attn.qkv.bias",
                 "head.final_layer.bias"):
        assert by_param[id(named[name])]["weight_decay"] == 0.0, name
    assert by_param[id(named["backbone.layers.1.ffn.layers.1.weight"])]["weight_decay"] == 0.1
    model.backbone.requires_grad_(False)
    assert all(not n.startswith("backbone.") for g in param_groups(model, 1e-3, 0.1, 0.85)
               for n, p in named.items() if any(p is q for q in g["params"]))


def test_lr_schedule_warms_up_then_steps_down():
    assert lr_factor(0.0, 0.05) == pytest.approx(0.001)
    assert lr_factor(0.025, 0.05) == pytest.approx(0.5005)
    assert [lr_factor(p, 0.05) for p in (0.5, 0.9, 0.97)] == [1.0, 0.1, 0.01]


def test_augmented_views_carry_their_landmarks():
    """Bright dots drawn at the landmarks land on the view's landmark coordinates after shift/scale/rotation/flip."""
    rng = np.random.default_rng(3)
    h, w = 300, 240
    points = np.array([[40.0, 50.0], [200.0, 60.0], [120.0, 250.0]])
    image = torch.zeros(1, 3, h, w)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    for x, y in points:
        image += 255 * torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0 ** 2))
    aug = replace(NO_AUGMENT, shift_p=1, scale=(0.7, 1.3), rotation_p=1, flip=1.0)
    for _ in range(5):
        view, pts, present = random_view(image, points, np.ones(3, bool), (96, 128), aug, rng, flip_pairs=[(0, 1)])
        grey = view[0]
        for k, (x, y) in enumerate(pts):
            if not (4 <= x < 92 and 4 <= y < 124):
                continue  # shifted out of the view
            xi, yi = int(round(x)), int(round(y))
            patch = grey[yi - 3:yi + 4, xi - 3:xi + 4]
            iy, ix = np.unravel_index(int(patch.argmax()), patch.shape)
            assert abs(iy - 3) <= 1 and abs(ix - 3) <= 1, f"landmark {k} is not on its dot"
    # a mirrored view swaps the declared pair: label 0 goes to the mirror image of landmark 1, as mmpose does
    _, plain, _ = random_view(image, points, np.ones(3, bool), (96, 128), NO_AUGMENT, rng)
    _, mirrored, _ = random_view(image, points, np.ones(3, bool), (96, 128), replace(NO_AUGMENT, flip=1.0), rng,
                                 flip_pairs=[(0, 1)])
    assert np.allclose(mirrored, [[95 - plain[1, 0], plain[1, 1]], [95 - plain[0, 0], plain[0, 1]], [95 - plain[2, 0],
                                                                                                    plain[2, 1]]])


def test_cached_tokens_give_the_same_heatmaps_as_the_whole_model():
    torch.manual_seed(0)
    model = SapiensPose("micro", 3, (16, 12)).eval()
    x = torch.randn(2, 3, *HW)
    with torch.no_grad():
        tokens = model.backbone.forward_tokens(x, 0, 1)
        assert torch.allclose(Tail(model, 1, (16, 12))(tokens), model(x), atol=1e-5)


@pytest.fixture(scope="module")
def first_case(ceph):
    case = ceph.case(0)
    case.landmarks = case.landmarks.subset(ceph.names[:6])  # a new landmark set: a fresh final layer
    return case


@pytest.mark.slow
def test_finetune_adapter_learns_a_new_landmark_set(tmp_path, fitted_file, first_case):
    out = tmp_path / "task.safetensors"
    seen = []
    finetune(fitted_file, [first_case], out, settings=LoraSettings(TrainSettings(steps=40, lr=3e-3), 8, 1),
             device="cpu", progress=seen.append)
    assert [p.phase for p in seen][:1] == ["views"] and seen[-1].phase == "train" and seen[-1].step == 40
    ckpt = read_checkpoint(out)
    assert ckpt.layout == "adapter" and ckpt.landmark_names == first_case.landmarks.names
    assert ckpt.meta["training_cases"] == ["001"] and ckpt.meta["base"]["name"] == fitted_file.name
    # LoRA only on the last block, as asked; the base's deconv/conv head layers were the starting point
    assert {k.split(".")[2] for k in ckpt.tensors if ".lora_" in k} == {"1"}
    detector = load_detector(fitted_file, adapter=out, device="cpu")
    errors = radial_errors(detector.detect(first_case), first_case.landmarks, first_case.spacing)
    # a fresh final layer gives points anywhere (~100 mm off); 40 steps place them near the truth
    assert np.median(errors) < 6.0, errors


@pytest.mark.slow
def test_finetune_cancel_leaves_the_previous_adapter(tmp_path, fitted_file, first_case):
    out = tmp_path / "task.safetensors"
    out.write_bytes(b"previous adapter")
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 12  # during the training steps

    with pytest.raises(Cancelled):
        finetune(fitted_file, [first_case], out, settings=LoraSettings(TrainSettings(steps=1000), 4, 1),
                 device="cpu", cancel=cancel)
    assert out.read_bytes() == b"previous adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.safetensors"]


@pytest.mark.slow
def test_finetune_cli_from_markups_folder_and_bad_inputs(tmp_path, fitted_file, ceph, capsys):
    from medsapiens.io.markups import write_markups

    folder = tmp_path / "cases"
    folder.mkdir()
    for i in (0, 1):
        case = ceph.case(i)
        (folder / f"{case.name}.png").write_bytes((ceph.root / ceph.rows[i].image).read_bytes())
        write_markups(folder / f"{case.name}.mrk.json", case.landmarks, case)
    out = tmp_path / "a.safetensors"
    assert main(["finetune", "--base", str(fitted_file), "--data", str(folder), "--out", str(out), "--steps", "3",
                 "--views", "2", "--lora-blocks", "1", "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()  # `<adapter path>  <steps> steps  <seconds> s  <phase times>`
    assert re.fullmatch(rf"{re.escape(str(out))}  3 steps  [0-9.]+ s  base [0-9.]+ s, views [0-9.]+ s, features [0-9.]+ s, "
                        r"train [0-9.]+ s", line), line
    # same landmark set as the base: its head is kept whole and only LoRA + head are stored
    ckpt = read_checkpoint(out)
    assert ckpt.meta["training_cases"] == ["001", "002"] and not any(k.startswith("backbone.") and ".lora_" not in k
                                                                     for k in ckpt.tensors)

    def fails(args, *words):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err

    csv = str(ceph.path)
    fails(["finetune", "--base", str(fitted_file), "--data", csv, "--cases", "001,999", "--out", str(out)], "999")
    fails(["finetune", "--base", str(out), "--data", csv, "--cases", "001", "--out", str(tmp_path / "b")],
          "cannot serve as a base")
    fails(["finetune", "--base", str(tmp_path / "none.pth"), "--data", csv, "--cases", "001", "--out", str(out)],
          "none.pth")
    fails(["finetune", "--base", str(fitted_file), "--data", csv, "--cases", "001", "--out", str(out),
           "--flip-pairs", "S:Q"], "S:Q")
    assert read_checkpoint(out).layout == "adapter", "the failed runs left the adapter alone"


def test_train_then_resume_continues_steps_and_optimizer(tmp_path, ceph, capsys):
    cases = [ceph.case(i) for i in range(2)]
    out = tmp_path / "m.safetensors"
    s = TrainSettings(input_hw=(128, 96), steps=3, batch=2)
    train(cases, ceph.names, out, arch="micro", settings=s, device="cpu")
    first, meta = load_weights(out)
    state, smeta = load_weights(str(out) + ".state")
    assert meta["kind"] == "model" and meta["steps"] == 3 and smeta["step"] == 3
    assert all(v.item() == 3 for k, v in state.items() if k.endswith(".step"))
    train(cases, ceph.names, out, arch="micro", settings=TrainSettings(input_hw=(128, 96), steps=5, batch=2),
          resume=out, device="cpu")
    second, meta = load_weights(out)
    state, _ = load_weights(str(out) + ".state")
    assert meta["steps"] == 5 and all(v.item() == 5 for k, v in state.items() if k.endswith(".step"))
    assert not torch.equal(first["head.final_layer.weight"], second["head.final_layer.weight"])
    capsys.readouterr()
    assert main(["train", "--data", str(ceph.path), "--rows", "0:2", "--epochs", "1", "--input-size", "64", "48",
                 "--resume", str(out), "--out", str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err.strip() == f"medsapiens: error: {out}: trained at input [128, 96], not [64, 48]"


@pytest.mark.slow
def test_torchrun_two_cpu_processes_end_with_the_same_weights(tmp_path, ceph):
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, torch\n"
        "from medsapiens.io.datasets import Dataset\n"
        "from medsapiens.settings import TrainSettings\n"
        "from medsapiens.training.loops import train\n"
        "import medsapiens.training.loops as training\n"
        "ds = Dataset(sys.argv[1])\n"
        "fit = training.fit\n"
        "def spy(net, *a, **k):\n"
        "    r = fit(net, *a, **k)\n"
        "    m = getattr(net, 'module', net)\n"
        "    torch.save({k: v.detach().clone() for k, v in m.state_dict().items()},\n"
        "               f'{sys.argv[2]}.rank{torch.distributed.get_rank()}')\n"
        "    return r\n"
        "training.fit = spy\n"
        "train([ds.case(i) for i in range(4)], ds.names, sys.argv[2], arch='micro', device='cpu',\n"
        "      settings=TrainSettings(input_hw=(128, 96), steps=4, batch=2))\n")
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(ceph.path), str(out)], check=True, env=env, timeout=300, capture_output=True)
    a = torch.load(f"{out}.rank0", weights_only=True)
    b = torch.load(f"{out}.rank1", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved, meta = load_weights(out)
    assert meta["steps"] == 4 and all(torch.equal(saved[k], a[k]) for k in saved)
    assert not torch.equal(a["head.final_layer.weight"], SapiensPose("micro", 19, (8, 6)).head.final_layer.weight)


@pytest.mark.slow
def test_evaluate_writes_report_and_plots(tmp_path, fitted_file, ceph, capsys):
    assert main(["evaluate", str(fitted_file), "--data", str(ceph.path), "--rows", "0:3", "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    written = sorted(Path(p).name for p in capsys.readouterr().out.split())
    assert written == ["per_landmark.png", "report.json", "report.md", "sdr_curve.png", "worst_cases.png"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"] == ["001", "002", "003"]
    errors = np.array(report["errors_mm"], dtype=float)
    assert report["summary"]["mre_mm"] == pytest.approx(np.nanmean(errors))
    # fitted on 001: that case is detected far better than the unseen ones
    assert np.nanmean(errors[0]) < np.nanmean(errors[1:])
    assert [r["name"] for r in report["per_landmark"]] == ceph.names
    assert "| S |" in (tmp_path / "report.md").read_text()
    for png in ("per_landmark.png", "sdr_curve.png", "worst_cases.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["evaluate", "--data", str(ceph.path), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "medsapiens: error: give either MODEL or --atlas"

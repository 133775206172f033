"""Fine-tuning on top of the atlas: real patch training on real cephalograms, the held-out estimate, the file
that carries its atlas (detect --adapter alone), unannotated images labelled per fold by the atlas, warm start,
cancel in every phase, the worse-than-atlas line."""
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from medsapiens import InputError, Volume
from medsapiens.cli import main
from medsapiens import load_detector
from medsapiens.api import adapter_info
from medsapiens.detectors.atlas import BSPLINE_GAIN
from medsapiens.detectors.refiner import (
    PatchNet,
    Refiner,
    RefinerConfig,
    grey,
    load_refined_atlas,
)
from medsapiens.io.datasets import Dataset
from medsapiens.io.markups import read_markups
from medsapiens.models.weight_files import load_weights
from medsapiens import Cancelled, NotBetter
from medsapiens.settings import RefineSettings
from medsapiens.training.refine import (
    PatchSampler,
    _estimate,
    _warm,
    atlas_wins,
    finetune_on_atlas,
    folds_of,
    pseudo_labels,
    pseudo_share,
)

# small and quick: two cases (two folds, one-atlas leave-one-out), a 32-sample patch, few steps, the affine atlas
QUICK = RefineSettings(steps=16, batch=16, patch=32, width=8, time_budget=120, try_deformable=False)


@pytest.fixture(scope="module")
def two_cases(ceph):
    return [ceph.case(0), ceph.case(1)]


@pytest.fixture(scope="module")
def adapter(two_cases, tmp_path_factory):
    out = tmp_path_factory.mktemp("refine") / "task.safetensors"
    result = finetune_on_atlas(two_cases, out, settings=QUICK, keep_worse=True)
    return out, result


@pytest.mark.slow
def test_patch_refiner_learns_a_landmark_from_real_patches(ceph):
    """A few hundred real steps on one cephalogram: the refined points land nearer the truth than the offset
    starting points they were given (the network learned the landmarks' appearance, not nothing)."""
    case = ceph.case(0)
    names = case.landmarks.names
    s = replace(RefineSettings(), batch=16, patch=32, width=8)
    cfg = RefinerConfig(32, 1.0, 8, prior_sigma=8.0)
    sampler = PatchSampler([case], names, cfg, s, offset_px=5.0)
    torch.manual_seed(0)
    net = PatchNet(len(names), 8)
    opt = torch.optim.AdamW(net.parameters(), 3e-3)
    rng = np.random.default_rng(0)
    from medsapiens.training.refine import soft_cross_entropy

    for _ in range(120):
        x, t, k = sampler.batch(rng, 16)
        loss = soft_cross_entropy(net(x), t, k)
        opt.zero_grad()
        loss.backward()
        opt.step()
    truth = case.landmarks.points
    start = truth + np.random.default_rng(1).normal(0, 5.0, truth.shape).clip(-8, 8)
    refiner = Refiner([net], cfg, np.ones(len(names), bool))
    out = refiner.refine(grey(case), start, case.landmarks.present, radius_px=3.0)
    before = np.linalg.norm(start - truth, axis=1).mean()
    after = np.linalg.norm(out.points - truth, axis=1).mean()
    assert after < 0.6 * before, (before, after)
    assert ((out.mass > 0) & (out.mass <= 1)).all()  # the posterior within 3 px of each refined point
    assert (out.disagree == 0).all()  # one start: nothing to disagree with
    # more starts (the atlases' votes): the answer is the median of the refinements from each; a start that is
    # no vote (NaN) starts from the fused estimate
    votes = np.stack([truth + np.random.default_rng(s).normal(0, 5.0, truth.shape).clip(-8, 8) for s in (2, 3)])
    votes[1, 0] = np.nan
    several = refiner.refine(grey(case), start, case.landmarks.present, 3.0, starts=votes)
    alone = [refiner.refine(grey(case), np.where(np.isfinite(v), v, start), case.landmarks.present, 3.0).points
             for v in (start, *votes)]
    assert np.allclose(several.points, np.median(alone, axis=0), atol=1e-4)
    assert np.allclose(several.mass, out.mass, atol=1e-5), "the mass is the fused start's"
    spread = np.sqrt(np.mean(np.sum((np.stack(alone) - several.points) ** 2, axis=2), axis=0))
    assert np.allclose(several.disagree, spread, atol=1e-4) and (several.disagree > 0).any()


@pytest.mark.slow
def test_adapter_carries_its_atlas_and_its_held_out_estimate(adapter, two_cases):
    out, result = adapter
    tensors, meta = load_weights(out)
    assert meta["kind"] == "atlas-refiner"
    assert [c["label"] for c in meta["cases"]] == [c.label for c in two_cases]
    assert all(re.fullmatch(r"[0-9a-f]{64}", c["sha256"]) for c in meta["cases"])
    est = meta["estimate"]
    assert est["method"] == "leave-one-case-out" and est["held_out_cases"] == [["001"], ["002"]]
    assert np.isfinite(est["atlas_mre_mm"]) and np.isfinite(est["refined_mre_mm"])
    assert len(meta["use_refined"]) == len(two_cases[0].landmarks.names)
    assert meta["steps"] == result.steps == 2 * QUICK.steps and meta["schedule_complete"]
    assert tensors["case0.image"].dtype == torch.uint8
    assert set(result.phase_seconds) == {"atlas", "train", "estimate", "save"}


@pytest.mark.slow
def test_detect_with_the_adapter_alone(adapter, ceph, tmp_path, capsys):
    """`detect --adapter A IMAGE` with no model and no atlas: the file is all it needs, and the result is the
    same as the Python detector's."""
    out, _ = adapter
    image = ceph.root / ceph.rows[5].image
    assert main(["detect", "--adapter", str(out), str(image), "--out", str(tmp_path / "det"),
                 "--spacing", str(ceph.rows[5].spacing)]) == 0
    names, lps, _, present, _ = read_markups(tmp_path / "det" / f"{image.stem}.mrk.json")
    case = ceph.case(5)
    found = load_detector(adapter=str(out)).detect(case)
    assert names == found.names and (present == found.present).all()
    ok = found.present
    assert ok.sum() >= len(ok) - 1
    # the same pipeline twice: ITK's threaded metric may move the atlas a little, not more
    written = lps[:, :2] / np.array(case.spacing)
    assert np.median(np.linalg.norm(written[ok] - found.points[ok], axis=1)) < 1.0


def test_damaged_atlas_case_is_refused(adapter, tmp_path):
    from medsapiens.models.weight_files import save_weights

    out, _ = adapter
    tensors, meta = load_weights(out)
    tensors["case1.image"] = tensors["case1.image"].clone()
    tensors["case1.image"][10, 10] ^= 1
    meta.pop("kind"), meta.pop("created")
    bad = save_weights(tmp_path / "bad.safetensors", tensors, meta, "atlas-refiner")
    with pytest.raises(InputError, match="checksum"):
        load_detector(adapter=str(bad))


def test_adapter_from_another_version_is_refused_in_one_line(adapter, tmp_path):
    from medsapiens.models.weight_files import save_weights

    tensors, meta = load_weights(adapter[0])
    meta["atlas_settings"]["local_side"] = meta["atlas_settings"].pop("bspline_side")  # its earlier name
    meta.pop("kind"), meta.pop("created")
    old = save_weights(tmp_path / "old.safetensors", tensors, meta, "atlas-refiner")
    with pytest.raises(InputError, match="another version of medsapiens .*local_side"):
        load_detector(adapter=str(old))


def test_an_adapter_with_the_local_stage_at_the_top_level_still_loads(adapter, tmp_path, ceph):
    """Files written before the local stage had settings of its own keep working, with the same settings."""
    from medsapiens.models.weight_files import save_weights

    tensors, meta = load_weights(adapter[0])
    local = meta["atlas_settings"].pop("local")
    meta["atlas_settings"].update(local)
    meta.pop("kind"), meta.pop("created")
    flat = save_weights(tmp_path / "flat.safetensors", tensors, meta, "atlas-refiner")
    assert load_detector(adapter=str(flat)).atlas.settings == load_detector(adapter=str(adapter[0])).atlas.settings


@pytest.mark.slow
def test_warm_start_continues_from_the_adapter_with_half_the_steps(adapter, two_cases, ceph, tmp_path):
    out, _ = adapter
    target = tmp_path / "task.safetensors"
    target.write_bytes(out.read_bytes())
    before, _ = load_weights(target)
    # one warm step at warm-up lr: the networks stay where the previous adapter left them
    result = finetune_on_atlas(two_cases, target, settings=replace(QUICK, steps=2), keep_worse=True)
    after, meta = load_weights(target)
    assert meta["warm_started"] and meta["steps_per_fold"] == 1 and result.steps == 2
    key = "fold0.down1.0.0.weight"
    moved = (after[key] - before[key]).abs().max()
    fresh = (PatchNet(len(two_cases[0].landmarks.names), QUICK.width).state_dict()["down1.0.0.weight"]
             - before[key]).abs().max()
    assert moved < 0.05 * fresh
    # a case more means a fold more: the total, not each fold, is held to half of the previous run
    again = tmp_path / "again.safetensors"
    again.write_bytes(out.read_bytes())  # 2 folds x 16 steps
    result = finetune_on_atlas(two_cases + [ceph.case(2)], again, settings=QUICK, keep_worse=True)
    assert load_weights(again)[1]["warm_started"] and result.steps == 3 * 5 <= 2 * QUICK.steps // 2


@pytest.mark.slow
def test_each_fold_learns_from_unannotated_images_as_labelled_by_its_own_training_cases(ceph, tmp_path):
    """Three cases, two unannotated images (one of them a case's image again, which is dropped): every fold's
    pseudo-labels are what the atlas of that fold's training cases alone detects, so the held-out case stays
    unseen; the adapter records the images it learned from, and the run its pseudo-label phase."""
    cases = [ceph.case(i) for i in range(3)]
    image = replace(ceph.case(4), landmarks=None)
    again = replace(cases[1], landmarks=None, name="a case's image again")
    seen = []
    out = tmp_path / "task.safetensors"
    result = finetune_on_atlas(cases, out, unannotated=[image, again], settings=replace(QUICK, steps=4),
                               progress=lambda p: seen.append((p.phase, p.step, p.total)), keep_worse=True)
    assert [s for s in seen if s[0] == "pseudo-labels"] == [("pseudo-labels", 1, 1)]
    assert list(result.phase_seconds) == ["atlas", "pseudo-labels", "train", "estimate", "save"]
    assert load_weights(out)[1]["unannotated_images"] == 1
    from medsapiens.detectors.atlas import AtlasDetector

    atlas = AtlasDetector(cases)
    votes = [atlas.votes(image)]
    names = cases[0].landmarks.names
    for keep in ([1, 2], [0, 2]):
        (labelled,) = pseudo_labels(atlas, [image], votes, keep, names)
        alone = AtlasDetector([cases[i] for i in keep]).detect(image)
        assert labelled.landmarks.present.sum() >= len(names) - 1
        ok = labelled.landmarks.present
        # the same registrations run again: ITK's threaded metric may move a point a little, not more
        assert np.median(np.linalg.norm(labelled.landmarks.points[ok] - alone.points[ok], axis=1)) < 0.5
    with pytest.raises(InputError, match="a 3D volume"):
        finetune_on_atlas(cases, out, unannotated=[Volume(np.zeros((4, 4, 4)), np.eye(4), name="ct")])


@pytest.mark.slow
def test_a_warm_start_reuses_the_atlas_votes_on_the_unannotated_images(ceph, tmp_path, monkeypatch):
    """After "Add case", only the new case's atlas labels the images again: the previous cases' votes come from
    the adapter file as they were, and the new file holds all of them for the next time."""
    from medsapiens.detectors.atlas import AtlasDetector

    cases = [ceph.case(0), ceph.case(1)]
    image = replace(ceph.case(4), landmarks=None)
    out = tmp_path / "task.safetensors"
    finetune_on_atlas(cases, out, unannotated=[image], settings=replace(QUICK, steps=4), keep_worse=True)
    first = load_weights(out)[0]
    calls = []
    real = AtlasDetector.votes
    monkeypatch.setattr(AtlasDetector, "votes", lambda self, case, atlases=None, **kw: calls.append(atlases) or
                        real(self, case, atlases, **kw))  # (None: the leave-one-out atlas's detections)
    finetune_on_atlas(cases + [ceph.case(2)], out, unannotated=[image], settings=replace(QUICK, steps=4),
                      keep_worse=True)
    tensors, meta = load_weights(out)
    assert meta["warm_started"] and [c for c in calls if c is not None] == [[2]]  # the new case's atlas only
    assert np.array_equal(tensors["unannotated0.points"][:2], first["unannotated0.points"], equal_nan=True)
    assert torch.isfinite(tensors["unannotated0.points"][2]).any() and len(meta["unannotated"]) == 1


def test_the_atlas_keeps_a_landmark_only_where_the_held_out_cases_show_it_better_beyond_chance():
    """Five held-out cases, three landmarks (mm errors): the refiner lost on all five (atlas kept: 1 in 32 by
    chance); lost badly twice, won three times (refined, though its mean is worse); won everywhere (refined).
    With three held-out cases not even losing on all three (1 in 8 by chance) shows the atlas better."""
    atlas = np.array([[1.0, 1.0, 2.0]] * 5)
    refined = np.array([[1.2, 5.0, 1.0], [1.1, 0.8, 1.0], [1.3, 0.8, 1.0], [1.4, 6.0, 1.0], [1.2, 0.9, 1.0]])
    as_points = lambda e: np.stack([e, np.zeros_like(e)], -1)  # noqa: E731 - errors along x
    est = _estimate(["a", "b", "c"], list("12345"), [[i] for i in range(5)], as_points(atlas), as_points(refined),
                    np.zeros((5, 3, 2)), np.ones((5, 1, 2)))
    assert est["use_refined"] == [False, True, True]
    assert est["per_landmark"]["b"] == {"atlas_mm": 1.0, "refined_mm": 2.7}
    est = _estimate(["a", "b", "c"], list("123"), [[0], [1], [2]], as_points(atlas[:3]), as_points(refined[:3]),
                    np.zeros((3, 3, 2)), np.ones((3, 1, 2)))
    assert est["use_refined"] == [True, True, True]
    assert [atlas_wins(n, n) for n in range(1, 7)] == [False, False, False, False, True, True]
    assert atlas_wins(7, 8) and not atlas_wins(6, 8) and not atlas_wins(0, 0)


def test_the_labelled_images_share_of_a_batch_falls_as_cases_are_added():
    """An annotated case weighs case_weight images the atlas labelled: with 3 cases and 47 images 3/4 of a batch of
    32 patches comes from those images; with 20 cases and 30 images less than a quarter; without images none."""
    weight = RefineSettings().case_weight
    assert round(32 * pseudo_share(3, 47, weight)) == 24
    shares = [pseudo_share(n, 50 - n, weight) for n in (3, 5, 10, 20)]
    assert shares == sorted(shares, reverse=True) and shares[-1] < 0.25
    assert pseudo_share(3, 0, weight) == 0


def test_warm_start_never_uses_a_network_that_saw_the_held_out_case():
    previous = {"folds": [["001"], ["002"], ["003"]], "nets": {0: "a", 1: "b", 2: "c"}}
    assert _warm(previous, {"002"}) == "b"  # fold 1 was trained on 001 and 003 only
    assert _warm(previous, {"004"}) in ("a", "b", "c")  # a new case: no previous network saw it
    assert _warm({"folds": [["001", "002"], ["003"]], "nets": {0: "a", 1: "b"}}, {"001"}) == "a"
    assert _warm(None, {"001"}) is None
    assert folds_of(3) == [[0], [1], [2]] and folds_of(7) == [[0, 5], [1, 6], [2], [3], [4]]


@pytest.mark.slow
@pytest.mark.parametrize("data", ["hand_dha", "ceph_hamedan"])
def test_the_atlas_keeps_its_bspline_stage_where_the_held_out_cases_show_it_better(data_dir, tmp_path, data):
    """Three real cases, each detected by the atlas of the other two, with and without the B-spline stage: kept on
    hands (fingers move on their own), not on cephalograms; the adapter's atlas is the one chosen, and the atlas
    error it reports is the chosen stage's."""
    cases = [Dataset(data_dir / data / "landmarks.csv").case(i) for i in range(3)]
    out = tmp_path / "task.safetensors"
    result = finetune_on_atlas(cases, out, settings=replace(QUICK, steps=2, try_deformable=True), keep_worse=True)
    stage, kept = result.estimate["atlas_stage"], data == "hand_dha"
    assert stage["bspline"] is kept and stage["cases"] == 3
    assert (stage["bspline_mm"] <= BSPLINE_GAIN * stage["affine_mm"]) is kept
    assert result.estimate["atlas_mre_mm"] == pytest.approx(stage["bspline_mm" if kept else "affine_mm"], abs=1e-3)
    assert load_refined_atlas(out).atlas.settings.deformable is kept
    assert adapter_info(out)["atlas_stage"] == stage and adapter_info(out)["atlas_deformable"] is kept
    assert f"atlas: B-spline stage {'kept' if kept else 'not kept'} (held-out " in "\n".join(result.notes())
    progress = []
    again = finetune_on_atlas(cases, out, settings=replace(QUICK, steps=2, try_deformable=True), keep_worse=True,
                              progress=lambda p: progress.append(p.message))
    assert again.estimate["atlas_stage"] == stage, "a warm start keeps the stage its previous adapter chose"
    assert load_refined_atlas(out).atlas.settings.deformable is kept and load_weights(out)[1]["warm_started"]
    atlas_lines = [m for m in progress if m.startswith("atlas of the other cases")]
    assert len(atlas_lines) == 1 + 3, "one leave-one-out pass after the first line: no second trial"
    assert sum("with its B-spline stage" in m for m in atlas_lines) == (3 if kept else 0)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["atlas", "pseudo-labels", "train", "estimate", "save"])
def test_cancel_in_each_phase_leaves_the_previous_adapter_byte_identical(adapter, two_cases, ceph, tmp_path, phase):
    out, _ = adapter
    target = tmp_path / "task.safetensors"
    target.write_bytes(out.read_bytes())
    original = target.read_bytes()
    seen = []
    progress = lambda p: seen.append(p.phase)  # noqa: E731
    cancel = lambda: bool(seen) and seen[-1].startswith(phase)  # noqa: E731
    unannotated = [replace(ceph.case(3), landmarks=None)] if phase == "pseudo-labels" else []
    with pytest.raises(Cancelled):
        finetune_on_atlas(two_cases, target, unannotated=unannotated, settings=QUICK, progress=progress,
                          cancel=cancel, keep_worse=True)
    assert seen[-1].startswith(phase)
    assert target.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["task.safetensors"]  # no temporary file left


@pytest.mark.slow
def test_worse_than_atlas_says_so_in_one_line_and_writes_nothing(ceph, data_dir, tmp_path, capsys):
    """A refiner thrown off by a learning rate of 1000 scatters the points: worse than the atlas on the held-out
    cases, so finetune keeps the previous file and says so in one line on stderr (exit 1)."""
    target = tmp_path / "task.safetensors"
    target.write_bytes(b"the user's previous adapter")
    with pytest.raises(NotBetter):
        finetune_on_atlas([ceph.case(0), ceph.case(1)], target,
                          settings=replace(QUICK, steps=2, lr=1000.0))
    assert target.read_bytes() == b"the user's previous adapter"
    capsys.readouterr()
    # the same through the command line
    import medsapiens.cli as cli

    code = cli.main(["finetune", "--data", str(data_dir / "ceph_hamedan" / "landmarks.csv"), "--cases", "001,002",
                     "--out", str(target), "--steps", "2", "--lr", "1000"])
    err = capsys.readouterr()
    assert code == 1 and err.out == ""
    lines = [ln for ln in err.err.splitlines() if "not better than the atlas" in ln]
    assert len(lines) == 1 and "nothing was saved" in lines[0]
    assert target.read_bytes() == b"the user's previous adapter"


@pytest.mark.slow
def test_adding_a_case_that_makes_it_worse_says_so_and_keeps_the_adapter(adapter, two_cases, ceph, tmp_path):
    """"Add case" then Fine-tune warm-starts; where the new adapter loses to the atlas on the held-out cases the
    user hears it in one line and keeps the adapter they had."""
    out, _ = adapter
    target = tmp_path / "task.safetensors"
    target.write_bytes(out.read_bytes())
    with pytest.raises(NotBetter, match="not better than the atlas on held-out cases .*3 cases"):
        finetune_on_atlas(two_cases + [ceph.case(2)], target, settings=replace(QUICK, steps=2, lr=1000.0))
    assert target.read_bytes() == out.read_bytes()


@pytest.mark.slow
def test_cli_finetune_prints_one_summary_line(data_dir, tmp_path, capsys):
    target = tmp_path / "task.safetensors"
    assert main(["finetune", "--data", str(data_dir / "ceph_hamedan" / "landmarks.csv"), "--cases", "001,002",
                 "--out", str(target), "--steps", "8", "--keep-worse"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert re.fullmatch(rf"{re.escape(str(target))}  16 steps  [0-9.]+ s  atlas [0-9.]+ s, train [0-9.]+ s, "
                        r"estimate [0-9.]+ s, save [0-9.]+ s", out[0]), out[0]


@pytest.mark.slow
def test_cli_finetune_learns_from_unannotated_images_too(data_dir, ceph, tmp_path, capsys):
    """--unannotated takes files and folders (their image files): the atlas labels them, a phase of its own."""
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "004.png").write_bytes((ceph.root / ceph.rows[3].image).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    target = tmp_path / "task.safetensors"
    assert main(["finetune", "--data", str(data_dir / "ceph_hamedan" / "landmarks.csv"), "--cases", "001,002",
                 "--out", str(target), "--steps", "4", "--keep-worse",
                 "--unannotated", str(folder), str(ceph.root / ceph.rows[4].image)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(rf"{re.escape(str(target))}  8 steps  [0-9.]+ s  atlas [0-9.]+ s, pseudo-labels [0-9.]+ s, "
                        r"train [0-9.]+ s, estimate [0-9.]+ s, save [0-9.]+ s", out[0]), out
    assert load_weights(target)[1]["unannotated_images"] == 2

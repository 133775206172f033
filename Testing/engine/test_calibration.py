"""The calibrated confidence P(within 2 mm) and the review flag: fitted where the truth is known, carried into
every output, and a detection whose cost stops growing with the cases."""
from __future__ import annotations

import numpy as np
import pytest
from medsapiens import Landmarks, api
from medsapiens.detectors.atlas import AtlasDetector
from medsapiens.detectors.calibration import (
    GROSS_MM,
    MOST_FLAGGED,
    WITHIN_MM,
    Calibration,
    Evidence,
    calibration_error,
    fit_calibration,
    review_figures,
)
from medsapiens.io.datasets import Dataset, landmarks_csv
from medsapiens.settings import REVIEW_BELOW, AtlasSettings


def synthetic(rng, cases: int, k: int = 19):
    """Points whose chance of lying within 2 mm is a known function of the atlas's vote spread and of how hard
    the landmark is: P = sigmoid(1.5 - 2.2 log(spread / 1 mm) - 0.6 hardness)."""
    hardness = np.linspace(-1.5, 1.5, k)
    spread = np.exp(rng.normal(0, 0.6, (cases, k)) + 0.3 * hardness)
    truth_p = 1 / (1 + np.exp(-(1.5 - 2.2 * np.log(spread) - 0.6 * hardness)))
    hit = rng.random((cases, k)) < truth_p
    error = np.where(hit, rng.uniform(0, WITHIN_MM, (cases, k)), rng.uniform(WITHIN_MM, 3 * GROSS_MM, (cases, k)))
    ncc = rng.uniform(0.4, 0.9, (cases, k))
    evidence = Evidence.of_atlas(spread.ravel(), ncc.ravel())
    return evidence, error.ravel(), truth_p.ravel(), np.repeat(np.arange(cases), k), np.tile(np.arange(k), cases)


def test_the_probability_matches_a_known_truth_on_unseen_points():
    rng = np.random.default_rng(0)
    evidence, error, _, case, landmark = synthetic(rng, cases=12)
    model = fit_calibration(evidence, error, case, landmark, 19)
    fresh, fresh_error, truth_p, _, fresh_landmark = synthetic(rng, cases=200)
    p = np.concatenate([model.probability(fresh.select(slice(i, i + 19))) for i in range(0, len(truth_p), 19)])
    assert np.abs(p - truth_p).mean() < 0.08
    assert calibration_error(p, fresh_error <= WITHIN_MM) < 0.05
    figures = review_figures(p, fresh_error, p < model.review_below)
    assert figures["auc"] > 0.75
    # the rule was chosen on the cases to catch most gross errors while flagging at most MOST_FLAGGED of the points
    assert model.held_out["flagged"] <= MOST_FLAGGED + 0.02
    assert figures["flagged"] <= MOST_FLAGGED + 0.05
    # it survives the adapter file's JSON
    again = Calibration.from_dict(model.to_dict())
    assert np.allclose(again.probability(fresh.select(slice(0, 19))), p[:19])


def test_the_rule_flags_at_most_its_share_of_the_points_the_detector_will_see():
    """Held-out cases are detected by an atlas of one case fewer and one network, new images by all of them, so
    their evidence differs: where the rule chosen on the held-out cases would flag more than MOST_FLAGGED of the
    unannotated images' points, it flags that share."""
    rng = np.random.default_rng(2)
    evidence, error, _, case, landmark = synthetic(rng, cases=12)
    alone = fit_calibration(evidence, error, case, landmark, 19)
    harder, *_ = synthetic(rng, cases=40)
    harder = Evidence.of_atlas(harder.spread_mm * 1.5, harder.ncc)  # the votes spread wider there
    seen = {}

    def on_unlabelled(model):  # P of each image's 19 points
        seen["p"] = np.concatenate([model.probability(harder.select(slice(i, i + 19))) for i in range(0, 760, 19)])
        return seen["p"]

    capped = fit_calibration(evidence, error, case, landmark, 19, on_unlabelled)
    assert capped.coef == alone.coef, "the model is the same; only the rule's threshold may fall"
    assert capped.review_below == pytest.approx(min(alone.review_below, np.quantile(seen["p"], MOST_FLAGGED)))
    assert (seen["p"] < capped.review_below).mean() <= MOST_FLAGGED + 1e-9
    assert (seen["p"] < alone.review_below).mean() > MOST_FLAGGED, "the cap changed something here"
    assert capped.held_out["flagged"] <= alone.held_out["flagged"]


def test_without_gross_errors_the_rule_falls_back_to_review_below():
    rng = np.random.default_rng(1)
    evidence, error, _, case, landmark = synthetic(rng, cases=4)
    model = fit_calibration(evidence, np.minimum(error, 1.0), case, landmark, 19)  # every point within 1 mm
    assert model.review_below <= REVIEW_BELOW and model.held_out["gross_errors"] == 0
    assert model.held_out["gross_caught"] is None


@pytest.fixture(scope="module")
def phantoms():
    return [api.phantom_case(seed) for seed in range(12)]


@pytest.mark.slow
def test_the_atlas_calibrates_on_its_cases_once_and_flags_by_its_rule(phantoms):
    detector = AtlasDetector(phantoms[:3])
    seen = []
    found = detector.detect(phantoms[3], progress=seen.append)
    model = detector._calibration
    assert model is not None and len(model.landmark_mm) == len(found)
    assert any("measuring the atlas's error" in p.message for p in seen)
    assert ((found.confidence >= 0) & (found.confidence <= 1)).all()
    assert np.array_equal(found.check, found.present & (found.confidence < model.review_below))
    detector.detect(phantoms[4])
    assert detector._calibration is model  # fitted once


def test_a_one_case_atlas_flags_every_point(phantoms):
    found = AtlasDetector(phantoms[:1]).detect(phantoms[1])
    assert found.check[found.present].all()


@pytest.mark.slow
def test_cost_per_image_stops_growing_with_the_cases(phantoms):
    """With more cases than max_atlases an image is registered to the most similar ones only; the image that is
    itself a case finds that case among them."""
    settings = AtlasSettings(max_atlases=4)
    detector = AtlasDetector(phantoms[:10], settings)
    stack, scores = detector.votes(phantoms[7])
    voted = np.isfinite(scores).any(axis=1)
    assert voted.sum() == 4 and voted[7]
    assert np.isnan(stack[~voted]).all()


def test_landmarks_csv_carries_p_and_the_flag_and_reads_them_back(tmp_path):
    found = Landmarks(["S", "N", "Or"], np.array([[10.0, 20.0], [np.nan, np.nan], [30.5, 40.25]]),
                      confidence=[0.91, 0.0, 0.41], check=[False, False, True])
    (tmp_path / "landmarks.csv").write_text(landmarks_csv([("a.png", 64, 48, (0.1, 0.1), found)], review=True))
    header = (tmp_path / "landmarks.csv").read_text().splitlines()[0].split(",")
    assert header[4:8] == ["S_x", "S_y", "S_p", "S_check"]
    back = Dataset(tmp_path / "landmarks.csv").rows[0].landmarks
    assert back.names == found.names
    assert np.array_equal(back.present, [True, False, True])  # missing stays missing, never guessed
    assert np.allclose(back.confidence[[0, 2]], [0.91, 0.41]) and list(back.check) == [False, False, True]

"""MRE / SDR as the field defines them, on the real inter-observer pair of the cephalogram set."""
import numpy as np
from medsapiens import Landmarks
from medsapiens.analysis.metrics import radial_errors, summary
from medsapiens.io.datasets import Dataset


def test_inter_observer_reference_of_the_ceph_set(data_dir, ceph):
    second = Dataset(data_dir / "ceph_hamedan" / "landmarks_annotator2.csv")
    errors = np.array([radial_errors(b.landmarks, a.landmarks, a.spacing) for a, b in zip(ceph.rows, second.rows)])
    s = summary(errors, (2.0, 4.0))
    assert abs(s["mre_mm"] - 1.45) < 0.05  # the data set's README: mean 5.7 px = 1.45 mm
    assert 0 < s["sdr"][2.0] < s["sdr"][4.0] <= 1


def test_missing_landmarks_are_not_scored_and_misses_count_against_sdr():
    truth = Landmarks(["a", "b", "c"], [[0, 0], [10, 10], [np.nan, np.nan]])
    found = Landmarks(["b", "a", "c"], [[13, 14], [0, 0], [5, 5]], present=[True, False, True])
    errors = radial_errors(found, truth, (0.5, 0.5))
    assert np.isinf(errors[0]) and errors[1] == 2.5 and np.isnan(errors[2])
    s = summary(errors[None], (3.0,))
    assert s["mre_mm"] == 2.5 and s["sdr"][3.0] == 0.5 and s["not_found"] == 1 and s["scored"] == 2

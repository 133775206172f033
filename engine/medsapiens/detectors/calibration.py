"""A calibrated probability on every detected point, P(it lies within 2 mm of where an expert would put it), and
the review rule that flags the points worth checking.

A detector's raw evidence about a point (how far its atlases' votes spread, how well the best atlas matched the
neighbourhood, how far the refiner moved the point, how much of its posterior lies within 2 mm and how far its
refinements from the several votes disagree, and how hard the landmark was on held-out cases) is not a
probability. A small logistic model turns it into one; it is fitted
on points whose truth the detector did not see: the leave-one-case-out predictions on its own annotated cases.
With a handful of cases that is some 50-100 points, so the model is kept small (standardised features, a ridge
penalty) and its own figures (flagged share, gross errors caught, AUC) are measured leaving each case's points out
of the fit in turn. The review rule flags a point whose P is below a threshold chosen on those held-out points to
catch most gross (> 3 mm) errors while flagging at most MOST_FLAGGED of the points; without gross errors to learn
from it falls back to P < REVIEW_BELOW.
"""
from __future__ import annotations

from dataclasses import asdict, astuple, dataclass, replace

import numpy as np

from ..case import Landmarks
from ..settings import REVIEW_BELOW

WITHIN_MM = 2.0    # P is the probability of lying within this distance of the expert's point
GROSS_MM = 3.0     # an error the review rule should catch
CATCH = 0.8        # the review rule's threshold is chosen to catch this share of the gross errors ...
MOST_FLAGGED = 0.2  # ... but flags at most this share of the points (a flag on most points tells nothing)
RIDGE = 2.0        # penalty on the standardised features' weights: tens of points, a few features
BINS = 10          # calibration error: mean |P - observed rate| over this many equal-width bins of P


@dataclass
class Evidence:
    """What a detector saw of each landmark of one image (arrays of K; NaN where it does not apply)."""

    spread_mm: np.ndarray      # weighted spread of the atlases' votes (NaN with one vote)
    ncc: np.ndarray            # best local NCC among the votes
    shift_mm: np.ndarray       # how far the refiner moved the atlas's point (NaN: not refined)
    mass: np.ndarray           # the refiner's posterior probability within WITHIN_MM of its point (NaN: not refined)
    disagree_mm: np.ndarray    # how far the refiner's answers from the atlases' several votes lie from its point

    @classmethod
    def of_atlas(cls, spread_mm: np.ndarray, ncc: np.ndarray) -> "Evidence":
        nan = np.full(len(ncc), np.nan)
        return cls(np.asarray(spread_mm, float), np.asarray(ncc, float), nan, nan.copy(), nan.copy())

    def select(self, keep: np.ndarray) -> "Evidence":
        return Evidence(*(v[keep] for v in astuple(self)))

    @classmethod
    def stack(cls, items: list["Evidence"]) -> "Evidence":
        """Many images' evidence as one (points of image 0, then image 1, ...)."""
        return cls(*(np.concatenate(parts) for parts in zip(*(astuple(e) for e in items))))


def _raw_features(e: Evidence, landmark_mm: np.ndarray) -> dict[str, np.ndarray]:
    """The model's inputs (before standardising): logs of distances and the logit of a mass."""
    mass = np.clip(e.mass, 0.01, 0.99)
    return {"spread": np.log(np.maximum(e.spread_mm, 0.05)), "ncc": np.clip(e.ncc, -1, 1),
            "landmark": np.log(np.maximum(landmark_mm, 0.1)), "shift": np.log(e.shift_mm + 0.1),
            "mass": np.log(mass / (1 - mass)), "disagree": np.log(e.disagree_mm + 0.1)}


@dataclass(frozen=True)
class Calibration:
    """A fitted model: P = sigmoid(coef . standardised features); `review_below`: check where P is below it;
    `held_out`: how the model and rule did on its own cases, each left out of the fit in turn."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]          # intercept, then one per feature
    landmark_mm: tuple[float, ...]   # per landmark: the mean held-out error it was fitted with (mm)
    review_below: float
    held_out: dict

    def probability(self, evidence: Evidence) -> np.ndarray:
        """P(within WITHIN_MM) of each landmark of one image."""
        x = _design(_raw_features(evidence, np.asarray(self.landmark_mm)), self.features, self.mean, self.scale)
        return _sigmoid(x @ np.asarray(self.coef))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def calibrated(found: Landmarks, evidence: Evidence, calibration: Calibration | None) -> Landmarks:
    """`found` with P as its confidence and the review rule's flags; without a calibration (a one-case atlas:
    nothing to measure its error on) every point is flagged and keeps its raw confidence."""
    if calibration is None:
        return Landmarks(found.names, found.points, found.confidence, found.present, found.present)
    p = np.where(found.present, calibration.probability(evidence), 0.0)
    return Landmarks(found.names, found.points, p, found.present, p < calibration.review_below)


def _sigmoid(z):
    return 1 / (1 + np.exp(-np.clip(z, -30, 30)))


def _design(raw: dict, features, mean, scale) -> np.ndarray:
    """Rows [1, standardised features]; a value that does not apply (NaN) stands at the fit's mean (0)."""
    cols = [(raw[f] - m) / s for f, m, s in zip(features, mean, scale)]
    x = np.column_stack([np.ones(len(raw["ncc"]))] + [np.nan_to_num(c, nan=0.0) for c in cols])
    return x


def _logistic(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge-penalised logistic regression by Newton's method (the intercept is not penalised)."""
    w = np.zeros(x.shape[1])
    penalty = np.full(x.shape[1], ridge)
    penalty[0] = 1e-6
    for _ in range(50):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - y) + penalty * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def _landmark_errors(error_mm: np.ndarray, landmark: np.ndarray, k_count: int, leave: np.ndarray) -> np.ndarray:
    """Per point: the mean error of its landmark over the points not in `leave` (same case excluded)."""
    out = np.full(len(error_mm), np.nan)
    for k in range(k_count):
        pts = landmark == k
        for i in np.flatnonzero(pts):
            others = pts & ~leave[i]
            out[i] = error_mm[others].mean() if others.any() else np.nan
    return out


def _fit(raw: dict, y: np.ndarray) -> tuple:
    """(features, mean, scale, coef) on the points given; a feature that never applies or never varies is left out."""
    features, mean, scale = [], [], []
    for name, v in raw.items():
        ok = np.isfinite(v)
        if ok.sum() >= 5 and np.std(v[ok]) > 1e-6:
            features.append(name), mean.append(float(v[ok].mean())), scale.append(float(v[ok].std()))
    coef = _logistic(_design(raw, features, mean, scale), y.astype(float), RIDGE)
    return tuple(features), tuple(mean), tuple(scale), tuple(float(c) for c in coef)


def fit_calibration(evidence: Evidence, error_mm: np.ndarray, case: np.ndarray, landmark: np.ndarray,
                    k_count: int, unlabelled=None) -> Calibration:
    """The model for points whose held-out error is known: `evidence` of every point of the cases (flat), its
    error (mm), which case and landmark it is (indices). The held-out figures leave each case out in turn.

    unlabelled: optional, a function of the fitted model giving P on points as the detector will see them (its
    own unannotated images, detected as at detection time); the review rule then flags at most MOST_FLAGGED of
    those too (the held-out cases were detected by an atlas of one case fewer and one network, so their evidence
    differs from a detection's)."""
    y = error_mm <= WITHIN_MM
    same_case = case[:, None] == case[None, :]
    raw = _raw_features(evidence, _landmark_errors(error_mm, landmark, k_count, same_case))
    p_held = np.full(len(y), np.nan)
    for c in np.unique(case):
        train, test = case != c, case == c
        fitted = _fit({k: v[train] for k, v in raw.items()}, y[train])
        p_held[test] = _sigmoid(_design({k: v[test] for k, v in raw.items()}, *fitted[:3]) @ np.asarray(fitted[3]))
    landmark_mm = [float(error_mm[landmark == k].mean()) if (landmark == k).any() else float(np.nanmean(error_mm))
                   for k in range(k_count)]
    features, mean, scale, coef = _fit(raw, y)  # a point's landmark error never includes its own case's
    model = Calibration(features, mean, scale, coef, tuple(landmark_mm), REVIEW_BELOW, {})
    threshold = review_threshold(p_held, error_mm)
    if unlabelled is not None:
        p_seen = unlabelled(model)
        if len(p_seen):
            threshold = min(threshold, float(np.quantile(p_seen, MOST_FLAGGED)))
    return replace(model, review_below=threshold, held_out=review_figures(p_held, error_mm, p_held < threshold))


def review_threshold(p: np.ndarray, error_mm: np.ndarray) -> float:
    """The lowest P threshold that flags CATCH of the gross errors (REVIEW_BELOW when there are fewer than 3 to go
    by), lowered where it would flag more than MOST_FLAGGED of the points."""
    gross = np.sort(p[error_mm > GROSS_MM])
    catch = REVIEW_BELOW if len(gross) < 3 else gross[int(np.ceil(CATCH * len(gross))) - 1] + 1e-6
    return float(min(catch, np.quantile(p, MOST_FLAGGED)))


def review_figures(p: np.ndarray, error_mm: np.ndarray, flagged: np.ndarray) -> dict:
    """How a probability and its flags did against the truth: points, share flagged, share of gross errors
    flagged, AUC of P for telling gross errors apart, calibration error over BINS bins of P."""
    gross = error_mm > GROSS_MM
    return {"points": int(len(p)), "flagged": round(float(flagged.mean()), 3) if len(p) else None,
            "gross_errors": int(gross.sum()),
            "gross_caught": round(float(flagged[gross].mean()), 3) if gross.any() else None,
            "auc": _auc(-p, gross), "calibration_error": calibration_error(p, error_mm <= WITHIN_MM)}


def _auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """P(a positive scores above a negative), ties half (the Mann-Whitney statistic)."""
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return round(float(greater + 0.5 * ties), 3)


def reliability(p: np.ndarray, hit: np.ndarray) -> list[tuple[float, float, int]]:
    """Per non-empty bin of P (BINS equal-width bins): mean P, observed rate of hits, points in it."""
    bins = np.minimum((p * BINS).astype(int), BINS - 1)
    return [(float(p[bins == b].mean()), float(hit[bins == b].mean()), int((bins == b).sum())) for b in np.unique(bins)]


def calibration_error(p: np.ndarray, hit: np.ndarray) -> float | None:
    """Mean over the non-empty bins of |mean P - observed rate|, weighted by the points in each bin."""
    if not len(p):
        return None
    return round(sum(abs(mean_p - rate) * n for mean_p, rate, n in reliability(p, hit)) / len(p), 3)

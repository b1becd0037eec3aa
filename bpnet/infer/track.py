"""Person ids across video frames: a small tracker on keypoint similarity.

Each frame's people are matched to the live tracks by an OKS-like
similarity (the COCO keypoint similarity with one falloff for every joint):
for the joints present in both, exp(-d^2 / (2 s^2 k^2)) averaged, where s^2
is the track's box area; joints missing on either side do not count, and
pairs sharing fewer than ``min_common`` joints are not compared. Matching is
greedy on decreasing similarity (the best pair first), one to one, above
``min_similarity``. A track that finds no person keeps its id for
``max_missed`` frames (a person hidden for a moment comes back under the
same id). A track is compared both where it was last seen and where its
body's mean motion would take it, and the better of the two counts: smooth
walking is followed, while jittery detections or sparse frames (where a
velocity extrapolation overshoots) still match where the person stood. The
falloff widens with every missed frame, as the person may have moved more.

The falloff ``k`` is 0.25, looser than COCO's evaluation constants
(0.025-0.107 per joint): between frames people move and joints jitter by
more than an annotation error.

Plain NumPy.
"""

from __future__ import annotations

import dataclasses
from typing import List

import numpy as np


@dataclasses.dataclass
class Track:
    id: int
    keypoints: np.ndarray  # [J, 3] last seen (x, y, score)
    velocity: np.ndarray  # [2] the body's mean motion, pixels per frame
    box_area: float
    missed: int = 0
    age: int = 1

    def predicted(self) -> np.ndarray:
        kp = self.keypoints.copy()
        present = kp[:, 2] > 0
        kp[present, :2] += self.velocity * (self.missed + 1)
        return kp


def keypoint_similarity(a: np.ndarray, b: np.ndarray, area: float, k: float = 0.1,
                        min_common: int = 2) -> float:
    """OKS-like similarity of two [J, 3] poses (0 when too few joints are shared)."""
    both = (a[:, 2] > 0) & (b[:, 2] > 0)
    if both.sum() < min_common:
        return 0.0
    d2 = ((a[both, :2] - b[both, :2]) ** 2).sum(1)
    s2 = max(area, 1.0)
    return float(np.exp(-d2 / (2.0 * s2 * k * k)).mean())


def _box_area(kp: np.ndarray) -> float:
    p = kp[kp[:, 2] > 0]
    if len(p) == 0:
        return 1.0
    w = p[:, 0].max() - p[:, 0].min()
    h = p[:, 1].max() - p[:, 1].min()
    # A person seen as one straight limb has a thin box; its larger side keeps
    # the falloff in proportion to the person.
    return float(max(w * h, 0.25 * max(w, h) ** 2, 1.0))


class Tracker:
    """Gives each person a stable id from frame to frame."""

    def __init__(self, max_missed: int = 5, min_similarity: float = 0.2, k: float = 0.25,
                 min_common: int = 2):
        self.max_missed = int(max_missed)
        self.min_similarity = float(min_similarity)
        self.k = float(k)
        self.min_common = int(min_common)
        self.tracks: List[Track] = []
        self._next_id = 1

    @property
    def ids_given(self) -> int:
        """How many ids were handed out so far: the tracks started."""
        return self._next_id - 1

    def update(self, keypoints: np.ndarray) -> np.ndarray:
        """[N, J, 3] people of a new frame -> [N] int ids."""
        kps = np.asarray(keypoints, dtype=np.float64)
        n = kps.shape[0]
        ids = np.full(n, -1, dtype=np.int64)
        if self.tracks and n:
            sim = np.zeros((len(self.tracks), n))
            for t, tr in enumerate(self.tracks):
                pred = tr.predicted()
                k = self.k * (1.0 + 0.5 * tr.missed)
                for d in range(n):
                    sim[t, d] = max(
                        keypoint_similarity(tr.keypoints, kps[d], tr.box_area, k, self.min_common),
                        keypoint_similarity(pred, kps[d], tr.box_area, k, self.min_common))
            order = np.dstack(np.unravel_index(np.argsort(-sim, axis=None), sim.shape))[0]
            used_t, used_d = set(), set()
            for t, d in order:
                if sim[t, d] < self.min_similarity:
                    break
                if t in used_t or d in used_d:
                    continue
                used_t.add(t)
                used_d.add(d)
                self._refresh(self.tracks[t], kps[d])
                ids[d] = self.tracks[t].id
        matched = {tr.id for tr in self.tracks} & set(ids.tolist())
        survivors = []
        for tr in self.tracks:
            if tr.id not in matched:
                tr.missed += 1
            if tr.missed <= self.max_missed:
                survivors.append(tr)
        self.tracks = survivors
        for d in np.nonzero(ids < 0)[0]:
            tr = Track(self._next_id, kps[d].copy(), np.zeros(2), _box_area(kps[d]))
            self._next_id += 1
            self.tracks.append(tr)
            ids[d] = tr.id
        return ids

    def _refresh(self, tr: Track, kp: np.ndarray):
        both = (tr.keypoints[:, 2] > 0) & (kp[:, 2] > 0)
        if both.any():
            # The median joint displacement: one mis-detected joint does not
            # throw the body's motion off.
            vel = np.median(kp[both, :2] - tr.keypoints[both, :2], axis=0) / (tr.missed + 1)
            tr.velocity = 0.5 * tr.velocity + 0.5 * vel if tr.age > 1 else vel
        tr.keypoints = kp.copy()
        tr.box_area = _box_area(kp)
        tr.missed = 0
        tr.age += 1

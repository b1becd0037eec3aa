"""From heatmaps and Part Affinity Fields to people (bottom-up grouping).

Plain NumPy, no TensorFlow or ONNX Runtime. The inner loops (peak search,
limb scoring, grouping) live in ``_decode_kernels.py`` and are compiled by
numba when it is installed (cached on disk, so only the very first run pays
a few seconds of compilation); without numba the same kernels run as
Python/NumPy and give the same people, only slower. Set BPNET_NO_NUMBA=1 to
force the slow path.

Algorithm, on maps at stride s (cell i is centred on input pixel
``i*s + (s-1)/2``):

1. Peaks: a cell above ``heatmap_threshold`` that is a local maximum of its
   3x3 neighbourhood; exact ties are broken in raster order so a flat top
   gives one peak. Its position is refined to a fraction of a cell by
   fitting a parabola to the log of the values on each axis through the
   peak (exact for a gaussian blob), so the whole maps never need to be
   upsampled.
2. Limbs: every pair of peaks of a limb's two joints is scored by the line
   integral of that limb's PAF along the segment (bilinear samples, one
   per cell of length or so); kept when ``min_pass_fraction`` of the
   samples exceed ``paf_threshold`` and the mean is positive.
3. People: all kept limbs of all types in one global order of decreasing
   score; a limb is accepted when neither end already has a limb of that
   type and merging the two ends' people repeats no joint. Peaks left
   alone form one-joint people.
4. Fragments: a person whose labeled joints are not linked by the skeleton
   (legs without a neck, a wrist without its elbow: 16% of COCO's persons)
   comes out in pieces with no PAF between them. Pieces with no joint in
   common are merged, closest first, when two of their joints at most
   ``merge_max_hops`` limbs apart lie within ``merge_ratio`` x hops x
   their mean limb length; noise-level pieces (mean confidence under
   ``min_person_score``) take no part.
5. Scores: a person's confidence is the mean of its joint (peak) and limb
   (PAF) scores; people with at least ``min_parts`` joints are kept when it
   reaches ``min_person_score``, smaller ones only when it reaches
   ``small_person_score``. The reported score, used for ranking (COCO AP),
   is the confidence times ``1 - exp(-joints / completeness)``.

The parameters and their defaults are those of ``bpnet.specs.DecoderConfig``
(the inference spec's ``decoder:`` section).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from ..errors import BpnetError
from ..model.meta import STRIDE
from ..specs import DecoderConfig
from . import _decode_kernels as K

_REFINE = {"none": K.REFINE_NONE, "quadratic": K.REFINE_QUADRATIC,
           "gaussian": K.REFINE_GAUSSIAN}
_FIELDS = frozenset(f.name for f in dataclasses.fields(DecoderConfig))


@dataclasses.dataclass(eq=False)
class People:
    """Decoded people. keypoints [N, J, 3] (x, y, score) in input pixels,
    missing joints all 0; scores [N] person scores (higher = surer); boxes
    [N, 4] (x0, y0, x1, y1) around the detected joints."""

    keypoints: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def empty(num_joints: int) -> "People":
        return People(np.zeros((0, num_joints, 3), np.float32), np.zeros((0,), np.float32),
                      np.zeros((0, 4), np.float32))

    def present(self) -> np.ndarray:
        """[N, J] bool: which joints were detected."""
        return self.keypoints[:, :, 2] > 0

    def transformed(self, scale_x: float, scale_y: float, offset_x: float = 0.0,
                    offset_y: float = 0.0) -> "People":
        """Map coordinates by x' = x*scale_x + offset_x (missing joints stay 0)."""
        kp = self.keypoints.copy()
        m = self.present()
        kp[..., 0] = np.where(m, kp[..., 0] * scale_x + offset_x, 0)
        kp[..., 1] = np.where(m, kp[..., 1] * scale_y + offset_y, 0)
        return People(kp, self.scores.copy(), _boxes(kp))

    def __getitem__(self, idx) -> "People":
        if isinstance(idx, (int, np.integer)):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        return People(self.keypoints[idx], self.scores[idx], self.boxes[idx])


def _boxes(kp: np.ndarray) -> np.ndarray:
    if kp.shape[0] == 0:
        return np.zeros((0, 4), np.float32)
    m = kp[:, :, 2] > 0
    big = np.float32(np.inf)
    x0 = np.where(m, kp[..., 0], big).min(1)
    y0 = np.where(m, kp[..., 1], big).min(1)
    x1 = np.where(m, kp[..., 0], -big).max(1)
    y1 = np.where(m, kp[..., 1], -big).max(1)
    out = np.stack([x0, y0, x1, y1], 1).astype(np.float32)
    out[~m.any(1)] = 0
    return out


_kernels = None


def _use_numba_default() -> bool:
    return os.environ.get("BPNET_NO_NUMBA", "").strip() not in ("1", "true", "yes")


def _get_kernels(use_numba: Optional[bool]):
    """(find_peaks, score_limbs, assemble, merge): numba-compiled when asked
    and available, else the NumPy twins and the plain-Python kernels."""
    global _kernels
    slow = (K.find_peaks_numpy, K.score_limbs_numpy, K.assemble_people, K.merge_fragments)
    if use_numba is None:
        use_numba = _use_numba_default()
    if not use_numba:
        return slow
    if _kernels is None:
        try:
            import numba
        except ImportError:
            _kernels = slow
        else:
            jit = numba.njit(cache=True, nogil=True)
            _kernels = (jit(K.find_peaks_loop), jit(K.score_limbs_loop),
                        jit(K.assemble_people), jit(K.merge_fragments))
    return _kernels


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _mean_confidence(slots, pv, lsum, lcnt):
    """Mean of a person's joint (peak) and limb (PAF) scores."""
    has = slots >= 0
    jsum = np.where(has, pv[np.where(has, slots, 0)], 0.0).sum(1)
    return (jsum + lsum) / np.maximum(has.sum(1) + lcnt, 1)


def decode(heatmaps, pafs, pose, stride: float = STRIDE,
           config: Optional[DecoderConfig] = None, *, use_numba: Optional[bool] = None,
           **overrides) -> People:
    """Decode one image's maps into people.

    heatmaps: [h, w, J] or [h, w, J+1] (a last background channel is
    ignored); pafs: [h, w, 2E] (x then y per limb of pose.skeleton); pose: a
    PoseConfig; stride: input pixels per map cell (8 for the network's own
    maps, 8/f for maps upsampled by f); cell i maps to pixel
    ``i*stride + (stride-1)/2``. config: a DecoderConfig (None: its
    defaults); overrides: DecoderConfig fields by name, applied on top of
    config (``decode(h, p, pose, heatmap_threshold=0.2, min_parts=3)``).
    use_numba: None = use it when installed (and BPNET_NO_NUMBA is not set).

    Returns People sorted by decreasing score.
    """
    if config is None:
        config = DecoderConfig()
    elif not isinstance(config, DecoderConfig):
        raise TypeError(f"decode() config must be a DecoderConfig or None, got "
                        f"{type(config).__name__}")
    if overrides:
        unknown = set(overrides) - _FIELDS
        if unknown:
            raise TypeError(f"decode() got unknown parameters {sorted(unknown)}; "
                            f"known: {sorted(_FIELDS)}")
        config = dataclasses.replace(config, **overrides)
    problems = config.check()
    if problems:
        raise ValueError("; ".join(f"{key} {msg}" for key, msg in problems))
    J, E = pose.num_joints, pose.num_edges
    heatmaps = np.asarray(heatmaps)
    pafs = np.asarray(pafs)
    if heatmaps.ndim != 3 or heatmaps.shape[2] not in (J, J + 1):
        raise BpnetError(f"heatmaps must be [h, w, {J}] or [h, w, {J + 1}] for pose config "
                         f"{pose.name!r}, got {heatmaps.shape}: the model and the pose config "
                         "do not match")
    if pafs.ndim != 3 or pafs.shape[2] != 2 * E or pafs.shape[:2] != heatmaps.shape[:2]:
        raise BpnetError(f"pafs must be [{heatmaps.shape[0]}, {heatmaps.shape[1]}, {2 * E}] "
                         f"for pose config {pose.name!r}, got {pafs.shape}: the model and the "
                         "pose config do not match")
    if not stride > 0:
        raise ValueError(f"stride must be positive, got {stride}")
    heatmaps = np.ascontiguousarray(heatmaps, dtype=np.float32)
    pafs = np.ascontiguousarray(pafs, dtype=np.float32)
    find_peaks, score_limbs, assemble, merge = _get_kernels(use_numba)

    h, w = heatmaps.shape[:2]
    if h == 0 or w == 0:
        return People.empty(J)
    thr = float(config.heatmap_threshold)
    px, py, pv, pj, start = find_peaks(heatmaps, J, thr, _REFINE[config.refine])
    if px.shape[0] == 0:
        return People.empty(J)
    px, py, pv, pj, start = _strongest(px, py, pv, pj, start, int(config.max_peaks))
    skel = _skeleton_array(pose)
    max_len = config.max_limb_length
    max_len = float(max(h, w) if max_len is None else max_len)
    cand = score_limbs(px, py, start, pafs, skel, float(config.paf_threshold),
                       float(config.min_pass_fraction), int(config.min_samples),
                       int(config.max_samples), max_len, float(config.length_weight))
    slots, lsum, lcnt = assemble(*cand, pj, px.shape[0], J, skel)
    mean = _mean_confidence(slots, pv, lsum, lcnt)
    if config.merge_ratio > 0 and slots.shape[0] > 1:
        alive = merge(slots, lsum, lcnt, mean >= config.min_person_score, px, py, skel,
                      _hops(pose), int(config.merge_max_hops), float(config.merge_ratio))
        slots, lsum, lcnt = slots[alive], lsum[alive], lcnt[alive]
        mean = _mean_confidence(slots, pv, lsum, lcnt)
    has = slots >= 0
    idx = np.where(has, slots, 0)
    jv = np.where(has, pv[idx], 0.0)
    nj = has.sum(1)
    # Ranking score: the saturating completeness factor keeps a lone strong
    # peak below a whole body, so a fragment of a split person ranks under
    # real people while small people (COCO has many with 1-4 labeled
    # joints) are still reported.
    rank = mean * (1.0 - np.exp(-nj / float(config.completeness)))
    keep = np.where(nj >= config.min_parts, mean >= config.min_person_score,
                    mean >= config.small_person_score)
    if not keep.any():
        return People.empty(J)
    has, idx, jv, rank = has[keep], idx[keep], jv[keep], rank[keep]
    half = (stride - 1) / 2.0
    kp = np.zeros(has.shape + (3,), np.float32)
    kp[..., 0] = np.where(has, px[idx] * stride + half, 0.0)
    kp[..., 1] = np.where(has, py[idx] * stride + half, 0.0)
    kp[..., 2] = jv
    order = np.argsort(-rank, kind="stable")
    kp = kp[order]
    return People(kp, rank[order].astype(np.float32), _boxes(kp))


def _strongest(px, py, pv, pj, start, max_peaks):
    """Keep at most max_peaks peaks per joint, the highest, in their order.

    A bound on the work: limb pairs grow with the square of the peaks, and
    noisy maps under a low threshold can have thousands per joint.
    """
    counts = np.diff(start)
    if max_peaks <= 0 or counts.max() <= max_peaks:
        return px, py, pv, pj, start
    keep = []
    for j in np.nonzero(counts)[0]:
        idx = np.arange(start[j], start[j + 1])
        if idx.size > max_peaks:
            idx = np.sort(idx[np.argsort(-pv[idx], kind="stable")[:max_peaks]])
        keep.append(idx)
    keep = np.concatenate(keep)
    new_start = np.zeros_like(start)
    new_start[1:] = np.cumsum(np.minimum(counts, max_peaks))
    return px[keep], py[keep], pv[keep], pj[keep], new_start


_skel_cache: dict = {}


def _skeleton_array(pose) -> np.ndarray:
    key = pose.skeleton
    arr = _skel_cache.get(key)
    if arr is None:
        arr = np.asarray(pose.skeleton, dtype=np.int64).reshape(-1, 2)
        _skel_cache[key] = arr
    return arr


_hops_cache: dict = {}


def _hops(pose) -> np.ndarray:
    """[J, J] number of limbs between two joints in the skeleton (-1: unlinked)."""
    key = (pose.num_joints, pose.skeleton)
    out = _hops_cache.get(key)
    if out is None:
        J = pose.num_joints
        adj = [[] for _ in range(J)]
        for a, b in pose.skeleton:
            adj[a].append(b)
            adj[b].append(a)
        out = np.full((J, J), -1, np.int64)
        for s in range(J):
            out[s, s] = 0
            frontier = [s]
            while frontier:
                nxt = []
                for u in frontier:
                    for v in adj[u]:
                        if out[s, v] < 0:
                            out[s, v] = out[s, u] + 1
                            nxt.append(v)
                frontier = nxt
        _hops_cache[key] = out
    return out

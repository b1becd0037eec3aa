"""Ground-truth heatmaps and Part Affinity Fields (the CMU convention).

Plain NumPy (no TensorFlow): the training pipeline calls it per sample, and
the decoder's tests and benchmarks render ground-truth maps with it.

Conventions, for an input of H x W pixels and a network of stride s: the
maps are h = ceil(H/s) by w = ceil(W/s) cells and cell i is centred on
input pixel ``i*s + (s-1)/2``, for heatmaps and PAFs alike (TAO mixes a
centre grid and a top-left grid: a bug).

- Heatmap of joint j: ``exp(-d^2 / (2 sigma^2))`` with d the distance in
  input pixels from the cell centre to the joint, the max over persons;
  values below ``exp(-HEATMAP_CUTOFF)`` (about 0.01) are 0 so that each peak
  has a finite support. The last channel is the background,
  ``clip(1 - max over joints, 0, 1)``.
- PAF of limb k (channels 2k, 2k+1: x then y): the unit vector from the
  limb's first joint to its second in every cell whose centre lies within
  ``paf_thresh * s`` pixels of the limb's line and whose projection on the
  limb falls between its two joints. Where limbs of several persons cover
  a cell, the vectors are averaged (TAO overwrites: a bug).

Joints with v == 0 are ignored. A labeled joint outside the input still
counts: the part of its gaussian and of its limbs that falls on the grid is
drawn, which is what the image shows near the border.

Speed: everything is vectorized over persons and joints/limbs at once on
small local windows (a heatmap peak touches at most ~7x7 cells at sigma 7,
stride 8), then scattered with one ``np.maximum.at`` (heatmaps) and three
``np.bincount`` calls (PAF sums and counts). No Python loop runs per
person, joint or cell.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from ..model.meta import STRIDE

# exp(-4.6) ~ 0.01: gaussian values below this are cut to 0.
HEATMAP_CUTOFF = 4.6


def grid_shape(image_hw, stride: int = STRIDE) -> Tuple[int, int]:
    """(h, w) of the label maps for an input of image_hw = (H, W) pixels."""
    H, W = int(image_hw[0]), int(image_hw[1])
    return -(-H // stride), -(-W // stride)


def cell_centres(n: int, stride: int = STRIDE) -> np.ndarray:
    """Input-pixel coordinate of the centre of each of n cells."""
    return np.arange(n, dtype=np.float32) * stride + (stride - 1) / 2.0


def render_heatmaps(joints: np.ndarray, num_joints: int, grid_hw, stride: int = STRIDE,
                    sigma: float = 7.0) -> np.ndarray:
    """[h, w, J+1] float32 heatmaps (background last) for joints [P, J, 3]."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    J = int(num_joints)
    # Channel-first while rendering: reductions over joints then run along
    # long contiguous rows (NumPy is slow over a short innermost axis).
    planes = np.zeros((J + 1, h * w), dtype=np.float32)
    joints = np.asarray(joints, dtype=np.float32).reshape(-1, J, 3)
    sel_p, sel_j = np.nonzero(joints[:, :, 2] > 0)
    if sel_p.size:
        x = joints[sel_p, sel_j, 0]
        y = joints[sel_p, sel_j, 1]
        inv2s2 = 1.0 / (2.0 * float(sigma) ** 2)
        radius = math.sqrt(HEATMAP_CUTOFF / inv2s2)  # pixels where the cut-off is reached
        half = (stride - 1) / 2.0
        k = int(math.floor(2 * radius / stride)) + 2  # cells a window can span per axis
        off = np.arange(k, dtype=np.int64)
        # First cell whose centre can be within `radius` of the joint.
        x0 = np.ceil((x - radius - half) / stride).astype(np.int64)
        y0 = np.ceil((y - radius - half) / stride).astype(np.int64)
        ix = x0[:, None] + off  # [N, k]
        iy = y0[:, None] + off
        ex = ((ix * stride + half) - x[:, None]) ** 2 * inv2s2
        ey = ((iy * stride + half) - y[:, None]) ** 2 * inv2s2
        # Cells off the grid get an exponent past the cut-off so they drop out.
        ex = np.where((ix >= 0) & (ix < w), ex, np.inf)
        ey = np.where((iy >= 0) & (iy < h), ey, np.inf)
        e = ey[:, :, None] + ex[:, None, :]  # [N, k, k]
        keep = e <= HEATMAP_CUTOFF
        n_idx, a_idx, b_idx = np.nonzero(keep)
        vals = np.exp(-e[keep]).astype(np.float32)
        flat = sel_j[n_idx] * (h * w) + iy[n_idx, a_idx] * w + ix[n_idx, b_idx]
        np.maximum.at(planes.reshape(-1), flat, vals)
        # Values are in [0, 1], so 1 - max needs no clipping.
        np.subtract(1.0, planes[:J].max(axis=0), out=planes[J])
    else:
        planes[J] = 1.0
    return np.ascontiguousarray(planes.reshape(J + 1, h, w).transpose(1, 2, 0))


def render_pafs(joints: np.ndarray, skeleton, grid_hw, stride: int = STRIDE,
                paf_thresh: float = 1.0) -> np.ndarray:
    """[h, w, 2E] float32 PAFs (x then y per limb) for joints [P, J, 3]."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    edges = np.asarray(skeleton, dtype=np.int64).reshape(-1, 2)
    E = edges.shape[0]
    paf = np.zeros((h, w, 2 * E), dtype=np.float32)
    joints = np.asarray(joints, dtype=np.float32)
    if joints.ndim != 3 or joints.shape[0] == 0 or E == 0:
        return paf
    a = joints[:, edges[:, 0]]  # [P, E, 3]
    b = joints[:, edges[:, 1]]
    d = b[..., :2] - a[..., :2]
    length = np.sqrt((d ** 2).sum(-1))
    # A limb whose two ends coincide has no direction: skip it.
    ok = (a[..., 2] > 0) & (b[..., 2] > 0) & (length > 1e-3)
    sel_p, sel_e = np.nonzero(ok)
    if not sel_p.size:
        return paf
    ax, ay = a[sel_p, sel_e, 0].astype(np.float64), a[sel_p, sel_e, 1].astype(np.float64)
    bx, by = b[sel_p, sel_e, 0].astype(np.float64), b[sel_p, sel_e, 1].astype(np.float64)
    L = length[sel_p, sel_e].astype(np.float64)
    ux, uy = (bx - ax) / L, (by - ay) / L
    thr = float(paf_thresh) * stride
    half = (stride - 1) / 2.0
    # Rows of cells the limb's band can touch (its box grown by the threshold).
    cy0 = np.clip(np.ceil((np.minimum(ay, by) - thr - half) / stride), 0, h).astype(np.int64)
    cy1 = np.clip(np.floor((np.maximum(ay, by) + thr - half) / stride) + 1, 0, h).astype(np.int64)
    nrows = np.maximum(cy1 - cy0, 0)
    total = int(nrows.sum())
    if total == 0:
        return paf
    # Ragged enumeration of every (limb, row) pair at once.
    limb = np.repeat(np.arange(nrows.size), nrows)
    local = np.arange(total, dtype=np.int64) - (np.cumsum(nrows) - nrows)[limb]
    gy = cy0[limb] + local
    py = gy * stride + half - ay[limb]  # row centre relative to the limb start
    rx, ry, rl = ux[limb], uy[limb], L[limb]
    # On a row, both conditions (0 <= along <= L, |across| <= thr) are linear
    # in the column offset px, so each is an interval of px: intersect them
    # and the cells are exactly the columns inside, no per-cell test needed.
    tol = 1e-6 * stride
    lo, hi = _interval(rx, -py * ry, rl, tol)  # along = px*ux + py*uy
    lo2, hi2 = _interval(ry, py * rx - thr, 2 * thr, tol)  # across = px*uy - py*ux
    lo, hi = np.maximum(lo, lo2), np.minimum(hi, hi2)
    ax_r = ax[limb] - half
    c0 = np.clip(np.ceil((lo + ax_r) / stride), 0, w).astype(np.int64)
    c1 = np.clip(np.floor((hi + ax_r) / stride) + 1, 0, w).astype(np.int64)
    ncols = np.maximum(c1 - c0, 0)
    total = int(ncols.sum())
    if total == 0:
        return paf
    row = np.repeat(np.arange(ncols.size), ncols)
    gx = c0[row] + (np.arange(total, dtype=np.int64) - (np.cumsum(ncols) - ncols)[row])
    gy = gy[row]
    limb = limb[row]
    # Channel-first bins (limb, cell), as for the heatmaps.
    flat = sel_e[limb] * (h * w) + gy * w + gx
    size = E * h * w
    # Averaging: each entry weighs 1/(entries in its bin), so the sums below
    # are already means, with no division over all the mostly empty bins.
    weight = 1.0 / np.bincount(flat, minlength=size)[flat]
    planes = np.empty((E, 2, h * w), dtype=np.float32)
    planes[:, 0] = np.bincount(flat, weights=ux[limb] * weight, minlength=size).reshape(E, h * w)
    planes[:, 1] = np.bincount(flat, weights=uy[limb] * weight, minlength=size).reshape(E, h * w)
    return np.ascontiguousarray(planes.reshape(2 * E, h, w).transpose(1, 2, 0))


def _interval(slope, offset, width, tol):
    """Per row, the interval of px with offset <= slope*px <= offset + width.

    The bounds are widened by tol so that cells lying exactly on the
    boundary stay inside despite rounding. Where slope is 0 the condition
    does not depend on px: all of the row or none of it.
    """
    offset = offset - tol
    width = np.broadcast_to(width + 2 * tol, offset.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = offset / slope
        q = (offset + width) / slope
    lo = np.minimum(p, q)
    hi = np.maximum(p, q)
    flat = slope == 0
    if flat.any():
        inside = (offset[flat] <= 0) & (offset[flat] + width[flat] >= 0)
        lo[flat] = np.where(inside, -np.inf, np.inf)
        hi[flat] = np.where(inside, np.inf, -np.inf)
    return lo, hi


def render_labels(joints, pose, image_hw, stride: int = STRIDE, sigma: float = 7.0,
                  paf_thresh: float = 1.0):
    """Heatmaps [h, w, J+1] and PAFs [h, w, 2E] (float32) for one sample.

    joints: [P, J, 3] (x, y, v) in input-image pixels, v == 0 ignored;
    pose: a PoseConfig (its joint count and skeleton give the channels);
    image_hw: the input size (H, W) in pixels.
    """
    J = pose.num_joints
    joints = np.asarray(joints, dtype=np.float32)
    if joints.size == 0:
        joints = np.zeros((0, J, 3), dtype=np.float32)
    if joints.ndim == 2:
        joints = joints[None]
    if joints.ndim != 3 or joints.shape[1:] != (J, 3):
        raise ValueError(f"joints must be [P, {J}, 3] for pose config {pose.name!r}, "
                         f"got shape {tuple(joints.shape)}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    grid = grid_shape(image_hw, stride)
    heat = render_heatmaps(joints, J, grid, stride, sigma)
    paf = render_pafs(joints, pose.skeleton, grid, stride, paf_thresh)
    return heat, paf

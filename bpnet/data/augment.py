"""Spatial augmentation: one affine transform for image, mask and keypoints.

Plain NumPy + OpenCV (no TensorFlow), called per sample by the tf.data
pipeline. Coordinates follow the label grid's convention: integer
coordinates are pixel centres (cell i of stride s is centred on pixel
``i*s + (s-1)/2``), which is also OpenCV's convention for ``warpAffine``, so
a keypoint moved by the 2x3 matrix lands exactly where its pixel went.

The transform maps source pixels to input pixels as

    M = Flip_out . T(out_centre + translation) . R(angle) . S(scale * zoom) . T(-src_centre)

with, per ``spatial_augmentation_mode``:

- ``person_centric``: src_centre is the main person's centre (the record's
  first person) and the scale makes that person's height (its bbox height,
  the record's ``scales``) ``target_person_scale`` of the input height;
- ``standard``: the whole image is stretched to the input size (x and y
  scales differ), centred;
- ``standard_with_fixed_aspect_ratio``: the whole image is scaled by one
  factor to fit the input, centred (the rest is filled).

Then zoom (with probability ``zoom_prob``, uniform in [zoom_ratio_min,
zoom_ratio_max]), rotation (uniform in [rotate_deg_min, rotate_deg_max],
about the centre), translation (uniform in pixels of the input, or as a
fraction of the input size with ``use_translate_ratio``), and the flips,
which mirror the finished input about its centre. Any mirror (left-right
or top-bottom) changes the handedness of the body, so each one swaps the
left/right joints (``PoseConfig.flip_permutation``); both together are a
180 degree turn and swap nothing. The PAFs follow, since they are rendered
from the transformed joints.

Pixels filled from outside the source image are grey (128) in the image
and VALID (255) in the mask: there is nothing there the loss must ignore.
Keypoints moved outside the input stay in the array with their
visibility; the label renderer draws only what falls on the grid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import cv2
import numpy as np

from ..model.meta import STRIDE

MODES = ("person_centric", "standard", "standard_with_fixed_aspect_ratio")
FILL_VALUE = 128  # grey: normalizes to ~0 with TAO's x/256 - 0.5
MASK_VALID = 255


@dataclasses.dataclass
class Transform:
    """A sampled spatial transform: matrix source -> input pixels, and the flips."""
    matrix: np.ndarray  # [2, 3] float64
    out_hw: Tuple[int, int]
    flip_lr: bool = False
    flip_tb: bool = False

    @property
    def swaps_sides(self) -> bool:
        return self.flip_lr != self.flip_tb

    @property
    def scale(self) -> float:
        """Largest linear scale factor of the matrix (for choosing a decode size)."""
        a = self.matrix[:, :2]
        return float(max(np.hypot(*a[:, 0]), np.hypot(*a[:, 1])))


def _affine(a: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    out[:2] = a
    return out


def _translate(tx, ty) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _centre(n: int) -> float:
    return (n - 1) / 2.0


def sample_transform(rng: Optional[np.random.Generator], src_hw, out_hw, mode: str, params,
                     center=None, person_scale: Optional[float] = None) -> Transform:
    """Draw one transform.

    rng None gives the deterministic base transform (no random part: the
    validation transform in the chosen mode). params is a
    ``specs.SpatialAugParams``. center/person_scale are the main person's
    centre (x, y) and height in source pixels, for person_centric.
    """
    if mode not in MODES:
        raise ValueError(f"unknown spatial_augmentation_mode {mode!r}; use one of {MODES}")
    H0, W0 = int(src_hw[0]), int(src_hw[1])
    H, W = int(out_hw[0]), int(out_hw[1])
    fit = min(W / W0, H / H0)
    sx = sy = fit
    cx, cy = _centre(W0), _centre(H0)
    if mode == "person_centric":
        if center is not None and person_scale is not None and person_scale > 0:
            sx = sy = params.target_person_scale * H / float(person_scale)
            cx, cy = float(center[0]), float(center[1])
        # A record without a usable main person is shown whole, as in
        # standard_with_fixed_aspect_ratio.
    elif mode == "standard":
        sx, sy = W / W0, H / H0
    zoom, angle, tx, ty, flip_lr, flip_tb = 1.0, 0.0, 0.0, 0.0, False, False
    if rng is not None:
        p = params
        # Draw every variable every time, so that one setting does not shift
        # the random stream of the others (reproducible across spec edits).
        u = rng.random(4)
        z = rng.uniform(p.zoom_ratio_min, p.zoom_ratio_max)
        ang = rng.uniform(p.rotate_deg_min, p.rotate_deg_max)
        if p.use_translate_ratio:
            t = rng.uniform(p.translate_ratio_min, p.translate_ratio_max, 2) * (W, H)
        else:
            t = np.array([rng.uniform(p.translate_min_x, p.translate_max_x),
                          rng.uniform(p.translate_min_y, p.translate_max_y)])
        zoom = z if u[0] < p.zoom_prob else 1.0
        angle = ang
        tx, ty = float(t[0]), float(t[1])
        flip_lr = bool(u[1] < p.flip_lr_prob)
        flip_tb = bool(u[2] < p.flip_tb_prob)
    rad = math.radians(angle)
    c, s = math.cos(rad), math.sin(rad)
    # Positive angles turn the picture counter-clockwise as seen on screen (y down).
    rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    scale = np.diag([sx * zoom, sy * zoom, 1.0])
    m = _translate(_centre(W) + tx, _centre(H) + ty) @ rot @ scale @ _translate(-cx, -cy)
    flip = np.eye(3)
    if flip_lr:
        flip[0] = (-1.0, 0.0, W - 1.0)
    if flip_tb:
        flip[1] = (0.0, -1.0, H - 1.0)
    m = flip @ m
    return Transform(matrix=m[:2].copy(), out_hw=(H, W), flip_lr=flip_lr, flip_tb=flip_tb)


def transform_joints(joints: np.ndarray, t: Transform, pose=None) -> np.ndarray:
    """Move [P, J, 3] joints by the transform; a mirror also swaps left/right."""
    joints = np.asarray(joints, dtype=np.float32)
    out = joints.copy()
    if joints.size:
        xy = joints[..., :2].astype(np.float64)
        m = t.matrix
        out[..., 0] = xy[..., 0] * m[0, 0] + xy[..., 1] * m[0, 1] + m[0, 2]
        out[..., 1] = xy[..., 0] * m[1, 0] + xy[..., 1] * m[1, 1] + m[1, 2]
        out[joints[..., 2] <= 0] = 0
        if t.swaps_sides and pose is not None:
            out = out[:, pose.flip_permutation()]
    return out


def transform_points(points: np.ndarray, t: Transform) -> np.ndarray:
    """Move [..., 2] points (e.g. person centres) by the transform."""
    p = np.asarray(points, dtype=np.float64)
    m = t.matrix
    return np.stack([p[..., 0] * m[0, 0] + p[..., 1] * m[0, 1] + m[0, 2],
                     p[..., 0] * m[1, 0] + p[..., 1] * m[1, 1] + m[1, 2]], -1).astype(np.float32)


def reduced_matrix(t: Transform, factor: int) -> np.ndarray:
    """The transform's matrix for a source decoded at 1/factor of its size.

    Pixel x of the full image is pixel (x + 0.5)/factor - 0.5 of the reduced one.
    """
    up = np.array([[factor, 0.0, (factor - 1) / 2.0], [0.0, factor, (factor - 1) / 2.0], [0, 0, 1.0]])
    return (_affine(t.matrix) @ up)[:2]


def warp_image(image: np.ndarray, t: Transform, matrix: Optional[np.ndarray] = None) -> np.ndarray:
    """Warp an HxWxC (or HxW) uint8 image to the input size; outside is grey."""
    H, W = t.out_hw
    m = t.matrix if matrix is None else matrix
    fill = (FILL_VALUE,) * (image.shape[2] if image.ndim == 3 else 1)
    return cv2.warpAffine(image, m, (W, H), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


# Mask samples per label cell and axis: the mask is warped straight to a grid
# this much finer than the label grid, then averaged per cell.
MASK_SUBSAMPLES = 4


def warp_mask_to_grid(mask: Optional[np.ndarray], t: Transform, stride: int = STRIDE) -> np.ndarray:
    """Warp a 0/255 mask and average it over each label cell: float32 [h, w].

    Each cell's value is the mean of MASK_SUBSAMPLES^2 bilinear samples
    spread evenly over its stride x stride block of input pixels, so a cell
    is 255 only if its whole block counts and 0 only if none of it does.
    Outside the source image counts as valid. (Warping at the full input
    size first would cost (stride/MASK_SUBSAMPLES)^2 = 4x more, for the same
    cells up to a fraction of a pixel at region edges.)
    """
    H, W = t.out_hw
    h, w = -(-H // stride), -(-W // stride)
    if mask is None:
        return np.full((h, w), float(MASK_VALID), np.float32)
    k = min(MASK_SUBSAMPLES, stride)
    step = stride / k
    # Input pixel x -> sub-sample index u: sub-sample u sits at input pixel (u + 0.5)*step - 0.5.
    to_sub = np.array([[1 / step, 0.0, 0.5 / step - 0.5], [0.0, 1 / step, 0.5 / step - 0.5], [0, 0, 1.0]])
    m = (to_sub @ _affine(t.matrix))[:2]
    fine = cv2.warpAffine(mask, m, (w * k, h * k), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=MASK_VALID)
    # INTER_AREA at an exact integer factor is the block mean, computed in float.
    return cv2.resize(fine.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)


def augment(image: np.ndarray, mask: Optional[np.ndarray], joints: np.ndarray, centers: np.ndarray,
            scales: np.ndarray, out_hw, mode: str, params, pose, rng: Optional[np.random.Generator],
            stride: int = STRIDE):
    """Augment one sample in memory.

    Returns (image [H, W, C] uint8, mask [h, w] float32 0..255 per label
    cell, joints [P, J, 3] moved (left/right swapped on a mirror), the
    Transform). rng None: no random part (validation).
    """
    centers = np.asarray(centers, np.float32).reshape(-1, 2)
    scales = np.asarray(scales, np.float32).reshape(-1)
    t = sample_transform(rng, image.shape[:2], out_hw, mode, params,
                         centers[0] if len(centers) else None, scales[0] if len(scales) else None)
    return warp_image(image, t), warp_mask_to_grid(mask, t, stride), transform_joints(joints, t, pose), t

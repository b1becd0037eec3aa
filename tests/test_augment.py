"""Spatial augmentation: image, mask and keypoints move together."""

import numpy as np
import pytest

from bpnet.data.augment import MODES, augment, sample_transform, transform_joints, warp_image
from bpnet.data.labels import render_labels
from bpnet.pose import load_pose_config
from bpnet.specs import SpatialAugParams, default_pose_config_path

POSE = load_pose_config(default_pose_config_path())
J = POSE.num_joints


def _colour(j):
    """A distinct saturated BGR colour per joint index."""
    rng = np.random.default_rng(100 + j)
    c = rng.integers(0, 256, 3)
    c[j % 3] = 255
    c[(j + 1) % 3] = 40 + 10 * (j // 3)
    return c.astype(np.uint8)


def _marked_image(h=240, w=320, seed=0):
    """Dark image with a 7x7 coloured square centred on each joint of two people."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 20, np.uint8)
    joints = np.zeros((2, J, 3), np.float32)
    taken = []
    for p in range(2):
        for j in range(J):
            while True:  # keep marks apart so that each one is clearly its own
                x, y = rng.integers(30, w - 30), rng.integers(30, h - 30)
                if all(abs(x - a) > 14 or abs(y - b) > 14 for a, b in taken):
                    break
            taken.append((x, y))
            if p == 1 and j % 2:
                continue  # unlabeled and undrawn joints stay at v = 0
            joints[p, j] = (x, y, 2)
            img[y - 3:y + 4, x - 3:x + 4] = _colour(j)
    return img, joints


def _params(**kw):
    base = dict(flip_lr_prob=0.5, flip_tb_prob=0.3, rotate_deg_max=40.0, zoom_prob=0.5,
                zoom_ratio_min=0.8, zoom_ratio_max=1.3, translate_max_x=20.0, translate_max_y=20.0,
                target_person_scale=0.6)
    base.update(kw)
    return SpatialAugParams(**base)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_ratio", [False, True])
def test_marks_follow_the_keypoints(mode, use_ratio):
    img, joints = _marked_image()
    centers = np.array([[160.0, 120.0], [100.0, 100.0]], np.float32)
    scales = np.array([200.0, 150.0], np.float32)
    params = _params(use_translate_ratio=use_ratio, translate_ratio_max=0.1, translate_ratio_min=-0.1)
    checked = flips = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        out, mask, moved, t = augment(img, None, joints, centers, scales, (256, 192), mode, params, POSE, rng)
        assert out.shape == (256, 192, 3) and mask.shape == (32, 24) and (mask == 255).all()
        perm = POSE.flip_permutation() if t.swaps_sides else np.arange(J)
        flips += t.swaps_sides
        for p in range(2):
            for j in range(J):
                x, y, v = moved[p, j]
                if v == 0:
                    assert joints[p, perm[j], 2] == 0
                    continue
                xi, yi = int(round(x)), int(round(y))
                if not (3 <= xi < 192 - 3 and 3 <= yi < 256 - 3):
                    continue
                # The mark's pixel under the moved keypoint has the colour of
                # the joint that moved there (left and right swap on mirrors).
                got = out[yi, xi].astype(int)
                want = _colour(perm[j]).astype(int)
                assert np.abs(got - want).max() <= 12, (mode, seed, p, j, got, want)
                checked += 1
    assert checked > 100 and flips > 0


def test_person_centric_scales_and_centres_the_main_person():
    img, joints = _marked_image()
    params = SpatialAugParams(target_person_scale=0.5)
    center, height = np.array([[150.0, 110.0]]), np.array([80.0])
    t = sample_transform(None, img.shape[:2], (368, 368), "person_centric", params, center[0], height[0])
    c = transform_joints(np.array([[[150.0, 110.0, 2], [150.0, 190.0, 2]]]), t)[0]
    np.testing.assert_allclose(c[0, :2], [183.5, 183.5], atol=1e-4)  # centre of the input
    assert c[1, 1] - c[0, 1] == pytest.approx(0.5 * 368, rel=1e-6)  # 80 px person -> half the height


def test_standard_modes_map_the_image_corners():
    params = SpatialAugParams()
    corners = np.array([[[-0.5, -0.5, 2], [639.5, 479.5, 2]]], np.float32)
    t = sample_transform(None, (480, 640), (368, 368), "standard", params)
    np.testing.assert_allclose(transform_joints(corners, t)[0, :, :2], [[-0.5, -0.5], [367.5, 367.5]], atol=1e-4)
    t = sample_transform(None, (480, 640), (368, 368), "standard_with_fixed_aspect_ratio", params)
    # One scale (368/640) for both axes; the image's 276 rows sit centred.
    np.testing.assert_allclose(transform_joints(corners, t)[0, :, :2], [[-0.5, 45.5], [367.5, 321.5]], atol=1e-4)


def test_flipping_twice_is_the_identity():
    img, joints = _marked_image()
    mask = np.full(img.shape[:2], 255, np.uint8)
    mask[50:90, 60:200] = 0
    for kw in (dict(flip_lr_prob=1.0), dict(flip_tb_prob=1.0), dict(flip_lr_prob=1.0, flip_tb_prob=1.0)):
        params = SpatialAugParams(**kw)
        rng = np.random.default_rng(0)
        a_img, a_mask, a_j, t = augment(img, mask, joints, [[0, 0]], [0], img.shape[:2], "standard", params, POSE, rng)
        assert not np.array_equal(a_img, img)
        assert t.swaps_sides == (len(kw) == 1)
        b_img, _, b_j, _ = augment(a_img, None, a_j, [[0, 0]], [0], img.shape[:2], "standard", params, POSE, rng)
        np.testing.assert_array_equal(b_img, img)
        np.testing.assert_allclose(b_j, joints, atol=1e-4)
        # Labels of the flipped sample are the mirrored labels of the original.
        heat, paf = render_labels(joints, POSE, img.shape[:2])
        fheat, fpaf = render_labels(a_j, POSE, img.shape[:2])
        if kw.get("flip_lr_prob") and not kw.get("flip_tb_prob"):
            perm = POSE.flip_permutation()
            np.testing.assert_allclose(fheat[:, ::-1, :-1], heat[..., perm], atol=1e-5)
            eperm, rev = POSE.edge_flip()
            for k in range(POSE.num_edges):
                sign = -1.0 if rev[k] else 1.0
                src = paf[..., 2 * eperm[k]:2 * eperm[k] + 2] * sign
                np.testing.assert_allclose(fpaf[:, ::-1, 2 * k], -src[..., 0], atol=1e-5)
                np.testing.assert_allclose(fpaf[:, ::-1, 2 * k + 1], src[..., 1], atol=1e-5)


def test_same_seed_same_output_and_different_seed_differs():
    img, joints = _marked_image()
    args = (img, None, joints, [[160, 120]], [200], (184, 184), "person_centric", _params(), POSE)
    a = augment(*args, np.random.default_rng(7))
    b = augment(*args, np.random.default_rng(7))
    c = augment(*args, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2], b[2])
    assert not np.array_equal(a[0], c[0])


def _erode(b):
    p = np.pad(b, 1, constant_values=True)
    out = b.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out &= p[1 + dy:1 + dy + b.shape[0], 1 + dx:1 + dx + b.shape[1]]
    return out


@pytest.mark.parametrize("mode", MODES)
def test_mask_zero_where_masked_one_elsewhere_border_valid(mode):
    h, w = 240, 320
    img = np.full((h, w, 3), 90, np.uint8)
    mask = np.full((h, w), 255, np.uint8)
    mask[80:160, 96:224] = 0  # a masked crowd region
    params = _params(flip_lr_prob=0.5, rotate_deg_max=30.0, zoom_ratio_min=0.5, zoom_ratio_max=0.7, zoom_prob=1.0)
    for seed in range(6):
        # Mark the masked region in the image's red channel to find it after warping.
        marked = img.copy()
        marked[80:160, 96:224, 2] = 250
        out, m, _, t = augment(marked, mask, np.zeros((1, J, 3)), [[160, 120]], [100], (256, 256), mode,
                               params, POSE, np.random.default_rng(seed))
        assert m.shape == (32, 32) and m.dtype == np.float32
        assert m.min() == 0 and m.max() == 255
        red = out[..., 2].astype(int)
        blocks = red.reshape(32, 8, 32, 8)
        # Cells well inside the masked region / well outside it (one cell of
        # margin: interpolation blurs the edge by a pixel in both maps).
        inside = _erode((blocks >= 245).all(axis=(1, 3)))
        outside = _erode((blocks <= 135).all(axis=(1, 3)))
        assert inside.any() and outside.any()
        np.testing.assert_array_equal(m[inside], 0)
        np.testing.assert_array_equal(m[outside], 255)
        # The filled border (grey, outside the source image) counts as valid.
        src_x = np.linalg.inv(np.vstack([t.matrix, [0, 0, 1]]))
        ys, xs = np.mgrid[0:32, 0:32] * 8 + 3.5
        sx = src_x[0, 0] * xs + src_x[0, 1] * ys + src_x[0, 2]
        sy = src_x[1, 0] * xs + src_x[1, 1] * ys + src_x[1, 2]
        off = (sx < -20) | (sx > w + 20) | (sy < -20) | (sy > h + 20)
        assert off.any()
        np.testing.assert_array_equal(m[off], 255)


def test_no_mask_is_all_valid_and_image_fill_is_grey():
    img = np.zeros((100, 100, 3), np.uint8)
    out, m, _, _ = augment(img, None, np.zeros((0, J, 3)), np.zeros((0, 2)), np.zeros(0), (200, 120),
                           "standard_with_fixed_aspect_ratio", SpatialAugParams(), POSE, None)
    assert (m == 255).all() and m.shape == (25, 15)
    assert (out[0, 0] == 128).all() and (out[100, 60] == 0).all()


def test_warp_image_keeps_grayscale():
    t = sample_transform(None, (50, 60), (40, 40), "standard", SpatialAugParams())
    assert warp_image(np.zeros((50, 60), np.uint8), t).shape == (40, 40)

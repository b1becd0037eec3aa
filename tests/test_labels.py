"""Label rendering: round trips on real COCO annotations and exact geometry."""

import json
import math

import numpy as np
import pytest

from bpnet.data.labels import HEATMAP_CUTOFF, grid_shape, render_labels
from bpnet.pose import load_pose_config, pose_config_from_dict
from bpnet.specs import default_pose_config_path

from conftest import COCO_VAL_ANN, need

POSE = load_pose_config(default_pose_config_path())


@pytest.fixture(scope="module")
def coco_people():
    """Per image of the real annotation file: (H, W, model joints [P, 18, 3])."""
    data = json.loads(need(COCO_VAL_ANN).read_text())
    names = data["categories"][0]["keypoints"]
    mapping = POSE.dataset_mapping(names)
    by_image = {}
    for a in data["annotations"]:
        if a.get("iscrowd") or a.get("num_keypoints", 0) == 0:
            continue
        by_image.setdefault(a["image_id"], []).append(np.asarray(a["keypoints"], np.float32).reshape(-1, 3))
    out = []
    for im in data["images"]:
        if im["id"] in by_image:
            out.append((im["height"], im["width"], mapping.dataset_to_model(np.stack(by_image[im["id"]]))))
    assert len(out) > 100
    return out


def _local_maxima(m, floor):
    """(row, col) of cells >= every 8-neighbour and > floor."""
    p = np.pad(m, 1, constant_values=-1)
    h, w = m.shape
    is_max = m > floor
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                is_max &= m >= p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    return np.argwhere(is_max)


def _brute_heatmaps(joints, J, grid, stride, sigma):
    h, w = grid
    cy = np.arange(h) * stride + (stride - 1) / 2
    cx = np.arange(w) * stride + (stride - 1) / 2
    out = np.zeros((h, w, J))
    for person in joints:
        for j, (x, y, v) in enumerate(person):
            if v <= 0:
                continue
            e = ((cx[None, :] - x) ** 2 + (cy[:, None] - y) ** 2) / (2 * sigma ** 2)
            g = np.where(e <= HEATMAP_CUTOFF, np.exp(-e), 0.0)
            out[..., j] = np.maximum(out[..., j], g)
    return out


def _brute_pafs(joints, skeleton, grid, stride, thresh):
    """Reference PAFs by testing every cell against every limb, plus a mask of
    cells that lie within 1e-3 px of some limb's boundary (rounding may go
    either way there)."""
    h, w = grid
    cy, cx = np.meshgrid(np.arange(h) * stride + (stride - 1) / 2,
                         np.arange(w) * stride + (stride - 1) / 2, indexing="ij")
    E = len(skeleton)
    sums = np.zeros((h, w, E, 2))
    count = np.zeros((h, w, E))
    fuzzy = np.zeros((h, w, E), bool)
    thr = thresh * stride
    for person in joints:
        for k, (a, b) in enumerate(skeleton):
            A, B = person[a], person[b]
            if A[2] <= 0 or B[2] <= 0:
                continue
            d = B[:2].astype(np.float64) - A[:2]
            L = math.hypot(*d)
            if L <= 1e-3:
                continue
            u = d / L
            px, py = cx - A[0], cy - A[1]
            along = px * u[0] + py * u[1]
            across = np.abs(px * u[1] - py * u[0])
            on = (along >= 0) & (along <= L) & (across <= thr)
            sums[on, k] += u
            count[on, k] += 1
            eps = 1e-3
            fuzzy[..., k] |= (np.abs(along) < eps) | (np.abs(along - L) < eps) | (np.abs(across - thr) < eps)
    paf = np.zeros((h, w, 2 * E))
    nz = count > 0
    for c in range(2):
        ch = np.zeros((h, w, E))
        ch[nz] = sums[..., c][nz] / count[nz]
        paf[..., c::2] = ch
    return paf, np.repeat(fuzzy, 2, axis=2)


def test_heatmap_peaks_sit_on_every_real_joint(coco_people):
    stride = 8
    checked = 0
    for H, W, joints in coco_people:
        heat, _ = render_labels(joints, POSE, (H, W), stride=stride)
        assert heat.shape == (math.ceil(H / 8), math.ceil(W / 8), POSE.num_joints + 1)
        for j in range(POSE.num_joints):
            peaks = _local_maxima(heat[..., j], 0.5)
            centres = peaks[:, ::-1] * stride + (stride - 1) / 2  # (x, y)
            labeled = joints[joints[:, j, 2] > 0, j, :2]
            for x, y in labeled:
                others = labeled[np.hypot(*(labeled - (x, y)).T) > 0]
                # Two same joints closer than ~2 cells merge into one peak: by design.
                if len(others) and np.hypot(*(others - (x, y)).T).min() < 2 * stride:
                    continue
                dist = np.abs(centres - (x, y)).max(axis=1)
                assert dist.min() <= stride / 2 + 1e-4, (H, W, j, x, y)
                checked += 1
            # No peak without a joint: every strong maximum is near a labeled joint.
            for cx_, cy_ in centres:
                assert len(labeled) and np.abs(labeled - (cx_, cy_)).max(axis=1).min() <= stride, (j, cx_, cy_)
    assert checked > 3000


def test_maps_equal_brute_force_reference(coco_people):
    for H, W, joints in coco_people[:40]:
        for stride, sigma, thresh in ((8, 7.0, 1.0), (4, 3.0, 1.5)):
            grid = grid_shape((H, W), stride)
            heat, paf = render_labels(joints, POSE, (H, W), stride=stride, sigma=sigma, paf_thresh=thresh)
            ref_heat = _brute_heatmaps(joints, POSE.num_joints, grid, stride, sigma)
            np.testing.assert_allclose(heat[..., :-1], ref_heat, atol=1e-5)
            np.testing.assert_allclose(heat[..., -1], np.clip(1 - ref_heat.max(-1), 0, 1), atol=1e-5)
            ref_paf, fuzzy = _brute_pafs(joints, POSE.skeleton, grid, stride, thresh)
            np.testing.assert_allclose(paf[~fuzzy], ref_paf[~fuzzy], atol=1e-5)


def test_every_paf_cell_on_a_limb_points_along_it(coco_people):
    stride, thr = 8, 8.0
    checked = 0
    for H, W, joints in coco_people[:120]:
        _, paf = render_labels(joints, POSE, (H, W), stride=stride)
        h, w = paf.shape[:2]
        cy, cx = np.meshgrid(np.arange(h) * 8 + 3.5, np.arange(w) * 8 + 3.5, indexing="ij")
        for k, (a, b) in enumerate(POSE.skeleton):
            vec = paf[..., 2 * k:2 * k + 2]
            covered = np.zeros((h, w), int)
            cells = []
            for person in joints:
                A, B = person[a], person[b]
                if A[2] <= 0 or B[2] <= 0 or np.hypot(*(B[:2] - A[:2])) < 1:
                    continue
                u = (B[:2] - A[:2]) / np.hypot(*(B[:2] - A[:2]))
                px, py = cx - A[0], cy - A[1]
                along = px * u[0] + py * u[1]
                across = np.abs(px * u[1] - py * u[0])
                L = np.hypot(*(B[:2] - A[:2]))
                # Cells within 1e-3 px of the boundary may fall either way.
                inner = (along >= 1e-3) & (along <= L - 1e-3) & (across <= thr - 1e-3)
                outer = (along >= -1e-3) & (along <= L + 1e-3) & (across <= thr + 1e-3)
                covered += outer
                cells.append((inner, u))
            for inner, u in cells:
                alone = inner & (covered == 1)  # cells shared by limbs hold an average
                if alone.any():
                    np.testing.assert_allclose(vec[alone], np.broadcast_to(u, vec[alone].shape), atol=1e-5)
                    checked += int(alone.sum())
            assert not vec[covered == 0].any()
    assert checked > 10000


def test_overlapping_limbs_are_averaged_not_overwritten():
    pose = pose_config_from_dict({"name": "stick", "keypoints": ["top", "bottom"], "skeleton": [[1, 2]]})
    # Two limbs crossing at the centre of cell (5, 5) = pixel (43.5, 43.5).
    joints = np.array([[[11.5, 43.5, 2], [75.5, 43.5, 2]],   # pointing +x
                       [[43.5, 11.5, 2], [43.5, 75.5, 2]]],  # pointing +y
                      np.float32)
    heat, paf = render_labels(joints, pose, (96, 96), stride=8, paf_thresh=1.0)
    np.testing.assert_allclose(paf[5, 5], [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(paf[5, 2], [1.0, 0.0], atol=1e-6)  # horizontal limb only
    np.testing.assert_allclose(paf[2, 5], [0.0, 1.0], atol=1e-6)
    # Same limb, opposite directions, both covering a cell: they cancel.
    anti = np.array([[[11.5, 43.5, 2], [75.5, 43.5, 2]], [[75.5, 43.5, 2], [11.5, 43.5, 2]]], np.float32)
    _, paf2 = render_labels(anti, pose, (96, 96))
    assert not paf2.any()
    _, single = render_labels(anti[:1], pose, (96, 96))
    assert single[..., 0].sum() > 10


def test_heatmap_values_background_and_invisible_joints():
    joints = np.zeros((2, POSE.num_joints, 3), np.float32)
    joints[0, 0] = (43.5, 27.5, 2)  # exactly on the centre of cell (3, 5)
    joints[1, 0] = (200, 100, 0)  # not labeled: ignored
    heat, paf = render_labels(joints, POSE, (128, 256))
    assert heat.shape == (16, 32, 19) and paf.shape == (16, 32, 38)
    assert heat[3, 5, 0] == pytest.approx(1.0)
    assert heat[3, 6, 0] == pytest.approx(math.exp(-64 / 98), rel=1e-6)
    assert heat[3, 5, -1] == pytest.approx(0.0, abs=1e-6)
    assert heat[..., 1:-1].max() == 0 and not paf.any()
    assert np.count_nonzero(heat[..., 0]) == np.count_nonzero(heat[..., -1] < 1)
    assert heat[..., 0][heat[..., 0] > 0].min() >= math.exp(-HEATMAP_CUTOFF) - 1e-7
    assert heat[12, 25, 0] == 0 and heat[12, 25, -1] == 1


@pytest.mark.parametrize("hw,stride,grid", [((368, 368), 8, (46, 46)), ((256, 320), 8, (32, 40)),
                                            ((100, 130), 4, (25, 33)), ((97, 61), 16, (7, 4)),
                                            ((288, 384), 8, (36, 48))])
def test_shapes_for_sizes_and_strides(hw, stride, grid):
    rng = np.random.default_rng(1)
    joints = np.concatenate([rng.uniform(0, min(hw), (3, 18, 2)), np.full((3, 18, 1), 2)], -1)
    heat, paf = render_labels(joints, POSE, hw, stride=stride)
    assert heat.shape == grid + (19,) and paf.shape == grid + (38,)
    assert heat.dtype == np.float32 and paf.dtype == np.float32
    assert 0 <= heat.min() and heat.max() <= 1 and np.abs(paf).max() <= 1 + 1e-6


def test_custom_five_joint_pose_config():
    pose = pose_config_from_dict({
        "name": "five", "keypoints": ["head", "left_hand", "right_hand", "left_foot", "right_foot"],
        "skeleton": [[1, 2], [1, 3], [1, 4], [1, 5]]})
    joints = np.array([[[50, 20, 2], [20, 50, 2], [80, 50, 2], [40, 90, 1], [60, 90, 2]]], np.float32)
    heat, paf = render_labels(joints, pose, (112, 104))
    assert heat.shape == (14, 13, 6) and paf.shape == (14, 13, 8)
    for k in range(4):
        assert np.abs(paf[..., 2 * k:2 * k + 2]).sum() > 0
    # An integer joint is at most 3.5 px per axis from its nearest cell centre.
    assert all(heat[..., j].max() >= math.exp(-2 * 3.5 ** 2 / 98) - 1e-6 for j in range(5))


def test_empty_and_bad_inputs():
    heat, paf = render_labels(np.zeros((0, 18, 3)), POSE, (64, 64))
    assert (heat[..., -1] == 1).all() and heat[..., :-1].max() == 0 and not paf.any()
    with pytest.raises(ValueError, match=r"\[P, 18, 3\]"):
        render_labels(np.zeros((2, 17, 3)), POSE, (64, 64))


def test_joints_outside_the_input_draw_only_what_falls_inside():
    joints = np.zeros((1, 18, 3), np.float32)
    joints[0, 1] = (-10, 30, 2)   # neck just left of the image
    joints[0, 8] = (40, 30, 2)    # right hip inside: limb neck-hip crosses the border
    heat, paf = render_labels(joints, POSE, (64, 64))
    assert 0 < heat[..., 1].max() < 1  # only the gaussian's tail
    assert paf[3, 0, 0] == pytest.approx(1.0) and paf[3, 4, 0] == pytest.approx(1.0)

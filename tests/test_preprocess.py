"""Preprocessing: image reading, the three geometry modes and their exact inverse,
multi-scale map alignment and flip-test un-mirroring (plain NumPy/OpenCV, no TF)."""

import json
import sys

import cv2
import numpy as np
import pytest

from bpnet.data.labels import render_labels
from bpnet.errors import BpnetError
from bpnet.infer.decode import decode
from bpnet.infer.preprocess import (PAD_VALUE, ImageReadError, Normalization, apply_geometry,
                                    plan_geometry, read_image, to_bgr8, unflip_maps, warp_maps)
from bpnet.pose import load_pose_config
from bpnet.specs import default_pose_config_path
from conftest import COCO_VAL_ANN, SHARED_IMAGES, need

POSE = load_pose_config(default_pose_config_path())
MODES = [None, "adjust_network_input", "pad_image_input"]


def _blob_image(hw, pt, sigma):
    yy, xx = np.mgrid[:hw[0], :hw[1]]
    blob = np.exp(-((xx - pt[0]) ** 2 + (yy - pt[1]) ** 2) / (2 * sigma ** 2))
    return (blob[..., None] * 255).repeat(3, 2).astype(np.uint8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (100, 1000), (37, 53)])
@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_transform_follows_the_pixels_exactly(mode, hw, scale):
    """A bright blob drawn at a known point lands where the transform says."""
    geo = plan_geometry(hw, [288, 384], mode, 8, scale)
    assert geo.net_hw[0] % 8 == 0 and geo.net_hw[1] % 8 == 0
    pt = np.array([hw[1] * 0.3, hw[0] * 0.6])
    net = apply_geometry(_blob_image(hw, pt, min(hw) / 10), geo)
    assert net.shape[:2] == geo.net_hw
    x = net[..., 0].astype(np.float64)
    w = np.where(x > 200, x - 200, 0)  # above the padding grey
    ys, xs = np.mgrid[:x.shape[0], :x.shape[1]]
    centroid = np.array([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])
    expected = geo.transform.to_input(pt)
    assert np.abs(centroid - expected).max() < 0.2
    back = geo.transform.to_original(expected)
    assert np.allclose(back, pt)


def test_modes_keep_or_change_the_aspect_ratio_as_documented():
    hw = (300, 600)  # 2:1
    none = plan_geometry(hw, [368, 368], None)
    assert none.net_hw == (368, 368)
    adj = plan_geometry(hw, [368, 368], "adjust_network_input")
    assert adj.net_hw == (368, 736)
    assert adj.transform.ax == pytest.approx(adj.transform.ay)
    pad = plan_geometry(hw, [288, 384], "pad_image_input")
    assert pad.net_hw == (288, 384)
    top, bottom, left, right = pad.pad
    assert left == right == 0 and abs(top - bottom) <= 1 and top + bottom == 150  # 600/(4/3) - 300
    assert pad.transform.ax == pytest.approx(pad.transform.ay)
    # Padding is the grey that normalizes to 0 with TAO's defaults.
    net = apply_geometry(np.zeros(hw + (3,), np.uint8), pad)
    assert (net[:10] == PAD_VALUE).all() and (net[-10:] == PAD_VALUE).all()
    assert Normalization().apply(net)[:10].max() == 0.0


def test_extreme_shapes_stay_bounded():
    tiny = plan_geometry((1, 1), [368, 368], "adjust_network_input")
    assert tiny.net_hw == (368, 368)
    strip = plan_geometry((10, 20000), [368, 368], "adjust_network_input")
    assert max(strip.net_hw) <= 4096 + 8
    big = plan_geometry((8000, 6000), [288, 384], "pad_image_input")
    assert big.net_hw == (288, 384)
    with pytest.raises(BpnetError, match="keep_aspect_ratio_mode"):
        plan_geometry((10, 10), [368, 368], "stretch")


def test_pixel_formats_become_bgr8(tmp_path):
    gray = np.full((5, 7), 200, np.uint8)
    assert to_bgr8(gray).shape == (5, 7, 3) and (to_bgr8(gray) == 200).all()
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (10, 20, 250)
    rgba[:2, :, 3] = 255  # top half opaque, bottom transparent
    out = to_bgr8(rgba)
    assert (out[:2] == (10, 20, 250)).all() and (out[2:] == PAD_VALUE).all()
    deep = np.full((3, 3, 3), 65535, np.uint16)
    deep[0, 0] = 0
    out = to_bgr8(deep)
    assert out.dtype == np.uint8 and out[1, 1, 0] == 255 and out[0, 0, 0] == 0
    assert to_bgr8(np.full((2, 2), 0.5, np.float32))[0, 0, 0] == 128
    with pytest.raises(ImageReadError):
        to_bgr8(np.zeros((0, 5, 3), np.uint8))


def test_normalization_is_rgb_over_scale_minus_offset():
    bgr = np.zeros((1, 1, 3), np.uint8)
    bgr[0, 0] = (10, 20, 30)  # B, G, R
    n = Normalization((2.0, 4.0, 5.0), (1.0, 0.0, 0.5))
    np.testing.assert_allclose(n.apply(bgr)[0, 0], [30 / 2 - 1, 20 / 4, 10 / 5 - 0.5])
    gray = n.apply(bgr, channels=1)
    assert gray.shape == (1, 1, 1)


def test_read_image_handles_real_files_and_rejects_bad_ones(tmp_path):
    cv2.imwrite(str(tmp_path / "gray.png"), np.full((20, 30), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "deep.png"), np.full((20, 30, 3), 40000, np.uint16))
    cv2.imwrite(str(tmp_path / "rgba.png"), np.full((20, 30, 4), 255, np.uint8))
    cv2.imwrite(str(tmp_path / "one.png"), np.zeros((1, 1, 3), np.uint8))
    for name in ("gray.png", "deep.png", "rgba.png", "one.png"):
        img = read_image(tmp_path / name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert read_image(tmp_path / "deep.png")[0, 0, 0] == round(40000 / 257)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(b"neither a PNG nor anything else")
    (tmp_path / "folder.jpg").mkdir()
    for name, msg in (("corrupt.jpg", "truncated JPEG"), ("empty.png", "empty file"),
                      ("garbage.png", "not a decodable image"), ("folder.jpg", "is a folder"),
                      ("missing.png", "file not found")):
        with pytest.raises(ImageReadError, match=msg):
            read_image(tmp_path / name)


def _people_from_coco(limit=40, min_people=2):
    """Some multi-person images' 18-joint keypoints (COCO -> model joints)."""
    doc = json.loads(need(COCO_VAL_ANN).read_text())
    mapping = POSE.dataset_mapping(doc["categories"][0]["keypoints"])
    by_img = {}
    for a in doc["annotations"]:
        if a.get("num_keypoints", 0) >= 8 and not a.get("iscrowd"):
            by_img.setdefault(a["image_id"], []).append(a)
    sizes = {im["id"]: (im["height"], im["width"]) for im in doc["images"]}
    out = []
    for iid, anns in by_img.items():
        if len(anns) >= min_people:
            kps = np.array([a["keypoints"] for a in anns], np.float32).reshape(len(anns), -1, 3)
            out.append((sizes[iid], mapping.dataset_to_model(kps)))
        if len(out) >= limit:
            break
    return out


def _match_error(found, truth):
    """Mean joint distance (original pixels) of each true person to its best found person."""
    errs = []
    for person in truth:
        vis = person[:, 2] > 0
        best = np.inf
        for cand in found:
            both = vis & (cand[:, 2] > 0)
            if both.sum() >= vis.sum() * 0.8:
                best = min(best, np.linalg.norm(cand[both, :2] - person[both, :2], axis=1).mean())
        errs.append(best)
    return np.array(errs)


@pytest.mark.parametrize("mode", MODES)
def test_multiscale_maps_realign_on_real_people(mode):
    """Maps rendered at another scale, warped to the scale-1 grid, decode to the same people."""
    from bpnet.infer.predictor import to_original
    errs = []
    for hw, joints in _people_from_coco(limit=12):
        ref = plan_geometry(hw, [368, 368], mode, 8, 1.0).transform
        out_hw = (ref.net_hw[0] // 8, ref.net_hw[1] // 8)
        for scale in (0.75, 1.5):
            g = plan_geometry(hw, [368, 368], mode, 8, scale).transform
            j_in = joints.copy()
            j_in[..., :2] = g.to_input(joints[..., :2])
            hm, paf = render_labels(j_in, POSE, g.net_hw, stride=8, sigma=7.0 * scale)
            hm2 = warp_maps(hm, g, ref, 8, out_hw)
            paf2 = warp_maps(paf, g, ref, 8, out_hw)
            assert hm2.shape[:2] == out_hw and paf2.shape[2] == POSE.paf_channels
            people = to_original(decode(hm2, paf2, POSE, stride=8), ref)
            errs.extend(_match_error(people.keypoints, joints))
    errs = np.array(errs)
    # Every person is found again, about a pixel off (median) in the original picture.
    assert np.isfinite(errs).mean() > 0.9
    assert np.median(errs[np.isfinite(errs)]) < 2.5


def test_warp_with_identity_returns_the_maps():
    g = plan_geometry((100, 200), [368, 368], "adjust_network_input").transform
    maps = np.random.default_rng(0).random((46, 92, 7)).astype(np.float32)
    assert warp_maps(maps, g, g, 8, (46, 92)) is maps
    # A shifted grid by whole cells: pure translation, exact away from the borders.
    g2 = plan_geometry((100, 200), [736, 736], "adjust_network_input").transform
    up = warp_maps(maps, g, g2, 8, (92, 184))
    down = warp_maps(up, g2, g, 8, (46, 92))
    assert np.abs(down[2:-2, 2:-2] - maps[2:-2, 2:-2]).mean() < 0.2


def _mirror(joints, width, pose=POSE):
    """Joints of the mirrored picture: positions mirrored, left/right names swapped."""
    jp = pose.flip_permutation()
    out = np.zeros_like(joints)
    out[:, jp] = joints
    out[..., 0] = np.where(out[..., 2] > 0, width - 1 - out[..., 0], 0)
    return out


def test_unflip_restores_maps_of_the_unmirrored_picture():
    for hw, joints in _people_from_coco(limit=6):
        g = plan_geometry(hw, [368, 368], "adjust_network_input").transform
        j_in = joints.copy()
        j_in[..., :2] = g.to_input(joints[..., :2])
        hm, paf = render_labels(j_in, POSE, g.net_hw)
        hm_m, paf_m = render_labels(_mirror(j_in, g.net_hw[1]), POSE, g.net_hw)
        hm_u, paf_u = unflip_maps(hm_m, paf_m, POSE)
        assert np.abs(hm_u[..., :-1] - hm[..., :-1]).max() < 1e-5
        # PAF cells on the edge of a limb's band may fall on either side when
        # mirrored; compare the bulk.
        assert np.abs(paf_u - paf).mean() < 2e-3
        assert np.abs(paf_u - paf).max() <= 1.0 + 1e-5
        # The limb directions agree where both have a vector.
        both = (np.abs(paf) > 0.5) & (np.abs(paf_u) > 0.5)
        assert both.any() and (np.sign(paf[both]) == np.sign(paf_u[both])).all()


def test_preprocess_has_no_tensorflow_import():
    code = ("import sys, bpnet.infer.preprocess, bpnet.infer.track, bpnet.infer.draw, "
            "bpnet.infer.outputs; bad = [m for m in ('tensorflow', 'onnxruntime', 'keras') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    import subprocess
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("scale,offset", [((256.0,) * 3, (0.5,) * 3), ((255.0,) * 3, (0.0,) * 3),
                                          ((58.4, 57.1, 57.4), (2.1, 2.0, 1.8))])
def test_normalization_table_gives_the_formulas_numbers(scale, offset):
    """The lookup table of uint8 pictures gives exactly x / scale - offset in float32, RGB, on
    a real photo, a cut-out view of it and a mirrored view; other dtypes use the formula."""
    need(SHARED_IMAGES)
    photo = read_image(sorted(SHARED_IMAGES.glob("*.jpg"))[0])
    norm = Normalization(scale, offset)
    for img in (photo, photo[7:301, 11:397], photo[:, ::-1]):
        got = norm.apply(img)
        want = img[:, :, ::-1].astype(np.float32) / np.asarray(scale, np.float32) \
            - np.asarray(offset, np.float32)
        assert got.dtype == np.float32 and got.shape == img.shape
        np.testing.assert_array_equal(got, want)
    as_float = photo.astype(np.float32)
    np.testing.assert_array_equal(norm.apply(as_float), norm.apply(photo))

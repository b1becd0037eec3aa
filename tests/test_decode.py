"""The PAF decoder on maps rendered by the project's own label renderer."""

import contextlib
import dataclasses
import inspect
import io
import json

import numpy as np
import pytest

from bpnet.data.labels import render_labels
from bpnet.errors import BpnetError
from bpnet.infer import _decode_kernels as K
from bpnet.infer.decode import People, decode, numba_available
from bpnet.infer.runners import Runner
from bpnet.model.meta import DEFAULT_NORMALIZATION, STRIDE, make_meta
from bpnet.pose import load_pose_config, pose_config_from_dict
from bpnet.specs import DecoderConfig, InferenceSpec, load_inference_spec

from conftest import COCO_VAL_ANN, REPO, need

POSE = load_pose_config(REPO / "bpnet" / "configs" / "bpnet_18joints.json")
NUM_IMAGES = 40  # enough people for a stable AP, fast enough for CI


@pytest.fixture(scope="module")
def coco_gt():
    """(COCO object, mapping, [(image id, (H, W), model joints [P, J, 3])])."""
    need(COCO_VAL_ANN)
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(COCO_VAL_ANN))
    cat = coco.loadCats(coco.getCatIds())[0]
    mapping = POSE.dataset_mapping(cat["keypoints"])
    out = []
    for img_id in sorted(coco.getImgIds())[:NUM_IMAGES]:
        info = coco.loadImgs(img_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False))
        kps = [np.asarray(a["keypoints"], np.float32).reshape(-1, 3)
               for a in anns if a["num_keypoints"] > 0]
        joints = (mapping.dataset_to_model(np.stack(kps)) if kps
                  else np.zeros((0, POSE.num_joints, 3), np.float32))
        out.append((img_id, (info["height"], info["width"]), joints))
    return coco, mapping, out


def coco_ap(coco, mapping, results_per_image):
    from pycocotools.cocoeval import COCOeval
    res = []
    for img_id, people in results_per_image:
        kp = mapping.model_to_dataset(people.keypoints[..., :2], people.keypoints[..., 2])
        for n in range(len(people)):
            k = kp[n].copy()
            k[:, 2] = (k[:, 2] > 0).astype(float)
            res.append({"image_id": img_id, "category_id": 1,
                        "keypoints": k.reshape(-1).tolist(), "score": float(people.scores[n])})
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(res), "keypoints")
        ev.params.imgIds = [i for i, _ in results_per_image]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0]


def match_people(gt_joints, people, tol):
    """For each GT person: the largest fraction of its joints that one decoded
    person puts within tol pixels."""
    out = []
    for g in gt_joints:
        lab = g[:, 2] > 0
        best = 0.0
        for n in range(len(people)):
            d = np.hypot(*(people.keypoints[n, lab, :2] - g[lab, :2]).T)
            ok = (people.keypoints[n, lab, 2] > 0) & (d <= tol)
            best = max(best, ok.mean())
        out.append(best)
    return np.array(out)


def test_real_annotations_high_ap_exact_and_noisy(coco_gt):
    coco, mapping, images = coco_gt
    rng = np.random.default_rng(0)
    exact, noisy = [], []
    for img_id, hw, joints in images:
        heat, paf = render_labels(joints, POSE, hw)
        exact.append((img_id, decode(heat, paf, POSE)))
        hn = heat + rng.normal(0, 1e-4, heat.shape).astype(np.float32)
        pn = paf + rng.normal(0, 1e-4, paf.shape).astype(np.float32)
        noisy.append((img_id, decode(hn, pn, POSE)))
    # The open decoders reach 0.71-0.82 on maps rendered this way.
    assert coco_ap(coco, mapping, exact) >= 0.85
    assert coco_ap(coco, mapping, noisy) >= 0.85


def test_real_annotations_joints_within_a_pixel(coco_gt):
    _, _, images = coco_gt
    fractions = []
    for _, hw, joints in images:
        heat, paf = render_labels(joints, POSE, hw)
        people = decode(heat, paf, POSE)
        big = joints[(joints[:, :, 2] > 0).sum(1) >= 10]
        if len(big):
            fractions.extend(match_people(big, people, tol=1.5))
    fractions = np.array(fractions)
    assert len(fractions) >= 30
    # Almost every well-labeled person comes back whole, each joint within 1.5 px.
    assert np.median(fractions) == 1.0
    assert (fractions >= 0.8).mean() >= 0.9


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
def test_numpy_fallback_gives_the_same_people(coco_gt):
    _, _, images = coco_gt
    rng = np.random.default_rng(1)
    for _, hw, joints in images[:12]:
        heat, paf = render_labels(joints, POSE, hw)
        heat = heat + rng.normal(0, 1e-4, heat.shape).astype(np.float32)
        a = decode(heat, paf, POSE, use_numba=True)
        b = decode(heat, paf, POSE, use_numba=False)
        assert len(a) == len(b)
        np.testing.assert_allclose(a.keypoints, b.keypoints, atol=1e-4)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    # Scoring limb pairs in small chunks changes nothing.
    from bpnet.infer.decode import _skeleton_array
    px, py, pv, pj, start = K.find_peaks_numpy(heat, 18, 0.1, K.REFINE_GAUSSIAN)
    args = (px, py, start, paf, _skeleton_array(POSE), 0.05, 0.8, 4, 20, 100.0, 1e-6)
    whole, chunked = K.score_limbs_numpy(*args), K.score_limbs_numpy(*args, chunk=30)
    assert len(whole[0]) > 10
    for x, y in zip(whole, chunked):
        np.testing.assert_array_equal(x, y)


def test_upsampled_maps_decode_to_the_same_people(coco_gt):
    import cv2
    _, _, images = coco_gt
    found = []
    for _, hw, joints in images[:15]:
        if not len(joints):
            continue
        heat, paf = render_labels(joints, POSE, hw)
        base = decode(heat, paf, POSE, stride=8)
        up = lambda m: cv2.resize(m, (m.shape[1] * 2, m.shape[0] * 2),  # noqa: E731
                                  interpolation=cv2.INTER_CUBIC)
        hu = np.dstack([up(heat[..., c]) for c in range(heat.shape[2])])
        pu = np.dstack([up(paf[..., c]) for c in range(paf.shape[2])])
        fine = decode(hu, pu, POSE, stride=4)
        big = base.present().sum(1) >= 5
        for n in np.nonzero(big)[0]:
            ref = base.keypoints[n].copy()
            ref[:, 2] = np.where(ref[:, 2] > 0, 2, 0)
            found.append(match_people(ref[None], fine, tol=2.0)[0])
    found = np.array(found)
    # The sizeable people of the stride-8 decode come back at stride 4, joints
    # within 2 px (cubic ringing may cost an odd limb in a crowd).
    assert len(found) >= 20
    assert np.median(found) == 1.0 and (found >= 0.8).mean() >= 0.9


def one_person(cx=100.0, cy=120.0, s=1.0):
    """A plausible standing 18-joint person (x, y, v) around (cx, cy)."""
    xy = np.array([
        [0, -60], [0, -40], [-15, -40], [-20, -15], [-22, 10], [15, -40], [20, -15], [22, 10],
        [-10, 5], [-11, 35], [-12, 65], [10, 5], [11, 35], [12, 65], [-4, -64], [4, -64],
        [-8, -60], [8, -60]], np.float32) * s + [cx, cy]
    return np.concatenate([xy, np.full((18, 1), 2, np.float32)], 1)


def test_thresholds_change_what_is_found():
    heat, paf = render_labels(one_person()[None], POSE, (256, 200))
    assert len(decode(heat, paf, POSE)) == 1
    # Weak joints: their peaks fall under a raised heatmap threshold.
    weak = heat.copy()
    weak[..., :5] *= 0.3
    full = decode(weak, paf, POSE, heatmap_threshold=0.1)
    part = decode(weak, paf, POSE, heatmap_threshold=0.5)
    assert full.present().sum() == 18
    assert part.present().sum() == 13 and not part.present()[:, :5].any()
    # Weak PAFs: no limb passes a raised PAF threshold, so no person has two joints.
    soft = paf * 0.3
    assert decode(heat, soft, POSE, paf_threshold=0.05).present().sum(1).max() == 18
    assert decode(heat, soft, POSE, paf_threshold=0.5).present().sum(1).max() == 1
    # A heatmap threshold above every peak finds nobody.
    assert len(decode(heat, paf, POSE, heatmap_threshold=0.999999)) == 0


def test_min_parts_and_scores_filter_small_people():
    heat, paf = render_labels(one_person()[None], POSE, (256, 200))
    lone = np.zeros_like(heat)
    lone[20, 5, 0] = 0.6  # one weak nose far away from the person
    heat2 = np.maximum(heat, lone)
    people = decode(heat2, paf, POSE)
    assert len(people) == 1  # the weak lone joint is below small_person_score
    people = decode(heat2, paf, POSE, small_person_score=0.5)
    assert len(people) == 2 and people.present().sum(1).tolist() == [18, 1]
    assert people.scores[0] > people.scores[1]
    # Under min_parts a person needs small_person_score; above 1 none can reach it.
    assert len(decode(heat, paf, POSE, min_parts=19)) == 1
    assert len(decode(heat, paf, POSE, min_parts=19, small_person_score=1.01)) == 0
    assert len(decode(heat, paf, POSE, min_person_score=1.01)) == 0


def test_custom_five_joint_config():
    cfg = pose_config_from_dict({
        "name": "star5",
        "keypoints": ["head", "left_hand", "right_hand", "left_foot", "right_foot"],
        "skeleton": [[1, 2], [1, 3], [1, 4], [1, 5]]})
    people = []
    for cx in (60.0, 160.0, 260.0):
        people.append([[cx, 40, 2], [cx + 30, 90, 2], [cx - 30, 90, 2], [cx + 15, 170, 2],
                       [cx - 15, 170, 2]])
    joints = np.array(people, np.float32)
    heat, paf = render_labels(joints, cfg, (200, 320))
    assert heat.shape[2] == 6 and paf.shape[2] == 8
    out = decode(heat, paf, cfg)
    assert len(out) == 3 and out.keypoints.shape == (3, 5, 3)
    assert (match_people(joints, out, tol=1.0) == 1.0).all()
    # Without the background channel too.
    assert len(decode(heat[..., :5], paf, cfg)) == 3


def test_nobody_gives_an_empty_result():
    h, w = 46, 46
    for heat in (np.zeros((h, w, 19), np.float32),
                 np.concatenate([np.zeros((h, w, 18)), np.ones((h, w, 1))], 2)):
        people = decode(heat, np.zeros((h, w, 38), np.float32), POSE, heatmap_threshold=0.0)
        assert isinstance(people, People) and len(people) == 0
        assert people.keypoints.shape == (0, 18, 3) and people.boxes.shape == (0, 4)
    heat, paf = render_labels(np.zeros((0, 18, 3)), POSE, (368, 368))
    assert len(decode(heat, paf, POSE)) == 0


@pytest.mark.parametrize("use_numba", [True, False])
def test_plateaus_give_one_peak(use_numba):
    if use_numba and not numba_available():
        pytest.skip("numba is not installed")
    heat = np.zeros((9, 12, 4), np.float32)
    heat[2, 3, 0] = heat[2, 4, 0] = 0.9  # horizontal tie
    heat[2, 2, 0] = heat[2, 5, 0] = 0.4
    heat[5, 5:7, 1] = heat[6, 5:7, 1] = 0.8  # 2x2 flat top
    heat[6, 9, 2] = heat[7, 10, 2] = 0.7  # diagonal tie
    heat[3:6, 6:10, 3] = 0.6  # 4 x 3 block, as from repeating cells
    heat[4, 5, 3] = 0.3
    from bpnet.infer.decode import _get_kernels
    find = _get_kernels(use_numba)[0]
    px, py, pv, pj, start = find(heat, 4, 0.1, K.REFINE_GAUSSIAN)
    assert pj.tolist() == [0, 1, 2, 3]
    assert (px[0], py[0]) == pytest.approx((3.5, 2.0), abs=1e-6)
    assert (px[1], py[1]) == pytest.approx((5.5, 5.5), abs=1e-6)
    assert (px[3], py[3]) == pytest.approx((7.5, 4.0), abs=1e-6)
    assert pv.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])


def test_neck_between_two_cells_is_one_joint():
    # The neck, midpoint of the shoulders, falls at x = 47.5, exactly between
    # the centres of cells 5 (43.5) and 6 (51.5): two equal heatmap cells.
    p = one_person(cx=47.5, cy=100.0)
    p[2, :2] = [35.5, 60]
    p[5, :2] = [59.5, 60]
    p[1, :2] = (p[2, :2] + p[5, :2]) / 2
    heat, paf = render_labels(p[None], POSE, (200, 120))
    neck = heat[..., 1]
    assert (neck == neck.max()).sum() == 2
    out = decode(heat, paf, POSE)
    assert len(out) == 1 and out.present().sum() == 18
    assert np.abs(out.keypoints[0, :, :2] - p[:, :2]).max() < 0.5


def test_output_format():
    people_gt = np.stack([one_person(80, 120), one_person(200, 130, s=1.2)])
    heat, paf = render_labels(people_gt, POSE, (256, 300))
    out = decode(heat, paf, POSE)
    assert out.keypoints.dtype == np.float32 and out.keypoints.shape == (2, 18, 3)
    assert np.all(np.diff(out.scores) <= 0) and np.all(out.scores > 0)
    for n in range(2):
        kp = out.keypoints[n]
        assert np.allclose(out.boxes[n], [kp[:, 0].min(), kp[:, 1].min(),
                                          kp[:, 0].max(), kp[:, 1].max()])
    assert (match_people(people_gt, out, tol=0.5) == 1.0).all()
    first = out[0]
    assert len(first) == 1 and first.keypoints.shape == (1, 18, 3)
    moved = out.transformed(2.0, 0.5, 10.0, -3.0)
    np.testing.assert_allclose(moved.keypoints[..., 0], out.keypoints[..., 0] * 2 + 10, rtol=1e-6)
    np.testing.assert_allclose(moved.boxes[:, 3], out.boxes[:, 3] * 0.5 - 3, rtol=1e-6)
    # Missing joints are all zero.
    gt = one_person()
    gt[[4, 7], 2] = 0
    out = decode(*render_labels(gt[None], POSE, (256, 200)), POSE)
    assert len(out) == 1 and (out.keypoints[0, [4, 7]] == 0).all()
    json.dumps(out.keypoints.tolist())


def test_mismatched_maps_are_a_clear_error():
    heat = np.zeros((10, 10, 19), np.float32)
    with pytest.raises(BpnetError, match="heatmaps must be"):
        decode(heat[..., :17], np.zeros((10, 10, 38)), POSE)
    with pytest.raises(BpnetError, match="pafs must be"):
        decode(heat, np.zeros((10, 10, 36)), POSE)
    with pytest.raises(BpnetError, match="pafs must be"):
        decode(heat, np.zeros((10, 11, 38)), POSE)
    with pytest.raises(TypeError, match="unknown parameters"):
        decode(heat, np.zeros((10, 10, 38)), POSE, min_prats=3)


def test_pieces_of_one_person_are_merged_but_neighbours_stay_apart():
    # Legs and arms but no shoulders: no neck, so no limb links the pieces.
    p = one_person(cx=100.0)
    p[[0, 1, 2, 5, 14, 15, 16, 17], 2] = 0
    far = one_person(cx=300.0)
    heat, paf = render_labels(np.stack([p, far]), POSE, (256, 420))
    out = decode(heat, paf, POSE)
    assert out.present().sum(1).tolist() == [18, 10]
    assert (match_people(np.stack([p, far]), out, tol=0.5) == 1.0).all()
    pieces = decode(heat, paf, POSE, merge_ratio=0)
    assert len(pieces) == 5  # the far person, two legs, two arms
    # Two small people side by side (a head each) are not glued together.
    heads = np.zeros((2, 18, 3), np.float32)
    for n, cx in enumerate((60.0, 200.0)):
        heads[n, [0, 14, 15], :] = [[cx, 50, 2], [cx - 6, 44, 2], [cx + 6, 44, 2]]
    # min_parts 3 keeps them on their mean score alone (the default, 4, asks
    # a 3-joint person for small_person_score).
    out = decode(*render_labels(heads, POSE, (120, 260)), POSE, min_parts=3)
    assert out.present().sum(1).tolist() == [3, 3]


def test_works_without_numba(monkeypatch):
    import sys
    import bpnet.infer.decode as D
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    monkeypatch.setattr(D, "_kernels", None)
    monkeypatch.delenv("BPNET_NO_NUMBA", raising=False)
    heat, paf = render_labels(one_person()[None], POSE, (256, 200))
    out = decode(heat, paf, POSE)
    assert D._kernels[0] is K.find_peaks_numpy
    assert len(out) == 1 and out.present().sum() == 18


@pytest.mark.parametrize("use_numba", [True, False])
def test_noisy_maps_with_no_threshold_stay_bounded(use_numba):
    if use_numba and not numba_available():
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(0)
    heat = rng.random((60, 80, 19)).astype(np.float32)  # ~900 peaks per joint
    paf = rng.uniform(-1, 1, (60, 80, 38)).astype(np.float32)
    out = decode(heat, paf, POSE, heatmap_threshold=0.0, max_peaks=20, use_numba=use_numba,
                 small_person_score=0.0, min_person_score=0.0)
    per_joint = out.present().sum(0)
    assert per_joint.max() == 20  # the strongest 20 peaks of each joint, no more
    strongest = np.sort(heat[..., 0].ravel())[-20:]
    assert set(np.round(out.keypoints[out.present()[:, 0], 0, 2], 6)) == \
        set(np.round(strongest, 6))


# ------------------------------------------------------------------ the decoder's settings

def test_config_and_overrides_set_the_decoder():
    heat, paf = render_labels(one_person()[None], POSE, (256, 200))
    strict = DecoderConfig(min_parts=19, small_person_score=1.01)
    assert len(decode(heat, paf, POSE, config=strict)) == 0
    # Overrides go on top of the config, which stays as it was.
    assert len(decode(heat, paf, POSE, config=strict, min_parts=18)) == 1
    assert strict.min_parts == 19
    # Bad values are DecoderConfig's own errors, named by field.
    with pytest.raises(ValueError, match="min_parts must be >= 1"):
        decode(heat, paf, POSE, min_parts=0)
    with pytest.raises(ValueError, match="refine must be one of 'gaussian'"):
        decode(heat, paf, POSE, refine="cubic")
    with pytest.raises(ValueError, match="max_samples must be >= min_samples 4"):
        decode(heat, paf, POSE, config=DecoderConfig(max_samples=2))
    # The fifth argument was heatmap_threshold before the config took its place.
    with pytest.raises(TypeError, match="config must be a DecoderConfig"):
        decode(heat, paf, POSE, 8, 0.1)


def test_decoder_defaults_live_in_decoder_config_only():
    import bpnet.infer.decode as D
    params = inspect.signature(decode).parameters
    assert list(params) == ["heatmaps", "pafs", "pose", "stride", "config", "use_numba",
                            "overrides"]
    assert params["stride"].default == STRIDE and params["config"].default is None
    assert not hasattr(D, "DEFAULTS")
    assert len(dataclasses.fields(DecoderConfig)) == 15
    assert InferenceSpec().decoder == DecoderConfig()
    # No config, an explicit default one, and the default one field by field: the same people.
    people = np.stack([one_person(80, 120), one_person(200, 130, s=1.2)])
    heat, paf = render_labels(people, POSE, (256, 300))
    a = decode(heat, paf, POSE)
    b = decode(heat, paf, POSE, config=DecoderConfig())
    c = decode(heat, paf, POSE, **dataclasses.asdict(DecoderConfig()))
    for other in (b, c):
        np.testing.assert_array_equal(a.keypoints, other.keypoints)
        np.testing.assert_array_equal(a.scores, other.scores)


class _RenderedRunner(Runner):
    """Stands in for a network: the maps of one person drawn at the input's centre."""

    def __init__(self):
        self.meta = make_meta(POSE, DEFAULT_NORMALIZATION, {})
        self.pose = POSE
        self.path = "<rendered>"

    def run(self, batch):
        h, w = batch.shape[1:3]
        heat, paf = render_labels(one_person(w / 2, h / 2)[None], POSE, (h, w))
        return (np.repeat(heat[None], len(batch), 0), np.repeat(paf[None], len(batch), 0))


def test_predictor_decodes_with_the_spec_decoder_section(tmp_path, monkeypatch):
    import bpnet.infer.decode as D
    from bpnet.infer.predictor import Predictor
    path = tmp_path / "infer.yaml"
    path.write_text("input_shape: [256, 256]\nkeep_aspect_ratio_mode: null\n"
                    "heatmap_threshold: 0.2\n"
                    "decoder: {min_parts: 19, small_person_score: 1.01, refine: quadratic}\n")
    spec = load_inference_spec(path)
    seen = []
    real = D.decode

    def spy(*args, **kw):
        seen.append(kw.get("config"))
        return real(*args, **kw)

    monkeypatch.setattr(D, "decode", spy)
    image = np.full((256, 256, 3), 128, np.uint8)
    people, _ = Predictor(spec, runner=_RenderedRunner()).predict(image)
    assert len(people) == 0  # 18 joints < min_parts 19, and nobody reaches 1.01
    assert seen[0] is spec.decoder
    assert (seen[0].heatmap_threshold, seen[0].refine) == (0.2, "quadratic")
    people, _ = Predictor(InferenceSpec(input_shape=[256, 256], keep_aspect_ratio_mode=None),
                          runner=_RenderedRunner()).predict(image)
    assert len(people) == 1 and people.present().sum() == 18

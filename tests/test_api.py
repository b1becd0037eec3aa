"""The public Python API: the names ``import bpnet`` offers, on real data."""

import json
import subprocess
import sys

import numpy as np
import pytest

import bpnet

from conftest import SHARED_IMAGES, TFPOSE_PB, bpnet_cli, need

HEAVY = ("tensorflow", "keras", "onnxruntime", "tf2onnx", "numba", "cv2", "jax")


def test_import_bpnet_is_cheap_and_every_name_resolves():
    code = ("import sys, json, bpnet; names = list(bpnet.__all__); "
            "heavy = [m for m in %r if m in sys.modules]; print(json.dumps([names, heavy]))"
            % (HEAVY,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, heavy = json.loads(out.stdout)
    assert heavy == [], f"import bpnet loaded {heavy}"
    assert {"load_predictor", "Predictor", "detect", "decode", "People", "read_image",
            "load_pose_config", "load_inference_spec", "DecoderConfig"} <= set(names)
    for name in names:
        assert getattr(bpnet, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bpnet.nope  # noqa: B018


def test_decode_from_the_top_finds_the_rendered_people():
    from bpnet.data.labels import render_labels
    pose = bpnet.load_pose_config(bpnet.__path__[0] + "/configs/bpnet_18joints.json")
    rng = np.random.default_rng(3)
    # Two upright people, every joint labeled, side by side on a 368x368 picture.
    joints = np.zeros((2, pose.num_joints, 3), np.float32)
    for p, x0 in enumerate((90.0, 270.0)):
        joints[p, :, 0] = x0 + rng.uniform(-40, 40, pose.num_joints)
        joints[p, :, 1] = np.linspace(40, 330, pose.num_joints)
        joints[p, :, 2] = 2
    heat, paf = render_labels(joints, pose, (368, 368))
    people = bpnet.decode(heat, paf, pose, config=bpnet.DecoderConfig(min_parts=3))
    assert isinstance(people, bpnet.People) and len(people) == 2
    found = people.keypoints[np.argsort(people.keypoints[:, 1, 0])]
    assert np.abs(found[..., :2] - joints[..., :2]).max() < 4.0


@pytest.fixture(scope="module")
def mobilenet_thin(tmp_path_factory):
    need(TFPOSE_PB)
    out = tmp_path_factory.mktemp("api") / "mobilenet_thin.keras"
    bpnet_cli("import_model", "-i", TFPOSE_PB, "-o", out, "-r", out.parent / "r", check=True)
    return out


def test_load_predictor_finds_the_skiers(mobilenet_thin, repo):
    need(SHARED_IMAGES)
    predictor = bpnet.load_predictor(mobilenet_thin, repo / "specs" / "infer_spec_mobilenet_thin.yaml")
    image = bpnet.read_image(SHARED_IMAGES / "ski.jpg")
    people, timings = predictor.predict(image)
    assert len(people) >= 3, len(people)
    h, w = image.shape[:2]
    seen = people.keypoints[people.keypoints[..., 2] > 0]
    assert (seen[:, 0] <= w - 1).all() and (seen[:, 1] <= h - 1).all()
    assert timings["network_s"] > 0
    drawn = bpnet.draw_people(image, people.keypoints, predictor.pose, people.scores)
    assert drawn.shape == image.shape and (drawn != image).any()


def test_detect_streams_a_folder_and_reports_the_bad_file(mobilenet_thin, repo, tmp_path):
    need(SHARED_IMAGES)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    predictor = bpnet.load_predictor(mobilenet_thin, repo / "specs" / "infer_spec_mobilenet_thin.yaml")
    paths = [SHARED_IMAGES / "ski.jpg", bad, SHARED_IMAGES / "golf.jpg"]
    found = list(bpnet.detect(predictor, paths, batch_size=2))
    assert [d.item.path for d in found] == [str(p) for p in paths]
    assert [d.ok for d in found] == [True, False, True]
    assert len(found[0].people) >= 3 and len(found[2].people) >= 1
    assert found[1].people is None and "broken.jpg" in found[1].error

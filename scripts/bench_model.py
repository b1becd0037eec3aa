#!/usr/bin/env python
"""Model figures: parameters, forward time, model-file size and save/load time.

Prints ONE JSON line, e.g.
  python scripts/bench_model.py --model BpNetLiteModel --stages 3 --input 368 368
Forward time is the median of --repeats single-image predictions after a
warm-up, with whatever Keras backend KERAS_BACKEND selects.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="BpNetLiteModel",
                    choices=["BpNetModel", "BpNetLiteModel"])
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--input", type=int, nargs=2, default=[368, 368], metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--width_multiplier", type=float, default=1.0)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras
    import numpy as np

    from bpnet.model.build import build_model
    from bpnet.model.io import load_model, save_model
    from bpnet.model.meta import DEFAULT_NORMALIZATION, make_meta
    from bpnet.pose import load_pose_config
    from bpnet.specs import ModelConfig, build_spec, default_pose_config_path, spec_to_dict

    pose = load_pose_config(default_pose_config_path())
    # Through the spec loader, which holds the value rules (stages >= 2, ...).
    cfg = build_spec(ModelConfig, {"__class_name__": args.model, "stages": args.stages,
                                   "heat_channels": pose.heat_channels,
                                   "paf_channels": pose.paf_channels,
                                   "width_multiplier": args.width_multiplier}, "bench_model")
    model = build_model(cfg, pose)
    h, w = args.input
    x = np.random.default_rng(0).random((args.batch, h, w, 3)).astype("float32")
    model.predict(x, verbose=0)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        model.predict(x, verbose=0)
        times.append(time.perf_counter() - t)

    out = {"model": args.model, "stages": args.stages, "params": model.count_params(),
           "input": [h, w], "batch": args.batch, "backend": keras.backend.backend(),
           "device": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(),
           "forward_ms": round(1000 * statistics.median(times), 1)}
    meta = make_meta(pose, DEFAULT_NORMALIZATION, spec_to_dict(cfg))
    with tempfile.TemporaryDirectory() as d:
        for label, key in (("plain", None), ("encrypted", "bench-key")):
            p = os.path.join(d, f"{label}.keras")
            t = time.perf_counter()
            save_model(model, p, meta, key=key)
            out[f"save_s_{label}"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            load_model(p, key=key)
            out[f"load_s_{label}"] = round(time.perf_counter() - t, 3)
            out[f"file_mb_{label}"] = round(os.path.getsize(p) / 2 ** 20, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

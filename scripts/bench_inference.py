#!/usr/bin/env python
"""Time the detection loop of `bpnet inference` per picture, by step; prints ONE JSON line.

    python scripts/bench_inference.py -m MODEL [-i SPEC] [--images DIR] [--repeat 3]
        [--input_shape H W] [--mode adjust_network_input|pad_image_input|null]
        [--multi_scale 0.5,1,1.5,2] [--flip]

Defaults: ../shared/data/images, the spec's settings (or InferenceSpec's
defaults). The first pass over the pictures warms up (graph tracing, numba
compilation) and is not counted. Pictures are read once beforehand and go
through bpnet.infer.detect one at a time (per-picture latency). Reported:
median and p90 milliseconds per picture for preprocessing, network, decoding
(including map averaging and the inverse transform) and in total, and people
found per picture.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-i", "--inference_spec", default=None)
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[1].parent
                                             / "shared" / "data" / "images"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--input_shape", type=int, nargs=2, default=None)
    ap.add_argument("--mode", default=None)
    ap.add_argument("--multi_scale", default=None, help="comma-separated scales")
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("-k", "--key", default=None)
    a = ap.parse_args()

    from bpnet.infer.detect import detect
    from bpnet.infer.predictor import Predictor
    from bpnet.infer.preprocess import is_image_file, read_image
    from bpnet.infer.sources import Item
    from bpnet.specs import InferenceSpec, load_inference_spec
    spec = load_inference_spec(a.inference_spec) if a.inference_spec else InferenceSpec()
    if a.input_shape:
        spec.input_shape = list(a.input_shape)
    if a.mode:
        spec.keep_aspect_ratio_mode = None if a.mode == "null" else a.mode
    if a.multi_scale:
        spec.multi_scale_inference = True
        spec.scales = [float(s) for s in a.multi_scale.split(",")]
    spec.flip_test = spec.flip_test or a.flip
    pred = Predictor(spec, model_path=a.model, key=a.key, batch_size=1)
    files = sorted(p for p in Path(a.images).iterdir() if is_image_file(p))
    if not files:
        sys.exit(f"no images in {a.images}")
    pics = [(Item(str(p), p, k), read_image(p)) for k, p in enumerate(files)]
    for _ in detect(pred, pics, 1):  # warm-up
        pass
    rows, people = [], []
    for _ in range(a.repeat):
        # total: from asking for the next picture to having its people.
        t = time.perf_counter()
        for d in detect(pred, pics, 1):
            tm = d.timings
            rows.append((tm["preprocess_s"], tm["network_s"], tm["decode_s"],
                         time.perf_counter() - t))
            people.append(len(d.people))
            t = time.perf_counter()
    r = np.array(rows) * 1000

    def stat(col):
        return round(float(np.median(r[:, col])), 2), round(float(np.percentile(r[:, col], 90)), 2)

    out = {"images": len(pics), "runs": len(rows), "model": Path(a.model).name,
           "input_shape": pred.input_shape, "mode": pred.mode, "scales": pred.scales,
           "flip": pred.flip, "people_per_image": round(float(np.mean(people)), 2)}
    for i, name in enumerate(("preprocess", "network", "decode", "total")):
        out[f"{name}_ms_median"], out[f"{name}_ms_p90"] = stat(i)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

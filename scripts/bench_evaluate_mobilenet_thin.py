"""Accuracy and speed of the imported mobilenet_thin network through `bpnet evaluate`.

Imports ../shared/models/tfpose_mobilenet_thin/graph_opt.pb (unless --model
names a model file), evaluates it with an inference spec on a dataset spec's
test_data, and prints ONE JSON line: AP, AP50, AR and the timings as
`bpnet evaluate` reports them (wall ms per image, median network and
decoding ms).

    python scripts/bench_evaluate_mobilenet_thin.py \
        --infer_spec specs/infer_spec_mobilenet_thin.yaml \
        --dataset_spec data_pose_config/coco_tiny_train_as_test_spec.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--infer_spec", default=str(REPO / "specs" / "infer_spec_mobilenet_thin.yaml"))
    ap.add_argument("--dataset_spec", default=str(REPO / "data_pose_config" / "coco_tiny_spec.json"))
    ap.add_argument("--model", default=None, help="a bpnet model file; default: import the graph")
    ap.add_argument("--graph", default=str(REPO.parent / "shared" / "models" / "tfpose_mobilenet_thin"
                                           / "graph_opt.pb"))
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from bpnet.tasks.evaluate import evaluate
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from bpnet.model.io import save_model
            from bpnet.tasks.import_model import import_tfpose
            m, meta = import_tfpose(args.graph)
            model = str(Path(tmp) / "mobilenet_thin.keras")
            save_model(m, model, meta)
        out = evaluate(args.infer_spec, args.dataset_spec, Path(tmp) / "eval", model_path=model,
                       show_progress=False)
    k = out["kpi"]
    print(json.dumps({
        "bench": "evaluate_mobilenet_thin",
        "infer_spec": Path(args.infer_spec).name, "dataset_spec": Path(args.dataset_spec).name,
        "images": out["images_evaluated"],
        "AP": round(k["AP_0.50:0.95_all"], 4), "AP50": round(k["AP_0.5"], 4),
        "AP75": round(k["AP_0.75"], 4), "AR": round(k["AR_0.50:0.95_all"], 4),
        "ms_per_image": out["ms_per_image"],
        "network_ms_median": out["network_ms_median"],
        "decode_ms_median": out["decode_ms_median"],
        "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
    }), flush=True)


if __name__ == "__main__":
    main()

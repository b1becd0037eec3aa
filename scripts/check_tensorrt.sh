#!/usr/bin/env bash
# For someone with an NVIDIA GPU and TensorRT 10/11: build engines from bpnet's exports and
# check them against ONNX Runtime. Run from the repository root:
#   pip install -e '.[tensorrt]' && bash scripts/check_tensorrt.sh
set -euo pipefail
python -c "import tensorrt, sys; print('TensorRT', tensorrt.__version__)"
# The engine tests of tests/test_export.py run (they skip where TensorRT is missing).
python -m pytest -q tests/test_export.py -k "tensorrt or engine"
# fp32 / fp16 / INT8 engines of the imported network, then evaluate each on coco_tiny val.
out=results/check_tensorrt
mkdir -p "$out"
if [ -f ../shared/models/tfpose_mobilenet_thin/graph_opt.pb ]; then
  bpnet import_model -i ../shared/models/tfpose_mobilenet_thin/graph_opt.pb -o "$out/mt.keras" -r "$out/r"
  for dt in fp32 fp16 int8; do
    cal=()
    [ "$dt" = int8 ] && cal=(--cal_image_dir ../shared/data/coco_tiny/train2017 --batches 20)
    bpnet export -m "$out/mt.keras" -o "$out/mt_$dt.onnx" --data_type "$dt" "${cal[@]}" \
      --engine_file "$out/mt_$dt.engine" --max_batch_size 4 --opt_batch_size 1 -r "$out/r_$dt"
    bpnet evaluate -i specs/infer_spec_mobilenet_thin.yaml -m "$out/mt_$dt.engine" \
      -d data_pose_config/coco_tiny_spec.json -r "$out/ev_$dt" | grep "AP_0.50:0.95_all"
  done
fi

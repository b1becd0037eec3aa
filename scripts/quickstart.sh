#!/usr/bin/env bash
# The whole pipeline on the bundled synthetic sample data, from the
# repository root: make data -> dataset_convert -> train -> inference ->
# evaluate. 7 to 23 minutes on 2 cores (README). Outputs: sample_data/, results/.
set -euo pipefail
cd "$(dirname "$0")/.."

# Start from scratch: bpnet train resumes from checkpoints it finds in its
# results dir, and this script is meant to show a whole fresh run.
rm -rf results/sample_train results/sample_inference results/sample_evaluate

echo "== 1/5 sample data (synthetic people, COCO format)"
bpnet make_sample_data -o sample_data
echo "== 2/5 dataset_convert: TFRecords + loss masks"
bpnet dataset_convert -d sample_data/sample_spec.json -m train -o sample_data/records/train --generate_masks
bpnet dataset_convert -d sample_data/sample_spec.json -m test -o sample_data/records/val --generate_masks
echo "== 3/5 train a small model from scratch (8 to 33 CPU minutes, by the CPU)"
bpnet train -e specs/bpnet_train_sample.yaml -r results/sample_train
echo "== 4/5 inference on the validation images, with drawings"
bpnet inference -i specs/infer_spec_sample.yaml -m results/sample_train/bpnet_model.keras \
  --input_type dir --input sample_data/images/val -r results/sample_inference --dump_visualizations
echo "== 5/5 evaluate: COCO keypoint AP on the validation split"
bpnet evaluate -i specs/infer_spec_sample.yaml -m results/sample_train/bpnet_model.keras \
  -d sample_data/sample_spec.json -r results/sample_evaluate
echo
echo "Done. Look at results/sample_inference/images_annotated/ and results/sample_evaluate/results.csv"

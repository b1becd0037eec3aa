#!/usr/bin/env python
"""Benchmark the training input pipeline; prints ONE JSON line.

    python scripts/bench_pipeline.py [--batches 40] [--batch_size 8] [--size 368]

Converts ../shared/data/coco_tiny (train split, with loss masks) into
TFRecords in a temporary folder with bpnet's dataset_convert, then runs
build_dataset at 368x368 input / 46x46 maps with the TAO tutorial's
augmentation (person_centric, flips, +-40 degrees, +-40 px) and measures:

- samples_per_s: samples out of the finished pipeline (JPEG decode,
  augmentation, labels, batching, normalization) per wall-clock second;
- samples_per_s_per_core: samples per second of CPU time the process used
  (all threads, user + system), i.e. what one fully used core delivers;
  robust on a machine shared with other jobs;
- label_ms_1_person / label_ms_30_people: render_labels alone (median ms of
  thread CPU time)
  on real COCO poses (../shared/data/coco_val_annotations) placed in a
  368x368 input: one person at 0.6 of the height, and 30 people 70-140 px tall.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BPNET_SHARED", REPO.parent / "shared"))
COCO_TINY = SHARED / "data" / "coco_tiny"
COCO_VAL_ANN = SHARED / "data" / "coco_val_annotations" / "person_keypoints_val2017_part_a.json"


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _real_poses(pose):
    """Real COCO poses as model joints, each normalized to its labeled extent."""
    doc = json.loads(COCO_VAL_ANN.read_text())
    mapping = pose.dataset_mapping(doc["categories"][0]["keypoints"])
    out = []
    for a in doc["annotations"]:
        if a.get("iscrowd") or a.get("num_keypoints", 0) < 8:
            continue
        j = mapping.dataset_to_model(np.asarray(a["keypoints"], np.float32).reshape(1, -1, 3))[0]
        lab = j[j[:, 2] > 0, :2]
        lo, hi = lab.min(0), lab.max(0)
        if hi[1] - lo[1] < 20:
            continue
        j[j[:, 2] > 0, :2] = (lab - (lo + hi) / 2) / (hi[1] - lo[1])  # centred, height 1
        out.append(j)
    return out


def bench_labels(pose, size: int, repeats: int = 200):
    from bpnet.data.labels import render_labels
    poses = _real_poses(pose)
    rng = np.random.default_rng(0)

    def place(n, heights):
        people = []
        for k in range(n):
            p = poses[int(rng.integers(len(poses)))].copy()
            c = rng.uniform(0.15 * size, 0.85 * size, 2) if n > 1 else np.array([size / 2, size / 2])
            p[:, :2] = np.where(p[:, 2:] > 0, p[:, :2] * heights[k] + c, 0)
            people.append(p)
        return np.stack(people)

    result = {}
    for n, key in ((1, "label_ms_1_person"), (30, "label_ms_30_people")):
        heights = [0.6 * size] if n == 1 else rng.uniform(70, 140, n)
        joints = place(n, heights)
        render_labels(joints, pose, (size, size))
        times = []
        for _ in range(repeats):
            # Thread CPU time: render_labels is single-threaded, and on a
            # shared machine wall time also counts other jobs' turns.
            t = time.thread_time()
            render_labels(joints, pose, (size, size))
            times.append(time.thread_time() - t)
        result[key] = round(float(np.median(times)) * 1000, 3)
    return result


def make_spec(tmp: Path, size: int, batch_size: int):
    from bpnet.data.convert import dataset_convert
    from bpnet.specs import TrainSpec, build_spec
    ds_spec = json.loads((REPO / "data_pose_config" / "coco_spec.json").read_text())
    ds_spec.pop("pose_config_path", None)
    ds_spec["root_directory_path"] = str(COCO_TINY)
    ds_spec["train_data"] = {"images_root_dir_path": "train2017",
                             "mask_root_dir_path": str(tmp / "masks"),
                             "annotation_root_dir_path": "annotations/person_keypoints_train2017.json"}
    (tmp / "coco_tiny.json").write_text(json.dumps(ds_spec))
    dataset_convert(tmp / "coco_tiny.json", tmp / "train", mode="train", generate_masks=True, workers=1)
    spec = {
        "dataloader": {
            "batch_size": batch_size, "shuffle_buffer_size": 1000,
            "pose_config": {"target_shape": [size // 8, size // 8]},
            "image_config": {"image_dims": {"height": size, "width": size, "channels": 3}},
            "dataset_config": {"root_data_path": str(tmp), "train_records_folder_path": str(tmp),
                               "train_records_path": ["train"],
                               "dataset_specs": {"coco": str(tmp / "coco_tiny.json")}},
            "augmentation_config": {
                "spatial_augmentation_mode": "person_centric",
                "spatial_aug_params": {"flip_lr_prob": 0.5, "rotate_deg_max": 40.0, "translate_max_x": 40.0,
                                       "translate_max_y": 40.0, "zoom_prob": 0.0,
                                       "target_person_scale": 0.6}},
        }}
    return build_spec(TrainSpec, spec, "<bench>")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--size", type=int, default=368)
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for p in (COCO_TINY, COCO_VAL_ANN):
        if not p.exists():
            print(f"error: needs {p} (the ../shared folder beside the checkout)", file=sys.stderr)
            return 1

    from bpnet.pose import load_pose_config
    from bpnet.specs import default_pose_config_path
    pose = load_pose_config(default_pose_config_path())
    labels = bench_labels(pose, args.size)

    with tempfile.TemporaryDirectory(prefix="bpnet_bench_") as tmp:
        spec = make_spec(Path(tmp), args.size, args.batch_size)
        from bpnet.data.pipeline import build_dataset
        ds = build_dataset(spec, "train", seed=0)
        it = iter(ds)
        for _ in range(3):  # warm up: graph tracing, thread pools, file cache
            next(it)
        n = 0
        t0, c0 = time.perf_counter(), _cpu_seconds()
        for _ in range(args.batches):
            x, _ = next(it)
            n += int(x.shape[0])
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    print(json.dumps({
        "samples_per_s": round(n / wall, 1),
        "samples_per_s_per_core": round(n / cpu, 1),
        **labels,
        "input": [args.size, args.size],
        "cores": cores,
        "cpu_ms_per_sample": round(cpu / n * 1000, 2),
        "samples": n,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Throughput of ``dataset_convert`` with masks on real COCO images.

Builds, in a temporary folder, an annotation file that references the
images of ../shared/data/coco_tiny/train2017 that have keypointed persons
many times over under different ids (through folder links, so each copy
gets its own mask file), then times one full conversion with
--generate_masks. Only images that produce records are repeated, so every
image costs the full work (COCO train2017 also has about half its images
without persons, which are cheaper). Prints ONE JSON line.

    python scripts/bench_dataset_convert.py [--images 5000] [--workers 0]
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def coco_minutes(t, n, workers, coco_images=118287, cores=16):
    """Scale the measured phases to COCO train2017: the load phase is serial, the rest parallel.

    Pessimistic: every COCO image is costed like these (all have records, half need masks).
    """
    scale = coco_images / n
    return (t["load"] * scale + (t["check"] + t["convert"]) * workers * scale / cores) / 60


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000, help="images in the generated file (>= 5000)")
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0: one per core)")
    ap.add_argument("--coco_tiny", default=str(REPO.parent / "shared" / "data" / "coco_tiny"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from bpnet.data.convert import dataset_convert

    tiny = Path(args.coco_tiny)
    src = json.loads((tiny / "annotations" / "person_keypoints_train2017.json").read_text())
    with_people = {a["image_id"] for a in src["annotations"]
                   if not a["iscrowd"] and a["num_keypoints"] >= 5}
    base_images = [im for im in src["images"] if im["id"] in with_people]
    anns_by_image = {}
    for a in src["annotations"]:
        anns_by_image.setdefault(a["image_id"], []).append(a)
    copies = -(-args.images // len(base_images))

    with tempfile.TemporaryDirectory(prefix="bpnet_bench_") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        images, anns = [], []
        next_id, next_ann = 1, 1
        for c in range(copies):
            os.symlink(tiny / "train2017", tmp / "images" / f"copy{c:04d}")
            for im in base_images:
                if len(images) >= args.images:
                    break
                images.append(dict(im, id=next_id, file_name=f"copy{c:04d}/{im['file_name']}"))
                for a in anns_by_image[im["id"]]:
                    anns.append(dict(a, id=next_ann, image_id=next_id))
                    next_ann += 1
                next_id += 1
        doc = dict(src, images=images, annotations=anns)
        (tmp / "ann.json").write_text(json.dumps(doc))
        spec = json.loads((REPO / "data_pose_config" / "coco_spec.json").read_text())
        spec.pop("pose_config_path", None)
        spec.update(root_directory_path=str(tmp))
        spec["train_data"] = {"images_root_dir_path": "images", "mask_root_dir_path": "masks",
                              "annotation_root_dir_path": "ann.json"}
        (tmp / "spec.json").write_text(json.dumps(spec))

        from bpnet.data.convert import _usable_cores
        workers = args.workers or _usable_cores()
        t0 = time.perf_counter()
        summary = dataset_convert(tmp / "spec.json", tmp / "out" / "train", generate_masks=True,
                                  workers=workers)
        dt = time.perf_counter() - t0

    n = len(images)
    print(json.dumps({
        "images_per_s": round(n / dt, 1),
        "images_per_s_per_core": round(n / dt / workers, 1),
        "with_masks": True,
        "images": n,
        "records": summary["records"],
        "masks": summary["masks"],
        "workers": workers,
        "seconds": round(dt, 2),
        "timings_s": summary["timings_s"],
        "coco_train2017_minutes_on_16_cores_est": round(coco_minutes(summary["timings_s"], n, workers), 1),
    }))


if __name__ == "__main__":
    main()

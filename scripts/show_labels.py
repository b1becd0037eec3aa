#!/usr/bin/env python
"""Draw one augmented training sample with its labels, to see that they sit on the body.

    python scripts/show_labels.py --spec train.yaml --out sample.png --index 3 --seed 7

Writes a PNG of three panels, each the augmented input image:
  1. heatmaps (max over joints) blended in, transformed keypoints as dots
     (left joints red, right joints blue, others green), masked cells hatched;
  2. PAF vectors drawn as short arrows from every cell where a limb field is set;
  3. the background heatmap channel.
The sample goes through exactly the code the tf.data pipeline runs per
sample (bpnet.data.pipeline.SampleProcessor), without TensorFlow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="train spec (YAML/JSON)")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--index", type=int, default=0, help="record index in the split's record files")
    ap.add_argument("--seed", type=int, default=0, help="augmentation seed")
    ap.add_argument("--split", choices=["train", "val"], default="train")
    ap.add_argument("--zoom", type=int, default=2, help="upscale factor of the drawing")
    args = ap.parse_args(argv)

    from bpnet.errors import BpnetError
    from bpnet.io import write_bytes_atomic
    from bpnet.data.pipeline import SampleProcessor, dataset_roots
    from bpnet.data.records import read_records, split_files
    from bpnet.model.meta import STRIDE
    from bpnet.specs import load_train_spec

    try:
        spec = load_train_spec(args.spec)
        pose = spec.dataloader.pose_config.load()
        files = split_files(spec.dataloader.dataset_config, args.split)
        roots, fallback = dataset_roots(spec)
        rec = None
        for i, r in enumerate(read_records(files)):
            if i == args.index:
                rec = r
                break
        if rec is None:
            raise BpnetError(f"--index {args.index}: the {args.split} records hold only {i + 1 if files else 0}")
        proc = SampleProcessor(spec, pose, roots, fallback, train=args.split == "train")
        img, heat, paf, mask, joints = proc(rec["dataset"], rec["image_path"], rec["mask_path"],
                                            rec["height"], rec["width"], rec["joints"], rec["centers"],
                                            rec["scales"], args.seed)
    except BpnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    z = args.zoom
    # The pipeline yields RGB; OpenCV draws and writes BGR.
    base = np.ascontiguousarray(img[..., ::-1]) if img.shape[2] == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    H, W = base.shape[:2]
    big = cv2.resize(base, (W * z, H * z), interpolation=cv2.INTER_LINEAR)
    J = pose.num_joints

    def up(m):
        return cv2.resize(m, (W * z, H * z), interpolation=cv2.INTER_LINEAR)

    # Panel 1: heatmaps + joints + mask.
    hm = up(heat[..., :J].max(axis=2))
    colour = cv2.applyColorMap((hm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    p1 = (big * (1 - 0.6 * hm[..., None]) + colour * (0.6 * hm[..., None])).astype(np.uint8)
    m = cv2.resize(mask[..., 0], (W * z, H * z), interpolation=cv2.INTER_NEAREST)
    hatch = (np.add.outer(np.arange(H * z), np.arange(W * z)) // 4) % 2 == 0
    p1[(m < 0.5) & hatch] = (0, 0, 0)
    for person in joints:
        for j, (x, y, v) in enumerate(person):
            if v <= 0:
                continue
            name = pose.keypoints[j]
            c = (0, 0, 255) if name.startswith("left") else (255, 0, 0) if name.startswith("right") else (0, 200, 0)
            cv2.circle(p1, (int(round((x + 0.5) * z - 0.5)), int(round((y + 0.5) * z - 0.5))), 3, c, -1, cv2.LINE_AA)

    # Panel 2: PAF arrows, one per cell and limb where the field is set.
    p2 = (big * 0.6).astype(np.uint8)
    h, w = paf.shape[:2]
    rng = np.random.default_rng(0)
    limb_colours = [tuple(int(v) for v in rng.integers(80, 256, 3)) for _ in range(pose.num_edges)]
    for k in range(pose.num_edges):
        vx, vy = paf[..., 2 * k], paf[..., 2 * k + 1]
        for gy, gx in np.argwhere(np.hypot(vx, vy) > 0.3):
            cx, cy = (gx * STRIDE + (STRIDE - 1) / 2 + 0.5) * z, (gy * STRIDE + (STRIDE - 1) / 2 + 0.5) * z
            L = STRIDE * z * 0.45
            cv2.arrowedLine(p2, (int(cx - vx[gy, gx] * L), int(cy - vy[gy, gx] * L)),
                            (int(cx + vx[gy, gx] * L), int(cy + vy[gy, gx] * L)), limb_colours[k], 1,
                            cv2.LINE_AA, tipLength=0.4)

    # Panel 3: background channel.
    bg = (up(heat[..., J]) * 255).astype(np.uint8)
    p3 = cv2.cvtColor(bg, cv2.COLOR_GRAY2BGR)

    sep = np.full((H * z, 6, 3), 255, np.uint8)
    canvas = np.concatenate([p1, sep, p2, sep, p3], axis=1)
    ok, buf = cv2.imencode(".png", canvas)
    if not ok:
        print("error: could not encode the PNG", file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.out, buf.tobytes())
    print(f"wrote {args.out}: record {args.index} ({rec['image_path']}), {len(joints)} persons, "
          f"heatmaps {heat.shape}, PAFs {paf.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost of refusing corrupt JPEGs: cv2.imdecode alone vs bpnet.data.images.decode_image
(structural checks + the libjpeg-warning capture), on real COCO pictures.

    python scripts/bench_image_check.py [--images DIR] [--repeats N]

Prints one JSON line: the least and the median ms per picture for both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import cv2
import numpy as np

from bpnet.data.images import decode_image

REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "coco_tiny" / "train2017"))
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    files = sorted(Path(args.images).glob("*.jpg"))[:20]
    if not files:
        raise SystemExit(f"no .jpg under {args.images}")
    cv2.setNumThreads(1)
    bufs = [np.frombuffer(f.read_bytes(), np.uint8) for f in files]
    plain, checked = [], []
    for _ in range(args.repeats):
        for b in bufs:
            t = time.perf_counter()
            cv2.imdecode(b, cv2.IMREAD_COLOR)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            img, problem = decode_image(b, cv2.IMREAD_COLOR)
            checked.append(time.perf_counter() - t)
            assert problem is None, problem
    # The least time of each is the cost without other processes' interference; the
    # medians show how noisy the machine was.
    p, c = min(plain) * 1e3, min(checked) * 1e3
    print(json.dumps({"bench": "image_check", "pictures": len(files), "repeats": args.repeats,
                      "imdecode_min_ms": round(p, 3), "decode_image_min_ms": round(c, 3),
                      "overhead_min_ms": round(c - p, 3),
                      "imdecode_median_ms": round(statistics.median(plain) * 1e3, 3),
                      "decode_image_median_ms": round(statistics.median(checked) * 1e3, 3)}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Decoder benchmark: how well and how fast ground-truth maps decode to people.

For every image of a COCO keypoint file (no pixels needed) the labeled
persons are mapped to the model's joints (bpnet_18joints: synthetic neck),
rendered at stride 8 at the image's own size with the project's label
renderer (sigma 7 px, PAF half-width 1 cell), decoded, mapped back to the
17 COCO keypoints and scored with pycocotools' COCOeval (keypoints; crowd
regions ignored as usual). ``ap`` uses the exact maps, ``ap_noise`` the
same maps plus N(0, 1e-4) noise (fixed seed) which breaks exact ties.

Time is decode only (maps in, people out, everything included), on one
thread, the best of --repeats runs per image (the best damps other
processes' noise on a shared machine), after a warm-up call that loads or
compiles numba's kernels. ``ms_30_people`` decodes a synthetic 656x368
scene of 30 real-pose persons rendered the same way (median over 15 trials
of the best of --repeats runs).

Prints ONE JSON line:
{"images", "ap", "ap_noise", "ap50", "ap75", "ar", "ms_median", "ms_p90", "ms_30_people"}
"""

import os

for _v in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bpnet.data.labels import render_labels  # noqa: E402
from bpnet.infer.decode import decode, numba_available  # noqa: E402
from bpnet.model.meta import STRIDE  # noqa: E402
from bpnet.pose import load_pose_config  # noqa: E402
from bpnet.specs import DecoderConfig  # noqa: E402

DEFAULT_ANN = REPO.parent / "shared" / "data" / "coco_val_annotations" / \
    "person_keypoints_val2017_part_a.json"
DEFAULT_POSE = REPO / "bpnet" / "configs" / "bpnet_18joints.json"

# The settings every figure is measured with (--param values go on top):
# min_parts 3 keeps COCO's many small people; DecoderConfig's default, 4, is
# TAO's filtering.
BENCH_DECODER = DecoderConfig(min_parts=3)


def load_gt(ann_path, pose):
    """Per image: (image id, (H, W), model joints [P, J, 3]), plus the COCO object."""
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_path))
    cat = coco.loadCats(coco.getCatIds(catNms=["person"]) or coco.getCatIds())[0]
    mapping = pose.dataset_mapping(cat["keypoints"])
    K = len(cat["keypoints"])
    images = []
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False))
        kps = [np.asarray(a["keypoints"], np.float32).reshape(K, 3)
               for a in anns if a.get("num_keypoints", 0) > 0]
        kps = np.stack(kps) if kps else np.zeros((0, K, 3), np.float32)
        joints = mapping.dataset_to_model(kps) if len(kps) else \
            np.zeros((0, pose.num_joints, 3), np.float32)
        images.append((img_id, (info["height"], info["width"]), joints))
    return coco, mapping, cat["id"], images


def coco_results(img_id, people, mapping, cat_id):
    out = []
    kp17 = mapping.model_to_dataset(people.keypoints[..., :2], people.keypoints[..., 2])
    for n in range(len(people)):
        k = kp17[n].copy()
        k[:, 2] = np.where(k[:, 2] > 0, 1.0, 0.0)
        out.append({"image_id": int(img_id), "category_id": int(cat_id),
                    "keypoints": [round(float(v), 3) for v in k.reshape(-1)],
                    "score": float(people.scores[n])})
    return out


def evaluate(coco, results, img_ids):
    from pycocotools.cocoeval import COCOeval
    if not results:
        return [0.0] * 10
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(results)
        ev = COCOeval(coco, dt, "keypoints")
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(x) for x in ev.stats]


def time_decode(heat, paf, pose, repeats, **kw):
    best = np.inf
    people = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        people = decode(heat, paf, pose, stride=STRIDE, config=BENCH_DECODER, **kw)
        best = min(best, time.perf_counter() - t0)
    return people, best * 1000.0


def crowd_scene(images, pose, n=30, hw=(368, 656), seed=0):
    """n real poses (the most complete ones), rescaled onto a grid of hw."""
    rng = np.random.default_rng(seed)
    pool = [p for _, _, joints in images for p in joints if (p[:, 2] > 0).sum() >= 14]
    if not pool:
        return None, hw
    # Repeat poses when the file has fewer than n complete persons.
    order = rng.permutation(len(pool))
    pool = [pool[order[i % len(pool)]] for i in range(n)]
    H, W = hw
    cols = int(np.ceil(np.sqrt(n * W / H)))
    rows = int(np.ceil(n / cols))
    cw, ch = W / cols, H / rows
    out = []
    for i, p in enumerate(pool):
        p = p.copy()
        m = p[:, 2] > 0
        lo, hi = p[m, :2].min(0), p[m, :2].max(0)
        s = min(cw / max(hi[0] - lo[0], 1), 1.3 * ch / max(hi[1] - lo[1], 1))
        r, c = divmod(i, cols)
        centre = np.array([(c + 0.5) * cw, (r + 0.5) * ch]) + rng.uniform(-4, 4, 2)
        p[m, :2] = (p[m, :2] - (lo + hi) / 2) * s + centre
        out.append(p)
    return np.stack(out), hw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotations", default=str(DEFAULT_ANN), help="COCO keypoint json")
    ap.add_argument("--pose_config", default=str(DEFAULT_POSE))
    ap.add_argument("--max_images", type=int, default=0, help="0 = all")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per image (best kept)")
    ap.add_argument("--noise", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--param", action="append", default=[],
                    help="decoder parameter NAME=VALUE (repeatable), e.g. min_parts=4")
    ap.add_argument("--no_numba", action="store_true",
                    help="time the pure NumPy/Python fallback instead of numba's kernels")
    args = ap.parse_args(argv)

    if not Path(args.annotations).is_file():
        ap.error(f"--annotations {args.annotations}: no such file (a COCO keypoint json)")
    kw = {}
    for item in args.param:
        k, _, v = item.partition("=")
        kw[k] = json.loads(v) if v not in ("gaussian", "quadratic", "none") else v
    if args.no_numba:
        kw["use_numba"] = False

    pose = load_pose_config(args.pose_config)
    coco, mapping, cat_id, images = load_gt(args.annotations, pose)
    if args.max_images:
        images = images[:args.max_images]
    rng = np.random.default_rng(args.seed)

    # Warm-up: numba loads (or, the very first time, compiles) its kernels.
    h0, p0 = render_labels(images[0][2], pose, images[0][1])
    decode(h0, p0, pose, config=BENCH_DECODER, **kw)

    res_exact, res_noise, times = [], [], []
    for img_id, hw, joints in images:
        heat, paf = render_labels(joints, pose, hw, stride=STRIDE, sigma=7.0, paf_thresh=1.0)
        people, ms = time_decode(heat, paf, pose, args.repeats, **kw)
        times.append(ms)
        res_exact += coco_results(img_id, people, mapping, cat_id)
        hn = heat + rng.normal(0, args.noise, heat.shape).astype(np.float32)
        pn = paf + rng.normal(0, args.noise, paf.shape).astype(np.float32)
        res_noise += coco_results(img_id, decode(hn, pn, pose, config=BENCH_DECODER, **kw),
                                  mapping, cat_id)

    ids = [i for i, _, _ in images]
    st = evaluate(coco, res_exact, ids)
    st_noise = evaluate(coco, res_noise, ids)

    joints30, hw30 = crowd_scene(images, pose)
    t30 = []
    if joints30 is not None:
        h30, p30 = render_labels(joints30, pose, hw30)
        for _ in range(15):
            people30, ms = time_decode(h30, p30, pose, args.repeats, **kw)
            t30.append(ms)

    out = {"images": len(images), "ap": round(st[0], 4), "ap_noise": round(st_noise[0], 4),
           "ap50": round(st[1], 4), "ap75": round(st[2], 4), "ar": round(st[5], 4),
           "ms_median": round(float(np.median(times)), 3),
           "ms_p90": round(float(np.percentile(times, 90)), 3),
           "ms_30_people": round(float(np.median(t30)), 3) if t30 else None}
    if kw:
        out["params"] = kw
    out["numba"] = not args.no_numba and numba_available()
    print(json.dumps(out))
    if t30 and len(people30) != len(joints30):
        print(f"note: the 30-person scene decoded to {len(people30)} people", file=sys.stderr)


if __name__ == "__main__":
    main()

"""A small synthetic COCO-format keypoint dataset for smoke runs, tests and CI.

Each image holds a few articulated stick-and-block figures on a textured,
desaturated background. The figures are built so that a small CNN at about
128 px input can learn them: thick, saturated, outlined limbs; the
person's LEFT limbs and ear are always warm (red-orange) and the RIGHT ones
always cool (blue), so left and right stay distinguishable even for figures
seen from the back. Annotations are exact:

* 17 COCO keypoints, visibility 2 (visible), 1 (covered by a figure drawn
  in front) or 0 (outside the image, face of a figure seen from the back,
  or a few dropped at random, as annotators do);
* person segmentation as polygons (one per body part, clipped to the image),
  bbox and area from the rasterized union;
* small figures, figures mostly outside the image and figures annotated
  without keypoints, so the main-person filters of dataset_convert matter;
* a few crowd regions (iscrowd=1, uncompressed RLE or polygon) filled with
  small unannotated figures, which the loss masks must hide.

Everything is a function of the seed: the same seed gives the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle")
COCO_SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13),
    (6, 7), (6, 8), (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3),
    (2, 4), (3, 5), (4, 6), (5, 7))
_K = {n: i for i, n in enumerate(COCO_KEYPOINTS)}


# ------------------------------------------------------------------ geometry

def _dir(angle: float) -> np.ndarray:
    """Unit vector; angle 0 points down the image, positive turns to image right."""
    return np.array([math.sin(angle), math.cos(angle)])


def _clip_polygon(poly: np.ndarray, w: int, h: int) -> np.ndarray:
    """Intersect a convex polygon with the image rectangle (Sutherland-Hodgman)."""
    def clip(pts, inside, cross):
        out = []
        n = len(pts)
        for i in range(n):
            cur, prev = pts[i], pts[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(cross(prev, cur))
                out.append(cur)
            elif inside(prev):
                out.append(cross(prev, cur))
        return out

    def at_x(x):
        return lambda a, b: np.array([x, a[1] + (b[1] - a[1]) * (x - a[0]) / (b[0] - a[0])])

    def at_y(y):
        return lambda a, b: np.array([a[0] + (b[0] - a[0]) * (y - a[1]) / (b[1] - a[1]), y])

    pts = list(poly)
    for inside, cross in ((lambda p: p[0] >= 0, at_x(0.0)), (lambda p: p[0] <= w, at_x(float(w))),
                          (lambda p: p[1] >= 0, at_y(0.0)), (lambda p: p[1] <= h, at_y(float(h)))):
        if not pts:
            break
        pts = clip(pts, inside, cross)
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


def _segment_polygon(a, b, thickness: float) -> np.ndarray:
    """A rectangle around segment a-b, extended by half its width at both ends."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = b - a
    n = np.linalg.norm(d)
    d = d / n if n > 1e-6 else np.array([0.0, 1.0])
    p = np.array([-d[1], d[0]]) * thickness / 2
    e = d * thickness / 2
    return np.array([a - e + p, b + e + p, b + e - p, a - e - p])


def _circle_polygon(c, r: float, n: int = 12) -> np.ndarray:
    t = np.arange(n) * 2 * math.pi / n
    return np.stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t)], 1)


# ------------------------------------------------------------------ figures

def _hsv(h, s, v) -> Tuple[int, int, int]:
    """HSV (OpenCV ranges) -> BGR tuple of ints."""
    import cv2
    px = np.uint8([[[int(h) % 180, int(s), int(v)]]])
    b, g, r = cv2.cvtColor(px, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _make_figure(rng: np.random.Generator, pelvis, height: float) -> dict:
    """Joint positions, body parts and colours of one figure (no drawing)."""
    H = height
    facing = 1.0 if rng.random() < 0.8 else -1.0  # -1: seen from the back
    lean = rng.uniform(-0.3, 0.3)
    up = -_dir(lean)  # from pelvis towards the head
    side = np.array([-up[1], up[0]])  # image-right when upright
    if side[0] < 0:
        side = -side
    pelvis = np.asarray(pelvis, float)
    s_mid = pelvis + 0.30 * H * up
    # Seen from the front, the person's left side is on the image right.
    lsh = s_mid + facing * 0.12 * H * side
    rsh = s_mid - facing * 0.12 * H * side
    lhip = pelvis + facing * 0.075 * H * side
    rhip = pelvis - facing * 0.075 * H * side
    head_r = 0.07 * H
    tilt = rng.uniform(-0.25, 0.25)
    head_up = -_dir(lean + tilt)
    head_side = np.array([-head_up[1], head_up[0]])
    if head_side[0] < 0:
        head_side = -head_side
    head = s_mid + 0.06 * H * up + 0.075 * H * head_up
    yaw = rng.uniform(-0.3, 0.3) * head_r
    kp = np.zeros((17, 2))
    kp[_K["nose"]] = head - 0.05 * head_r * head_up + yaw * head_side
    kp[_K["left_eye"]] = head + 0.3 * head_r * head_up + (facing * 0.38 * head_r + yaw) * head_side
    kp[_K["right_eye"]] = head + 0.3 * head_r * head_up + (-facing * 0.38 * head_r + yaw) * head_side
    kp[_K["left_ear"]] = head + facing * 0.8 * head_r * head_side
    kp[_K["right_ear"]] = head - facing * 0.8 * head_r * head_side
    kp[_K["left_shoulder"]], kp[_K["right_shoulder"]] = lsh, rsh
    kp[_K["left_hip"]], kp[_K["right_hip"]] = lhip, rhip

    def limb(start, out_sign, l1, l2, a_range, bend_range):
        # Angles measured from "down"; out_sign turns the limb away from the body.
        a1 = lean + out_sign * rng.uniform(*a_range)
        bend = out_sign * rng.uniform(*bend_range) * (1 if rng.random() < 0.7 else -1)
        mid = start + l1 * H * _dir(a1)
        end = mid + l2 * H * _dir(a1 + bend)
        return mid, end

    # Arms: anywhere from hanging to raised; legs: mostly downwards.
    for name, sh, sgn in (("left", lsh, facing), ("right", rsh, -facing)):
        e, w = limb(sh, sgn, 0.17, 0.15, (-0.3, 2.8), (0.0, 2.4))
        kp[_K[f"{name}_elbow"]], kp[_K[f"{name}_wrist"]] = e, w
    for name, hp, sgn in (("left", lhip, facing), ("right", rhip, -facing)):
        k, a = limb(hp, sgn, 0.23, 0.23, (-0.25, 0.9), (0.0, 1.4))
        kp[_K[f"{name}_knee"]], kp[_K[f"{name}_ankle"]] = k, a

    arm_t, leg_t, neck_t = max(2.0, 0.07 * H), max(2.0, 0.09 * H), max(2.0, 0.08 * H)
    torso = np.array([rsh, lsh, lhip, rhip]) if facing > 0 else np.array([lsh, rsh, rhip, lhip])
    # Widen the torso slightly so shoulders and hips lie inside it.
    c = torso.mean(0)
    torso = c + (torso - c) * 1.15
    warm = rng.uniform(0, 14)
    cool = rng.uniform(100, 122)
    colors = {
        "left_arm": _hsv(warm, rng.uniform(200, 255), rng.uniform(210, 255)),
        "right_arm": _hsv(cool, rng.uniform(200, 255), rng.uniform(210, 255)),
        "left_leg": _hsv(warm + 4, rng.uniform(180, 255), rng.uniform(150, 200)),
        "right_leg": _hsv(cool + 4, rng.uniform(180, 255), rng.uniform(150, 200)),
        "torso": _hsv(rng.uniform(30, 85), rng.uniform(120, 230), rng.uniform(140, 240)),
        "skin": _hsv(rng.uniform(8, 20), rng.uniform(60, 150), rng.uniform(150, 250)),
    }
    segs = [  # (polygon-part name, a, b, thickness, colour key), in drawing order
        ("left_thigh", lhip, kp[_K["left_knee"]], leg_t, "left_leg"),
        ("left_shin", kp[_K["left_knee"]], kp[_K["left_ankle"]], leg_t, "left_leg"),
        ("right_thigh", rhip, kp[_K["right_knee"]], leg_t, "right_leg"),
        ("right_shin", kp[_K["right_knee"]], kp[_K["right_ankle"]], leg_t, "right_leg"),
        ("neck", s_mid, head, neck_t, "skin"),
    ]
    arms = [
        ("left_upper_arm", lsh, kp[_K["left_elbow"]], arm_t, "left_arm"),
        ("left_forearm", kp[_K["left_elbow"]], kp[_K["left_wrist"]], arm_t, "left_arm"),
        ("right_upper_arm", rsh, kp[_K["right_elbow"]], arm_t, "right_arm"),
        ("right_forearm", kp[_K["right_elbow"]], kp[_K["right_wrist"]], arm_t, "right_arm"),
    ]
    return {"kp": kp, "facing": facing, "torso": torso, "segs": segs, "arms": arms,
            "head": head, "head_r": head_r, "colors": colors, "height": H}


def _figure_polygons(fig) -> List[np.ndarray]:
    polys = [_segment_polygon(a, b, t) for _, a, b, t, _ in fig["segs"]]
    polys.append(fig["torso"])
    polys += [_segment_polygon(a, b, t) for _, a, b, t, _ in fig["arms"]]
    polys.append(_circle_polygon(fig["head"], fig["head_r"]))
    return polys


_SHIFT = 4  # fixed-point bits for sub-pixel cv2 drawing


def _pts(p) -> np.ndarray:
    return np.round(np.asarray(p) * (1 << _SHIFT)).astype(np.int32)


def _disc(img: np.ndarray, centre, radius: float, color, thickness: int = -1) -> None:
    """A sub-pixel, anti-aliased circle (filled unless ``thickness`` >= 0)."""
    import cv2
    cv2.circle(img, tuple(_pts(centre)), int(round(radius * (1 << _SHIFT))), color, thickness,
               cv2.LINE_AA, _SHIFT)


def _draw_face(img: np.ndarray, kp, dot: float, eye_color, nose_scale: float, nose_color) -> None:
    """Eyes (radius ``dot``) and nose (``dot * nose_scale``) at their keypoints."""
    for n in ("left_eye", "right_eye"):
        _disc(img, kp[_K[n]], dot, eye_color)
    _disc(img, kp[_K["nose"]], dot * nose_scale, nose_color)


def _draw_figure(img: np.ndarray, fig) -> None:
    import cv2
    aa = cv2.LINE_AA
    outline = (25, 25, 25)

    def seg(a, b, t, color):
        t = max(1, int(round(t)))
        cv2.line(img, tuple(_pts(a)), tuple(_pts(b)), outline, t + 2, aa, _SHIFT)
        cv2.line(img, tuple(_pts(a)), tuple(_pts(b)), color, t, aa, _SHIFT)

    for _, a, b, t, ck in fig["segs"]:
        seg(a, b, t, fig["colors"][ck])
    cv2.fillPoly(img, [_pts(fig["torso"])], fig["colors"]["torso"], aa, _SHIFT)
    cv2.polylines(img, [_pts(fig["torso"])], True, outline, 1, aa, _SHIFT)
    for _, a, b, t, ck in fig["arms"]:
        seg(a, b, t, fig["colors"][ck])
    r = fig["head_r"]
    _disc(img, fig["head"], r, fig["colors"]["skin"])
    _disc(img, fig["head"], r, outline, 1)
    kp = fig["kp"]
    dot = max(1.0, 0.2 * r)
    # Ears carry the side colours, like the limbs.
    _disc(img, kp[_K["left_ear"]], dot * 1.2, fig["colors"]["left_arm"])
    _disc(img, kp[_K["right_ear"]], dot * 1.2, fig["colors"]["right_arm"])
    if fig["facing"] > 0:
        _draw_face(img, kp, dot, (10, 10, 10), 0.9, (40, 40, 200))


def _raster(polys: Sequence[np.ndarray], h: int, w: int) -> np.ndarray:
    """Rasterize polygons exactly as pycocotools does, so areas and masks agree with COCO tools."""
    from pycocotools import mask as mask_utils
    flat = [_r(np.asarray(p).reshape(-1)) for p in polys if len(p) >= 3]
    if not flat:
        return np.zeros((h, w), bool)
    rle = mask_utils.merge(mask_utils.frPyObjects(flat, h, w))
    return mask_utils.decode(rle).astype(bool)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    import cv2
    # Smooth random colour field plus grain and a few faint shapes: texture
    # that a network must learn to ignore, kept desaturated so figures stand out.
    low = rng.uniform(60, 200, size=(rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.float32)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    gray = img.mean(2, keepdims=True)
    img = gray + (img - gray) * rng.uniform(0.2, 0.5)
    img += rng.normal(0, rng.uniform(4, 12), size=(h, w, 1)).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(2, 7)):
        c = tuple(int(x) for x in rng.uniform(70, 190, 3))
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x0, y0), (x0 + int(rng.integers(10, w // 2)),
                                          y0 + int(rng.integers(10, h // 2))), c, -1)
        else:
            cv2.ellipse(img, (x0, y0), (int(rng.integers(5, w // 4)), int(rng.integers(5, h // 4))),
                        float(rng.uniform(0, 180)), 0, 360, c, -1)
    return cv2.GaussianBlur(img, (3, 3), 0)


def _rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths, starting with zeros)."""
    flat = mask.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0] + runs
    return {"counts": [int(r) for r in runs], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _bbox(mask: np.ndarray) -> List[float]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]


def _r(x, nd=2):
    return [round(float(v), nd) for v in x]


def _make_image(rng: np.random.Generator, h: int, w: int, image_id: int, next_ann_id: int):
    """One image and its annotations."""
    import cv2
    img = _background(rng, h, w)
    anns: List[dict] = []
    size = min(h, w)

    # A crowd: several small overlapping figures, annotated only as one region.
    if rng.random() < 0.2:
        cw = rng.uniform(0.25, 0.4) * w
        x0 = rng.uniform(0, w - cw)
        crowd_masks = []
        for _ in range(rng.integers(4, 9)):
            fh = rng.uniform(0.12, 0.2) * size
            fig = _make_figure(rng, (x0 + rng.uniform(0, cw), rng.uniform(0.55 * fh, h - 0.5 * fh)), fh)
            _draw_figure(img, fig)
            crowd_masks.append(_raster([_clip_polygon(p, w, h) for p in _figure_polygons(fig)], h, w))
        cm = np.any(crowd_masks, 0)
        if rng.random() < 0.7:
            seg = _rle_uncompressed(cm)
        else:
            # A single convex outline around the crowd, as some datasets annotate it.
            ys, xs = np.nonzero(cm)
            hull = cv2.convexHull(np.stack([xs, ys], 1).astype(np.float32))[:, 0]
            seg = [_r(hull.reshape(-1))]
            cm = _raster([hull.astype(np.float64)], h, w)
        anns.append({"segmentation": seg, "num_keypoints": 0, "area": float(cm.sum()),
                     "iscrowd": 1, "keypoints": [0] * 51, "bbox": _bbox(cm), "category_id": 1})

    figs = []
    n_main = int(rng.integers(1, 5))
    for _ in range(n_main):
        fh = rng.uniform(0.3, 0.85) * size
        x = rng.uniform(-0.05, 1.05) * w
        lo, hi = 0.55 * fh, h - 0.46 * fh
        y = rng.uniform(lo, hi) if hi > lo else h / 2
        y += rng.normal(0, 0.08 * fh)
        figs.append((_make_figure(rng, (x, y), fh), "keypoints"))
    if rng.random() < 0.35:  # too small to be a main person
        fh = rng.uniform(0.08, 0.15) * size
        figs.append((_make_figure(rng, (rng.uniform(0.1, 0.9) * w, rng.uniform(0.2, 0.9) * h), fh),
                     "keypoints"))
    if rng.random() < 0.25:  # annotated outline only, no keypoints (COCO has many)
        fh = rng.uniform(0.15, 0.4) * size
        figs.append((_make_figure(rng, (rng.uniform(0.1, 0.9) * w, rng.uniform(0.3, 0.8) * h), fh),
                     "no_keypoints"))
    order = rng.permutation(len(figs))  # drawing order: later figures are in front
    figs = [figs[i] for i in order]
    masks = []
    polys_all = []
    for fig, _ in figs:
        _draw_figure(img, fig)
        polys = [q for q in (_clip_polygon(p, w, h) for p in _figure_polygons(fig)) if len(q) >= 3]
        polys_all.append(polys)
        masks.append(_raster(polys, h, w))

    for i, (fig, kind) in enumerate(figs):
        m = masks[i]
        if not m.any():
            continue
        kp = np.zeros((17, 3))
        if kind == "keypoints":
            front = np.any(masks[i + 1:], 0) if i + 1 < len(figs) else np.zeros((h, w), bool)
            for k, (x, y) in enumerate(fig["kp"]):
                xi, yi = int(x), int(y)
                if not (0 <= x < w and 0 <= y < h):
                    continue  # outside the image: not labeled
                if fig["facing"] < 0 and k in (_K["nose"], _K["left_eye"], _K["right_eye"]):
                    continue
                if rng.random() < 0.03:
                    continue  # annotators skip some joints
                kp[k] = (x, y, 1 if front[yi, xi] else 2)
        seg = [_r(p.reshape(-1)) for p in polys_all[i]]
        anns.append({"segmentation": seg, "num_keypoints": int((kp[:, 2] > 0).sum()),
                     "area": float(m.sum()), "iscrowd": 0,
                     "keypoints": [round(float(v), 2) if j % 3 < 2 else int(v)
                                   for j, v in enumerate(kp.reshape(-1))],
                     "bbox": _bbox(m), "category_id": 1})

    img = np.clip(img.astype(np.int16) + rng.normal(0, 3, img.shape).astype(np.int16), 0, 255)
    for a in anns:
        a["image_id"] = image_id
        a["id"] = next_ann_id
        next_ann_id += 1
    return img.astype(np.uint8), anns


# ------------------------------------------------------------------ dataset

def coco_category() -> dict:
    return {"supercategory": "person", "id": 1, "name": "person", "num_joints": 17,
            "keypoints": list(COCO_KEYPOINTS), "skeleton": [list(e) for e in COCO_SKELETON]}


def sample_dataset_spec(name: str = "sample") -> dict:
    """The dataset spec written beside the sample data (paths relative to it)."""
    return {
        "dataset": name,
        "root_directory_path": ".",
        "train_data": {"images_root_dir_path": "images/train", "mask_root_dir_path": "masks/train",
                       "annotation_root_dir_path": "annotations/person_keypoints_train.json"},
        "test_data": {"images_root_dir_path": "images/val", "mask_root_dir_path": "masks/val",
                      "annotation_root_dir_path": "annotations/person_keypoints_val.json"},
        "duplicate_data_with_each_person_as_center": True,
        "categories": [coco_category()],
        "visibility_flags": {"value": {"visible": 2, "occluded": 1, "not_labeled": 0},
                             "mapping": {"visible": "visible", "occluded": "occluded",
                                         "not_labeled": "not_labeled"}},
        "data_filtering_params": {"min_acceptable_height": 32, "min_acceptable_width": 32,
                                  "min_acceptable_kpts": 5,
                                  "min_acceptable_interperson_dist_ratio": 0.3},
    }


def split_key(split: str) -> int:
    """A number per split name, for the per-image seeds."""
    return sum(ord(c) * 31 ** i for i, c in enumerate(split)) % (2 ** 31)


def write_split(out_dir, split: str, num_images: int, image_size, make_image, info: dict,
                licence: str, first_id: int = 1, jpeg_quality: int = 92) -> list:
    """Write images/<split>/*.jpg and annotations/person_keypoints_<split>.json.

    ``make_image(i, h, w, image_id, first_ann_id) -> (BGR image, annotations)`` draws
    image ``i``. Returns the annotations.
    """
    import cv2
    from ..io import write_bytes_atomic, write_json_atomic
    out = Path(out_dir)
    h, w = int(image_size[0]), int(image_size[1])
    images, anns = [], []
    ann_id = first_id * 100 + 1
    for i in range(num_images):
        image_id = first_id + i
        img, a = make_image(i, h, w, image_id, ann_id)
        ann_id += len(a)
        anns += a
        name = f"{image_id:012d}.jpg"
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        write_bytes_atomic(out / "images" / split / name, buf.tobytes())
        images.append({"id": image_id, "file_name": name, "height": h, "width": w, "license": 1})
    doc = {"info": info, "licenses": [{"id": 1, "name": licence, "url": ""}],
           "images": images, "annotations": anns, "categories": [coco_category()]}
    write_json_atomic(out / "annotations" / f"person_keypoints_{split}.json", doc, indent=None)
    return anns


def make_split(out_dir, split: str, num_images: int, image_size=(256, 256), seed: int = 0,
               first_id: int = 1, jpeg_quality: int = 92) -> dict:
    """Write images/<split>/*.jpg and annotations/person_keypoints_<split>.json."""
    key = split_key(split)

    def draw(i, h, w, image_id, ann_id):
        return _make_image(np.random.default_rng([seed, key, i]), h, w, image_id, ann_id)

    anns = write_split(out_dir, split, num_images, image_size, draw,
                       {"description": f"bpnet synthetic sample data ({split}, seed {seed})",
                        "version": "1.0"}, "CC0 1.0 (generated by bpnet)", first_id, jpeg_quality)
    kp_persons = sum(1 for a in anns if not a["iscrowd"] and a["num_keypoints"] > 0)
    return {"images": num_images, "annotations": len(anns), "persons_with_keypoints": kp_persons,
            "crowd_regions": sum(1 for a in anns if a["iscrowd"])}


MAX_SAMPLE_SIDE = 4096  # pixels; bpnet.specs.MAX_INPUT_SIDE bounds network inputs alike


def check_output_dir(out_dir, image_size) -> Path:
    """``out_dir`` as a Path, after checking the picture size and that the folder holds no
    dataset make_sample_data did not write (it never writes over one)."""
    from ..errors import BpnetError
    out = Path(out_dir)
    if min(image_size) < 32:
        raise BpnetError(f"image_size {tuple(image_size)} is too small; use at least 32x32")
    if max(image_size) > MAX_SAMPLE_SIDE:
        raise BpnetError(f"image_size {tuple(image_size)} exceeds the bound {MAX_SAMPLE_SIDE} "
                         "per side (sample pictures that large take minutes each and teach nothing "
                         "more)")
    for split in ("train", "val"):
        ann = out / "annotations" / f"person_keypoints_{split}.json"
        if ann.exists() and not (out / "sample_spec.json").exists():
            raise BpnetError(f"{out} already holds {ann} that make_sample_data did not write; "
                             "choose an empty folder")
    return out


def make_output_dir(out: Path) -> None:
    from ..errors import BpnetError
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BpnetError(f"cannot create output folder {out}: {e.strerror or e}") from e


def make_sample_dataset(out_dir, num_train: int = 200, num_val: int = 40,
                        image_size: Tuple[int, int] = (256, 256), seed: int = 0) -> Dict[str, object]:
    """Write the synthetic sample dataset and its dataset spec; return a summary.

    Layout: images/{train,val}/*.jpg, annotations/person_keypoints_{train,val}.json
    and sample_spec.json (root ".", masks under masks/train and masks/val).
    """
    from ..io import write_json_atomic
    out = check_output_dir(out_dir, image_size)
    make_output_dir(out)
    train = make_split(out, "train", num_train, image_size, seed, first_id=1)
    val = make_split(out, "val", num_val, image_size, seed, first_id=1_000_001)
    spec_path = out / "sample_spec.json"
    write_json_atomic(spec_path, sample_dataset_spec())
    return {"output_dir": str(out), "dataset_spec": str(spec_path), "train": train, "val": val}

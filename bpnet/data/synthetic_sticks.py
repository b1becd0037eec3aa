"""A second synthetic keypoint dataset: thin stick figures over photo mosaics.

The blocks style of :mod:`bpnet.data.synthetic` is built to be easy (thick,
outlined limbs, left and right colour-coded). This style is built to differ
from it, for checking that a training recipe carries over to data nobody
tuned it on:

* thin stick figures: every limb, the spine and the shoulder and hip bars are
  lines a few pixels wide, one colour per figure (thin dark outline), 1 to 5
  figures per image, 25-90 % of the image height, random arm and leg angles
  with bent elbows and knees, a slight lean and head tilt;
* left and right are told apart as for real people, not by colour: a figure
  seen from the front (80 %) has a light face with eyes and nose, so its
  left side is on the image right; one seen from the back has a dark head
  with no face, so its left side is on the image left;
* backgrounds are real photos made unrecognizable: crops of 1 to 3 photos
  (the photos of a backgrounds folder, by default the coco_tiny images of
  ../shared when present: train2017 for the train split, val2017 for val)
  are cut into square tiles of 16-32 px (at 256 px; scaled with the image),
  each tile shown at most at its photo's own resolution (never a downscaled
  photo), and the tiles are shuffled, rotated by a random multiple of 90
  degrees and mirrored at random. Colours, textures and edges of real scenes
  stay; no person in the photos (who is not annotated) stays recognizable,
  a tile holding at most a fragment of one. Without photos, the generated
  texture of the blocks style is used;
* COCO-17 keypoints: visibility 2, 1 when covered by the drawn lines of a
  figure drawn in front of it, 0 outside the image and for the nose and eyes
  of a figure seen from the back (ears stay labeled, as in COCO);
* segmentation (polygons clipped to the image), bbox and area are those of
  the body the stick figure stands for (limb and torso outlines of a
  person's width, head disk), not of the thin lines, so COCO's OKS scale
  (the square root of the area) is that of a real person of that height.

Everything is a function of the seed: the same seed (and the same
backgrounds) gives the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .synthetic import (_K, _background, _bbox, _circle_polygon, _clip_polygon,
                        _dir, _disc, _draw_face, _hsv, _pts, _r, _raster, _segment_polygon, _SHIFT,
                        check_output_dir, make_output_dir, sample_dataset_spec, split_key,
                        write_split)

STYLE_KEY = 0x571C  # mixed into the seeds, so the same seed differs from the blocks style
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
FRONT_VIEW_P = 0.8


def default_background_dirs(split: str) -> List[Path]:
    """The coco_tiny photos of ../shared (or $BPNET_SHARED) for a split, when present."""
    repo = Path(__file__).resolve().parents[2]
    shared = Path(os.environ.get("BPNET_SHARED", repo.parent / "shared"))
    folder = shared / "data" / "coco_tiny" / ("val2017" if split == "val" else "train2017")
    return [folder] if folder.is_dir() else []


def background_files(backgrounds) -> List[Path]:
    """The photo files of a folder (or a list of folders), sorted; BpnetError when none."""
    from ..errors import BpnetError
    folders = [backgrounds] if isinstance(backgrounds, (str, Path)) else list(backgrounds)
    files: List[Path] = []
    for f in folders:
        f = Path(f)
        if not f.is_dir():
            raise BpnetError(f"backgrounds folder {f} does not exist or is not a folder")
        found = sorted(p for p in f.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise BpnetError(f"backgrounds folder {f} holds no .jpg/.jpeg/.png/.bmp photos")
        files += found
    return files


class _Photos:
    """Decoded background photos, read on first use (BpnetError for an unreadable one)."""

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)
        self._cache: Dict[int, np.ndarray] = {}

    def __len__(self):
        return len(self.files)

    def get(self, i: int) -> np.ndarray:
        import cv2
        from ..errors import BpnetError
        if i not in self._cache:
            img = cv2.imread(str(self.files[i]), cv2.IMREAD_COLOR)
            if img is None or min(img.shape[:2]) < 8:
                raise BpnetError(f"background photo {self.files[i]} cannot be read as an image")
            self._cache[i] = img
        return self._cache[i]


def _mosaic_background(rng: np.random.Generator, photos: _Photos, h: int, w: int) -> np.ndarray:
    """Tiles of 1-3 photo crops, shuffled, rotated and mirrored (see the module docstring)."""
    import cv2
    scale = min(h, w) / 256.0
    t = max(8, int(round(int(rng.integers(16, 33)) * scale)))
    gh, gw = -(-h // t), -(-w // t)
    tiles = []
    for _ in range(int(rng.integers(1, 4))):
        photo = photos.get(int(rng.integers(len(photos))))
        ph, pw = photo.shape[:2]
        # Photo pixels per output pixel: at most 1 (never shrink a photo, so a tile holds at
        # most t x t photo pixels: a fragment of any person in it).
        s = rng.uniform(0.5, 1.0)
        s = min(s, ph / (gh * t), pw / (gw * t))
        ch, cw = max(1, int(gh * t * s)), max(1, int(gw * t * s))
        y0 = int(rng.integers(0, ph - ch + 1))
        x0 = int(rng.integers(0, pw - cw + 1))
        crop = cv2.resize(photo[y0:y0 + ch, x0:x0 + cw], (gw * t, gh * t),
                          interpolation=cv2.INTER_LINEAR)
        tiles += [crop[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(gh) for c in range(gw)]
    pick = rng.permutation(len(tiles))[:gh * gw]
    out = np.empty((gh * t, gw * t, 3), np.uint8)
    for n, i in enumerate(pick):
        tile = np.rot90(tiles[i], int(rng.integers(4)))
        if rng.random() < 0.5:
            tile = tile[:, ::-1]
        r, c = divmod(n, gw)
        out[r * t:(r + 1) * t, c * t:(c + 1) * t] = tile
    out = out[:h, :w]
    # Slight brightness/contrast variation between images.
    a, b = rng.uniform(0.8, 1.1), rng.uniform(-15, 15)
    return np.clip(out.astype(np.float32) * a + b, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ figures

def _make_stick(rng: np.random.Generator, pelvis, height: float) -> dict:
    """Joints, drawing strokes and body outline of one stick figure (no drawing)."""
    H = float(height)
    facing = 1.0 if rng.random() < FRONT_VIEW_P else -1.0  # -1: seen from the back
    lean = rng.uniform(-0.2, 0.2)
    up = -_dir(lean)
    side = np.array([-up[1], up[0]])
    if side[0] < 0:
        side = -side  # image right when upright
    pelvis = np.asarray(pelvis, float)
    neck = pelvis + 0.30 * H * up
    # Seen from the front, the person's left is on the image right.
    lsh, rsh = neck + facing * 0.10 * H * side, neck - facing * 0.10 * H * side
    lhip, rhip = pelvis + facing * 0.065 * H * side, pelvis - facing * 0.065 * H * side
    r = 0.065 * H
    head_up = -_dir(lean + rng.uniform(-0.3, 0.3))
    head_side = np.array([-head_up[1], head_up[0]])
    if head_side[0] < 0:
        head_side = -head_side
    head_base = neck + 0.05 * H * up
    head = head_base + r * head_up
    yaw = rng.uniform(-0.25, 0.25) * r if facing > 0 else 0.0
    kp = np.zeros((17, 2))
    kp[_K["nose"]] = head - 0.12 * r * head_up + yaw * head_side
    kp[_K["left_eye"]] = head + 0.25 * r * head_up + (0.38 * r + yaw) * head_side
    kp[_K["right_eye"]] = head + 0.25 * r * head_up + (-0.38 * r + yaw) * head_side
    kp[_K["left_ear"]] = head + facing * 0.95 * r * head_side
    kp[_K["right_ear"]] = head - facing * 0.95 * r * head_side
    kp[_K["left_shoulder"]], kp[_K["right_shoulder"]] = lsh, rsh
    kp[_K["left_hip"]], kp[_K["right_hip"]] = lhip, rhip

    def limb(start, out_sign, l1, l2, a_range, bend_range, bend_out_p):
        a1 = lean + out_sign * rng.uniform(*a_range)
        bend = rng.uniform(*bend_range) * (out_sign if rng.random() < bend_out_p else -out_sign)
        mid = start + l1 * H * _dir(a1)
        return mid, mid + l2 * H * _dir(a1 + bend)

    # out_sign +1 turns a limb towards the image right; the left limbs of a front view go there.
    for name, sh, sgn in (("left", lsh, facing), ("right", rsh, -facing)):
        kp[_K[f"{name}_elbow"]], kp[_K[f"{name}_wrist"]] = limb(
            sh, sgn, 0.16, 0.15, (-0.4, 2.9), (0.15, 2.3), 0.6)
    for name, hp, sgn in (("left", lhip, facing), ("right", rhip, -facing)):
        kp[_K[f"{name}_knee"]], kp[_K[f"{name}_ankle"]] = limb(
            hp, sgn, 0.23, 0.22, (-0.3, 1.0), (0.1, 1.5), 0.5)

    k = lambda n: kp[_K[n]]  # noqa: E731
    strokes = [(lhip, k("left_knee")), (k("left_knee"), k("left_ankle")),
               (rhip, k("right_knee")), (k("right_knee"), k("right_ankle")),
               (lhip, rhip), (pelvis, neck), (lsh, rsh), (neck, head_base),
               (lsh, k("left_elbow")), (k("left_elbow"), k("left_wrist")),
               (rsh, k("right_elbow")), (k("right_elbow"), k("right_wrist"))]
    t = float(np.clip(H * rng.uniform(0.012, 0.022), 2.0, 6.0))
    body = [_segment_polygon(a, b, 0.09 * H) for a, b in strokes[:4]]
    torso = np.array([rsh, lsh, lhip, rhip]) if facing > 0 else np.array([lsh, rsh, rhip, lhip])
    c = torso.mean(0)
    body.append(c + (torso - c) * 1.2)
    body.append(_segment_polygon(neck, head_base, 0.06 * H))
    body += [_segment_polygon(a, b, 0.07 * H) for a, b in strokes[8:]]
    body.append(_circle_polygon(head, r * 1.05, 16))
    drawn = [_segment_polygon(a, b, t + 2) for a, b in strokes]
    drawn.append(_circle_polygon(head, r + t / 2 + 1, 16))
    colors = {
        "line": _hsv(rng.uniform(0, 180), rng.uniform(140, 255), rng.uniform(160, 255)),
        "face": _hsv(rng.uniform(5, 25), rng.uniform(40, 130), rng.uniform(180, 250)),
        "hair": _hsv(rng.uniform(0, 30), rng.uniform(30, 200), rng.uniform(20, 90)),
    }
    return {"kp": kp, "facing": facing, "strokes": strokes, "head": head, "head_r": r,
            "thickness": t, "body": body, "drawn": drawn, "colors": colors, "height": H}


def _draw_stick(img: np.ndarray, fig) -> None:
    import cv2
    aa = cv2.LINE_AA
    outline = (20, 20, 20)
    t = max(1, int(round(fig["thickness"])))
    col = fig["colors"]["line"]
    for a, b in fig["strokes"]:
        cv2.line(img, tuple(_pts(a)), tuple(_pts(b)), outline, t + 2, aa, _SHIFT)
    for a, b in fig["strokes"]:
        cv2.line(img, tuple(_pts(a)), tuple(_pts(b)), col, t, aa, _SHIFT)
    fill = fig["colors"]["face"] if fig["facing"] > 0 else fig["colors"]["hair"]
    _disc(img, fig["head"], fig["head_r"], fill)
    _disc(img, fig["head"], fig["head_r"], outline, t + 2)
    _disc(img, fig["head"], fig["head_r"], col, t)
    kp = fig["kp"]
    dot = max(1.0, 0.13 * fig["head_r"])
    for n in ("left_ear", "right_ear"):  # the same in both views: no left/right cue
        _disc(img, kp[_K[n]], dot * 1.1, col)
    if fig["facing"] > 0:
        _draw_face(img, kp, dot, (15, 15, 15), 0.8, (40, 40, 170))


def _make_sticks_image(rng: np.random.Generator, h: int, w: int, image_id: int, next_ann_id: int,
                       photos: Optional[_Photos]):
    """One image, its annotations, and the figures (in drawing order; None for a figure
    wholly outside the image, which gets no annotation)."""
    img = _mosaic_background(rng, photos, h, w) if photos else _background(rng, h, w)
    figs = []
    for _ in range(int(rng.integers(1, 6))):
        fh = rng.uniform(0.25, 0.9) * h
        x = rng.uniform(0.0, 1.0) * w
        lo, hi = 0.5 * fh, h - 0.45 * fh
        y = (rng.uniform(lo, hi) if hi > lo else h / 2) + rng.normal(0, 0.06 * fh)
        figs.append(_make_stick(rng, (x, y), fh))
    for fig in figs:  # list order = drawing order: later figures are in front
        _draw_stick(img, fig)
    drawn = [_raster([q for q in (_clip_polygon(p, w, h) for p in f["drawn"]) if len(q) >= 3], h, w)
             for f in figs]
    anns: List[dict] = []
    annotated: List[Optional[dict]] = []
    for i, fig in enumerate(figs):
        polys = [q for q in (_clip_polygon(p, w, h) for p in fig["body"]) if len(q) >= 3]
        m = _raster(polys, h, w)
        if not m.any():
            annotated.append(None)
            continue
        annotated.append(fig)
        front = np.any(drawn[i + 1:], 0) if i + 1 < len(figs) else np.zeros((h, w), bool)
        kp = np.zeros((17, 3))
        for k, (x, y) in enumerate(fig["kp"]):
            if not (0 <= x < w and 0 <= y < h):
                continue  # outside the image: not labeled
            if fig["facing"] < 0 and k in (_K["nose"], _K["left_eye"], _K["right_eye"]):
                continue  # no face seen from the back
            kp[k] = (x, y, 1 if front[int(y), int(x)] else 2)
        anns.append({"segmentation": [_r(p.reshape(-1)) for p in polys],
                     "num_keypoints": int((kp[:, 2] > 0).sum()), "area": float(m.sum()),
                     "iscrowd": 0,
                     "keypoints": [round(float(v), 2) if j % 3 < 2 else int(v)
                                   for j, v in enumerate(kp.reshape(-1))],
                     "bbox": _bbox(m), "category_id": 1,
                     "image_id": image_id, "id": next_ann_id})
        next_ann_id += 1
    img = np.clip(img.astype(np.int16) + rng.normal(0, 3, img.shape).astype(np.int16), 0, 255)
    return img.astype(np.uint8), anns, annotated


# ------------------------------------------------------------------ dataset

def make_sticks_split(out_dir, split: str, num_images: int, image_size=(256, 256), seed: int = 0,
                      first_id: int = 1, backgrounds=None, jpeg_quality: int = 92) -> dict:
    """Write images/<split>/*.jpg and annotations/person_keypoints_<split>.json.

    backgrounds: a folder (or list of folders) of photos; None = the default
    coco_tiny folder of this split when present, else the generated texture;
    False = the generated texture.
    """
    if backgrounds is None:
        folders = default_background_dirs(split)
        files = background_files(folders) if folders else []
    elif backgrounds is False:
        files = []
    else:
        files = background_files(backgrounds)
    photos = _Photos(files) if files else None
    key = split_key(split)

    def draw(i, h, w, image_id, ann_id):
        rng = np.random.default_rng([seed, STYLE_KEY, key, i])
        img, anns, _ = _make_sticks_image(rng, h, w, image_id, ann_id, photos)
        return img, anns

    info = {"description": f"bpnet synthetic stick figures ({split}, seed {seed}, "
                           f"{'photo mosaic' if photos else 'generated'} backgrounds)",
            "version": "1.0"}
    anns = write_split(out_dir, split, num_images, image_size, draw, info,
                       "generated by bpnet (backgrounds: tiles of the photos named in backgrounds)",
                       first_id, jpeg_quality)
    return {"images": num_images, "annotations": len(anns),
            "persons_with_keypoints": sum(1 for a in anns if a["num_keypoints"] > 0),
            "crowd_regions": 0, "background_photos": len(files)}


def make_sticks_dataset(out_dir, num_train: int = 200, num_val: int = 40,
                        image_size: Tuple[int, int] = (256, 256), seed: int = 0,
                        backgrounds: Union[None, bool, str, Path, Sequence] = None
                        ) -> Dict[str, object]:
    """Write the stick-figure dataset and its dataset spec; return a summary.

    The layout and the summary are those of
    :func:`bpnet.data.synthetic.make_sample_dataset`: images/{train,val}/*.jpg,
    annotations/person_keypoints_{train,val}.json and sample_spec.json (dataset
    "sticks"; masks under masks/train and masks/val), usable by ``bpnet
    dataset_convert -d`` and ``bpnet evaluate -d``. backgrounds: see
    :func:`make_sticks_split`.
    """
    from ..io import write_json_atomic
    out = check_output_dir(out_dir, image_size)
    if backgrounds not in (None, False):
        background_files(backgrounds)  # a bad folder fails before anything is written
    make_output_dir(out)
    train = make_sticks_split(out, "train", num_train, image_size, seed, first_id=1,
                              backgrounds=backgrounds)
    val = make_sticks_split(out, "val", num_val, image_size, seed, first_id=1_000_001,
                            backgrounds=backgrounds)
    spec_path = out / "sample_spec.json"
    write_json_atomic(spec_path, sample_dataset_spec("sticks"))
    return {"output_dir": str(out), "dataset_spec": str(spec_path), "train": train, "val": val,
            "style": "sticks"}


def ground_truth_ap(annotation_file, stride: int = 8, pose=None, input_height=None,
                    decoder=None) -> Dict[str, float]:
    """COCO keypoint AP of bpnet's decoder on the label maps rendered from the
    ground truth of an annotation file: the ceiling a perfect network reaches
    on the set. Maps at ``stride`` of each image at its own size, or scaled to
    ``input_height`` rows (a network input; aspect ratio kept) and the decoded
    people scaled back; decoder: a DecoderConfig (None: its defaults)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from ..infer.decode import decode
    from ..pose import load_pose_config
    from .labels import render_labels
    if pose is None:
        pose = load_pose_config(Path(__file__).resolve().parents[1] / "configs"
                                / "bpnet_18joints.json")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotation_file))
    mapping = pose.dataset_mapping(coco.loadCats(coco.getCatIds())[0]["keypoints"])
    res = []
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False))
        kps = [np.asarray(a["keypoints"], np.float32).reshape(-1, 3) for a in anns
               if a["num_keypoints"] > 0]
        if not kps:
            continue
        joints = mapping.dataset_to_model(np.stack(kps))
        f = 1.0 if input_height is None else float(input_height) / info["height"]
        joints[..., :2] *= f
        hw = (max(1, round(info["height"] * f)), max(1, round(info["width"] * f)))
        heat, paf = render_labels(joints, pose, hw, stride=stride)
        people = decode(heat, paf, pose, stride=stride, config=decoder)
        kp = mapping.model_to_dataset(people.keypoints[..., :2] / f, people.keypoints[..., 2])
        for n in range(len(people)):
            k = kp[n].copy()
            k[:, 2] = (k[:, 2] > 0).astype(float)
            res.append({"image_id": img_id, "category_id": 1, "keypoints": k.reshape(-1).tolist(),
                        "score": float(people.scores[n])})
    if not res:
        return {"ap": 0.0, "ap50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(res), "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"ap": float(ev.stats[0]), "ap50": float(ev.stats[1])}

"""Reading COCO-format keypoint files and choosing the main persons of each image.

The rules (TAO's data_filtering_params, as TAO applies them):

* a person is a non-crowd annotation of the dataset's category; a *labeled*
  person has at least one labeled keypoint (after the visibility mapping);
  persons without keypoints never enter the joints (the loss mask hides them);
* a main person has at least ``min_acceptable_kpts`` labeled keypoints, an
  annotation ``area`` of at least ``min_acceptable_width *
  min_acceptable_height`` (the product, compared with the segmentation area
  as TAO does), and a bbox centre at least
  ``min_acceptable_interperson_dist_ratio * max(w, h)`` away from the centre
  of every main person chosen before it (w, h: that earlier person's box);
  candidates are taken in annotation order;
* with ``duplicate_data_with_each_person_as_center`` each main person gives
  one sample with that person first, else each image with a main person
  gives one sample (its first main person first).

Everything here is plain Python/NumPy; problems with the file are collected
and raised as one BpnetError naming the file and the first offenders.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import BpnetError
from ..pose import KeypointMapping

MAX_LISTED = 5  # problems quoted in one error message
# Largest image side an annotation may give: JPEG's limit (65535), far above any camera's.
MAX_IMAGE_SIDE = 65535
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# Why annotations give no joints to any record (dataset_convert's summary), and why labeled
# persons are not main persons (they stay in their image's records as other persons).
DROP_RULES = ("other_category", "crowd", "no_keypoints", "in_images_without_main_person")
NOT_MAIN_RULES = ("too_few_keypoints", "too_small", "too_close_to_a_main_person")


@dataclasses.dataclass
class Person:
    ann_id: int
    joints: np.ndarray  # [J, 3] model joints, canonical visibility
    num_labeled: int  # labeled dataset keypoints
    area: float
    bbox: np.ndarray  # x, y, w, h

    @property
    def center(self) -> np.ndarray:
        return np.array([self.bbox[0] + self.bbox[2] / 2, self.bbox[1] + self.bbox[3] / 2])

    @property
    def scale(self) -> float:
        return float(self.bbox[3])


@dataclasses.dataclass
class ImageEntry:
    id: int
    file_name: str
    height: int
    width: int
    persons: List[Person]  # labeled persons, annotation order
    crowd_segs: list  # segmentations of crowd regions
    unlabeled_segs: list  # segmentations of persons without keypoints
    labeled_segs: list  # segmentations of labeled persons

    @property
    def needs_mask(self) -> bool:
        return bool(self.crowd_segs or self.unlabeled_segs)


@dataclasses.dataclass
class Sample:
    image: ImageEntry
    order: List[int]  # indices into image.persons, main person first


class _Problems:
    def __init__(self, source: str):
        self.source = source
        self.items: List[str] = []
        self.count = 0

    def add(self, msg: str):
        self.count += 1
        if len(self.items) < MAX_LISTED:
            self.items.append(msg)

    def raise_if_any(self, what: str):
        if self.count:
            more = f" (and {self.count - len(self.items)} more)" if self.count > len(self.items) else ""
            raise BpnetError(f"{self.source}: {self.count} {what}: " + "; ".join(self.items) + more)


def read_annotation_file(path) -> dict:
    """Load a COCO annotation JSON with clear errors for missing or broken files."""
    path = Path(path)
    if not path.exists():
        raise BpnetError(f"annotation file not found: {path} (check root_directory_path and "
                         "annotation_root_dir_path in the dataset spec)")
    if path.is_dir():
        raise BpnetError(f"annotation path {path} is a folder; it must name a COCO JSON file")
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except UnicodeDecodeError as e:
        raise BpnetError(f"annotation file {path} is not JSON text ({e.reason})") from e
    except json.JSONDecodeError as e:
        raise BpnetError(f"annotation file {path} is not valid JSON: {e.msg} at line {e.lineno} "
                         f"column {e.colno}") from e
    except OSError as e:
        raise BpnetError(f"cannot read annotation file {path}: {e.strerror or e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise BpnetError(f"annotation file {path} is not COCO-shaped: expected a JSON object with "
                         "'images' and 'annotations' lists")
    return doc


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _numbers(values) -> Optional[np.ndarray]:
    """A flat list of JSON numbers as float64, or None if it holds anything else
    (strings such as "12.5", booleans, null, nested lists, integers beyond 64 bits)."""
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError, OverflowError):
        return None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iuf"):
        return None
    return arr.astype(np.float64)


def _int64(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and INT64_MIN <= v <= INT64_MAX


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return False
    return True


def _check_segmentation(seg, h: int, w: int) -> Optional[str]:
    if isinstance(seg, list):
        for poly in seg:
            arr = _numbers(poly) if isinstance(poly, list) else None
            if arr is None or len(arr) < 6 or len(arr) % 2:
                return "polygon segmentation must be lists of >= 3 x,y number pairs"
            if not np.isfinite(arr).all():
                return "polygon segmentation has NaN or infinite coordinates"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2):
            return "RLE segmentation needs 'size': [height, width]"
        if [int(size[0]), int(size[1])] != [h, w]:
            return f"RLE size {size} differs from the image size [{h}, {w}]"
        if isinstance(counts, list):
            arr = _numbers(counts)
            if arr is None or (arr != np.round(arr)).any() or (arr < 0).any() or arr.sum() != h * w:
                return "uncompressed RLE counts must be non-negative integers summing to height*width"
        elif not isinstance(counts, str):
            return "RLE 'counts' must be a list of ints or a compressed string"
        return None
    return "segmentation must be a list of polygons or an RLE object"


def parse_coco(doc: dict, source: str, category, visibility: Dict[int, int],
               mapping: Optional[KeypointMapping], check_segmentation: bool = True,
               stats: Optional[dict] = None, for_evaluation: bool = False) -> List[ImageEntry]:
    """Validate a COCO keypoint document and group its persons by image.

    THE ground-truth validator: dataset_convert and evaluate (and anything else
    that reads ground truth) refuse the same files, naming the file and the
    offending ids. ``mapping`` None: persons keep the dataset's keypoints
    (validation only). ``stats``: filled with annotation counts per rule
    (``DROP_RULES``' first three, "annotations", "persons").
    ``for_evaluation``: also require what pycocotools' COCOeval reads from
    ground truth (annotation ``id``, ``area``, ``num_keypoints``, ``keypoints``).
    """
    num_kpts = len(category.keypoints)
    counts = {"annotations": 0, "persons": 0, "other_category": 0, "crowd": 0, "no_keypoints": 0}
    probs = _Problems(source)
    for cat in doc.get("categories") or []:
        if isinstance(cat, dict) and cat.get("id") == category.id and isinstance(
                cat.get("keypoints"), list) and cat["keypoints"] and \
                list(cat["keypoints"]) != list(category.keypoints):
            raise BpnetError(
                f"{source}: category {category.id} lists keypoints {cat['keypoints']} but the dataset "
                f"spec's categories[0].keypoints are {list(category.keypoints)}; they must match in "
                "order")

    images: Dict[int, ImageEntry] = {}
    order: List[int] = []
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict):
            probs.add(f"images[{i}] is not an object")
            continue
        iid, fn, h, w = im.get("id"), im.get("file_name"), im.get("height"), im.get("width")
        if not isinstance(iid, int) or isinstance(iid, bool):
            probs.add(f"images[{i}] has no integer 'id'")
        elif not _int64(iid):
            probs.add(f"images[{i}]: id {iid} does not fit a 64-bit signed integer (records and "
                      "COCO tools hold no larger)")
        elif not isinstance(fn, str) or not fn or not _utf8(fn):
            probs.add(f"image id {iid} has no 'file_name' (or one that is not valid text)")
        elif not (isinstance(h, int) and isinstance(w, int) and not isinstance(h, bool)
                  and not isinstance(w, bool) and 0 < h <= MAX_IMAGE_SIDE
                  and 0 < w <= MAX_IMAGE_SIDE):
            probs.add(f"image id {iid} needs integer 'height' and 'width' in 1..{MAX_IMAGE_SIDE}, "
                      f"got {h!r}, {w!r}")
        elif iid in images:
            probs.add(f"image id {iid} appears twice")
        else:
            images[iid] = ImageEntry(iid, fn, h, w, [], [], [], [])
            order.append(iid)
    probs.raise_if_any("invalid image entries")

    table = np.full(max(list(visibility) + [2]) + 1, -1, dtype=np.int64)
    for k, v in visibility.items():
        if k >= 0:
            table[k] = v
    cands = []  # persons whose keypoints are checked and mapped together below
    seen_ids: Dict[int, int] = {}
    for i, a in enumerate(doc["annotations"]):
        if not isinstance(a, dict):
            probs.add(f"annotations[{i}] is not an object")
            continue
        counts["annotations"] += 1
        aid = a.get("id", f"#{i}")
        where = f"annotation id {aid}"
        if "id" in a or for_evaluation:
            if not _int64(a.get("id")):
                probs.add(f"annotations[{i}]: 'id' must be an integer of at most 64 bits, got "
                          f"{a.get('id')!r}")
                continue
            if aid in seen_ids:
                probs.add(f"annotation id {aid} appears twice (annotations[{seen_ids[aid]}] and "
                          f"annotations[{i}])")
                continue
            seen_ids[aid] = i
        if "category_id" in a and a["category_id"] != category.id:
            counts["other_category"] += 1
            continue
        im = images.get(a.get("image_id"))
        if im is None:
            probs.add(f"{where}: image_id {a.get('image_id')!r} is not in 'images'")
            continue
        crowd = a.get("iscrowd", 0)
        if crowd not in (0, 1, True, False):
            probs.add(f"{where}: iscrowd must be 0 or 1, got {crowd!r}")
            continue
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_num(v) for v in bbox)):
            probs.add(f"{where}: bbox must be [x, y, width, height] numbers, got {bbox!r}")
            continue
        bb = np.asarray(bbox, dtype=np.float64)
        if not np.all(np.isfinite(bb)) or bb[2] < 0 or bb[3] < 0:
            probs.add(f"{where}: bbox {bbox} has NaN or negative values")
            continue
        seg = a.get("segmentation", [])
        if check_segmentation:
            err = _check_segmentation(seg, im.height, im.width)
            if err:
                probs.add(f"{where}: {err}")
                continue
        if for_evaluation:
            bad = [k for k in ("area", "num_keypoints") if not _is_num(a.get(k))]
            if not isinstance(a.get("keypoints"), list):  # crowd regions too: COCOeval reads all
                bad.append("keypoints")
            if bad:
                probs.add(f"{where}: needs {' and '.join(bad)} (COCO keypoint evaluation "
                          "reads them)")
                continue
        if crowd:
            counts["crowd"] += 1
            im.crowd_segs.append(seg)
            continue
        kp = a.get("keypoints")
        if kp is None:
            kp = [0] * (3 * num_kpts)
        if not isinstance(kp, list) or len(kp) != 3 * num_kpts:
            n = len(kp) if isinstance(kp, list) else type(kp).__name__
            probs.add(f"{where}: keypoints has {n} values, expected {3 * num_kpts} "
                      f"({num_kpts} keypoints x 3)")
            continue
        flat = _numbers(kp)
        if flat is None:
            bad = next((v for v in kp if not _is_num(v)), None)
            probs.add(f"{where}: keypoints must be numbers, found {bad!r}")
            continue
        area = a.get("area")
        if area is None:
            area = float(bb[2] * bb[3])
        elif not _is_num(area) or not math.isfinite(area) or area < 0:
            probs.add(f"{where}: area must be a non-negative number, got {area!r}")
            continue
        cands.append((im, aid, flat, float(area), bb, seg))
    probs.raise_if_any("invalid annotations")
    if stats is not None:
        stats.update(counts)
    if not cands:
        return [images[i] for i in order]

    # Keypoints of all persons at once: per-annotation NumPy calls would dominate on COCO.
    kps = np.stack([c[2] for c in cands]).reshape(len(cands), num_kpts, 3)
    with np.errstate(over="ignore"):  # finite in float32 too: records hold float32
        finite = np.isfinite(kps).all(axis=(1, 2)) & np.isfinite(kps.astype(np.float32)).all(axis=(1, 2))
    kps[~finite] = 0
    negative = (kps[:, :, :2] < 0).any(axis=(1, 2))
    vis = kps[:, :, 2]
    vis_ok = (vis == np.round(vis)) & (vis >= 0) & (vis < len(table))
    codes = table[np.where(vis_ok, vis, 0).astype(np.int64)]
    vis_ok = (vis_ok & (codes >= 0)).all(axis=1)
    kps[:, :, 2] = np.maximum(codes, 0)
    joints = (mapping.dataset_to_model(kps.astype(np.float32)) if mapping is not None
              else kps.astype(np.float32))
    labeled = (kps[:, :, 2] > 0).sum(axis=1)
    for n, (im, aid, _, area, bb, seg) in enumerate(cands):
        where = f"annotation id {aid}"
        if not finite[n]:
            probs.add(f"{where}: keypoints contain NaN or infinite values")
        elif negative[n]:
            probs.add(f"{where}: keypoints have negative coordinates")
        elif not vis_ok[n]:
            probs.add(f"{where}: visibility values {sorted(set(vis[n].tolist()))} are not all in "
                      f"the dataset spec's visibility_flags {sorted(visibility)}")
        elif labeled[n] == 0:
            counts["no_keypoints"] += 1
            im.unlabeled_segs.append(seg)
        else:
            counts["persons"] += 1
            im.persons.append(Person(aid, joints[n], int(labeled[n]), area, bb))
            im.labeled_segs.append(seg)
    probs.raise_if_any("invalid annotations")
    if stats is not None:
        stats.update(counts)
    return [images[i] for i in order]


def select_main_persons(persons: Sequence[Person], params,
                        why_not: Optional[dict] = None) -> List[int]:
    """Indices of the main persons of one image (see the module docstring).

    ``why_not``: counts of the persons passed over, per rule (``NOT_MAIN_RULES``).
    """
    min_area = params.min_acceptable_width * params.min_acceptable_height
    chosen: List[int] = []
    taken: List[tuple] = []  # (centre, max side) of chosen persons
    why = why_not if why_not is not None else {}
    for i, p in enumerate(persons):
        if p.num_labeled < params.min_acceptable_kpts:
            why["too_few_keypoints"] = why.get("too_few_keypoints", 0) + 1
            continue
        if p.area < min_area:
            why["too_small"] = why.get("too_small", 0) + 1
            continue
        c = p.center
        if any(np.hypot(*(c - tc)) < params.min_acceptable_interperson_dist_ratio * ts
               for tc, ts in taken):
            why["too_close_to_a_main_person"] = why.get("too_close_to_a_main_person", 0) + 1
            continue
        chosen.append(i)
        taken.append((c, max(p.bbox[2], p.bbox[3])))
    return chosen


def make_samples(images: Sequence[ImageEntry], params, duplicate: bool,
                 stats: Optional[dict] = None) -> List[Sample]:
    """The records' samples; ``stats`` gets "not_main_persons" (per rule), "main_persons"
    and "in_images_without_main_person" (labeled persons of images that give no record)."""
    out: List[Sample] = []
    why_not = {k: 0 for k in NOT_MAIN_RULES}
    n_main = n_orphans = 0
    for im in images:
        mains = select_main_persons(im.persons, params, why_not)
        n_main += len(mains)
        if not mains:
            n_orphans += len(im.persons)
            continue
        heads = mains if duplicate else mains[:1]
        for m in heads:
            out.append(Sample(im, [m] + [k for k in range(len(im.persons)) if k != m]))
    if stats is not None:
        stats.update(not_main_persons=why_not, main_persons=n_main,
                     in_images_without_main_person=n_orphans)
    return out

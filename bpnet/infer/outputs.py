"""Detection file formats: TAO's detections.json and COCO keypoint results.

``write_detections`` writes both files for ``bpnet inference`` and
``bpnet evaluate`` alike.

detections.json (TAO's layout, bpnet's extra keys marked +):

    {"pose_config_type": NAME, "categories": [the pose config's person
     category, with TAO's keys: supercategory, id, name, num_joints, keypoints,
     skeleton (1-based), skeleton_edge_names], "inference_spec":
     {the spec's fields, +"model_path", +"spec_file", +"input_shape_used",
     +"keep_aspect_ratio_mode_used", +"runtime_used"}, "images": [
       {"full_image_path": PATH, "keypoints": [[[x, y] * J] per person],
        "scores": [person score], "viz_id": index in images (TAO's key; TAO
        names its drawing <viz_id>.png, bpnet after the picture), +"joint_scores": [[s] * J per person],
        +"boxes": [[x0, y0, x1, y1] per person], +"image_id", +"height", +"width",
        (+"frame", +"track_ids" for video)}],
     +"skipped": [{"path", "reason"}] (pictures, not video)}

Coordinates are original-image pixels; a missing joint is [0, 0] with score 0.

detections_coco_format.json: the COCO results list that pycocotools'
``loadRes`` reads: {"image_id", "category_id": 1, "keypoints": [x, y, s] * K,
"score", "bbox": [x, y, w, h]}; K is the model's joints, or the dataset's
keypoints when a KeypointMapping is given (evaluation drops synthetic joints
such as the neck that way).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..io import write_json_atomic


def _r(v, nd=2):
    return round(float(v), nd)


def coco_category(pose) -> dict:
    """The pose config's person category, with every key of TAO's pose-config category."""
    return {"supercategory": "person", "id": 1, "name": "person",
            "num_joints": pose.num_joints,
            "keypoints": list(pose.keypoints),
            "skeleton": [[a + 1, b + 1] for a, b in pose.skeleton],
            "skeleton_edge_names": [[pose.keypoints[a], pose.keypoints[b]]
                                    for a, b in pose.skeleton]}


def image_entry(path: str, people, image_id=None, hw=None, **extra) -> dict:
    kp = np.asarray(people.keypoints, dtype=np.float64)
    entry = {
        "full_image_path": str(path),
        "keypoints": [[[_r(x), _r(y)] for x, y in person[:, :2]] for person in kp],
        "scores": [_r(s, 4) for s in people.scores],
        "joint_scores": [[_r(s, 4) for s in person[:, 2]] for person in kp],
        "boxes": [[_r(v) for v in b] for b in people.boxes],
    }
    if image_id is not None:
        entry["image_id"] = image_id
    if hw is not None:
        entry["height"], entry["width"] = int(hw[0]), int(hw[1])
    entry.update(extra)
    return entry


def spec_doc(predictor, spec_file=None) -> dict:
    """The inference spec of a run as detections.json records it.

    The spec's fields, the model file that ran, the spec file (None for a
    spec made in code) and the input size and aspect mode actually used (a
    fixed-size ONNX model overrides the spec's).
    """
    d = dataclasses.asdict(predictor.spec)
    d["model_path"] = predictor.runner.path
    d["spec_file"] = str(spec_file) if spec_file else None
    d["input_shape_used"] = predictor.input_shape
    d["keep_aspect_ratio_mode_used"] = predictor.mode
    d["runtime_used"] = getattr(predictor.runner, "runtime", "") or type(predictor.runner).__name__
    return d


def detections_doc(pose, inference_spec: dict, images: List[dict], skipped=None,
                   categories: Optional[List[dict]] = None, extra: Optional[dict] = None) -> dict:
    """The detections.json document; ``categories`` default to the pose config's one;
    ``extra``: more top-level keys (inference's ``complete``, ``interrupted``...).
    Every image entry gets TAO's ``viz_id`` (its index in images) unless it has one."""
    for i, entry in enumerate(images):
        entry.setdefault("viz_id", i)
    doc = {"pose_config_type": pose.name,
           "categories": categories if categories is not None else [coco_category(pose)],
           "inference_spec": inference_spec, "images": images}
    if skipped is not None:
        doc["skipped"] = skipped
    if extra:
        doc.update(extra)
    return doc


def write_detections(results_dir, pose, inference_spec: dict, images: List[dict],
                     coco: List[dict], skipped=None, categories=None, extra=None):
    """detections.json (see detections_doc) and detections_coco_format.json in results_dir.

    Each file is written atomically: it appears complete or not at all.
    """
    out = Path(results_dir)
    write_json_atomic(out / "detections.json",
                      detections_doc(pose, inference_spec, images, skipped, categories, extra))
    write_json_atomic(out / "detections_coco_format.json", coco, indent=None)


def coco_results(people, image_id, mapping=None, category_id: int = 1) -> List[dict]:
    """People of one image -> COCO keypoint result dicts.

    mapping: a bpnet.pose.KeypointMapping to express the joints as the
    dataset's keypoints (None: the model's joints as they are).
    """
    kp = np.asarray(people.keypoints, dtype=np.float64)
    if mapping is not None:
        kp = mapping.model_to_dataset(kp[..., :2], kp[..., 2])
    out = []
    for n in range(kp.shape[0]):
        k = kp[n]
        present = k[:, 2] > 0
        if present.any():
            x0, y0 = k[present, 0].min(), k[present, 1].min()
            x1, y1 = k[present, 0].max(), k[present, 1].max()
        else:
            x0 = y0 = x1 = y1 = 0.0
        flat = []
        for j in range(k.shape[0]):
            flat += [_r(k[j, 0]), _r(k[j, 1]), _r(k[j, 2], 4)] if present[j] else [0, 0, 0]
        out.append({"image_id": image_id, "category_id": category_id, "keypoints": flat,
                    "score": float(people.scores[n]),  # unrounded: COCOeval ranks by it
                    "bbox": [_r(x0), _r(y0), _r(x1 - x0), _r(y1 - y0)]})
    return out

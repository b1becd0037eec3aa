"""Drawing people on pictures: limbs coloured per limb, joints, boxes, ids.

Colours come from the pose config's limb count (evenly spaced hues), so a
custom keypoint set gets its own palette. Line widths follow the picture's
size, so a 4K frame and a thumbnail both stay readable.
"""

from __future__ import annotations

import colorsys
from typing import Optional, Sequence

import cv2
import numpy as np


def limb_colours(num_limbs: int):
    """BGR colours, one per limb, evenly spaced around the hue circle."""
    out = []
    for k in range(max(num_limbs, 1)):
        r, g, b = colorsys.hsv_to_rgb(k / max(num_limbs, 1), 0.9, 1.0)
        out.append((int(b * 255), int(g * 255), int(r * 255)))
    return out


def id_colour(pid: int):
    """A stable, distinct BGR colour for a track id (golden-ratio hue steps)."""
    h = (pid * 0.61803398875) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.8, 1.0)
    return (int(b * 255), int(g * 255), int(r * 255))


def draw_people(image_bgr: np.ndarray, keypoints: np.ndarray, pose, scores=None, boxes=None,
                ids: Optional[Sequence[int]] = None, draw_boxes: bool = True) -> np.ndarray:
    """A copy of the picture with people drawn on it.

    keypoints [N, J, 2|3] in the picture's pixels ((0, 0) or score 0 = missing).
    """
    canvas = image_bgr.copy()
    kps = np.asarray(keypoints, dtype=np.float64)
    if kps.size == 0:
        return canvas
    h, w = canvas.shape[:2]
    thick = max(1, int(round(max(h, w) / 300)))
    radius = max(2, thick + 1)
    colours = limb_colours(pose.num_edges)
    for n, kp in enumerate(kps):
        present = kp[:, 2] > 0 if kp.shape[1] > 2 else (kp[:, 0] != 0) | (kp[:, 1] != 0)
        for k, (a, b) in enumerate(pose.skeleton):
            if present[a] and present[b]:
                pa = (int(round(kp[a, 0])), int(round(kp[a, 1])))
                pb = (int(round(kp[b, 0])), int(round(kp[b, 1])))
                cv2.line(canvas, pa, pb, colours[k], thick + 1, cv2.LINE_AA)
        for j in np.nonzero(present)[0]:
            c = (int(round(kp[j, 0])), int(round(kp[j, 1])))
            cv2.circle(canvas, c, radius, (255, 255, 255), -1, cv2.LINE_AA)
            cv2.circle(canvas, c, radius, (40, 40, 40), 1, cv2.LINE_AA)
        label_colour = id_colour(int(ids[n])) if ids is not None else (0, 220, 255)
        box = None
        if boxes is not None and len(boxes) > n:
            box = [int(round(v)) for v in boxes[n]]
        elif present.any():
            p = kp[present, :2]
            box = [int(p[:, 0].min()), int(p[:, 1].min()), int(p[:, 0].max()), int(p[:, 1].max())]
        if box is None:
            continue
        if draw_boxes:
            cv2.rectangle(canvas, (box[0], box[1]), (box[2], box[3]), label_colour, thick,
                          cv2.LINE_AA)
        text = []
        if ids is not None:
            text.append(f"#{int(ids[n])}")
        if scores is not None and len(scores) > n:
            text.append(f"{float(scores[n]):.2f}")
        if text:
            scale = 0.4 * thick
            org = (box[0], max(box[1] - 4, int(12 * scale) + 2))
            cv2.putText(canvas, " ".join(text), org, cv2.FONT_HERSHEY_SIMPLEX, scale,
                        (0, 0, 0), thick + 2, cv2.LINE_AA)
            cv2.putText(canvas, " ".join(text), org, cv2.FONT_HERSHEY_SIMPLEX, scale,
                        label_colour, thick, cv2.LINE_AA)
    return canvas

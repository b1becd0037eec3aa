"""What training measures: TensorBoard scalars (validation AP included) and the validation's
joint peak hits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def write_scalars(writer, step: int, scalars: dict[str, float]):
    """TensorBoard scalars through TensorFlow's core summary op.

    tf.summary.scalar lives in the tensorboard package; the event files it
    writes are plain tensor summaries tagged for the "scalars" plugin, which
    core TensorFlow writes as well. So training needs no tensorboard install,
    only viewing the curves does.
    """
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2
    meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    with writer.as_default(step=int(step)):
        for tag, value in scalars.items():
            tf.summary.write(tag, tf.constant(float(value), tf.float32), metadata=meta)
    writer.flush()


def loss_scalars(prefix: str, vals: Sequence[float], num_stages: int, lr: float) -> dict[str, float]:
    """Tags of a training loss vector [total, regularization, heatmap [T], PAF [T]]."""
    T = num_stages
    scalars = {f"{prefix}/loss": vals[0], f"{prefix}/regularization_loss": vals[1]}
    for t in range(T):
        scalars[f"{prefix}/heatmap_stage{t + 1}"] = vals[2 + t]
        scalars[f"{prefix}/paf_stage{t + 1}"] = vals[2 + T + t]
    scalars["learning_rate"] = lr
    return scalars


def val_scalars(val: dict) -> dict[str, float]:
    """Tags of a validation result (see bpnet.train.loop.validate)."""
    scalars = {"val/loss": val["val_loss"]}
    for t, (h, p) in enumerate(zip(val["heatmap"], val["paf"]), 1):
        scalars[f"val/heatmap_stage{t}"] = h
        scalars[f"val/paf_stage{t}"] = p
    if val.get("peak_accuracy") is not None:
        scalars["val/peak_accuracy"] = val["peak_accuracy"]
    if val.get("ap") is not None:  # COCO keypoint AP (bpnet.train.val_ap)
        scalars["val/AP"] = val["ap"]
        scalars["val/AP50"] = val["ap50"]
    return scalars


def joint_peak_hits(pred, gt, mask=None, radius: float = 2.0, peak_min: float = 0.6):
    """(hits, labeled joints) of a batch of heatmaps [B, h, w, J] (no background channel).

    The labeled joints are the peaks of the target heatmaps (3x3 local maxima
    of at least ``peak_min``; a joint renders >= 0.72 at its nearest cell with
    sigma 7 px, stride 8) where the mask counts. A joint is hit when the
    predicted map's maximum over the cells nearer to it than to any other
    labeled joint of the same kind lies within ``radius`` cells. With one
    person this is the maximum of the whole map.
    """
    pred = np.asarray(pred, np.float32)
    gt = np.asarray(gt, np.float32)
    B, h, w, J = gt.shape
    pad = np.pad(gt, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    local = np.max(np.stack([pad[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                             for dy in (-1, 0, 1) for dx in (-1, 0, 1)]), axis=0)
    is_peak = (gt >= peak_min) & (gt >= local)
    if mask is not None:
        is_peak &= np.asarray(mask).reshape(B, h, w, 1) > 0.5
    yy, xx = np.mgrid[0:h, 0:w]
    cells = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float32)  # [h*w, 2]
    hits = total = 0
    for b in range(B):
        for j in range(J):
            ys, xs = np.nonzero(is_peak[b, :, :, j])
            if not len(ys):
                continue
            peaks = np.stack([ys, xs], 1).astype(np.float32)
            # A joint half-way between two cells renders two equal peaks: keep one.
            keep = []
            for k, pk in enumerate(peaks):
                if all(np.hypot(*(pk - peaks[q])) > 1.5 for q in keep):
                    keep.append(k)
            peaks = peaks[keep]
            owner = np.argmin(((cells[:, None, :] - peaks[None]) ** 2).sum(-1), axis=1)
            flat = pred[b, :, :, j].ravel()
            for k, pk in enumerate(peaks):
                region = np.nonzero(owner == k)[0]
                best = cells[region[np.argmax(flat[region])]]
                hits += int(np.hypot(*(best - pk)) <= radius)
                total += 1
    return hits, total

"""Training loss: masked L2 on every stage's heatmaps and PAFs (keras.ops only).

For stage t with predictions P and targets G (heatmaps include the
background channel) and the loss mask M ([B, h, w, 1], 1 where the loss
counts, broadcast over channels):

    L_heat(t) = 0.5 * sum(((P_heat(t) - G_heat) * M) ** 2) / B
    L_paf(t)  = 0.5 * sum(((P_paf(t)  - G_paf)  * M) ** 2) / B
    L = sum_t (L_heat(t) + L_paf(t)) + regularization losses of the model

B is the batch size (under tf.distribute: the global batch size, so the
replicas' summed gradients equal one device's). That is TAO's loss, the
default (``loss.normalization: sum``).

With ``loss.normalization: cells`` every term is further divided by the
number of label-map cells h * w (the heatmap's height times width; masked
cells count, channels and stages are still summed):

    L_heat(t) = 0.5 * sum(((P_heat(t) - G_heat) * M) ** 2) / (B * h * w)

The summed loss grows with the map: the same people at twice the input side
give about four times the loss and gradient, so a learning rate tuned at one
size acts about four times larger at the other. Per cell, one learning rate
suits every input size. The model's regularization losses are not divided:
relative to the data loss, an L2 kernel regularizer weighs about h * w times
more than under ``sum`` (see docs/train.md; with ``cells`` prefer AdamW's
decoupled ``weight_decay`` and ``kernel_regularization_factor: 0``).

Focal variant (LossConfig class ``BpNetFocalLoss``, or TAO's ``BpNetLoss`` with
``focal_loss_params.use_focal_loss: true``; parameters alpha, beta,
bkg_thresh, gamma; the "focal L2" of Zhang et al., "Simple and lightweight
human pose estimation", 2019), element-wise:

    s = sign(g) * p - alpha        where |g| >= bkg_thresh  (foreground)
    s = 1 - |p| - beta             elsewhere                (background)
    w = |1 - s| ** gamma           (held constant: no gradient through w)
    loss = 0.5 * sum(w * ((p - g) * m) ** 2) / B

Well-predicted elements weigh little (a foreground cell predicted at its
target of 1 has w = alpha; background predicted at 0 has w = beta), badly
predicted ones about 1 or more. For heatmaps g >= 0, so this is the paper's
form; for PAFs the sign makes it compare the prediction along the target's
direction.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from keras import ops

from bpnet.errors import BpnetError

NORMALIZATIONS = ("sum", "cells")


def _focal_weight(pred, gt, alpha, beta, bkg_thresh, gamma):
    fg = ops.abs(gt) >= bkg_thresh
    s = ops.where(fg, ops.sign(gt) * pred - alpha, 1.0 - ops.abs(pred) - beta)
    w = ops.abs(1.0 - s)
    if gamma != 1.0:
        w = ops.power(w, gamma)
    return ops.stop_gradient(w)


def masked_l2(pred, gt, mask, focal=None):
    """0.5 * sum(((pred - gt) * mask)^2 [* focal weight]) over all elements."""
    pred = ops.cast(pred, "float32")
    gt = ops.cast(gt, "float32")
    mask = ops.cast(mask, "float32")
    sq = ops.square((pred - gt) * mask)
    if focal is not None:
        sq = sq * _focal_weight(pred, gt, focal.alpha, focal.beta, focal.bkg_thresh, focal.gamma)
    return 0.5 * ops.sum(sq)


class BpNetLoss:
    """Callable: (labels dict, model outputs list) -> (total loss, per-stage losses).

    ``labels`` is the pipeline's {"heatmap", "paf", "mask"}; ``outputs`` the
    model's [heatmaps per stage..., PAFs per stage...]. The per-stage dict has
    ``heatmap_stage{t}`` and ``paf_stage{t}`` (already divided by the batch
    size, and with ``normalization="cells"`` by the map's cells) for logging. Regularization is not included: add
    :func:`regularization_loss` of the model.
    """

    def __init__(self, num_stages: int, focal=None, global_batch_size: Optional[int] = None,
                 normalization: str = "sum"):
        if num_stages < 1:
            raise BpnetError(f"loss: num_stages must be >= 1, got {num_stages}")
        if normalization not in NORMALIZATIONS:
            raise BpnetError(f"loss: normalization {normalization!r} is not one of "
                             f"{', '.join(NORMALIZATIONS)}")
        self.num_stages = int(num_stages)
        self.focal = focal
        self.global_batch_size = global_batch_size
        self.normalization = normalization

    @classmethod
    def from_config(cls, loss_cfg, num_stages: int, global_batch_size: Optional[int] = None):
        name = getattr(loss_cfg, "class_name", "BpNetLoss")
        focal = getattr(loss_cfg, "focal_loss_params", None)
        norm = getattr(loss_cfg, "normalization", "sum")
        # TAO's switch: focal_loss_params.use_focal_loss selects the focal variant.
        if name == "BpNetFocalLoss" or (name == "BpNetLoss" and getattr(focal, "use_focal_loss", False)):
            return cls(num_stages, focal, global_batch_size, norm)
        if name == "BpNetLoss":
            return cls(num_stages, None, global_batch_size, norm)
        raise BpnetError(f"loss: unknown class {name!r}; use BpNetLoss or BpNetFocalLoss")

    def __call__(self, labels: Dict, outputs: Sequence):
        T = self.num_stages
        outputs = list(outputs)
        if len(outputs) != 2 * T:
            raise BpnetError(f"loss: expected {2 * T} model outputs ({T} stages), "
                             f"got {len(outputs)}")
        heat_gt, paf_gt, mask = labels["heatmap"], labels["paf"], labels["mask"]
        if self.global_batch_size is not None:
            batch = float(self.global_batch_size)
        else:
            batch = ops.cast(ops.shape(heat_gt)[0], "float32")
        if self.normalization == "cells":
            shape = ops.shape(heat_gt)
            batch = ops.multiply(batch, ops.multiply(ops.cast(shape[1], "float32"),
                                                     ops.cast(shape[2], "float32")))
        per_stage = {}
        total = 0.0
        for t in range(1, T + 1):
            lh = masked_l2(outputs[t - 1], heat_gt, mask, self.focal) / batch
            lp = masked_l2(outputs[T + t - 1], paf_gt, mask, self.focal) / batch
            per_stage[f"heatmap_stage{t}"] = lh
            per_stage[f"paf_stage{t}"] = lp
            total = total + lh + lp
        return total, per_stage


def regularization_loss(model):
    """Sum of the model's regularization losses (0 when it has none)."""
    losses = list(model.losses)
    if not losses:
        return ops.convert_to_tensor(0.0, dtype="float32")
    return ops.sum(ops.stack([ops.cast(x, "float32") for x in losses]))

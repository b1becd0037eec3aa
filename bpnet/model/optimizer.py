"""Momentum SGD with per-variable gradient weights (TAO's stagewise LR multipliers).

Each trainable variable's gradient is multiplied by a constant weight before
the momentum update. For momentum SGD that is the same as giving that
variable its own learning rate multiplier:

    m <- momentum * m - lr * w_v * g
    v <- v + m                      (nesterov: v <- v + momentum * m - lr * w_v * g)

Stagewise multipliers (OpenPose's / TAO's), kernel / bias:
stage 1 layers (including stage 1's outputs) 1 / 2; stages >= 2 and the
final outputs 4 / 8; backbone and channel reduction 1 / 2. Variables that
are neither a conv kernel nor a bias (BatchNorm's gamma and beta) keep 1.
Without ``use_stagewise_lr_multipliers`` every weight is 1.

The weights are a plain {variable path: weight} dict in the optimizer's
config, so the optimizer serializes; its state (iterations, momentum
buffers) is ordinary Keras optimizer state, saved and restored by
checkpoints, and the update runs under tf.distribute and on JAX alike.
"""

from __future__ import annotations

from typing import Dict, Optional

import keras
from keras import ops

from .heads import layer_stage

STAGE1_MULT = {"kernel": 1.0, "bias": 2.0}
LATER_MULT = {"kernel": 4.0, "bias": 8.0}
BACKBONE_MULT = {"kernel": 1.0, "bias": 2.0}


def _leaf_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers"):  # a nested model
            yield from _leaf_layers(layer)
        else:
            yield layer


def _kind(var) -> str:
    name = var.name.split("/")[-1].split(":")[0]
    if name.endswith("kernel"):  # kernel, depthwise_kernel, pointwise_kernel
        return "kernel"
    if name == "bias":
        return "bias"
    return ""


def stagewise_gradient_weights(model, num_stages: Optional[int] = None,
                               enabled: bool = True) -> Dict[str, float]:
    """{variable path: gradient weight} for every conv kernel and bias of ``model``.

    Layers are assigned to stages by name (heads.layer_stage); anything
    that is not a stage layer is backbone.
    """
    if num_stages is None:
        num_stages = len(model.outputs) // 2
    weights = {}
    for layer in _leaf_layers(model):
        stage = layer_stage(layer.name, num_stages)
        table = (BACKBONE_MULT if stage == 0 else STAGE1_MULT if stage == 1 else LATER_MULT)
        for var in layer.trainable_weights:
            kind = _kind(var)
            if kind:
                weights[var.path] = table[kind] if enabled else 1.0
    return weights


@keras.saving.register_keras_serializable(package="bpnet")
class WeightedMomentumOptimizer(keras.optimizers.SGD):
    """keras SGD (momentum, optional Nesterov) whose gradients are scaled per variable."""

    def __init__(self, learning_rate=0.01, momentum=0.9, nesterov=False,
                 gradient_weights: Optional[Dict[str, float]] = None,
                 name="weighted_momentum", **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=float(momentum),
                         nesterov=nesterov, name=name, **kwargs)
        self.gradient_weights = {str(k): float(v) for k, v in (gradient_weights or {}).items()}
        self._weights_by_index = []

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._weights_by_index = [self.gradient_weights.get(v.path, 1.0) for v in variables]

    def weight_of(self, variable) -> float:
        return self._weights_by_index[self._get_variable_index(variable)]

    def update_step(self, gradient, variable, learning_rate):
        w = self.weight_of(variable)
        if w != 1.0:
            gradient = ops.multiply(gradient, ops.cast(w, gradient.dtype))
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config["gradient_weights"] = dict(self.gradient_weights)
        return config


def make_optimizer(opt_cfg, model, schedule, use_stagewise_lr_multipliers: bool):
    """The optimizer of a train spec's ``optimizer`` section for ``model``."""
    return WeightedMomentumOptimizer(
        learning_rate=schedule, momentum=opt_cfg.momentum, nesterov=opt_cfg.use_nesterov,
        gradient_weights=stagewise_gradient_weights(model, enabled=use_stagewise_lr_multipliers))

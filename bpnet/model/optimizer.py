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

TAO's two optimizer keys, with TAO's meaning: ``weight_default_value`` is the
weight of every variable the multipliers leave out (all of them without
stagewise multipliers; BatchNorm's gamma and beta with them), and
``grad_weights_dict`` ({variable name: weight}) sets single variables' weights
over the multipliers. TAO's trainer replaces that dict with its own
multipliers, so the key does nothing there; bpnet honours it. A name matches
a variable's Keras path ("stage1_heatmap_conv1/kernel") or, TAO-style, that
path with a ":0" suffix; a name that matches no variable is an error.

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


def apply_grad_weights_dict(weights: Dict[str, float], model, grad_weights_dict) -> Dict[str, float]:
    """``weights`` with TAO's ``grad_weights_dict`` entries set over them, by variable name."""
    if not grad_weights_dict:
        return weights
    from ..errors import BpnetError
    paths = {v.path: v.path for v in model.trainable_variables}
    out = dict(weights)
    for name, w in grad_weights_dict.items():
        key = str(name)[:-2] if str(name).endswith(":0") else str(name)
        if key not in paths:
            import difflib
            near = difflib.get_close_matches(key, list(paths), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise BpnetError(f"optimizer.grad_weights_dict: {name!r} is not a trainable "
                             f"variable of the model{hint}")
        out[key] = float(w)
    return out


@keras.saving.register_keras_serializable(package="bpnet")
class WeightedMomentumOptimizer(keras.optimizers.SGD):
    """keras SGD (momentum, optional Nesterov) whose gradients are scaled per variable.

    ``default_weight``: the weight of a variable not in ``gradient_weights``.
    """

    def __init__(self, learning_rate=0.01, momentum=0.9, nesterov=False,
                 gradient_weights: Optional[Dict[str, float]] = None,
                 default_weight: float = 1.0,
                 name="weighted_momentum", **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=float(momentum),
                         nesterov=nesterov, name=name, **kwargs)
        self.gradient_weights = {str(k): float(v) for k, v in (gradient_weights or {}).items()}
        self.default_weight = float(default_weight)
        self._weights_by_index = []

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._weights_by_index = [self.gradient_weights.get(v.path, self.default_weight)
                                  for v in variables]

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
        config["default_weight"] = self.default_weight
        return config


def make_optimizer(opt_cfg, model, schedule, use_stagewise_lr_multipliers: bool):
    """The optimizer of a train spec's ``optimizer`` section for ``model``.

    With stagewise multipliers every conv kernel and bias has its multiplier
    and the rest (BatchNorm) ``weight_default_value``; without them every
    variable has ``weight_default_value``. ``grad_weights_dict`` goes on top.
    """
    default = float(getattr(opt_cfg, "weight_default_value", 1.0))
    weights = (stagewise_gradient_weights(model, enabled=True)
               if use_stagewise_lr_multipliers else {})
    weights = apply_grad_weights_dict(weights, model, getattr(opt_cfg, "grad_weights_dict", None))
    return WeightedMomentumOptimizer(
        learning_rate=schedule, momentum=opt_cfg.momentum, nesterov=opt_cfg.use_nesterov,
        gradient_weights=weights, default_weight=default)

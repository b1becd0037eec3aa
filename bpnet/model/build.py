"""build_model: a ModelConfig and a PoseConfig -> a Keras model.

Outputs are [heatmaps of stages 1..T, PAFs of stages 1..T]; the last stage's
layers are named ``heatmap_out`` and ``paf_out`` (see heads.py for all names).
Channel counts come from the pose config: J+1 heatmaps (background last) and
2E PAF channels.
"""

from __future__ import annotations

from typing import Optional, Sequence

from bpnet.errors import BpnetError

#: Every model class a spec may name (``model.__class_name__``); the spec
#: layer validates against this list, build_model dispatches on it.
MODEL_CLASSES = ("BpNetModel", "BpNetLiteModel", "MobileNetThinModel")


def check_channels(model_cfg, pose) -> None:
    """The spec's heat/paf channel counts must match the pose config."""
    problems = []
    if model_cfg.heat_channels != pose.heat_channels:
        problems.append(f"model.heat_channels is {model_cfg.heat_channels} but pose config "
                        f"{pose.name!r} has {pose.num_joints} joints + background = "
                        f"{pose.heat_channels}; set model.heat_channels: {pose.heat_channels}")
    if model_cfg.paf_channels != pose.paf_channels:
        problems.append(f"model.paf_channels is {model_cfg.paf_channels} but pose config "
                        f"{pose.name!r} has {pose.num_edges} limbs x 2 = {pose.paf_channels}; "
                        f"set model.paf_channels: {pose.paf_channels}")
    if problems:
        raise BpnetError("; ".join(problems))


def build_model(model_cfg, pose, input_shape: Sequence[Optional[int]] = (None, None, 3),
                name: Optional[str] = None):
    """Build the model named by ``model_cfg.class_name`` for ``pose``.

    ``model_cfg`` is a ModelConfig as the spec loader returns it: its values
    (stages, channel parity, ...) were checked there.
    """
    cls = getattr(model_cfg, "class_name", "BpNetLiteModel")
    if cls not in MODEL_CLASSES:
        raise BpnetError(f"model: unknown class {cls!r}; choose one of {', '.join(MODEL_CLASSES)}")
    check_channels(model_cfg, pose)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise BpnetError(f"model input shape must be (height, width, channels), got {input_shape}")
    if cls == "MobileNetThinModel":
        # Written by the import helper; imported lazily so a missing or broken
        # file only matters to users of that class.
        from bpnet.model.mobilenet_thin import build_mobilenet_thin
        return build_mobilenet_thin(model_cfg, pose, input_shape)

    arch = model_cfg.backbone_attributes.architecture
    if arch != "vgg":
        raise BpnetError(f"model.backbone_attributes.architecture {arch!r} is not available for "
                         f"{cls}; use vgg (mobilenet_v1 goes with MobileNetThinModel)")
    import keras
    from keras import layers

    from .heads import lite_stages, two_branch_stages
    from .layers import ConvFactory
    from .vgg import vgg19_backbone

    convs = ConvFactory(model_cfg)
    inputs = layers.Input(shape=input_shape, name="input_1")
    x = vgg19_backbone(inputs, convs, use_bias=model_cfg.backbone_attributes.use_bias)
    features = convs.conv(x, 128, 3, "channel_reduction_conv", use_bias=model_cfg.use_bias,
                          activation="relu")
    stages = lite_stages if cls == "BpNetLiteModel" else two_branch_stages
    heats, pafs = stages(convs, features, model_cfg, pose.heat_channels, pose.paf_channels)
    return keras.Model(inputs, heats + pafs, name=name or cls)


def num_stages_of(model) -> int:
    """Number of stages of a built model (its outputs come in heatmap/PAF pairs)."""
    n = len(model.outputs)
    if n % 2:
        raise BpnetError(f"model {model.name!r} has {n} outputs; expected heatmap/PAF pairs")
    return n // 2


def select_stage_outputs(outputs, num_stages: int, output_stage_to_use: Optional[int] = None):
    """(heatmaps, PAFs) of stage ``output_stage_to_use`` (1-based, None = last)."""
    from .heads import select_stage
    return select_stage(outputs, num_stages, output_stage_to_use)


def stage_model(model, output_stage_to_use: Optional[int] = None):
    """A model sharing ``model``'s weights whose outputs are [heatmaps, PAFs] of one stage."""
    import keras
    T = num_stages_of(model)
    heat, paf = select_stage_outputs(model.outputs, T, output_stage_to_use)
    return keras.Model(model.inputs, [heat, paf], name=f"{model.name}_stage")

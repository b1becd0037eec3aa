"""Stage heads: the two-branch OpenPose model and TAO's "lite" shared-trunk model.

Two-branch (BpNetModel), every stage has a heatmap branch and a PAF branch:
  stage 1, per branch: 3 x conv3x3(128), conv1x1(512), conv1x1(out)
  stage t >= 2: input concat[features, heatmaps(t-1), PAFs(t-1)], per branch:
      5 x conv7x7(128), conv1x1(128), [attention], conv1x1(out)
Lite (BpNetLiteModel), the kxk convolutions are shared by both outputs and the
trunk splits into per-output 1x1 convolutions:
  stage 1: 3 x conv3x3(128) -> per output: conv1x1(512), conv1x1(out)
  stage t >= 2: 5 x conv7x7(128) -> per output: conv1x1(128), [attention], conv1x1(out)
Attention (optional, stages >= 2): a 3x3 conv with the branch's width, tanh
for PAFs and sigmoid for heatmaps, multiplied into the branch features.
Every conv but the outputs is followed by ReLU; outputs are linear.

Layer names: ``stage{t}_{heat|paf}_conv{i}`` (per branch), ``stage{t}_conv{i}``
(lite trunk), outputs ``heatmap_stage{t}`` / ``paf_stage{t}`` and, for the last
stage, ``heatmap_out`` / ``paf_out``.
"""

from __future__ import annotations

import re
from typing import Optional

HEAT, PAF = "heat", "paf"
_OUT_PREFIX = {HEAT: "heatmap", PAF: "paf"}
_ATTENTION_ACT = {HEAT: "sigmoid", PAF: "tanh"}


def output_layer_name(branch: str, stage: int, num_stages: int) -> str:
    prefix = _OUT_PREFIX[branch]
    return f"{prefix}_out" if stage == num_stages else f"{prefix}_stage{stage}"


def output_names(num_stages: int):
    """Model output names in output order: heatmaps of stages 1..T, then PAFs."""
    return ([output_layer_name(HEAT, t, num_stages) for t in range(1, num_stages + 1)]
            + [output_layer_name(PAF, t, num_stages) for t in range(1, num_stages + 1)])


_STAGE_RE = re.compile(r"^(?:stage(\d+)_|(?:heatmap|paf)_stage(\d+)$)")


def layer_stage(name: str, num_stages: int) -> int:
    """Stage number (1-based) of a head layer; 0 for the backbone and channel reduction."""
    if name in ("heatmap_out", "paf_out"):
        return num_stages
    m = _STAGE_RE.match(name)
    if not m:
        return 0
    return int(m.group(1) or m.group(2))


def _output(convs, x, branch, stage, num_stages, channels, use_bias):
    # Outputs stay float32 under mixed precision: the loss sums squares of them.
    return convs.conv(x, channels, 1, output_layer_name(branch, stage, num_stages),
                      use_bias=use_bias, scale=False, dtype="float32")


def _attention(convs, x, branch, stage, width, use_bias):
    from keras import layers
    att = convs.conv(x, width, 3, f"stage{stage}_{branch}_attention_conv",
                     use_bias=use_bias, activation=_ATTENTION_ACT[branch], scale=False)
    return layers.Multiply(name=f"stage{stage}_{branch}_attention")([x, att])


def _refinement_input(features, heat, paf, stage):
    from keras import layers
    return layers.Concatenate(axis=-1, name=f"stage{stage}_input")([features, heat, paf])


def two_branch_stages(convs, features, cfg, heat_channels, paf_channels):
    """Stages of the two-branch model; returns (heatmaps per stage, PAFs per stage)."""
    T, bias = cfg.stages, cfg.use_bias
    heats, pafs = [], []
    outs = {HEAT: heat_channels, PAF: paf_channels}
    for stage in range(1, T + 1):
        if stage == 1:
            x_in = features
        else:
            x_in = _refinement_input(features, heats[-1], pafs[-1], stage)
        result = {}
        # PAF branch first, like TAO, so layer creation order (and with it the
        # random initial weights drawn under one seed) follows TAO's order.
        for branch in (PAF, HEAT):
            x = x_in
            if stage == 1:
                for i in range(3):
                    x = convs.conv(x, 128, 3, f"stage1_{branch}_conv{i + 1}", use_bias=bias,
                                   activation="relu")
                x = convs.conv(x, 512, 1, f"stage1_{branch}_conv4", use_bias=bias,
                               activation="relu")
            else:
                for i in range(5):
                    x = convs.conv(x, 128, 7, f"stage{stage}_{branch}_conv{i + 1}",
                                   use_bias=bias, activation="relu")
                x = convs.conv(x, 128, 1, f"stage{stage}_{branch}_conv6", use_bias=bias,
                               activation="relu")
                if cfg.use_self_attention:
                    x = _attention(convs, x, branch, stage, x.shape[-1], bias)
            result[branch] = _output(convs, x, branch, stage, T, outs[branch], bias)
        heats.append(result[HEAT])
        pafs.append(result[PAF])
    return heats, pafs


def lite_stages(convs, features, cfg, heat_channels, paf_channels):
    """Stages of the lite model (shared kxk trunk per stage)."""
    T, bias = cfg.stages, cfg.use_bias
    heats, pafs = [], []
    outs = {HEAT: heat_channels, PAF: paf_channels}
    for stage in range(1, T + 1):
        if stage == 1:
            x = features
            for i in range(3):
                x = convs.conv(x, 128, 3, f"stage1_conv{i + 1}", use_bias=bias, activation="relu")
            split_width, split_index = 512, 4
        else:
            x = _refinement_input(features, heats[-1], pafs[-1], stage)
            for i in range(5):
                x = convs.conv(x, 128, 7, f"stage{stage}_conv{i + 1}", use_bias=bias,
                               activation="relu")
            split_width, split_index = 128, 6
        result = {}
        for branch in (PAF, HEAT):
            y = convs.conv(x, split_width, 1, f"stage{stage}_{branch}_conv{split_index}",
                           use_bias=bias, activation="relu")
            if stage > 1 and cfg.use_self_attention:
                y = _attention(convs, y, branch, stage, y.shape[-1], bias)
            result[branch] = _output(convs, y, branch, stage, T, outs[branch], bias)
        heats.append(result[HEAT])
        pafs.append(result[PAF])
    return heats, pafs


def select_stage(outputs, num_stages: int, output_stage_to_use: Optional[int] = None):
    """(heatmaps, PAFs) of one stage from the model's output list.

    ``output_stage_to_use`` is 1-based; None means the last stage.
    """
    from bpnet.errors import BpnetError
    outputs = list(outputs)
    if len(outputs) != 2 * num_stages:
        raise BpnetError(f"expected {2 * num_stages} model outputs ({num_stages} stages x "
                         f"heatmaps and PAFs), got {len(outputs)}")
    stage = num_stages if output_stage_to_use is None else int(output_stage_to_use)
    if not 1 <= stage <= num_stages:
        raise BpnetError(f"output_stage_to_use is {output_stage_to_use} but the model has "
                         f"{num_stages} stages; use 1..{num_stages} or null for the last")
    return outputs[stage - 1], outputs[num_stages + stage - 1]

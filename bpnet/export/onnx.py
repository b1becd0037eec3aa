"""A bpnet Keras model as an ONNX file, written layer by layer (``keras_graph``), or
converted with tf2onnx where a layer is not one of bpnet's (and for the DeepStream file).

What the file holds:

- the last stage only: two outputs, ordered and named as TAO's exported
  BodyPoseNet, PAFs first (``paf_out/BiasAdd:0``; ``conv2d_transpose_1/BiasAdd:0``
  when the DeepStream upsample is appended) then heatmaps
  (``heatmap_out/BiasAdd:0``);
- one NHWC float32 input, ``input_1:0`` (TAO's name), with a dynamic batch
  unless a static batch size is given, and a dynamic height and width unless
  input dims are given;
- opset 17: read by ONNX Runtime and by TensorRT 10/11's ONNX parser;
- the bpnet meta (``bpnet.model.meta``) as the ``bpnet_meta`` metadata_props
  entry, with what export adds: ``precision``, ``input_dims``,
  ``source_model_sha256``, ``output_names`` and, for the DeepStream file,
  ``paf_upsample``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional, Sequence, Tuple

from ..errors import BpnetError
from ..model.meta import ONNX_META_KEY, STRIDE

log = logging.getLogger("bpnet.export")

#: ONNX opset of exported files: ONNX Runtime and TensorRT 10/11 read it.
OPSET = 17
INPUT_NAME = "input_1:0"
PAF_NAME = "paf_out/BiasAdd:0"
SDK_PAF_NAME = "conv2d_transpose_1/BiasAdd:0"  # what DeepStream's bodypose2d app reads
HEATMAP_NAME = "heatmap_out/BiasAdd:0"


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_input_dims(text: Optional[str], channels: int, stride: int = STRIDE
                     ) -> Optional[Tuple[int, int, int]]:
    """``"H,W,C"`` -> (H, W, C), checked against the stride and the model's channels."""
    if text is None or str(text).strip() == "":
        return None
    parts = [p.strip() for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise BpnetError(f"--input_dims {text!r}: expected three integers H,W,C "
                         "(e.g. 368,640,3)") from None
    if len(dims) != 3:
        raise BpnetError(f"--input_dims {text!r}: expected three integers H,W,C (e.g. 368,640,3)")
    h, w, c = dims
    if h <= 0 or w <= 0:
        raise BpnetError(f"--input_dims {text!r}: height and width must be positive")
    from ..specs import MAX_INPUT_SIDE
    if max(h, w) > MAX_INPUT_SIDE:
        raise BpnetError(f"--input_dims {text!r}: sides above {MAX_INPUT_SIDE} pixels are "
                         "refused, as in the inference spec's input_shape")
    if h % stride or w % stride:
        raise BpnetError(f"--input_dims {text!r}: height and width must be multiples of the "
                         f"model's stride {stride} (e.g. {max(stride, h // stride * stride)},"
                         f"{max(stride, w // stride * stride)},{c})")
    if c != channels:
        raise BpnetError(f"--input_dims {text!r}: the model takes {channels} input channel(s), "
                         f"not {c}")
    return dims


def _upsample_layer(channels: int, ratio: int):
    """A fixed nearest x``ratio`` upsample: a transposed conv with a ones kernel per channel."""
    import keras
    import numpy as np
    layer = keras.layers.Conv2DTranspose(channels, ratio, strides=ratio, padding="valid",
                                         use_bias=True, name="conv2d_transpose_1",
                                         trainable=False)
    layer.build((None, None, None, channels))
    kernel = np.zeros((ratio, ratio, channels, channels), np.float32)
    kernel[:, :, np.arange(channels), np.arange(channels)] = 1.0
    layer.set_weights([kernel, np.zeros(channels, np.float32)])
    return layer


def keras_to_onnx(model, *, batch: Optional[int] = None,
                  input_hw: Optional[Sequence[int]] = None, channels: int = 3,
                  paf_upsample: Optional[int] = None):
    """The last stage of a Keras bpnet model as an ONNX ModelProto (no meta yet).

    Outputs [PAFs, heatmaps] named as TAO's. ``paf_upsample``: append the
    DeepStream upsample of the PAF output.
    """
    from ..model.build import stage_model
    from .keras_graph import Unsupported, write_graph
    one = stage_model(model)
    if not paf_upsample and len(one.inputs) == 1 and len(one.outputs) == 2:
        # bpnet's layers written directly: the weights held once (tf2onnx needed 14 GB
        # for the VGG model); anything else goes through tf2onnx below.
        try:
            proto = write_graph((one.inputs[0], INPUT_NAME),
                                [(one.outputs[1], PAF_NAME), (one.outputs[0], HEATMAP_NAME)],
                                batch, input_hw, channels, OPSET)
        except Unsupported as e:
            log.debug("ONNX: %s; converting with tf2onnx", e)
        else:
            _canonical_names(proto.graph)
            return proto
    import tensorflow as tf
    import tf2onnx
    up = _upsample_layer(int(one.outputs[1].shape[-1]), paf_upsample) if paf_upsample else None

    def fn(x):
        heat, paf = one([x], training=False)
        if up is not None:
            paf = up(paf)
        return paf, heat

    h, w = (None, None) if input_hw is None else (int(input_hw[0]), int(input_hw[1]))
    spec = tf.TensorSpec([batch, h, w, channels], tf.float32, name="input_1")
    try:
        proto, _ = tf2onnx.convert.from_function(tf.function(fn, autograph=False),
                                                 input_signature=[spec], opset=OPSET)
    except Exception as e:  # tf2onnx raises many types
        raise BpnetError(f"the model could not be converted to ONNX ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    g = proto.graph
    if len(g.input) != 1 or len(g.output) != 2:
        raise BpnetError(f"conversion gave {len(g.input)} inputs and {len(g.output)} outputs; "
                         "expected 1 and 2")
    _rename(g, g.input[0].name, INPUT_NAME)
    _rename(g, g.output[0].name, SDK_PAF_NAME if paf_upsample else PAF_NAME)
    _rename(g, g.output[1].name, HEATMAP_NAME)
    _canonical_names(g)
    return proto


def _canonical_names(graph):
    """Name every inner tensor by its node's place and op type ("t12_Conv").

    tf2onnx's names carry process-wide counters (``mul_1__4103``,
    ``const_fold_opt__1537``) and Keras' call counts (``stage_2``), so two
    conversions of one model differ; the INT8 cache is keyed by tensor name
    and by the graph's fingerprint, and needs names that do not. Constants
    are named by their first reader's place and input slot ("c12_1"). The
    places are those of ``_order_by_structure``: tf2onnx's node order, too,
    changes from one conversion to the next.
    """
    _order_by_structure(graph)
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    inits = {i.name for i in graph.initializer}
    mapping = {}
    for i, node in enumerate(graph.node):
        node.name = f"n{i}_{node.op_type}"
        for j, name in enumerate(node.input):
            if name in inits and name not in mapping:  # constants: by their first reader
                mapping[name] = f"c{i}_{j}"
        for j, out in enumerate(node.output):
            if out and out not in keep:
                mapping[out] = f"t{i}_{node.op_type}" + (f"_{j}" if j else "")
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for v in list(graph.value_info) + list(graph.initializer):
        v.name = mapping.get(v.name, v.name)
    place: dict = {}
    for name in (n for node in graph.node for n in node.input):
        place.setdefault(name, len(place))
    replace_all(graph.initializer,
                sorted(graph.initializer, key=lambda i: place.get(i.name, len(place))))


def replace_all(field, items):
    """Make the repeated protobuf ``field`` hold ``items`` (some of its own elements,
    reordered): copied first, since clearing the field invalidates them."""
    copies = [type(m)() for m in items]
    for c, m in zip(copies, items):
        c.CopyFrom(m)
    del field[:]
    field.extend(copies)


def _order_by_structure(graph):
    """Order ``graph.node`` by the graph's structure alone: depth first from the outputs,
    each node's inputs in their order, a node after everything it reads.

    Any topological order is valid ONNX; this one depends on no name, so two
    conversions of one model list their nodes alike. Nodes no output needs
    (none, after tf2onnx's optimizers) keep their order at the end.
    """
    nodes = list(graph.node)
    made_by = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    placed, ordered = set(), []
    for out in graph.output:
        stack = [(made_by.get(out.name), 0)]
        while stack:
            i, k = stack.pop()
            if i is None or i in placed:
                continue
            if k < len(nodes[i].input):
                stack.append((i, k + 1))
                stack.append((made_by.get(nodes[i].input[k]), 0))
            else:
                placed.add(i)
                ordered.append(i)
    ordered += [i for i in range(len(nodes)) if i not in placed]
    replace_all(graph.node, [nodes[i] for i in ordered])


def graph_fingerprint(proto) -> str:
    """SHA-256 of the graph's structure (ops, their inputs and outputs, weight shapes)."""
    h = hashlib.sha256()
    for node in proto.graph.node:
        h.update(f"{node.op_type}|{','.join(node.input)}|{','.join(node.output)};".encode())
    for init in proto.graph.initializer:
        h.update(f"{init.name}:{list(init.dims)};".encode())
    return h.hexdigest()


def _rename(graph, old: str, new: str):
    """Rename a tensor everywhere it appears in ``graph``."""
    if old == new:
        return
    for coll in (graph.input, graph.output, graph.value_info):
        for v in coll:
            if v.name == old:
                v.name = new
    for node in graph.node:
        for i, n in enumerate(node.input):
            if n == old:
                node.input[i] = new
        for i, n in enumerate(node.output):
            if n == old:
                node.output[i] = new


def set_meta(proto, meta: dict):
    """Store ``meta`` (JSON) as the ``bpnet_meta`` metadata_props entry, replacing any."""
    from ..io import json_default
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key != ONNX_META_KEY]
    del proto.metadata_props[:]
    for k, v in keep + [(ONNX_META_KEY, json.dumps(meta, default=json_default, sort_keys=True))]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    return proto


def get_meta(proto) -> dict:
    for p in proto.metadata_props:
        if p.key == ONNX_META_KEY:
            return json.loads(p.value)
    return {}


def save_onnx(proto, path):
    """Write ``proto`` to ``path`` atomically (one file; no external data)."""
    from ..io import write_bytes_atomic
    data = proto.SerializeToString()
    write_bytes_atomic(Path(path), data)
    return Path(path)

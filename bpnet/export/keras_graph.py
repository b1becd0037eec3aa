"""A bpnet Keras network written as an ONNX graph directly, layer by layer.

tf2onnx freezes the model into a TensorFlow graph, runs grappler on it and
converts that, holding many copies of the weights: the default VGG model
(209 MB of weights) took 14 GB of memory and a minute. bpnet's networks are
made of a handful of layer types; this writer maps each to its ONNX nodes
(NCHW inside, one Transpose at the input and one per output, as tf2onnx's
files have) and holds the weights once:

- ``Conv2D``: Conv (kernel HWIO -> OIHW), its activation after it;
- ``SeparableConv2D``: a depthwise Conv (group = input channels) then a 1x1
  Conv with the bias, then the activation;
- ``BatchNormalization``: folded into the Conv before it (per output channel
  scale and shift), or a BatchNormalization node where no Conv precedes it;
- ``Activation`` / ``ReLU`` (plain ReLU): Relu;
- ``MaxPooling2D``: MaxPool; ``Concatenate`` on the channels: Concat.

``same`` padding is ``auto_pad=SAME_UPPER`` where the stride is above 1 (the
extra row or column at the end, as TensorFlow pads, for any input size), and
explicit symmetric pads otherwise. A network with any other layer, or option,
raises ``Unsupported``: the caller converts it with tf2onnx instead.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np


class Unsupported(Exception):
    """A layer or option this writer does not map (tf2onnx converts the model instead)."""


def _pads(layer, kernel, strides) -> dict:
    padding = layer.padding.lower()
    if padding == "valid":
        return {"pads": [0, 0, 0, 0]}
    if padding != "same":
        raise Unsupported(f"{layer.name}: padding {layer.padding!r}")
    dilation = tuple(getattr(layer, "dilation_rate", (1, 1)))
    if any(s > 1 for s in strides):
        if any(d > 1 for d in dilation):
            raise Unsupported(f"{layer.name}: dilation with stride")
        return {"auto_pad": "SAME_UPPER"}
    total = [(k - 1) * d for k, d in zip(kernel, dilation)]
    if any(t % 2 for t in total):  # even kernels: TensorFlow puts the extra pad at the end
        return {"auto_pad": "SAME_UPPER"}
    return {"pads": [total[0] // 2, total[1] // 2, total[0] // 2, total[1] // 2]}


def _activation(layer) -> Optional[str]:
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", None)
    if act is None or name == "linear":
        return None
    if name == "relu":
        return "Relu"
    raise Unsupported(f"{layer.name}: activation {name or act}")


class _Writer:
    def __init__(self):
        self.nodes: list = []
        self.inits: dict = {}  # name -> TensorProto
        self.conv_of: Dict[str, int] = {}  # tensor -> index of the Conv node that makes it
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, base: str, array) -> str:
        from onnx import numpy_helper
        name = self.name(base)
        self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def node(self, op: str, inputs: List[str], **attrs) -> str:
        import onnx
        out = self.name(op)
        self.nodes.append(onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, weight, bias, **attrs) -> str:
        inputs = [x, self.const("W", weight.astype(np.float32))]
        if bias is not None:
            inputs.append(self.const("B", bias.astype(np.float32)))
        out = self.node("Conv", inputs, **attrs)
        self.conv_of[out] = len(self.nodes) - 1
        return out

    def activation(self, x: str, op: Optional[str]) -> str:
        return self.node(op, [x]) if op else x

    def fold_batch_norm(self, x: str, layer, sole_reader: bool) -> str:
        """``layer`` folded into the Conv that makes ``x`` when the BN is its only reader."""
        from onnx import numpy_helper
        if layer.axis not in (-1, 3):
            raise Unsupported(f"{layer.name}: axis {layer.axis}")
        v = np.asarray(layer.moving_variance, np.float64)
        m = np.asarray(layer.moving_mean, np.float64)
        g = np.asarray(layer.gamma, np.float64) if layer.scale else np.ones_like(v)
        b = np.asarray(layer.beta, np.float64) if layer.center else np.zeros_like(v)
        scale = g / np.sqrt(v + layer.epsilon)
        shift = b - m * scale
        k = self.conv_of.get(x)
        if k is None or not sole_reader:
            return self.node("BatchNormalization", [
                x, self.const("scale", g.astype(np.float32)), self.const("bias", b.astype(np.float32)),
                self.const("mean", m.astype(np.float32)), self.const("var", v.astype(np.float32))],
                epsilon=float(layer.epsilon))
        node = self.nodes[k]
        weight = node.input[1]
        w = numpy_helper.to_array(self.inits[weight]).astype(np.float64)
        self.inits[weight] = numpy_helper.from_array(
            (w * scale.reshape(-1, 1, 1, 1)).astype(np.float32), weight)
        if len(node.input) > 2:
            bias = numpy_helper.to_array(self.inits[node.input[2]]).astype(np.float64)
            self.inits[node.input[2]] = numpy_helper.from_array(
                (bias * scale + shift).astype(np.float32), node.input[2])
        else:
            node.input.append(self.const("B", shift.astype(np.float32)))
        return x

    def layer(self, layer, xs: List[str], sources: list) -> str:
        """The ONNX nodes of ``layer`` reading ``xs``; ``sources``: the Keras tensors they are."""
        kind = type(layer).__name__
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise Unsupported(f"{layer.name}: data_format {layer.data_format}")
        if kind == "Conv2D":
            if layer.groups != 1:
                raise Unsupported(f"{layer.name}: groups")
            kernel = np.asarray(layer.kernel)
            strides = tuple(layer.strides)
            out = self.conv(xs[0], kernel.transpose(3, 2, 0, 1),
                            np.asarray(layer.bias) if layer.use_bias else None,
                            kernel_shape=list(kernel.shape[:2]), strides=list(strides),
                            dilations=list(layer.dilation_rate),
                            **_pads(layer, kernel.shape[:2], strides))
            return self.activation(out, _activation(layer))
        if kind == "SeparableConv2D":
            dw = np.asarray(layer.depthwise_kernel)  # kh, kw, cin, multiplier
            pw = np.asarray(layer.pointwise_kernel)  # 1, 1, cin * multiplier, cout
            kh, kw, cin, mult = dw.shape
            strides = tuple(layer.strides)
            y = self.conv(xs[0], dw.transpose(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw), None,
                          kernel_shape=[kh, kw], strides=list(strides),
                          dilations=list(layer.dilation_rate), group=cin,
                          **_pads(layer, (kh, kw), strides))
            out = self.conv(y, pw.transpose(3, 2, 0, 1),
                            np.asarray(layer.bias) if layer.use_bias else None,
                            kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0])
            return self.activation(out, _activation(layer))
        if kind == "BatchNormalization":
            producer = sources[0]._keras_history[0]
            return self.fold_batch_norm(xs[0], layer, len(producer._outbound_nodes) == 1)
        if kind == "Activation":
            op = _activation(layer)
            return self.activation(xs[0], op)
        if kind == "ReLU":
            if layer.max_value is not None or float(layer.negative_slope) != 0 \
                    or float(layer.threshold) != 0:
                raise Unsupported(f"{layer.name}: a ReLU with options")
            return self.node("Relu", xs)
        if kind == "MaxPooling2D":
            pool, strides = tuple(layer.pool_size), tuple(layer.strides)
            return self.node("MaxPool", xs, kernel_shape=list(pool), strides=list(strides),
                             **_pads(layer, pool, strides))
        if kind == "Concatenate":
            if layer.axis not in (-1, 3):
                raise Unsupported(f"{layer.name}: axis {layer.axis}")
            return self.node("Concat", xs, axis=1)
        raise Unsupported(f"{layer.name}: layer type {kind}")


def write_graph(inputs, outputs, batch: Optional[int], input_hw, channels: int, opset: int):
    """The ONNX ModelProto computing ``outputs`` [(KerasTensor, name)] from ``inputs``
    (KerasTensor, name) of a Keras functional graph, NHWC in and out."""
    import onnx
    from onnx import TensorProto, helper

    source, input_name = inputs
    w = _Writer()
    made = {id(source): w.node("Transpose", [input_name], perm=[0, 3, 1, 2])}

    def build(t) -> str:
        # Depth first without recursion: networks are a few hundred layers deep.
        stack = [t]
        while stack:
            x = stack[-1]
            if id(x) in made:
                stack.pop()
                continue
            op, node_index, tensor_index = x._keras_history
            node = op._inbound_nodes[node_index]
            pending = [y for y in node.input_tensors if id(y) not in made]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            if tensor_index != 0 or len(node.output_tensors) != 1:
                raise Unsupported(f"{op.name}: several outputs")
            # The file computes inference: a ``training`` argument given at build time is moot,
            # and so is an empty mask (what Keras records for a BatchNormalization call).
            extra = {k for k, v in node.arguments.kwargs.items()
                     if k != "training" and not (k == "mask" and v is None)}
            if extra or type(op).__name__ == "InputLayer":
                raise Unsupported(f"{op.name}: call arguments or another input")
            sources = list(node.input_tensors)
            made[id(x)] = w.layer(op, [made[id(y)] for y in sources], sources)
        return made[id(t)]

    for t, name in outputs:
        w.node("Transpose", [build(t)], perm=[0, 2, 3, 1])
        w.nodes[-1].output[0] = name
    h, wd = (None, None) if input_hw is None else (int(input_hw[0]), int(input_hw[1]))
    graph = helper.make_graph(
        w.nodes, "bpnet",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                       [batch or "N", h or "H", wd or "W", channels])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                       [batch or "N", None, None, int(t.shape[-1])])
         for t, name in outputs],
        initializer=list(w.inits.values()))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="bpnet")
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto

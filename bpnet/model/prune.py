"""Filter pruning of a bpnet model: a smaller ordinary Keras model with the same outputs.

TAO's recipe (train with L1 regularization, prune filters whose norm is
small, retrain with ``load_graph``), written over the Keras functional graph
without tfmot or kerassurgeon:

1. Every channel of every tensor is traced to the convolution filter that
   made it (Conv2D, SeparableConv2D) or to nothing prunable (the input).
   Batch norm, activations, pooling and depthwise convs pass channels
   through; a concatenation lists its parts' channels one after another; an
   element-wise op (Add, Multiply: attention) ties the convolutions meeting
   there into one group that keeps the same filters.
2. Groups never pruned: those whose channels reach a model output (the
   heatmap and PAF convolutions of every stage), those with an excluded
   layer, those feeding a layer this module does not know.
3. Per filter, the L2 norm of its kernel (a separable conv: its pointwise
   column), divided by the layer's largest norm (``max``) or by the L2 norm of
   the layer's norms (``L2``). A group's members are combined per filter by the
   equalization criterion (union: max, intersection: min, arithmetic_mean,
   geometric_mean). Filters scoring at least the threshold are kept, their
   count rounded up to a multiple of the granularity and to at least the
   minimum (never more than the layer has); the highest scores win.
4. The model is rebuilt from its functional config with the new filter
   counts and each layer gets the kept slices of its weights (output filters
   and input channels, batch norm statistics, depthwise kernels).

Keras is imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import BpnetError

NORMALIZERS = ("max", "L2")
EQUALIZATION_CRITERIA = ("union", "intersection", "arithmetic_mean", "geometric_mean")

_PRODUCERS = ("Conv2D", "SeparableConv2D")
_PASS_THROUGH = ("BatchNormalization", "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU",
                 "Softmax", "MaxPooling2D", "AveragePooling2D", "ZeroPadding2D", "Cropping2D",
                 "UpSampling2D", "Dropout", "SpatialDropout2D", "GaussianNoise", "Identity",
                 "DepthwiseConv2D")
_ELEMENTWISE = ("Add", "Multiply", "Subtract", "Maximum", "Minimum", "Average")

# A channel: (group id, filter index) of the filter that made it, or None.
Channel = tuple[int, int] | None


@dataclasses.dataclass
class PruneOptions:
    normalizer: str = "max"
    equalization_criterion: str = "union"
    pruning_granularity: int = 8
    pruning_threshold: float = 0.1
    min_num_filters: int = 16
    excluded_layers: Sequence[str] = ()

    def check(self):
        if self.normalizer not in NORMALIZERS:
            raise BpnetError(f"normalizer {self.normalizer!r}: use one of {', '.join(NORMALIZERS)}")
        if self.equalization_criterion not in EQUALIZATION_CRITERIA:
            raise BpnetError(f"equalization_criterion {self.equalization_criterion!r}: use one of "
                             f"{', '.join(EQUALIZATION_CRITERIA)}")
        t = self.pruning_threshold
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise BpnetError(f"pruning_threshold is {t}; it must be a finite number >= 0 "
                             "(useful range 0.05 to 3.0; 0 removes nothing)")
        if int(self.pruning_granularity) != self.pruning_granularity or self.pruning_granularity < 1:
            raise BpnetError(f"pruning_granularity is {self.pruning_granularity}; it must be an "
                             "integer >= 1 (filters are kept in multiples of it)")
        if int(self.min_num_filters) != self.min_num_filters or self.min_num_filters < 1:
            raise BpnetError(f"min_num_filters is {self.min_num_filters}; it must be an integer >= 1")


@dataclasses.dataclass
class LayerReport:
    name: str
    kept: int
    total: int
    reason: str  # "pruned", "output", "excluded", "unknown consumer", "group member"


@dataclasses.dataclass
class PruneReport:
    params_before: int
    params_after: int
    layers: list[LayerReport]

    @property
    def param_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def as_dict(self) -> dict:
        return {"params_before": self.params_before, "params_after": self.params_after,
                "param_ratio": round(self.param_ratio, 6),
                "layers": {l.name: {"kept": l.kept, "total": l.total, "why": l.reason}
                           for l in self.layers}}


# ------------------------------------------------------------------ the graph

class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def add(self, x):
        self.parent.setdefault(x, x)

    def find(self, x):
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _history(tensor):
    op, node_index, tensor_index = tensor._keras_history
    return op, node_index, tensor_index


class _Graph:
    """Channel provenance of every tensor of a functional model."""

    def __init__(self, model):
        self.model = model
        self.producers: dict[str, int] = {}     # layer name -> producer id
        self.names: list[str] = []               # producer id -> layer name
        self.frozen: dict[int, str] = {}         # producer id -> why it keeps every filter
        self.uf = _UnionFind()
        self.inputs_of: dict[str, list[list[Channel]]] = {}  # layer -> channels of each input
        self._memo: dict[int, list[Channel]] = {}
        for t in model.outputs:
            for ch in self.channels(t):
                if ch is not None:
                    self.freeze(ch[0], "output")

    def freeze(self, pid, why):
        self.frozen.setdefault(pid, why)

    def _producer(self, layer) -> int:
        if layer.name not in self.producers:
            pid = len(self.names)
            self.producers[layer.name] = pid
            self.names.append(layer.name)
            self.uf.add(pid)
        return self.producers[layer.name]

    def channels(self, tensor) -> list[Channel]:
        key = id(tensor)
        if key in self._memo:
            return self._memo[key]
        op, node_index, _ = _history(tensor)
        cls = op.__class__.__name__
        width = int(tensor.shape[-1])
        if cls == "InputLayer":
            out: list[Channel] = [None] * width
        else:
            node = op._inbound_nodes[node_index]
            ins = [self.channels(t) for t in node.input_tensors]
            if len(op._inbound_nodes) > 1 and op.weights:
                # A layer called on several tensors: its inputs must keep every channel.
                self._freeze_all(ins, f"input of the shared layer {op.name}")
            self.inputs_of[op.name] = ins
            if cls in _PRODUCERS:
                pid = self._producer(op)
                out = [(pid, i) for i in range(width)]
            elif cls in _PASS_THROUGH and len(ins) == 1:
                src = ins[0]
                mult = width // max(1, len(src))
                if mult * len(src) != width:
                    self._freeze_all(ins, f"input of {op.name}")
                    out = [None] * width
                else:  # depthwise with a multiplier m: channel c*m+j comes from c
                    out = [c for c in src for _ in range(mult)]
            elif cls == "Concatenate" and op.axis in (-1, len(tensor.shape) - 1):
                out = [c for part in ins for c in part]
            elif cls in _ELEMENTWISE and len({len(p) for p in ins}) == 1:
                out = self._meet(op, ins)
            else:
                self._freeze_all(ins, f"input of {op.name} ({cls})")
                out = [None] * width
        if len(out) != width:
            raise BpnetError(f"layer {op.name}: traced {len(out)} channels, the tensor has {width}")
        self._memo[key] = out
        return out

    def _freeze_all(self, ins, why):
        for part in ins:
            for ch in part:
                if ch is not None:
                    self.freeze(ch[0], why)

    def _meet(self, op, ins) -> list[Channel]:
        """Inputs of an element-wise op: each the whole output of one producer, in order,
        to be pruned alike; anything else keeps every channel."""
        pids = []
        for part in ins:
            first = part[0]
            whole = first is not None and all(c == (first[0], i) for i, c in enumerate(part))
            if not whole:
                self._freeze_all(ins, f"input of {op.name}")
                return list(ins[0])
            pids.append(first[0])
        for p in pids[1:]:
            self.uf.union(pids[0], p)
        return list(ins[0])

    def groups(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for pid in range(len(self.names)):
            out.setdefault(self.uf.find(pid), []).append(pid)
        return out


# ------------------------------------------------------------------ scores and counts

def filter_norms(layer) -> np.ndarray:
    """L2 norm of each output filter's kernel (a separable conv: its pointwise column)."""
    cls = layer.__class__.__name__
    w = layer.get_weights()
    kernel = np.asarray(w[1] if cls == "SeparableConv2D" else w[0], dtype=np.float64)
    return np.sqrt((kernel.reshape(-1, kernel.shape[-1]) ** 2).sum(axis=0))


def normalize(norms: np.ndarray, normalizer: str) -> np.ndarray:
    scale = norms.max() if normalizer == "max" else np.sqrt((norms ** 2).sum())
    return norms / scale if scale > 0 else np.zeros_like(norms)


def equalize(scores: list[np.ndarray], criterion: str) -> np.ndarray:
    s = np.stack(scores)
    if criterion == "union":
        return s.max(axis=0)
    if criterion == "intersection":
        return s.min(axis=0)
    if criterion == "arithmetic_mean":
        return s.mean(axis=0)
    return np.exp(np.log(np.maximum(s, 1e-30)).mean(axis=0)) * (s.min(axis=0) > 0)


def kept_count(scores: np.ndarray, threshold: float, granularity: int, minimum: int) -> int:
    """Filters scoring >= threshold, rounded up to the granularity and the minimum."""
    total = len(scores)
    above = int((scores >= threshold).sum())
    n = int(math.ceil(max(above, minimum) / granularity) * granularity)
    return min(total, n)


def keep_indices(scores: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` best filters (ties: lower index first), in their original order."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:n])


# ------------------------------------------------------------------ the rebuild

def _survivors(chans: list[Channel], keep: dict[int, np.ndarray]) -> np.ndarray:
    kept_sets = {}
    out = []
    for i, ch in enumerate(chans):
        if ch is None:
            out.append(i)
            continue
        pid, f = ch
        s = kept_sets.get(pid)
        if s is None:
            s = kept_sets[pid] = set(keep[pid].tolist())
        if f in s:
            out.append(i)
    return np.asarray(out, dtype=np.int64)


def _slice_weights(layer, weights, in_keep, out_keep, depth_mult=1):
    cls = layer.__class__.__name__
    if cls == "Conv2D":
        w = [weights[0][:, :, in_keep, :][..., out_keep]]
        return w + [weights[1][out_keep]] if len(weights) > 1 else w
    if cls == "SeparableConv2D":
        m = weights[0].shape[-1]
        rows = (in_keep[:, None] * m + np.arange(m)[None, :]).reshape(-1)
        w = [weights[0][:, :, in_keep, :], weights[1][:, :, rows, :][..., out_keep]]
        return w + [weights[2][out_keep]] if len(weights) > 2 else w
    if cls == "DepthwiseConv2D":
        w = [weights[0][:, :, in_keep, :]]
        return w + [weights[1][out_keep]] if len(weights) > 1 else w
    if cls in ("BatchNormalization", "PReLU"):
        return [v[..., out_keep] for v in weights]
    return weights


class _Constants:
    """Per channel, the value a tensor takes where its filters' kernels are ignored.

    A removed filter whose kernel is (nearly) zero still outputs a constant
    (its bias, or a batch norm's offset, through the activation). The next
    convolution's bias (or the batch norm after it) absorbs that constant, so
    dead filters with a bias go without changing the outputs (away from the
    zero-padded border). The constants are found by running each layer on a
    constant 9x9 picture and reading its centre.
    """

    PROBE = 9

    def __init__(self, graph):
        self.g = graph
        self.memo: dict[int, np.ndarray] = {}

    def of(self, tensor) -> np.ndarray:
        key = id(tensor)
        if key not in self.memo:
            self.memo[key] = self._compute(tensor)
        return self.memo[key]

    def _compute(self, tensor) -> np.ndarray:
        op, node_index, _ = _history(tensor)
        width = int(tensor.shape[-1])
        cls = op.__class__.__name__
        if cls == "InputLayer":
            return np.zeros(width, np.float32)
        if cls in _PRODUCERS:
            const = (np.asarray(op.get_weights()[-1], np.float32) if _has_bias(op)
                     else np.zeros(width, np.float32))
            act = getattr(op, "activation", None)
            if act is not None:
                const = np.asarray(act(const[None, :]))[0]
            return const.astype(np.float32)
        node = op._inbound_nodes[node_index]
        ins = [self.of(t) for t in node.input_tensors]
        if not (cls in _PASS_THROUGH or cls == "Concatenate" or cls in _ELEMENTWISE):
            return np.zeros(width, np.float32)
        n = self.PROBE
        probes = [np.broadcast_to(c, (1, n, n, len(c))).astype(np.float32) for c in ins]
        kwargs = {"training": False} if cls in ("BatchNormalization", "Dropout",
                                                 "SpatialDropout2D", "GaussianNoise") else {}
        out = op(probes if len(probes) > 1 or cls == "Concatenate" else probes[0], **kwargs)
        out = np.asarray(out)
        return out[0, out.shape[1] // 2, out.shape[2] // 2, :].astype(np.float32)


def _has_bias(layer) -> bool:
    return bool(getattr(layer, "use_bias", False))


def _following_bn(graph, layer) -> str | None:
    """The batch norm that directly and only consumes ``layer``'s output, if any."""
    for other in graph.model.layers:
        if other.__class__.__name__ != "BatchNormalization":
            continue
        for node in getattr(other, "_inbound_nodes", []):
            if any(_history(t)[0] is layer for t in node.input_tensors):
                return other.name
    return None


def _removed_input_shift(layer, weights, consts, in_keep, out_keep) -> np.ndarray | None:
    """What the removed input channels (constants) added to each kept output filter."""
    node = layer._inbound_nodes[0]
    const = consts.of(node.input_tensors[0])
    removed = np.setdiff1d(np.arange(len(const)), in_keep)
    v = const[removed]
    if not np.any(v):
        return None
    cls = layer.__class__.__name__
    if cls == "Conv2D":
        k = weights[0][:, :, removed, :][..., out_keep]
        return np.einsum("hwco,c->o", k, v).astype(np.float32)
    if cls == "SeparableConv2D":
        dw, pw = weights[0], weights[1]
        m = dw.shape[-1]
        dsum = dw[:, :, removed, :].sum(axis=(0, 1))  # [removed, m]
        rows = (removed[:, None] * m + np.arange(m)[None, :])  # [removed, m]
        pwr = pw[0, 0][rows][..., out_keep]  # [removed, m, out]
        return np.einsum("cm,cmo,c->o", dsum, pwr, v).astype(np.float32)
    return None


def count_params(model) -> int:
    return int(sum(int(np.prod(v.shape)) for v in model.weights))


def prunable_layer_names(model) -> list[str]:
    return [l.name for l in model.layers if l.__class__.__name__ in _PRODUCERS]


def check_excluded(model, excluded: Iterable[str]) -> None:
    names = [l.name for l in model.layers]
    prunable = prunable_layer_names(model)
    for name in excluded:
        if name not in names:
            near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = (f"; did you mean {', '.join(near)}?" if near
                    else f"; prunable layers are e.g. {', '.join(prunable[:4])}")
            raise BpnetError(f"excluded layer {name!r} is not a layer of the model{hint}")


def prune_model(model, options: PruneOptions):
    """(pruned keras.Model, PruneReport). ``model`` is a functional Keras model."""
    import keras

    options.check()
    check_excluded(model, options.excluded_layers)
    if model.__class__.__name__ != "Functional":
        raise BpnetError(f"model {model.name!r} is not a functional Keras model; cannot prune it")
    g = _Graph(model)
    for name in options.excluded_layers:
        if name in g.producers:
            g.freeze(g.producers[name], "excluded")
        else:  # a non-producer: the filters feeding it stay whole
            for part in g.inputs_of.get(name, []):
                for ch in part:
                    if ch is not None:
                        g.freeze(ch[0], "excluded")

    keep: dict[int, np.ndarray] = {}
    reasons: dict[int, str] = {}
    for members in g.groups().values():
        layers = [model.get_layer(g.names[p]) for p in members]
        total = int(layers[0].filters)
        why = next((g.frozen[p] for p in members if p in g.frozen), None)
        if why is not None:
            idx = np.arange(total)
        else:
            scores = equalize([normalize(filter_norms(l), options.normalizer) for l in layers],
                              options.equalization_criterion)
            n = kept_count(scores, options.pruning_threshold, int(options.pruning_granularity),
                           int(options.min_num_filters))
            idx = keep_indices(scores, n)
            why = "pruned" if len(members) == 1 else f"pruned with {len(members)} tied layers"
        for p in members:
            keep[p] = idx
            reasons[p] = why

    config = model.get_config()
    for layer_cfg in config["layers"]:
        # Built from the new inputs, not from the recorded (unpruned) input shapes.
        layer_cfg.pop("build_config", None)
        name = layer_cfg["config"].get("name", layer_cfg.get("name"))
        if name in g.producers:
            layer_cfg["config"]["filters"] = len(keep[g.producers[name]])
    from . import register_custom_objects
    register_custom_objects()
    pruned = keras.Model.from_config(config)

    consts = _Constants(g)
    mean_shift: dict[str, np.ndarray] = {}  # BN layer -> what to subtract from its moving mean
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        ins = g.inputs_of.get(layer.name)
        new = pruned.get_layer(layer.name)
        if ins is None:  # not on the way to an output: unchanged
            sliced = weights
        else:
            in_keep = _survivors(ins[0], keep)
            out_keep = (keep[g.producers[layer.name]] if layer.name in g.producers
                        else _survivors(g.channels(layer.output), keep))
            sliced = _slice_weights(layer, weights, in_keep, out_keep)
            if layer.name in g.producers and len(in_keep) < len(ins[0]):
                shift = _removed_input_shift(layer, weights, consts, in_keep, out_keep)
                if shift is not None:
                    if _has_bias(layer):
                        sliced[-1] = sliced[-1] + shift
                    else:  # no bias: a batch norm right after it takes the shift
                        bn = _following_bn(g, layer)
                        if bn is not None:
                            mean_shift[bn] = shift
            if layer.name in mean_shift:
                sliced[2] = sliced[2] - mean_shift.pop(layer.name)
        try:
            new.set_weights(sliced)
        except ValueError as e:
            raise BpnetError(f"layer {layer.name}: the pruned weights do not fit ({e})") from e

    report = PruneReport(
        params_before=count_params(model), params_after=count_params(pruned),
        layers=[LayerReport(name, len(keep[p]), int(model.get_layer(name).filters),
                            reasons[p]) for name, p in g.producers.items()])
    return pruned, report

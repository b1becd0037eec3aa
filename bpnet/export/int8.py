"""INT8 ONNX: explicit quantization (QuantizeLinear/DequantizeLinear pairs).

ONNX Runtime's static quantization in QDQ format: weights int8 per output
channel, activations int8 symmetric (zero point 0), which is what TensorRT's
explicit-precision path builds INT8 engines from (TensorRT 10 deprecated and
11 removed the implicit calibrators) and what ONNX Runtime runs on CPU.

Calibration pictures come from a folder (``--cal_image_dir``) or from a
``.npy`` file of network inputs (``--cal_data_file``; written from the folder
when both are given, as TAO's tensorfile is). ``batches x batch_size`` pictures
are drawn from the folder reproducibly (a fixed seed over the sorted names)
and preprocessed as inference's strict mode does (``pad_image_input``: padded
symmetrically with grey to the input's aspect ratio, resized, normalized
with the model's normalization) at the export input size. A folder with fewer
pictures is used whole, with a warning: a few hundred pictures calibrate
well, a few dozen still usably, and refusing would only push users to copy
pictures.

Before the ranges are measured, the float graph is prepared for per-tensor
activation ranges, without changing what it computes:

- cross-layer equalization: where a convolution feeds only convolutions
  (directly, or through a ReLU, which commutes with a positive scale), each
  of its output channels is scaled so that all channels of that tensor reach
  the same largest value over the calibration pictures, and the consumers'
  matching input weights are divided by the same factor. Folded batch norms
  leave channels of one tensor hundreds of times apart (the imported
  mobilenet_thin's depthwise outputs: largest values from 0.05 to 230), which
  one per-tensor int8 scale cannot hold; depthwise and per-output-channel
  weight quantization are unaffected by the scaling. A refinement stage reads
  the previous stage's maps through a Concat with the backbone features
  (largest values about 1 against about 25): those maps' channels are scaled
  up to the Concat's largest channel, so that one scale fits the Concat.
- bias correction: each quantized convolution's bias absorbs the mean shift
  its rounded weights cause (minus the weight error times the mean input per
  channel over the calibration pictures), so that rounding does not add up
  to an offset over many layers.

``--int8_weight_bits 7`` rounds the weights to 7 bits ([-64, 64]) instead of 8, for x86 CPUs
without VNNI: their int8 kernels (AVX2/AVX-512 ``vpmaddubsw``) add pairs of uint8 x int8
products in 16 bits, which 8-bit weights can overflow; with 7-bit weights they cannot
(docs/export.md#int8-on-cpus-without-vnni).

``--int8_scope backbone`` quantizes only the backbone (everything up to the
features every stage reads) and leaves the stages in float: for networks
whose stages do not survive int8 (measured: docs/export.md#int8). ``auto``,
the default, is ``backbone`` for networks with refinement stages and ``all``
for one-stage networks: the imported network loses 5-8 AP points with every
layer in int8 and keeps its AP with the backbone in int8, so the default
keeps the accuracy and ``all`` is asked for where speed matters more.

The calibration (per-tensor ranges, the equalization scales, the bias
corrections) can be kept in a cache file (``--cal_cache_file``) with the
source model's SHA-256: a later export of the same model reads it instead of
calibrating again; a cache from another model is refused.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import BpnetError

log = logging.getLogger("bpnet.export")

CAL_METHODS = ("minmax", "entropy", "percentile")
#: The default. Measured on the imported mobilenet_thin network with equalization and bias
#: correction (10 train2017 calibration pictures; AP on coco_tiny train2017 / val2017, fp32
#: 0.276 / 0.664): percentile keeps the most, all layers 0.177 / 0.371, backbone only
#: 0.274 / 0.627 (minmax 0.144 / 0.198 and 0.258 / 0.619; entropy 0.000 and 0.273).
DEFAULT_CAL_METHOD = "percentile"
#: Network input size of the calibration pictures when the export has no fixed size.
DEFAULT_CAL_HW = (368, 496)
CACHE_FORMAT = "bpnet-int8-calibration"
CACHE_VERSION = 3
#: --int8_scope: what is quantized (auto: backbone where the network has refinement stages).
SCOPES = ("auto", "all", "backbone")
#: --int8_weight_bits: 8 (the full int8 range, what TensorRT and VNNI CPUs want) or 7 (for
#: x86 CPUs without VNNI, whose int8 kernels saturate with 8-bit weights; see cpu_int8_saturates).
WEIGHT_BITS = (8, 7)
SEED = 0


# ------------------------------------------------------------------ calibration data

def list_cal_images(folder) -> List[Path]:
    from ..infer.preprocess import is_image_file
    d = Path(folder)
    if not d.exists():
        raise BpnetError(f"--cal_image_dir {d}: folder not found")
    if not d.is_dir():
        raise BpnetError(f"--cal_image_dir {d}: not a folder")
    files = sorted(p for p in d.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise BpnetError(f"--cal_image_dir {d}: no pictures in the folder (.jpg, .png, ...)")
    return files


def sample_images(files: Sequence[Path], count: int) -> List[Path]:
    """``count`` of ``files``, drawn reproducibly; all of them (with a warning) if fewer."""
    files = list(files)
    if len(files) < count:
        log.warning("calibration wants %d pictures (--batches x --batch_size) but %s has %d; "
                    "using all %d", count, files[0].parent, len(files), len(files))
        return files
    idx = np.random.default_rng(SEED).choice(len(files), size=count, replace=False)
    return [files[i] for i in sorted(idx)]


def preprocess_strict(image_bgr: np.ndarray, hw, normalization, channels: int) -> np.ndarray:
    """One network input as inference's strict mode (pad_image_input) makes it."""
    from ..infer.preprocess import preprocess
    x, _ = preprocess(image_bgr, hw, "pad_image_input", normalization, channels=channels)
    return x


def calibration_inputs(files: Sequence[Path], hw, normalization, channels: int,
                       progress: bool = False, skipped: Optional[list] = None) -> np.ndarray:
    """[N, H, W, C] float32 network inputs of the pictures (unreadable ones skipped, and
    added to ``skipped`` as {"path", "reason"} when it is given)."""
    from tqdm import tqdm

    from ..infer.preprocess import read_image
    out = []
    for p in tqdm(files, desc="calibration pictures", unit="img", disable=not progress):
        try:
            img = read_image(p)
        except BpnetError as e:
            log.warning("skipping calibration picture %s: %s", p, e)
            if skipped is not None:
                skipped.append({"path": str(p), "reason": str(e)})
            continue
        out.append(preprocess_strict(img, hw, normalization, channels))
    if not out:
        raise BpnetError(f"none of the {len(files)} calibration pictures could be read "
                         f"({files[0].parent})")
    return np.stack(out).astype(np.float32)


def load_cal_data_file(path, hw, channels: int) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise BpnetError(f"--cal_data_file {p}: file not found (give --cal_image_dir to "
                         "write it from pictures)")
    try:
        data = np.load(p, allow_pickle=False)
    except Exception as e:  # ValueError, OSError, pickle refusals
        raise BpnetError(f"--cal_data_file {p}: not a .npy array of network inputs "
                         f"({type(e).__name__}: {e})") from None
    if data.ndim != 4 or data.shape[-1] != channels or len(data) == 0:
        raise BpnetError(f"--cal_data_file {p}: expected network inputs [N, H, W, {channels}], "
                         f"got shape {list(data.shape)}")
    if hw is not None and tuple(data.shape[1:3]) != tuple(hw):
        raise BpnetError(f"--cal_data_file {p}: inputs are {data.shape[1]}x{data.shape[2]} "
                         f"but the export input is {hw[0]}x{hw[1]}")
    return data.astype(np.float32)


def save_cal_data_file(path, data: np.ndarray):
    from ..io import atomic_path
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, data, allow_pickle=False)


def batches_of(data: np.ndarray, batch: int, fixed_batch: Optional[int]):
    """Split ``data`` into batches; a model with a fixed batch gets full ones (wrapping round)."""
    if fixed_batch:
        batch = fixed_batch
        n = -(-len(data) // batch) * batch
        data = data[np.arange(n) % len(data)]
    return [data[i:i + batch] for i in range(0, len(data), batch)]


# ------------------------------------------------------------------ the cache

def read_cache(path, model_sha256: str, method: str, graph_sha256: str,
               weight_bits: int = 8) -> dict:
    """The ranges of a cache file made for this model (by sha256), or a BpnetError."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise BpnetError(f"--cal_cache_file {p}: not a bpnet calibration cache ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT:
        raise BpnetError(f"--cal_cache_file {p}: not a bpnet calibration cache (a TensorRT "
                         "calibration table is not one; delete it or name a new file)")
    version = doc.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise BpnetError(f"--cal_cache_file {p}: its version {version!r} is not a whole number "
                         "(edited by hand?); name a new file to calibrate again")
    if version > CACHE_VERSION:
        raise BpnetError(f"--cal_cache_file {p}: written by a newer bpnet")
    if version < CACHE_VERSION:
        raise BpnetError(f"--cal_cache_file {p}: written by an older bpnet (its calibration "
                         "does not fit this one's); delete it or name a new file to calibrate again")
    if doc.get("source_model_sha256") != model_sha256:
        raise BpnetError(f"--cal_cache_file {p}: made for another model (sha256 "
                         f"{str(doc.get('source_model_sha256'))[:12]}..., this model "
                         f"{model_sha256[:12]}...); delete it or name a new file to calibrate again")
    if doc.get("cal_method") != method:
        raise BpnetError(f"--cal_cache_file {p}: made with --cal_method {doc.get('cal_method')}, "
                         f"not {method}; pass --cal_method {doc.get('cal_method')} or name a new file")
    made_bits = doc.get("weight_bits", 8)  # caches from before the option: 8-bit weights
    if made_bits != weight_bits:
        raise BpnetError(f"--cal_cache_file {p}: made with --int8_weight_bits {made_bits}, not "
                         f"{weight_bits} (the bias corrections differ); name a new file to "
                         "calibrate")
    if doc.get("graph_sha256") != graph_sha256:
        raise BpnetError(f"--cal_cache_file {p}: made for this model exported differently (other "
                         "--sdk_compatible_model or bpnet version); name a new file to calibrate")
    ranges = doc.get("ranges")
    if not isinstance(ranges, dict) or not ranges:
        raise BpnetError(f"--cal_cache_file {p}: holds no ranges")
    for key in ("equalization", "bias_correction"):
        if not isinstance(doc.get(key), dict):
            raise BpnetError(f"--cal_cache_file {p}: holds no {key}; name a new file to calibrate")
    _check_cache_values(p, doc)
    return doc


def _finite_numbers(v) -> bool:
    return (isinstance(v, list) and bool(v)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)
                    for x in v))


def _check_cache_values(p: Path, doc: dict):
    """Every range a finite [lowest, highest] with lowest <= highest, every equalization scale
    finite and positive, every bias correction finite: a cache edited by hand (or damaged)
    is one error naming the entry, never a file quantized from nonsense."""
    def bad(what, name, v):
        return BpnetError(f"--cal_cache_file {p}: {what} of {name!r} is {str(v)[:60]}; "
                          "name a new file to calibrate again")
    for name, r in doc["ranges"].items():
        if not (_finite_numbers(r) and len(r) == 2 and r[0] <= r[1]):
            raise bad("the range", name, r)
    for name, s in doc["equalization"].items():
        if not (_finite_numbers(s) and min(s) > 0):
            raise bad("the equalization scales", name, s)
    for name, b in doc["bias_correction"].items():
        if not _finite_numbers(b):
            raise bad("the bias correction", name, b)


def write_cache(path, model_sha256: str, method: str, cal: "Calibration", images: int, hw,
                graph_sha256: str):
    from ..io import write_json_atomic
    write_json_atomic(path, {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                             "source_model_sha256": model_sha256, "graph_sha256": graph_sha256,
                             "cal_method": method, "weight_bits": cal.weight_bits,
                             "images": int(images), "input_hw": list(hw), "ranges": cal.ranges,
                             "equalization": cal.equalization,
                             "bias_correction": cal.bias_correction}, indent=None)


# ------------------------------------------------------------------ calibration

@dataclass
class Calibration:
    """What calibration measured: enough to quantize the model again without pictures."""

    ranges: Dict[str, List[float]]  # tensor -> [lowest, highest] (of the equalized graph)
    equalization: Dict[str, List[float]]  # tensor -> per-channel scale
    bias_correction: Dict[str, List[float]]  # Conv node -> per-channel bias change
    weight_bits: int = 8  # the weights' rounding the bias corrections were made for

    @classmethod
    def from_cache(cls, doc: dict) -> "Calibration":
        return cls(doc["ranges"], doc["equalization"], doc["bias_correction"],
                   int(doc.get("weight_bits", 8)))


def calibrate(proto, batches, method: str, progress: bool = False,
              weight_bits: int = 8) -> Calibration:
    """Equalize, measure the ranges, then the bias corrections, over ``batches``."""
    scales = equalization_scales(proto, batches)
    eq = apply_equalization(proto, scales)
    ranges = compute_ranges(eq, batches, method, progress)
    deltas = bias_corrections(eq, ranges, batches, weight_bits)
    return Calibration(ranges, {k: v.tolist() for k, v in scales.items()},
                       {k: v.tolist() for k, v in deltas.items()}, weight_bits)


def quantize_calibrated(proto, cal: Calibration, scope: str = "all",
                        nodes: Optional[set] = None):
    """The QDQ ModelProto of an fp32 one: equalized, bias-corrected, quantized in ``scope``
    (or only in ``nodes``, names of ``proto``'s nodes, when given)."""
    if nodes is None and scope == "backbone":
        nodes = backbone_nodes(proto)
    model = apply_equalization(proto, cal.equalization)
    deltas = cal.bias_correction
    if nodes is not None:
        deltas = {k: v for k, v in deltas.items() if k in nodes}
    model = apply_bias_corrections(model, deltas)
    return quantize(model, cal.ranges, nodes, cal.weight_bits)


# ------------------------------------------------------------------ per-layer sensitivity

def quantization_units(proto) -> Dict[str, List[str]]:
    """The layers int8 quantizes, each with what is quantized along with it.

    A Conv (or MaxPool, Concat) whose only reader is a ReLU is one unit with it: ONNX
    Runtime quantizes such a pair with the ReLU output's range, so a Conv quantized
    without its ReLU would get the pre-ReLU range, which the whole-network file never uses.
    """
    _, consumers, _ = _graph_maps(proto.graph)
    units = {}
    for n in proto.graph.node:
        if n.op_type in ("Conv", "MaxPool", "Concat"):
            readers = consumers.get(n.output[0], [])
            units[n.name] = [n.name] + [r.name for r in readers
                                        if len(readers) == 1 and r.op_type == "Relu"]
    return units


def output_sqnr(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> List[float]:
    """Signal to quantization noise (dB) of each output against its float reference."""
    out = []
    for r, o in zip(reference, outputs):
        noise = float(np.sum((np.asarray(o, np.float64) - r) ** 2))
        signal = float(np.sum(np.asarray(r, np.float64) ** 2))
        out.append(float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise))
    return out


def combined_sqnr(values: Sequence[float]) -> float:
    """The SQNR (dB) that independent noise sources of these SQNRs give together."""
    total = sum(10 ** (-v / 10) for v in values if np.isfinite(v))
    return float("inf") if total == 0 else float(-10 * np.log10(total))


def run_outputs(proto, batches) -> List[np.ndarray]:
    """The graph outputs over ``batches``, concatenated (unoptimized ONNX Runtime session)."""
    session, inp = _run_with_outputs(proto, [])
    runs = [session.run(None, {inp: b}) for b in batches]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]


def layer_sensitivity(proto, cal: Calibration, batches,
                      progress: bool = False) -> Dict[str, List[float]]:
    """Per unit of ``quantization_units``: the SQNR (dB) of each graph output over ``batches``
    with only that unit in int8 and everything else float (equalized, bias-corrected as
    the whole-network file is). One quantization and one run of ``batches`` per unit."""
    from tqdm import tqdm
    reference = run_outputs(proto, batches)
    out = {}
    units = quantization_units(proto)
    with _quiet_root_logger():
        for name, nodes in tqdm(units.items(), desc="layer sensitivity", unit="layer",
                                disable=not progress):
            q = quantize_calibrated(proto, cal, nodes=set(nodes))
            out[name] = output_sqnr(reference, run_outputs(q, batches))
    return out


def _copy(proto):
    import onnx
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _attr(node, name, default=None):
    import onnx
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _graph_maps(graph):
    """(initializers by name, consumers by tensor, how often each initializer is used)."""
    inits = {i.name: i for i in graph.initializer}
    consumers: Dict[str, list] = {}
    uses: Dict[str, int] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
            if t in inits:
                uses[t] = uses.get(t, 0) + 1
    return inits, consumers, uses


def _is_depthwise(node, weight_shape) -> bool:
    return _attr(node, "group", 1) == weight_shape[0] and weight_shape[1] == 1


@dataclass
class EqualizationLink:
    """A tensor whose channels can be scaled exactly: ``producer`` makes it, ``readers`` read it.

    ``tensor`` is a Conv's output or the ReLU of it (ReLU(s x) = s ReLU(x) for s > 0). The
    readers are Convs reading ``read`` as their data input: ``tensor`` itself, or a Concat
    that holds ``tensor``'s channels from ``offset`` on (each refinement stage concatenates
    the previous stage's maps with the backbone features).
    """

    tensor: str
    producer: object
    readers: list
    read: str
    offset: int = 0


def _channel_count(tensor, made_by, inits) -> Optional[int]:
    """Channels of a tensor made by a Conv, through ReLU/MaxPool/Concat; None if unknown."""
    n = made_by.get(tensor)
    while n is not None and n.op_type in ("Relu", "MaxPool"):
        n = made_by.get(n.input[0])
    if n is None:
        return None
    if n.op_type == "Conv" and n.input[1] in inits:
        return int(inits[n.input[1]].dims[0])
    if n.op_type == "Concat" and _attr(n, "axis") == 1:
        counts = [_channel_count(t, made_by, inits) for t in n.input]
        return None if None in counts else sum(counts)
    return None


def equalization_pairs(proto) -> List[EqualizationLink]:
    """Every tensor whose channels can be scaled exactly, with its producer and readers.

    Every reader is a Conv reading the tensor (or a Concat holding it) as its data input,
    ordinary or depthwise (one weight slice per channel); no weight is shared; the tensor
    is not a graph output.
    """
    from onnx import numpy_helper as nh
    inits, consumers, uses = _graph_maps(proto.graph)
    made_by = {o: n for n in proto.graph.node for o in n.output}
    graph_outputs = {o.name for o in proto.graph.output}

    def owns_weights(n):
        return (n.op_type == "Conv" and len(n.input) >= 2 and uses.get(n.input[1]) == 1
                and (len(n.input) < 3 or not n.input[2] or uses.get(n.input[2]) == 1))

    def readers_fit(read, total):
        """The Convs reading ``read`` (``total`` channels), if all can take the scaling."""
        readers = consumers.get(read, [])
        if not readers or read in graph_outputs:
            return None
        for r in readers:
            if r.op_type != "Conv" or r.input[0] != read or not owns_weights(r):
                return None
            w = nh.to_array(inits[r.input[1]])
            if not (_attr(r, "group", 1) == 1 and w.shape[1] == total
                    or _is_depthwise(r, w.shape) and w.shape[0] == total):
                return None
        return readers

    links = []
    for n in proto.graph.node:
        if not owns_weights(n) or n.output[0] in graph_outputs:
            continue
        tensor, readers = n.output[0], consumers.get(n.output[0], [])
        if len(readers) == 1 and readers[0].op_type == "Relu":
            tensor = readers[0].output[0]
            readers = consumers.get(tensor, [])
        if tensor in graph_outputs:
            continue
        channels = inits[n.input[1]].dims[0]
        if len(readers) == 1 and readers[0].op_type == "Concat" and _attr(readers[0], "axis") == 1:
            cat = readers[0]
            counts = [_channel_count(t, made_by, inits) for t in cat.input]
            if None in counts or list(cat.input).count(tensor) != 1:
                continue
            offset = sum(counts[:list(cat.input).index(tensor)])
            fit = readers_fit(cat.output[0], sum(counts))
            if fit is not None:
                links.append(EqualizationLink(tensor, n, fit, cat.output[0], offset))
            continue
        fit = readers_fit(tensor, channels)
        if fit is not None:
            links.append(EqualizationLink(tensor, n, fit, tensor))
    return links


def _run_with_outputs(proto, names: Sequence[str]):
    """An ORT session of ``proto`` that also returns the tensors ``names``."""
    import onnx
    import onnxruntime as ort
    model = _copy(proto)
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names if t not in have)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name


def _channel_stats(proto, names: Sequence[str], batches, stat: str) -> Dict[str, np.ndarray]:
    """Per channel (axis 1, NCHW inside the graph): the largest |value| or the mean."""
    names = list(dict.fromkeys(names))
    session, inp = _run_with_outputs(proto, names)
    acc: Dict[str, np.ndarray] = {}
    for b in batches:
        for name, v in zip(names, session.run(names, {inp: b})):
            axes = (0,) + tuple(range(2, v.ndim))
            if stat == "absmax":
                r = np.abs(v).max(axis=axes)
                acc[name] = np.maximum(acc[name], r) if name in acc else r
            else:
                acc[name] = acc.get(name, 0) + v.mean(axis=axes) / len(batches)
    return acc


def equalization_scales(proto, batches, floor: float = 1e-2) -> Dict[str, np.ndarray]:
    """Per equalizable tensor, the channel scales that give every channel the largest range.

    The largest range is the tensor's own largest channel, or, for a tensor read through a
    Concat, the Concat's largest channel: one int8 scale then fits the previous stage's
    maps (largest values about 1) and the backbone features (about 25) alike. A channel
    that never exceeds ``floor`` of that is scaled as if it reached it (a dead channel is
    not blown up).
    """
    links = equalization_pairs(proto)
    top = _channel_stats(proto, [x.tensor for x in links] + [x.read for x in links], batches,
                         "absmax")
    scales = {}
    for x in links:
        r = top[x.tensor].astype(np.float64)
        target = float(top[x.read].max())
        if not np.isfinite(r).all() or not np.isfinite(target) or target <= 0:
            continue
        r = np.maximum(r, floor * target)
        scales[x.tensor] = (target / r).astype(np.float32)
    return scales


def apply_equalization(proto, scales: Dict[str, Sequence[float]]):
    """A copy of ``proto`` with ``scales`` folded in (the float outputs are unchanged)."""
    from onnx import numpy_helper as nh
    model = _copy(proto)
    if not scales:
        return model
    inits = {i.name: i for i in model.graph.initializer}

    def update(name, fn):
        inits[name].CopyFrom(nh.from_array(fn(nh.to_array(inits[name])).astype(np.float32), name))

    links = {x.tensor: x for x in equalization_pairs(model)}
    for tensor, s in scales.items():
        if tensor not in links:
            raise BpnetError(f"the calibration's equalization does not fit this network "
                             f"(tensor {tensor!r}); calibrate again")
        s = np.asarray(s, np.float32)
        x = links[tensor]
        update(x.producer.input[1], lambda w: w * s.reshape(-1, 1, 1, 1))
        if len(x.producer.input) > 2 and x.producer.input[2]:
            update(x.producer.input[2], lambda b: b * s)
        part = slice(x.offset, x.offset + len(s))
        for r in x.readers:
            def divide(w, grouped=_attr(r, "group", 1) == 1):
                w = w.copy()
                if grouped:
                    w[:, part] /= s.reshape(1, -1, 1, 1)
                else:
                    w[part] /= s.reshape(-1, 1, 1, 1)
                return w
            update(r.input[1], divide)
    return model


def _dequantized_weights(qproto) -> Dict[str, np.ndarray]:
    """Conv node -> its weights as the QDQ file computes with them."""
    from onnx import numpy_helper as nh
    inits = {i.name: nh.to_array(i) for i in qproto.graph.initializer}
    made_by = {o: n for n in qproto.graph.node for o in n.output}
    out = {}
    for n in qproto.graph.node:
        dq = made_by.get(n.input[1]) if n.op_type == "Conv" else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        q = inits[dq.input[0]].astype(np.float32)
        shape = (-1,) + (1,) * (q.ndim - 1)
        scale = np.reshape(inits[dq.input[1]], shape if np.ndim(inits[dq.input[1]]) else ())
        zero = 0.0
        if len(dq.input) > 2 and dq.input[2] in inits:
            z = inits[dq.input[2]].astype(np.float32)
            zero = np.reshape(z, shape if np.ndim(z) else ())
        out[n.name] = (q - zero) * scale
    return out


def bias_corrections(proto, ranges: dict, batches, weight_bits: int = 8) -> Dict[str, np.ndarray]:
    """Conv node -> the bias change that cancels its rounded weights' mean shift."""
    from onnx import numpy_helper as nh
    rounded = _dequantized_weights(quantize(proto, ranges, weight_bits=weight_bits))
    convs = [n for n in proto.graph.node if n.name in rounded]
    means = _channel_stats(proto, [n.input[0] for n in convs], batches, "mean")
    inits = {i.name: i for i in proto.graph.initializer}
    out = {}
    for n in convs:
        err = rounded[n.name] - nh.to_array(inits[n.input[1]])
        mu = means[n.input[0]]
        if _attr(n, "group", 1) == 1 and err.shape[1] == len(mu):
            out[n.name] = -(err.sum(axis=(2, 3)) @ mu)
        elif _is_depthwise(n, err.shape) and err.shape[0] == len(mu):
            out[n.name] = -(err.sum(axis=(1, 2, 3)) * mu)
    return {k: v.astype(np.float32) for k, v in out.items() if np.isfinite(v).all()}


def apply_bias_corrections(proto, deltas: Dict[str, Sequence[float]]):
    """A copy of ``proto`` whose Conv biases are changed by ``deltas`` (added if absent)."""
    from onnx import numpy_helper as nh
    model = _copy(proto)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    for name, d in deltas.items():
        n = nodes.get(name)
        if n is None or n.op_type != "Conv":
            raise BpnetError(f"the calibration's bias correction does not fit this network "
                             f"(node {name!r}); calibrate again")
        d = np.asarray(d, np.float32)
        if len(n.input) > 2 and n.input[2]:
            b = nh.to_array(inits[n.input[2]]) + d
            inits[n.input[2]].CopyFrom(nh.from_array(b.astype(np.float32), n.input[2]))
        else:
            bias = f"{name}_bias"
            model.graph.initializer.append(nh.from_array(d, bias))
            n.input.extend([""] * (3 - len(n.input)))
            n.input[2] = bias
    return model


def merge_sibling_convs(proto):
    """A copy of ``proto`` where Convs that read one tensor with one geometry are one Conv.

    Each refinement stage starts with a PAF and a heatmap convolution over the
    same input; they become one convolution with both filter sets, followed
    by a Split into the two original outputs (the same numbers). ONNX
    Runtime fuses a QDQ Conv into its int8 kernel only when the Conv is its
    input's single reader: left apart, these two stay float and take about
    half of the INT8 VGG model's time (docs/benchmarks.md#export).
    """
    import onnx
    from onnx import numpy_helper as nh
    model = _copy(proto)
    g = model.graph
    inits, consumers, uses = _graph_maps(g)

    def geometry(n):
        return tuple((a.name, onnx.helper.get_attribute_value(a).__repr__())
                     for a in sorted(n.attribute, key=lambda a: a.name))

    groups = []
    for tensor, readers in consumers.items():
        convs = [n for n in readers if n.op_type == "Conv" and n.input[0] == tensor
                 and _attr(n, "group", 1) == 1 and uses.get(n.input[1]) == 1
                 and (len(n.input) < 3 or not n.input[2] or uses.get(n.input[2]) == 1)]
        by_geometry: Dict[tuple, list] = {}
        for n in convs:
            shape = tuple(inits[n.input[1]].dims[1:])
            by_geometry.setdefault((geometry(n), shape), []).append(n)
        groups.extend(ns for ns in by_geometry.values() if len(ns) > 1)
    for convs in groups:
        weights = [nh.to_array(inits[n.input[1]]) for n in convs]
        biases = [nh.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2]
                  else np.zeros(w.shape[0], np.float32) for n, w in zip(convs, weights)]
        name = "+".join(n.name for n in convs)
        merged_out = f"{convs[0].output[0]}_merged"
        g.initializer.extend([nh.from_array(np.concatenate(weights), f"{name}_W"),
                              nh.from_array(np.concatenate(biases).astype(np.float32),
                                            f"{name}_B"),
                              nh.from_array(np.array([w.shape[0] for w in weights], np.int64),
                                            f"{name}_split")])
        merged = onnx.helper.make_node("Conv", [convs[0].input[0], f"{name}_W", f"{name}_B"],
                                       [merged_out], name=name)
        merged.attribute.extend(convs[0].attribute)
        split = onnx.helper.make_node("Split", [merged_out, f"{name}_split"],
                                      [n.output[0] for n in convs], name=f"{name}_Split", axis=1)
        at = list(g.node).index(convs[0])
        for n in convs:
            g.node.remove(n)
        g.node.insert(at, split)
        g.node.insert(at, merged)
    used = {t for n in g.node for t in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    sort_topologically(g)
    return model


def resolve_scope(proto, scope: str) -> str:
    """``all`` or ``backbone``: ``auto`` is ``backbone`` where the network has refinement stages
    that share the backbone's features, else ``all``."""
    if scope != "auto":
        return scope
    try:
        backbone_nodes(proto)
    except BpnetError:
        return "all"
    return "backbone"


def backbone_nodes(proto) -> set:
    """Names of the nodes that compute the features every stage reads.

    Those features are what stage 1 reads and what each refinement stage
    concatenates with the previous stage's maps: of the tensors Concat nodes
    take, the one that other nodes read too (the maps go to the Concat only),
    and the one most Concat nodes take where several are. A one-stage network
    has none, and is refused.
    """
    counts: Dict[str, int] = {}
    for n in proto.graph.node:
        if n.op_type == "Concat":
            for t in set(n.input):
                counts[t] = counts.get(t, 0) + 1
    read_elsewhere = {t for n in proto.graph.node if n.op_type != "Concat" for t in n.input}
    shared = {t: c for t, c in counts.items() if t in read_elsewhere}
    if not shared:
        raise BpnetError("--int8_scope backbone: this network has no refinement stages that "
                         "share backbone features; use --int8_scope all")
    features = max(shared, key=shared.get)
    made_by = {o: n for n in proto.graph.node for o in n.output}
    keep, todo = set(), [features]
    while todo:
        n = made_by.get(todo.pop())
        if n is not None and n.name not in keep:
            keep.add(n.name)
            todo.extend(n.input)
    return keep


# ------------------------------------------------------------------ quantization

def _ort_method(name: str):
    from onnxruntime.quantization import CalibrationMethod
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def compute_ranges(proto, batches, method: str, progress: bool = False) -> dict:
    """{tensor name: [lowest, highest]} of every float tensor over the calibration batches."""
    import onnx
    from onnxruntime.quantization.calibrate import create_calibrator
    from tqdm import tqdm

    opts = {"symmetric": True}
    if method == "percentile":
        opts.update(num_bins=2048, percentile=99.999)
    elif method == "entropy":
        opts.update(num_bins=2048, num_quantized_bins=128)
    with tempfile.TemporaryDirectory(prefix="bpnet_cal_") as tmp, _quiet_root_logger():
        src = Path(tmp) / "model.onnx"
        onnx.save(proto, str(src))
        cal = create_calibrator(src, [], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                calibrate_method=_ort_method(method),
                                providers=["CPUExecutionProvider"], extra_options=opts)
        name = cal.infer_session.get_inputs()[0].name
        # One batch per call keeps memory bounded (the collectors merge as they go).
        for b in tqdm(batches, desc=f"calibrating ({method})", unit="batch",
                      disable=not progress):
            cal.collect_data(_OneBatch(name, b))
        data = cal.compute_data()
    ranges = {}
    for k, td in data.data.items() if hasattr(data, "data") else data.items():
        lo, hi = td.range_value
        ranges[k] = [float(np.asarray(lo).reshape(-1)[0]), float(np.asarray(hi).reshape(-1)[0])]
    return ranges


class _OneBatch:
    """A CalibrationDataReader over one batch."""

    def __init__(self, name, batch):
        self._items = [{name: np.ascontiguousarray(batch, dtype=np.float32)}]

    def get_next(self):
        return self._items.pop() if self._items else None

    def __len__(self):
        return len(self._items)


def quantize(proto, ranges: dict, nodes: Optional[set] = None, weight_bits: int = 8):
    """The QDQ ModelProto of an fp32 ModelProto, from computed ranges (only ``nodes``: those).

    ``weight_bits`` 7: the weights use [-64, 64] of int8 (ONNX Runtime's reduce_range), the
    activations keep the full range (export checks the value)."""
    reduce_range = {8: False, 7: True}[weight_bits]
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import save_and_reload_model_with_shape_infer
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    tensors = {}
    for k, (lo, hi) in ranges.items():
        tensors[k] = TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
    model = save_and_reload_model_with_shape_infer(proto)
    needed = _activation_tensors(model)
    missing = sorted(needed - set(tensors))
    if missing:
        raise BpnetError(f"the calibration ranges do not cover this network ({len(missing)} "
                         f"tensors missing, e.g. {missing[0]!r}); calibrate again")
    ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    q = QDQQuantizer(model, True, reduce_range, QuantType.QInt8, QuantType.QInt8,
                     TensorsData(CalibrationMethod.MinMax, tensors), sorted(nodes or []), [], ops,
                     {"ActivationSymmetric": True, "WeightSymmetric": True})
    with _quiet_root_logger():  # ORT logs every bias-scale adjustment on the root logger
        q.quantize_model()
    out = q.model.model
    # Keep metadata_props (the bpnet meta) on the quantized model.
    del out.metadata_props[:]
    out.metadata_props.extend(proto.metadata_props)
    sort_topologically(out.graph)
    return out


def sort_topologically(graph):
    """Order ``graph.node`` so each node comes after the nodes it reads (ONNX requires it).

    ONNX Runtime's quantizer appends the Q/DQ nodes it inserts at the end;
    ONNX Runtime sorts on load, but the ONNX checker and other readers do not.
    Stable: nodes keep their relative order where the data flow allows.
    """
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    waiting = list(graph.node)
    ordered = []
    while waiting:
        rest = []
        for n in waiting:
            if all(t in known for t in n.input):
                ordered.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(waiting):
            raise BpnetError(f"the quantized graph has a cycle or a missing input (node "
                             f"{rest[0].name!r}); please report this")
        waiting = rest
    from .onnx import replace_all
    replace_all(graph.node, ordered)


class _quiet_root_logger:
    """ONNX Runtime's quantization tools log on the root logger and print() to stdout (the
    histogram calibrators' settings): both go to bpnet's debug log instead."""

    def __enter__(self):
        import contextlib
        import io
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        self._buf = io.StringIO()
        self._redirect = contextlib.redirect_stdout(self._buf)
        self._redirect.__enter__()

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        logging.getLogger().setLevel(self._level)
        text = self._buf.getvalue().strip()
        if text:
            log.debug("onnxruntime.quantization: %s", " | ".join(text.splitlines()))


def _activation_tensors(model) -> set:
    """Float tensors computed by the graph (not initializers): what calibration measured."""
    inits = {i.name for i in model.graph.initializer}
    out = {i.name for i in model.graph.input if i.name not in inits}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "MaxPool", "Relu", "Concat", "Add"):
            out.update(n for n in node.output if n)
    return out


def count_qdq(proto) -> dict:
    ops = [n.op_type for n in proto.graph.node]
    return {"QuantizeLinear": ops.count("QuantizeLinear"),
            "DequantizeLinear": ops.count("DequantizeLinear")}

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

The ranges computed (per tensor: lowest, highest) can be kept in a cache file
(``--cal_cache_file``) with the source model's SHA-256: a later export of
the same model reads them instead of calibrating again; a cache from another
model is refused.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..errors import BpnetError

log = logging.getLogger("bpnet.export")

CAL_METHODS = ("minmax", "entropy", "percentile")
#: The default. Measured on the imported mobilenet_thin network, coco_tiny val, 10-20
#: train2017 pictures: no method keeps its AP (all three give AP 0.000, against
#: 0.664 in fp32; docs/benchmarks.md#export), so the fastest one (30 s against 70 s
#: for percentile and 160 s for entropy), which is also TensorRT's usual choice.
DEFAULT_CAL_METHOD = "minmax"
#: Network input size of the calibration pictures when the export has no fixed size.
DEFAULT_CAL_HW = (368, 496)
CACHE_FORMAT = "bpnet-int8-calibration"
CACHE_VERSION = 1
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
                       progress: bool = False) -> np.ndarray:
    """[N, H, W, C] float32 network inputs of the pictures (unreadable ones skipped)."""
    from tqdm import tqdm

    from ..infer.preprocess import read_image
    out = []
    for p in tqdm(files, desc="calibration pictures", unit="img", disable=not progress):
        try:
            img = read_image(p)
        except BpnetError as e:
            log.warning("skipping calibration picture %s: %s", p, e)
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

def read_cache(path, model_sha256: str, method: str, graph_sha256: str) -> dict:
    """The ranges of a cache file made for this model (by sha256), or a BpnetError."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise BpnetError(f"--cal_cache_file {p}: not a bpnet calibration cache ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT:
        raise BpnetError(f"--cal_cache_file {p}: not a bpnet calibration cache (a TensorRT "
                         "calibration table is not one; delete it or name a new file)")
    if doc.get("version", 0) > CACHE_VERSION:
        raise BpnetError(f"--cal_cache_file {p}: written by a newer bpnet")
    if doc.get("source_model_sha256") != model_sha256:
        raise BpnetError(f"--cal_cache_file {p}: made for another model (sha256 "
                         f"{str(doc.get('source_model_sha256'))[:12]}..., this model "
                         f"{model_sha256[:12]}...); delete it or name a new file to calibrate again")
    if doc.get("cal_method") != method:
        raise BpnetError(f"--cal_cache_file {p}: made with --cal_method {doc.get('cal_method')}, "
                         f"not {method}; pass --cal_method {doc.get('cal_method')} or name a new file")
    if doc.get("graph_sha256") != graph_sha256:
        raise BpnetError(f"--cal_cache_file {p}: made for this model exported differently (other "
                         "--sdk_compatible_model or bpnet version); name a new file to calibrate")
    ranges = doc.get("ranges")
    if not isinstance(ranges, dict) or not ranges:
        raise BpnetError(f"--cal_cache_file {p}: holds no ranges")
    return doc


def write_cache(path, model_sha256: str, method: str, ranges: dict, images: int, hw,
                graph_sha256: str):
    from ..io import write_json_atomic
    write_json_atomic(path, {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                             "source_model_sha256": model_sha256, "graph_sha256": graph_sha256,
                             "cal_method": method,
                             "images": int(images), "input_hw": list(hw), "ranges": ranges})


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


def quantize(proto, ranges: dict):
    """The QDQ ModelProto of an fp32 ModelProto, from computed ranges."""
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
    q = QDQQuantizer(model, True, False, QuantType.QInt8, QuantType.QInt8,
                     TensorsData(CalibrationMethod.MinMax, tensors), [], [], ops,
                     {"ActivationSymmetric": True, "WeightSymmetric": True})
    with _quiet_root_logger():  # ORT logs every bias-scale adjustment on the root logger
        q.quantize_model()
    out = q.model.model
    # Keep metadata_props (the bpnet meta) on the quantized model.
    del out.metadata_props[:]
    out.metadata_props.extend(proto.metadata_props)
    return out


class _quiet_root_logger:
    def __enter__(self):
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self._level)


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

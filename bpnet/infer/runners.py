"""Model runners: one interface over a Keras model file and an ONNX file.

A runner turns a batch of normalized network inputs [B, H, W, C] into the
chosen stage's (heatmaps [B, h, w, J+1], PAFs [B, h, w, 2E]) as float32
NumPy arrays, and carries the model's meta (pose config, normalization,
stride), checked by ``bpnet.model.meta.parse_meta``. ``load_runner`` picks
the runner from the file:

- ``.onnx`` (or a file that parses as an ONNX protobuf): ONNX Runtime; the
  bpnet meta travels as JSON in the model's metadata_props under
  ``bpnet.model.meta.ONNX_META_KEY`` (the export command writes it).
- ``.engine`` / ``.trt`` / ``.plan``: a TensorRT engine built by ``bpnet
  export --engine_file`` (or trtexec from an exported ONNX file); its meta is
  ``<engine>.json`` or the ONNX file of the same name beside it. Needs the
  ``tensorrt`` and ``cuda-python`` packages (the ``tensorrt`` extra) and an
  NVIDIA GPU.
- anything else: the Keras model file read by ``bpnet.model.io.load_model``
  (plain or encrypted with ``-k``).

TensorFlow, ONNX Runtime and TensorRT are imported only inside the runner
that needs them, so ONNX-only deployments do not pay for TensorFlow.
"""

from __future__ import annotations

import abc
import json
import logging
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..errors import BpnetError
from ..model.meta import ONNX_META_KEY, STRIDE, ModelMeta, parse_meta
from ..pose import PoseConfig

log = logging.getLogger(__name__)

ENGINE_SUFFIXES = (".engine", ".trt", ".plan")


class Runner(abc.ABC):
    """What the predictor needs from a model."""

    meta: dict
    pose: PoseConfig
    stride: int = STRIDE
    input_channels: int = 3
    # Set when the model only accepts one input size / batch size.
    fixed_input_hw: Optional[Tuple[int, int]] = None
    fixed_batch: Optional[int] = None
    path: str = ""

    @abc.abstractmethod
    def run(self, batch: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """[B, H, W, C] float32 -> (heatmaps [B, h, w, J+1], PAFs [B, h, w, 2E])."""

    @property
    def model_meta(self) -> ModelMeta:
        """``meta``, checked (read from ``meta`` so that a runner may set only that)."""
        return parse_meta(self.meta, self.path or type(self).__name__)

    def _init_meta(self, meta: dict, source: str):
        parsed = parse_meta(meta, source)
        self.meta = parsed.raw
        self.pose = parsed.pose
        self.stride = parsed.stride
        self.input_channels = parsed.input_channels


def _split_outputs(outputs, pose: PoseConfig, source: str, names=None):
    """Tell heatmaps from PAFs by channel count (by name when the counts tie)."""
    outs = [np.asarray(o) for o in outputs]
    if len(outs) != 2:
        raise BpnetError(f"{source}: expected 2 outputs (heatmaps, PAFs), got {len(outs)}")
    jh, jp = pose.heat_channels, pose.paf_channels
    c0, c1 = outs[0].shape[-1], outs[1].shape[-1]
    if jh != jp:
        if (c0, c1) == (jh, jp):
            return outs[0], outs[1]
        if (c0, c1) == (jp, jh):
            return outs[1], outs[0]
    elif names is not None and "paf" in str(names[0]).lower():
        return outs[1], outs[0]
    elif c0 == c1 == jh:
        return outs[0], outs[1]
    raise BpnetError(f"{source}: output channels {c0} and {c1} do not match pose config "
                     f"{pose.name!r} ({jh} heatmap, {jp} PAF channels)")


class KerasRunner(Runner):
    def __init__(self, path, key: Optional[str] = None, stage: Optional[int] = None):
        from ..model.io import load_model
        model, meta = load_model(str(path), key=key)
        self.path = str(path)
        self._init_meta(meta, self.path)
        from ..model.build import num_stages_of, stage_model
        T = num_stages_of(model)
        if stage is not None and not 1 <= stage <= T:
            raise BpnetError(f"output_stage_to_use is {stage} but {path} has {T} stages (1..{T})")
        # A sub-model ending at the chosen stage: later stages are not computed.
        self.model = stage_model(model, stage)
        self.num_stages = T
        shape = self.model.inputs[0].shape
        if shape[1] is not None and shape[2] is not None:
            self.fixed_input_hw = (int(shape[1]), int(shape[2]))
        if shape[-1] is not None:
            self.input_channels = int(shape[-1])
        self._fn = self._compile()

    def _compile(self):
        import keras
        model = self.model

        def call(x):
            # A one-element list matches the functional model's input structure.
            return model([x], training=False)

        if keras.backend.backend() != "tensorflow":
            return call
        import tensorflow as tf
        # One trace for every input size and batch size.
        sig = [tf.TensorSpec([None, None, None, self.input_channels], tf.float32)]
        return tf.function(call, input_signature=sig, autograph=False)

    def run(self, batch):
        outs = self._fn(np.ascontiguousarray(batch, dtype=np.float32))
        outs = [np.asarray(o) for o in outs]
        return _split_outputs(outs, self.pose, self.path)


class OnnxRunner(Runner):
    def __init__(self, path, stage: Optional[int] = None, providers=None):
        import onnxruntime as ort
        self.path = str(path)
        try:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self.session = ort.InferenceSession(
                self.path, sess_options=opts,
                providers=providers or _default_providers(ort))
        except Exception as e:  # ORT raises several private exception types
            raise BpnetError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0]})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY)
        if raw is None:
            raise BpnetError(f"{path}: ONNX model without bpnet meta (metadata_props "
                             f"{ONNX_META_KEY!r}); export it with `bpnet export`")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BpnetError(f"{path}: metadata {ONNX_META_KEY!r} is not valid JSON ({e})") from None
        self._init_meta(meta, self.path)
        inp = self.session.get_inputs()
        if len(inp) != 1:
            raise BpnetError(f"{path}: expected one input, got {len(inp)}")
        self.input_name = inp[0].name
        shape = inp[0].shape
        if len(shape) != 4:
            raise BpnetError(f"{path}: expected an NHWC input, got shape {shape}")
        if isinstance(shape[1], int) and isinstance(shape[2], int):
            self.fixed_input_hw = (shape[1], shape[2])
        if isinstance(shape[0], int):
            self.fixed_batch = shape[0]
        if isinstance(shape[3], int):
            self.input_channels = shape[3]
        outs = [o.name for o in self.session.get_outputs()]
        self.output_names = self._choose_outputs(outs, stage)

    def _choose_outputs(self, names, stage):
        if len(names) == 2:
            total = self.meta.get("num_stages")
            if stage is not None and stage != total:
                if total is None:
                    log.warning("%s carries one stage (the exported one); output_stage_to_use "
                                "%s is ignored", self.path, stage)
                else:
                    raise BpnetError(
                        f"output_stage_to_use is {stage} but {self.path} only carries the last "
                        f"stage (of {total}); set output_stage_to_use: null")
            return names
        if len(names) % 2:
            raise BpnetError(f"{self.path}: expected heatmap/PAF output pairs, got {len(names)}")
        T = len(names) // 2
        s = T if stage is None else stage
        if not 1 <= s <= T:
            raise BpnetError(f"output_stage_to_use is {stage} but {self.path} has {T} stages")
        return [names[s - 1], names[T + s - 1]]

    def run(self, batch):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        outs = self.session.run(self.output_names, {self.input_name: batch})
        return _split_outputs(_undo_upsample(outs, self.meta), self.pose, self.path,
                              self.output_names)


def _undo_upsample(outs, meta):
    """The DeepStream export's PAF output is a nearest x``u`` upsample: every u-th cell is it."""
    u = int(meta.get("paf_upsample") or 1)
    if u == 1:
        return outs
    first = min(o.shape[1] for o in outs)
    return [o[:, ::u, ::u] if o.shape[1] > first else o for o in outs]


def _cuda_check(result):
    """cuda-python calls return (error, *values); raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BpnetError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


class TensorRTRunner(Runner):
    """A TensorRT engine (TensorRT 10/11 tensor API) with cuda-python device buffers."""

    def __init__(self, path, stage: Optional[int] = None):
        try:
            import tensorrt as trt
        except ImportError:
            raise BpnetError(f"{path}: TensorRT engines need the tensorrt and cuda-python "
                             "packages (pip install 'bpnet[tensorrt]') on an NVIDIA GPU; pass "
                             "the .onnx or Keras model here instead") from None
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:  # cuda-python before 12.6
            from cuda import cudart
        self.path = str(path)
        self._trt, self._cudart = trt, cudart
        self._init_meta(_engine_meta(Path(path)), self.path)
        if stage is not None and stage != self.meta.get("num_stages", stage):
            log.warning("%s carries the last stage only; output_stage_to_use %s is ignored",
                        path, stage)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise BpnetError(f"{path}: TensorRT could not load the engine (built by another "
                             "TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = [self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.input_name = [n for n, i in zip(names, is_in) if i][0]
        self.output_names = [n for n, i in zip(names, is_in) if not i]
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        if shape[1] > 0 and shape[2] > 0:
            self.fixed_input_hw = (int(shape[1]), int(shape[2]))
        if shape[0] > 0:
            self.fixed_batch = int(shape[0])
        self.stream = _cuda_check(cudart.cudaStreamCreate())
        self._buffers = {}  # name -> (device pointer, bytes)

    def _device(self, name, nbytes):
        ptr, size = self._buffers.get(name, (None, 0))
        if size < nbytes:
            if ptr is not None:
                _cuda_check(self._cudart.cudaFree(ptr))
            ptr = _cuda_check(self._cudart.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, batch):
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        x = np.ascontiguousarray(batch, dtype=np.float32)
        self.context.set_input_shape(self.input_name, x.shape)
        ptr = self._device(self.input_name, x.nbytes)
        _cuda_check(cudart.cudaMemcpyAsync(ptr, x.ctypes.data, x.nbytes, h2d, self.stream))
        self.context.set_tensor_address(self.input_name, int(ptr))
        outs = []
        for name in self.output_names:
            out = np.empty(tuple(self.context.get_tensor_shape(name)), np.float32)
            optr = self._device(name, out.nbytes)
            self.context.set_tensor_address(name, int(optr))
            outs.append((out, optr))
        if not self.context.execute_async_v3(self.stream):
            raise BpnetError(f"{self.path}: TensorRT failed to run the engine")
        for out, optr in outs:
            _cuda_check(cudart.cudaMemcpyAsync(out.ctypes.data, optr, out.nbytes, d2h,
                                               self.stream))
        _cuda_check(cudart.cudaStreamSynchronize(self.stream))
        arrays = _undo_upsample([o for o, _ in outs], self.meta)
        return _split_outputs(arrays, self.pose, self.path, self.output_names)

    def __del__(self):
        for ptr, _ in getattr(self, "_buffers", {}).values():
            try:
                self._cudart.cudaFree(ptr)
            except Exception:
                pass


def _engine_meta(path: Path) -> dict:
    """An engine's bpnet meta: ``<engine>.json``, else the same-named ONNX file's."""
    side = Path(str(path) + ".json")
    if side.is_file():
        try:
            return json.loads(side.read_text())
        except ValueError as e:
            raise BpnetError(f"{side}: not valid JSON ({e})") from None
    onnx_file = path.with_suffix(".onnx")
    if onnx_file.is_file():
        import onnx
        for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props:
            if p.key == ONNX_META_KEY:
                return json.loads(p.value)
    raise BpnetError(f"{path}: no bpnet meta for this engine: keep {side.name} (written by "
                     f"bpnet export) or the exported {onnx_file.name} beside it")


def _default_providers(ort):
    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]


def _looks_like_onnx(path: Path) -> bool:
    """ONNX files have no magic number; ask the protobuf parser instead."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" or not head or head[0] != 0x08:  # zip (.keras) or not field 1 varint
        return False
    try:
        import onnx
        onnx.load(str(path), load_external_data=False)
        return True
    except Exception:
        return False


def load_runner(path, key: Optional[str] = None, stage: Optional[int] = None) -> Runner:
    """A runner for a model file: ONNX by suffix or content, else Keras."""
    if path is None or str(path) == "":
        raise BpnetError("no model given: pass -m/--model_filename or set model_path in the "
                         "inference spec")
    p = Path(path)
    if not p.exists():
        raise BpnetError(f"{p}: model file not found")
    if p.is_dir():
        raise BpnetError(f"{p}: is a folder; pass the model file (.keras / .onnx)")
    if p.suffix.lower() in ENGINE_SUFFIXES:
        return TensorRTRunner(p, stage=stage)
    if p.suffix.lower() == ".onnx" or _looks_like_onnx(p):
        return OnnxRunner(p, stage=stage)
    try:
        return KerasRunner(p, key=key, stage=stage)
    except BpnetError:
        raise
    except Exception as e:  # Keras/zip/h5 raise many types for a non-model file
        raise BpnetError(f"{p}: not a readable bpnet model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None

"""Model runners: one interface over Keras, ONNX Runtime, OpenVINO and TensorRT.

A runner turns a batch of normalized network inputs [B, H, W, C] into the
chosen stage's (heatmaps [B, h, w, J+1], PAFs [B, h, w, 2E]) as float32
NumPy arrays, and carries the model's meta (pose config, normalization,
stride), checked by ``bpnet.model.meta.parse_meta``, and the name of its
runtime (``runner.runtime``). ``load_runner(path, key, stage, runtime)``
picks the runner from the file and the runtime asked for (``RUNTIMES``):

- a Keras model file (plain or encrypted with ``-k``): ``keras``.
- ``.onnx`` (or a file that parses as an ONNX protobuf): ``onnxruntime``
  (part of bpnet's install) or ``openvino`` (the ``openvino`` extra); the
  bpnet meta travels as JSON in the model's metadata_props under
  ``bpnet.model.meta.ONNX_META_KEY`` (the export command writes it).
- ``.engine`` / ``.trt`` / ``.plan``: ``tensorrt``, an engine built by
  ``bpnet export --engine_file`` (or trtexec from an exported ONNX file); its
  meta is ``<engine>.json`` or the ONNX file of the same name beside it. Needs
  the ``tensorrt`` and ``cuda-python`` packages (the ``tensorrt`` extra) and
  an NVIDIA GPU.

``auto`` takes the fastest installed runtime for the file (``AUTO_ORDER``;
measured in docs/benchmarks.md): OpenVINO, then ONNX Runtime for ONNX files.
A runtime that is not installed, or that cannot run the file, is one
BpnetError naming what to install or to do.

TensorFlow, ONNX Runtime, OpenVINO and TensorRT are imported only inside the
runner that needs them, so ONNX-only deployments do not pay for TensorFlow.
"""

from __future__ import annotations

import abc
import importlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..errors import BpnetError
from ..model.meta import ONNX_META_KEY, STRIDE, ModelMeta, parse_meta
from ..pose import PoseConfig

log = logging.getLogger(__name__)

ENGINE_SUFFIXES = (".engine", ".trt", ".plan")

#: The values of the inference spec's ``runtime`` and of ``--runtime``.
RUNTIMES = ("auto", "keras", "onnxruntime", "openvino", "tensorrt")
#: Which runtimes run which kind of file.
FILE_RUNTIMES = {"keras": ("keras",), "onnx": ("onnxruntime", "openvino"),
                 "engine": ("tensorrt",)}
#: ``auto``'s choice per kind of file, fastest first (benchmarks.md#inference-runtimes);
#: ONNX Runtime comes first for ONNX files when it has its CUDA provider.
AUTO_ORDER = {"keras": ("keras",), "onnx": ("openvino", "onnxruntime"),
              "engine": ("tensorrt",)}
#: The Python module each runtime needs, and how to install it.
RUNTIME_MODULES = {"keras": "keras", "onnxruntime": "onnxruntime", "openvino": "openvino",
                   "tensorrt": "tensorrt"}
INSTALL_HINTS = {
    "keras": "pip install bpnet (TensorFlow and Keras come with it)",
    "onnxruntime": "pip install onnxruntime (part of bpnet's own install)",
    "openvino": 'pip install "bpnet[openvino]"',
    "tensorrt": 'pip install "bpnet[tensorrt]" on a machine with an NVIDIA GPU',
}


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


#: x86 CPU flags (Linux /proc/cpuinfo names) of the int8 dot products that add uint8 x int8
#: products straight into 32 bits (AVX512-VNNI, AVX-VNNI, AMX).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> Optional[frozenset]:
    """The first CPU's flags from ``cpuinfo`` (None where it cannot be read: not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_int8_saturates(flags: Optional[frozenset] = None) -> bool:
    """Whether this CPU's int8 convolution kernels can saturate with 8-bit weights.

    x86 CPUs without VNNI (AVX2, AVX-512 before VNNI) multiply uint8 activations by int8
    weights with ``vpmaddubsw``, which adds each pair of products in 16 bits and clamps:
    2 x 255 x 127 does not fit. ONNX Runtime and OpenVINO both use it there; weights of 7
    bits (``bpnet export --int8_weight_bits 7``) cannot overflow it. False where unknown
    (not x86, or no /proc/cpuinfo).
    """
    import platform
    if flags is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
            return False
        flags = cpu_flags()
    if not flags or "avx2" not in flags and "sse4_1" not in flags:
        return False
    return not (flags & VNNI_FLAGS)


def warn_if_int8_saturates(runner) -> None:
    """One warning when ``runner`` runs an INT8 file with 8-bit weights on such a CPU."""
    meta = getattr(runner, "meta", None) or {}
    if meta.get("precision") != "int8" or int(meta.get("int8_weight_bits", 8)) != 8:
        return
    session = getattr(runner, "session", None)
    if session is not None and session.get_providers()[0] != "CPUExecutionProvider":
        return  # ONNX Runtime on a GPU
    if cpu_int8_saturates():
        log.warning("%s: this CPU has no VNNI instructions, so %s's int8 kernels can saturate "
                    "with this file's 8-bit weights and lose accuracy (the imported network "
                    "lost 5.8 AP points that way); for this CPU export with "
                    "--int8_weight_bits 7, or use the fp32 file", runner.path, runner.runtime)


def runtime_installed(runtime: str) -> bool:
    """Whether ``runtime``'s Python package imports."""
    try:
        importlib.import_module(RUNTIME_MODULES[runtime])
        return True
    except ImportError:
        return False


def _import_runtime(runtime: str, path):
    """The runtime's module, or one BpnetError saying how to install it."""
    try:
        return importlib.import_module(RUNTIME_MODULES[runtime])
    except ImportError:
        other = {"openvino": "; or use --runtime onnxruntime (or auto)",
                 "onnxruntime": "; or use --runtime openvino (or auto)"}.get(runtime, "")
        raise BpnetError(f"{path}: runtime {runtime!r} is not installed: "
                         f"{INSTALL_HINTS[runtime]}{other}") from None


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
    runtime: str = ""  # one of RUNTIMES (not "auto"): what runs the model
    #: Network calls that may run at the same time from different threads, each at full
    #: speed (OpenVINO with streams > 1); the video and folder pipelines keep that many
    #: frames in flight.
    parallel_calls: int = 1

    @abc.abstractmethod
    def run(self, batch: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """[B, H, W, C] float32 -> (heatmaps [B, h, w, J+1], PAFs [B, h, w, 2E])."""

    @property
    def described(self) -> dict:
        """What status.json says of the runner: the runtime (and OpenVINO's precision)."""
        out = {"runtime": self.runtime}
        if getattr(self, "inference_precision", None):
            out["inference_precision"] = self.inference_precision
        if self.parallel_calls > 1:
            out["streams"] = self.parallel_calls
        return out

    @property
    def label(self) -> str:
        """The runtime for a log line, e.g. ``openvino (bf16, 2 streams)``."""
        d = self.described
        details = ([d["inference_precision"]] if "inference_precision" in d else []) + \
            ([f"{d['streams']} streams"] if "streams" in d else [])
        return f"{self.runtime} ({', '.join(details)})" if details else self.runtime

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
    runtime = "keras"

    def __init__(self, path, key: Optional[str] = None, stage: Optional[int] = None):
        from ..model.io import load_model
        model, meta = load_model(str(path), key=key)
        self._setup(model, meta, str(path), stage)

    @classmethod
    def from_model(cls, model, meta: dict, stage: Optional[int] = None,
                   source: str = "<in-memory model>") -> "KerasRunner":
        """A runner over a Keras model object and its meta (no file): it shares the model's
        weights, so it sees them as they change (validation during training)."""
        runner = cls.__new__(cls)
        runner._setup(model, meta, source, stage)
        return runner

    def _setup(self, model, meta: dict, path: str, stage: Optional[int]):
        self.path = path
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
        # float32 also from a mixed-precision (float16) model in training.
        outs = [np.asarray(o, dtype=np.float32) for o in outs]
        return _split_outputs(outs, self.pose, self.path)


def _read_onnx_meta(path) -> dict:
    """The bpnet meta of an exported ONNX file (metadata_props ``ONNX_META_KEY``)."""
    import onnx
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several types
        raise BpnetError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0]})") from None
    if not proto.graph.node:  # an empty file parses as an empty model
        size = Path(path).stat().st_size
        raise BpnetError(f"{path}: not an ONNX model ({'an empty file' if not size else 'no graph'}"
                         "); export the model again with `bpnet export`")
    raw = {p.key: p.value for p in proto.metadata_props}.get(ONNX_META_KEY)
    return _parse_onnx_meta(raw, path)


def _parse_onnx_meta(raw, path) -> dict:
    if raw is None:
        raise BpnetError(f"{path}: ONNX model without bpnet meta (metadata_props "
                         f"{ONNX_META_KEY!r}); export it with `bpnet export`")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise BpnetError(f"{path}: metadata {ONNX_META_KEY!r} is not valid JSON ({e})") from None


def _choose_outputs(runner: Runner, names, stage):
    """The (heatmap, PAF) output pair of the stage asked for, from an ONNX file's outputs."""
    if len(names) == 2:
        total = runner.meta.get("num_stages")
        if stage is not None and stage != total:
            if total is None:
                log.warning("%s carries one stage (the exported one); output_stage_to_use "
                            "%s is ignored", runner.path, stage)
            else:
                raise BpnetError(
                    f"output_stage_to_use is {stage} but {runner.path} only carries the last "
                    f"stage (of {total}); set output_stage_to_use: null")
        return list(names)
    if len(names) % 2:
        raise BpnetError(f"{runner.path}: expected heatmap/PAF output pairs, got {len(names)}")
    T = len(names) // 2
    s = T if stage is None else stage
    if not 1 <= s <= T:
        raise BpnetError(f"output_stage_to_use is {stage} but {runner.path} has {T} stages")
    return [names[s - 1], names[T + s - 1]]


def _input_shape(runner: Runner, shape):
    """Fixed sizes, batch and channels from an NHWC input shape (None: dynamic)."""
    if len(shape) != 4:
        raise BpnetError(f"{runner.path}: expected an NHWC input, got shape {list(shape)}")
    if shape[1] is not None and shape[2] is not None:
        runner.fixed_input_hw = (int(shape[1]), int(shape[2]))
    if shape[0] is not None:
        runner.fixed_batch = int(shape[0])
    if shape[3] is not None:
        runner.input_channels = int(shape[3])


def onnxruntime_options(ort, threads: Optional[int] = None):
    """The session options bpnet runs ONNX files with on CPU.

    Intra-op threads = the usable cores, one inter-op thread and sequential
    execution (one picture's graph is a chain; parallel execution only adds
    scheduling), every graph optimization (the level that fuses QDQ
    DequantizeLinear -> Conv -> QuantizeLinear into int8 QLinearConv).
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = int(threads or usable_cores())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


class OnnxRunner(Runner):
    """An ONNX file in ONNX Runtime (CUDA provider where available, else CPU)."""

    runtime = "onnxruntime"

    def __init__(self, path, stage: Optional[int] = None, providers=None,
                 threads: Optional[int] = None):
        ort = _import_runtime("onnxruntime", path)
        self.path = str(path)
        try:
            self.session = ort.InferenceSession(
                self.path, sess_options=onnxruntime_options(ort, threads),
                providers=providers or _default_providers(ort))
        except Exception as e:  # ORT raises several private exception types
            raise BpnetError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0]})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY)
        self._init_meta(_parse_onnx_meta(raw, path), self.path)
        inp = self.session.get_inputs()
        if len(inp) != 1:
            raise BpnetError(f"{path}: expected one input, got {len(inp)}")
        self.input_name = inp[0].name
        _input_shape(self, [d if isinstance(d, int) else None for d in inp[0].shape])
        outs = [o.name for o in self.session.get_outputs()]
        self.output_names = _choose_outputs(self, outs, stage)

    def run(self, batch):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        outs = self.session.run(self.output_names, {self.input_name: batch})
        return _split_outputs(_undo_upsample(outs, self.meta), self.pose, self.path,
                              self.output_names)


class OpenVinoRunner(Runner):
    """An ONNX file (fp32, fp16 or QDQ INT8) in OpenVINO on the CPU.

    The file is read as it is (no conversion step) and compiled once with its
    dynamic batch, height and width kept dynamic: on the CPU plugin that runs
    as fast as a model compiled for one fixed shape (measured: within 5 %),
    without a compile per picture size. LATENCY hint, one stream, threads =
    the usable cores. ``streams`` > 1: that many streams share the cores (THROUGHPUT
    style), and that many threads may call ``run`` at once, each with its own
    request: more frames per second on a video, each frame slower. ``inference_precision``
    "f32" (default) computes in
    float32 as the file says; OpenVINO's own default on CPUs with bfloat16
    instructions (AVX512-BF16, AMX) is "bf16", which is faster and moves the
    maps (and the AP) a little, so it is asked for explicitly only.
    """

    runtime = "openvino"
    #: The ``inference_precision`` of runners made without one (e.g. by load_runner).
    default_precision = "f32"

    def __init__(self, path, stage: Optional[int] = None, device: str = "CPU",
                 threads: Optional[int] = None, inference_precision: Optional[str] = None,
                 streams: int = 1):
        ov = _import_runtime("openvino", path)
        streams = max(1, int(streams))
        inference_precision = inference_precision or self.default_precision
        self.inference_precision = inference_precision
        self.path = str(path)
        self._init_meta(_read_onnx_meta(path), self.path)
        core = ov.Core()
        try:
            model = core.read_model(self.path)
            if len(model.inputs) != 1:
                raise BpnetError(f"{path}: expected one input, got {len(model.inputs)}")
            pshape = model.inputs[0].get_partial_shape()
            dims = [None if d.is_dynamic else d.get_length() for d in pshape]
            self.input_name = model.inputs[0].get_any_name()
            _input_shape(self, dims)
            config = {"INFERENCE_NUM_THREADS": int(threads or usable_cores()),
                      "INFERENCE_PRECISION_HINT": inference_precision}
            if streams == 1:
                config["PERFORMANCE_HINT"] = "LATENCY"
            else:
                config["NUM_STREAMS"] = streams
            self.compiled = core.compile_model(model, device, config)
            got = self.compiled.get_property("INFERENCE_PRECISION_HINT")
            got = got.get_type_name() if hasattr(got, "get_type_name") else str(got)
            if inference_precision == "bf16" and got != "bf16":
                log.warning("%s: this CPU has no bfloat16 instructions; OpenVINO computes in "
                            "%s", path, got)
                self.inference_precision = got
        except BpnetError:
            raise
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with long texts
            raise BpnetError(f"{path}: OpenVINO cannot load this ONNX model "
                             f"({str(e).strip().splitlines()[0] if str(e) else type(e).__name__})"
                             ) from None
        names = [o.get_any_name() for o in self.compiled.outputs]
        self.output_names = _choose_outputs(self, names, stage)
        self._out_index = [names.index(n) for n in self.output_names]
        self.parallel_calls = streams
        self._local = threading.local()  # one infer request per calling thread

    def run(self, batch):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({0: batch})
        # Copies: the request's output buffers are reused by the next call.
        outs = [np.array(request.get_output_tensor(i).data, copy=True)
                for i in self._out_index]
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

    runtime = "tensorrt"

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
        return _read_onnx_meta(onnx_file)
    raise BpnetError(f"{path}: no bpnet meta for this engine: keep {side.name} (written by "
                     f"bpnet export) or the exported {onnx_file.name} beside it")


def _onnxruntime_has_cuda() -> bool:
    """ONNX Runtime with its CUDA provider (onnxruntime-gpu on a GPU machine): then auto
    prefers it to OpenVINO's CPU plugin for ONNX files."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


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


def file_kind(path) -> str:
    """``keras``, ``onnx`` or ``engine``: what kind of model file ``path`` is."""
    p = Path(path)
    if p.suffix.lower() in ENGINE_SUFFIXES:
        return "engine"
    if p.suffix.lower() == ".onnx" or _looks_like_onnx(p):
        return "onnx"
    return "keras"


def choose_runtime(path, runtime: Optional[str] = "auto") -> str:
    """The runtime that will run ``path``: ``runtime`` checked against the file, or auto's pick.

    BpnetError (one line) when that runtime cannot run this kind of file or is
    not installed.
    """
    runtime = (runtime or "auto").lower()
    if runtime not in RUNTIMES:
        raise BpnetError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    kind = file_kind(path)
    if runtime == "auto":
        order = AUTO_ORDER[kind]
        if kind == "onnx" and _onnxruntime_has_cuda():
            order = ("onnxruntime",) + tuple(r for r in order if r != "onnxruntime")
        for rt in order:
            if runtime_installed(rt):
                return rt
        return order[-1]  # not installed: its runner says what to install
    if runtime not in FILE_RUNTIMES[kind]:
        raise BpnetError(f"{path}: runtime {runtime!r} cannot run this file: "
                         + _what_to_do(kind, runtime, path))
    return runtime


def _what_to_do(kind: str, runtime: str, path) -> str:
    if kind == "keras":
        return (f"{runtime} runs exported files; export it first (bpnet export -m {path}"
                + (" --engine_file ENGINE" if runtime == "tensorrt" else "")
                + ") or use --runtime keras (or auto)")
    if kind == "onnx":
        if runtime == "tensorrt":
            return ("TensorRT runs engines; build one from this file (bpnet export "
                    "--engine_file, or trtexec) or use --runtime onnxruntime, openvino or auto")
        return ("it is an ONNX file; use --runtime onnxruntime or openvino (or auto), or pass "
                "the Keras model")
    return ("it is a TensorRT engine; use --runtime tensorrt (or auto), or pass the .onnx or "
            "Keras model")


def load_runner(path, key: Optional[str] = None, stage: Optional[int] = None,
                runtime: Optional[str] = "auto", precision: Optional[str] = None,
                streams: int = 1) -> Runner:
    """A runner for a model file in the runtime asked for (``auto``: the fastest installed).

    ``precision``: OpenVINO's inference precision, ``f32`` or ``bf16`` (None:
    OpenVinoRunner.default_precision); bf16 with another runtime is an error.
    ``streams``: OpenVINO's streams (frames in flight); other runtimes run one at a time.
    """
    if path is None or str(path) == "":
        raise BpnetError("no model given: pass -m/--model_filename or set model_path in the "
                         "inference spec")
    from ..tao_files import checked_model_path
    p = Path(checked_model_path(path, "model"))  # TAO's bpnet_model.hdf5 -> bpnet_model.keras
    if not p.exists():
        raise BpnetError(f"{p}: model file not found")
    if p.is_dir():
        raise BpnetError(f"{p}: is a folder; pass the model file (.keras / .onnx)")
    rt = choose_runtime(p, runtime)
    if precision not in (None, "f32", "bf16"):
        raise BpnetError(f"inference_precision {precision!r}: choose f32 or bf16")
    if precision == "bf16" and rt != "openvino":
        raise BpnetError(f"inference_precision bf16 is OpenVINO's, but {p.name} runs in {rt}: "
                         "use an .onnx file with --runtime openvino (pip install "
                         "\"bpnet[openvino]\"), or inference_precision f32")
    if streams > 1 and rt != "openvino":
        log.warning("streams %d: only OpenVINO runs several network calls at once; %s runs "
                    "one at a time", streams, rt)
    if rt == "tensorrt":
        return TensorRTRunner(p, stage=stage)
    if rt in ("onnxruntime", "openvino"):
        runner = (OnnxRunner(p, stage=stage) if rt == "onnxruntime" else
                  OpenVinoRunner(p, stage=stage, inference_precision=precision, streams=streams))
        warn_if_int8_saturates(runner)
        return runner
    try:
        return KerasRunner(p, key=key, stage=stage)
    except BpnetError:
        raise
    except Exception as e:  # Keras/zip/h5 raise many types for a non-model file
        raise BpnetError(f"{p}: not a readable bpnet model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None

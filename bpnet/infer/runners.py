"""Model runners: one interface over a Keras model file and an ONNX file.

A runner turns a batch of normalized network inputs [B, H, W, C] into the
chosen stage's (heatmaps [B, h, w, J+1], PAFs [B, h, w, 2E]) as float32
NumPy arrays, and carries the model's meta (pose config, normalization,
stride), checked by ``bpnet.model.meta.parse_meta``. ``load_runner`` picks
the runner from the file:

- ``.onnx`` (or a file that parses as an ONNX protobuf): ONNX Runtime; the
  bpnet meta travels as JSON in the model's metadata_props under
  ``bpnet.model.meta.ONNX_META_KEY`` (the export command writes it).
- anything else: the Keras model file read by ``bpnet.model.io.load_model``
  (plain or encrypted with ``-k``).

TensorFlow and ONNX Runtime are imported only inside the runner that needs
them, so ONNX-only deployments do not pay for TensorFlow.
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
        return _split_outputs(outs, self.pose, self.path, self.output_names)


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
        raise BpnetError(f"{p}: TensorRT engines are run by the TensorRT runner, which needs "
                         "the tensorrt package on an NVIDIA GPU; pass the .onnx or Keras model here")
    if p.suffix.lower() == ".onnx" or _looks_like_onnx(p):
        return OnnxRunner(p, stage=stage)
    try:
        return KerasRunner(p, key=key, stage=stage)
    except BpnetError:
        raise
    except Exception as e:  # Keras/zip/h5 raise many types for a non-model file
        raise BpnetError(f"{p}: not a readable bpnet model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None

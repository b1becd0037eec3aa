"""The model meta: what every bpnet model file carries besides its weights.

One schema for every writer (training, ``import_model``, export, tests) and
every reader (the Keras, ONNX Runtime and TensorRT runners). Keras files keep
it in the archive (``bpnet.model.io``), ONNX files as the ``bpnet_meta``
metadata_props entry (JSON). Plain Python: no Keras, no TensorFlow.

Keys:

- ``pose_config``: the pose config as a dict (``PoseConfig.to_dict``): the
  joints and limbs the outputs are ordered by. Required.
- ``normalization``: ``{"image_scale": [3], "image_offset": [3]}``; the network
  sees ``rgb / image_scale - image_offset``.
- ``stride``: input pixels per map cell (8).
- ``model``: the model section of the train spec that built it (a dict).
- ``input_channels``: 3 (RGB) or 1 (gray).
- optional: ``train_input_shape`` [h, w], ``source`` (where an imported
  network came from), ``checkpoint`` (epoch, step), and what export adds
  (``precision``, ``input_dims``, ``source_model_sha256``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

from ..errors import BpnetError

#: Input pixels per output cell of every bpnet network (VGG19 and MobileNet
#: backbones both downsample three times).
STRIDE = 8

#: Where ONNX files keep the meta (a metadata_props key; the value is JSON).
ONNX_META_KEY = "bpnet_meta"

#: The normalization of models that do not say otherwise (TAO's default).
DEFAULT_NORMALIZATION = {"image_scale": [256.0, 256.0, 256.0],
                         "image_offset": [0.5, 0.5, 0.5]}


def make_meta(pose, normalization, model: dict, *, input_channels: int = 3,
              stride: int = STRIDE, train_input_shape: Optional[Sequence[int]] = None,
              **extra) -> dict:
    """The meta of a model for ``pose`` (a PoseConfig).

    ``normalization``: a dict with ``image_scale`` / ``image_offset`` or an
    object with those attributes (the train spec's normalization_params).
    ``model``: the model section as a dict. ``extra``: further keys.
    """
    if isinstance(normalization, dict):
        scale, offset = normalization["image_scale"], normalization["image_offset"]
    else:
        scale, offset = normalization.image_scale, normalization.image_offset
    meta = {
        "pose_config": pose.to_dict(),
        "normalization": {"image_scale": [float(v) for v in scale],
                          "image_offset": [float(v) for v in offset]},
        "stride": int(stride),
        "model": dict(model),
        "input_channels": int(input_channels),
    }
    if train_input_shape is not None:
        meta["train_input_shape"] = [int(v) for v in train_input_shape]
    meta.update(extra)
    return meta


@dataclasses.dataclass(frozen=True)
class ModelMeta:
    """A model's meta, checked: what a runner needs to feed it and read its maps."""

    pose: object  # PoseConfig
    stride: int
    input_channels: int
    normalization: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]  # None: not recorded
    raw: dict


def parse_meta(meta, source: str) -> ModelMeta:
    """Check a meta dict read from ``source`` (a file name, for messages)."""
    from ..pose import pose_config_from_dict

    if not isinstance(meta, dict) or "pose_config" not in meta:
        raise BpnetError(f"{source}: the model carries no bpnet meta (pose_config missing); "
                         "is it a bpnet model?")
    pose = pose_config_from_dict(meta["pose_config"], f"{source} (meta pose_config)")
    try:
        stride = int(meta.get("stride", STRIDE))
        channels = int(meta.get("input_channels", 3))
    except (TypeError, ValueError) as e:
        raise BpnetError(f"{source}: bad stride or input_channels in the model meta ({e})") from e
    if stride <= 0 or channels not in (1, 3):
        raise BpnetError(f"{source}: model meta has stride {stride} and input_channels "
                         f"{channels}; expected a positive stride and 1 or 3 channels")
    norm = None
    n = meta.get("normalization")
    if n:
        try:
            norm = (tuple(float(v) for v in n["image_scale"]),
                    tuple(float(v) for v in n["image_offset"]))
        except (KeyError, TypeError, ValueError) as e:
            raise BpnetError(f"{source}: bad normalization in the model meta ({e})") from e
    return ModelMeta(pose, stride, channels, norm, meta)

"""The files DeepStream's bodypose2d app needs next to an exported ONNX model.

With ``--sdk_compatible_model`` the ONNX file's PAF output carries the fixed
nearest x``u`` upsample the app expects (``bpnet.export.onnx``), and two text
files are written beside it, filled from the model:

- ``<name>_nvinfer_config.txt``: the nvinfer element's ``[property]`` group
  (onnx-file, engine file name, infer-dims, NHWC input order, batch size,
  network mode, output blob names, net-scale-factor and offsets from the
  model's normalization, colour format, aspect-ratio padding);
- ``<name>_bodypose2d_model_config.txt``: the app's parameters (its decoder's
  thresholds, the upsampling factor, the joints and limbs of the model's pose
  config).

DeepStream normalizes as ``net-scale-factor * (pixel - offset)``; bpnet as
``pixel / image_scale - image_offset``, the same with net-scale-factor =
1 / image_scale and offset = image_offset * image_scale. These files are for
deployment only: bpnet's own runners read the plain export.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from ..errors import BpnetError

#: The bodypose2d app's decoder parameters (REFERENCE.md section 8).
APP_PARAMS = {"nmsWindowSize": 7, "threshHeat": 0.05, "threshVectorScore": 0.05,
              "threshVectorCnt1": 8, "threshPartCnt": 4, "threshHumanScore": 0.4}
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}


def _fmt(v: float) -> str:
    return f"{v:.10g}"


def nvinfer_config(onnx_name: str, meta: dict, dims, data_type: str, max_batch: int) -> str:
    from .onnx import HEATMAP_NAME, SDK_PAF_NAME
    norm = meta.get("normalization") or {"image_scale": [256.0] * 3, "image_offset": [0.5] * 3}
    scale, offset = norm["image_scale"], norm["image_offset"]
    if len(set(float(s) for s in scale)) != 1:
        raise BpnetError(f"--sdk_compatible_model: DeepStream takes one net-scale-factor but the "
                         f"model's image_scale differs per channel ({scale})")
    h, w, c = dims
    stem = Path(onnx_name).stem
    lines = [
        "# nvinfer config written by `bpnet export --sdk_compatible_model`",
        "[property]",
        "gpu-id=0",
        f"onnx-file={onnx_name}",
        f"model-engine-file={stem}_b{max_batch}_gpu0_{data_type}.engine",
        "network-input-order=1",
        f"infer-dims={c};{h};{w}",
        f"batch-size={max_batch}",
        "## 0=FP32, 1=INT8, 2=FP16 mode",
        f"network-mode={NETWORK_MODE[data_type]}",
        "num-detected-classes=1",
        "gie-unique-id=1",
        f"output-blob-names={SDK_PAF_NAME};{HEATMAP_NAME}",
        "network-type=100",
        "output-tensor-meta=1",
        "process-mode=1",
        f"net-scale-factor={_fmt(1.0 / float(scale[0]))}",
        "offsets=" + ";".join(_fmt(float(o) * float(s)) for o, s in zip(offset, scale)),
        f"model-color-format={2 if c == 1 else 0}",
        "maintain-aspect-ratio=1",
        "symmetric-padding=1",
        "scaling-filter=1",
        "scaling-compute-hw=1",
        "",
        "[class-attrs-all]",
        "threshold=0.0",
        "",
    ]
    return "\n".join(lines)


def app_model_config(meta: dict, max_batch: int, upsample: int) -> str:
    from ..pose import pose_config_from_dict
    pose = pose_config_from_dict(meta["pose_config"], "model meta")
    lines = [f"nmsWindowSize={APP_PARAMS['nmsWindowSize']}",
             f"featUpsamplingFactor={upsample}"]
    lines += [f"{k}={APP_PARAMS[k]}" for k in ("threshHeat", "threshVectorScore",
                                               "threshVectorCnt1", "threshPartCnt",
                                               "threshHumanScore")]
    lines += [f"batchSize={max_batch}", "imageType=8", f"numJoints={pose.num_joints}"]
    # jointEdges: the PAF limbs in output order; connections: what the app draws.
    lines += [f"jointEdges={a}, {b}" for a, b in pose.skeleton]
    lines += [f"connections={a}, {b}" for a, b in pose.skeleton]
    return "\n".join(lines) + "\n"


def write_deepstream_files(onnx_path, meta: dict, dims, data_type: str, max_batch: int,
                           upsample: int) -> List[Path]:
    from ..io import write_text_atomic
    onnx_path = Path(onnx_path)
    stem = onnx_path.with_suffix("")
    nvinfer = Path(f"{stem}_nvinfer_config.txt")
    app = Path(f"{stem}_bodypose2d_model_config.txt")
    write_text_atomic(nvinfer, nvinfer_config(onnx_path.name, meta, dims, data_type, max_batch))
    write_text_atomic(app, app_model_config(meta, max_batch, upsample))
    return [nvinfer, app]

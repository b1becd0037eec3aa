"""Shared test fixtures: where ../shared is, and skipping when it is absent."""

import os
from pathlib import Path

import pytest

from bpnet.pose import pose_config_from_dict

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BPNET_SHARED", REPO.parent / "shared"))
COCO_TINY = SHARED / "data" / "coco_tiny"
COCO_VAL_ANN = SHARED / "data" / "coco_val_annotations" / "person_keypoints_val2017_part_a.json"
TFPOSE_PB = SHARED / "models" / "tfpose_mobilenet_thin" / "graph_opt.pb"
SHARED_IMAGES = SHARED / "data" / "images"
DEMO_VIDEO = SHARED / "data" / "video" / "demo.mp4"


def need(path: Path):
    """Skip the calling test unless ``path`` (something under ../shared) exists."""
    if not path.exists():
        pytest.skip(f"needs {path} (the ../shared folder beside the checkout is absent)")
    return path


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


# ------------------------------------------------------------------ running the command

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _bpnet_cmd():
    import sys
    script = Path(sys.executable).parent / "bpnet"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bpnet.cli"]


def bpnet_cli(*args, cwd=None, env=None, timeout=600, check=False):
    """Run ``bpnet ARGS`` in a subprocess (the installed console script when there is
    one); returns the CompletedProcess with text stdout/stderr. ``check``: assert exit 0."""
    import subprocess
    p = subprocess.run(_bpnet_cmd() + [str(a) for a in args], capture_output=True, text=True,
                       cwd=cwd or REPO, env=env or ENV, timeout=timeout)
    if check:
        assert p.returncode == 0, f"bpnet {' '.join(map(str, args))} failed:\n{p.stderr[-3000:]}"
    return p


def invoke(*args):
    """Run ``bpnet ARGS`` in this process (click's CliRunner); returns its Result."""
    from click.testing import CliRunner

    from bpnet.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def error_lines(stderr: str, task: str):
    """The ``bpnet TASK: error: ...`` lines of a run's stderr."""
    return [ln for ln in stderr.splitlines() if ln.startswith(f"bpnet {task}: error:")]


# ------------------------------------------------------------------ ONNX files for runner tests

def keras_to_onnx(model, meta: dict, out_path, input_shape=(None, None, None, 3)):
    """The last stage of a Keras bpnet model as an ONNX file, made by bpnet's exporter
    (``bpnet.export.onnx``), with ``meta`` as its bpnet_meta. ``input_shape`` [B, H, W, C]:
    None for a dynamic dimension."""
    from bpnet.export.onnx import keras_to_onnx as convert
    from bpnet.export.onnx import save_onnx, set_meta
    b, h, w, c = input_shape
    proto = convert(model, batch=b, input_hw=None if h is None else (h, w), channels=c)
    meta = {k: v for k, v in meta.items() if k != "num_stages"}  # the file has one stage
    return save_onnx(set_meta(proto, meta), out_path)


# ------------------------------------------------------------------ tiny model files

def save_tiny_model(path, pose, *, cls="BpNetLiteModel", stages=2, seed=0, key=None,
                    norm=None):
    """A tiny randomly initialised bpnet model (1/16 width, Xavier weights) for ``pose``, saved
    with its meta at ``path``; returns (path, model, meta)."""
    import dataclasses

    import keras

    from bpnet.model.build import build_model
    from bpnet.model.io import save_model
    from bpnet.model.meta import make_meta
    from bpnet.specs import ModelConfig
    cfg = ModelConfig(class_name=cls, stages=stages, width_multiplier=0.0625,
                      heat_channels=pose.heat_channels, paf_channels=pose.paf_channels,
                      kernel_initializer="xavier")
    keras.utils.set_random_seed(seed)
    model = build_model(cfg, pose)
    meta = make_meta(pose, norm or {"image_scale": [256.0] * 3, "image_offset": [0.5] * 3},
                     dataclasses.asdict(cfg), num_stages=stages)
    save_model(model, path, meta, key=key)
    return path, model, meta


def make_converted_sample(root: Path, num_train: int, num_val: int, image_size=(256, 256),
                          seed: int = 0, val_records: bool = True) -> Path:
    """A synthetic sample dataset in ``root`` with its train (and val) records and loss masks."""
    from bpnet.data.convert import dataset_convert
    from bpnet.data.synthetic import make_sample_dataset
    make_sample_dataset(root, num_train=num_train, num_val=num_val, image_size=image_size,
                        seed=seed)
    dataset_convert(root / "sample_spec.json", root / "records" / "train", mode="train",
                    generate_masks=True)
    if val_records:
        dataset_convert(root / "sample_spec.json", root / "records" / "val", mode="test",
                        generate_masks=True)
    return root


# The start of a script run in a subprocess: TensorFlow with 2 logical CPUs (set before
# anything else touches TensorFlow), a tiny 5-joint lite model config ``cfg`` with ``pose``,
# ``rng`` and a random batch ``x`` of 4 16x16 images.
TWO_CPU_TINY_PRELUDE = """\
import json, sys, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from bpnet.pose import pose_config_from_dict
from bpnet.specs import ModelConfig
from bpnet.model.build import build_model
pose = pose_config_from_dict({"name": "five", "keypoints": ["a", "b", "c", "d", "e"],
                              "skeleton": [[1, 2], [1, 3], [1, 4], [1, 5]]})
cfg = ModelConfig(class_name="BpNetLiteModel", stages=2, heat_channels=6, paf_channels=8,
                  width_multiplier=0.0625, kernel_initializer="xavier")
rng = np.random.default_rng(0)
x = rng.normal(size=(4, 16, 16, 3)).astype("float32")
"""


#: A five-joint pose config (a head and four limbs) for tiny test models.
POSE5 = pose_config_from_dict({
    "name": "five",
    "keypoints": ["head", "left_hand", "right_hand", "left_foot", "right_foot"],
    "skeleton": [[1, 2], [1, 3], [1, 4], [1, 5]],
})


def checked_annotation(coco, a):
    """(mask, keypoints [17, 3]) of COCO annotation ``a``, after asserting that its mask has
    its area and its bbox, its num_keypoints counts its labeled keypoints and unlabeled ones
    sit at (0, 0)."""
    import numpy as np
    m = coco.annToMask(a).astype(bool)
    assert m.sum() == a["area"] > 0
    x, y, w, h = a["bbox"]
    ys, xs = np.nonzero(m)
    assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
    kp = np.asarray(a["keypoints"], float).reshape(17, 3)
    assert a["num_keypoints"] == int((kp[:, 2] > 0).sum())
    assert np.all(kp[kp[:, 2] == 0, :2] == 0)
    return m, kp

"""The record schema: our encoder and framing against TensorFlow's reader and parser."""

import os

import numpy as np
import pytest

from bpnet.data import records as R
from bpnet.errors import BpnetError


def _rec(p=3, j=18, image_id=123456789012, seed=0):
    rng = np.random.default_rng(seed)
    joints = np.concatenate([rng.uniform(0, 640, (p, j, 2)), rng.integers(0, 3, (p, j, 1))], -1)
    return {"image_id": image_id, "height": 480, "width": 640, "image_path": "train2017/é.jpg",
            "mask_path": "" if p % 2 else "masks/a.png", "dataset": "coco",
            "pose_config": "bpnet_18joints", "joints": joints.astype(np.float32),
            "scales": rng.uniform(10, 400, p).astype(np.float32),
            "centers": rng.uniform(0, 600, (p, 2)).astype(np.float32)}


def test_crc32c_known_value():
    assert R.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert R.crc32c(b"") == 0


def test_roundtrip_without_tensorflow(tmp_path):
    recs = [_rec(), _rec(p=0, image_id=-7), _rec(p=1, j=5, seed=2)]
    path = tmp_path / "x-fold-000-of-001"
    assert R.write_records(path, recs) == 3
    assert R.check_frame(path) == 3
    back = list(R.read_records(tmp_path / "x"))
    for a, b in zip(recs, back):
        for k in ("image_id", "height", "width", "image_path", "mask_path", "dataset", "pose_config"):
            assert a[k] == b[k]
        assert b["num_persons"] == len(a["joints"]) and b["num_joints"] == a["joints"].shape[1]
        np.testing.assert_array_equal(a["joints"], b["joints"])
        np.testing.assert_array_equal(a["scales"], b["scales"])
        np.testing.assert_array_equal(a["centers"], b["centers"])


def test_tensorflow_reads_our_files(tmp_path):
    tf = pytest.importorskip("tensorflow")
    recs = [_rec(), _rec(p=0, image_id=-7), _rec(p=2, j=5, seed=3)]
    path = tmp_path / "r-fold-000-of-001"
    R.write_records(path, recs)
    ds = tf.data.TFRecordDataset([str(path)])
    raw = list(ds.as_numpy_iterator())
    assert raw == [R.serialize_record(r) for r in recs]
    ex = tf.train.Example.FromString(raw[0])
    assert set(ex.features.feature) == set(R.INT_FEATURES + R.BYTES_FEATURES + R.FLOAT_FEATURES)
    assert list(ex.features.feature["image_id"].int64_list.value) == [123456789012]
    for r, p in zip(recs, ds.map(R.parse_record)):
        assert p["joints"].shape == r["joints"].shape
        assert p["centers"].shape == r["centers"].shape
        np.testing.assert_array_equal(p["joints"].numpy(), r["joints"])
        assert int(p["image_id"]) == r["image_id"]
        assert p["image_path"].numpy().decode() == r["image_path"]


def test_corruption_is_detected(tmp_path):
    path = tmp_path / "c-fold-000-of-001"
    R.write_records(path, [_rec()])
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BpnetError, match="corrupt"):
        R.check_frame(path)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(BpnetError, match="truncated"):
        list(R.iter_tfrecord(path))


def test_record_file_names(tmp_path):
    assert R.record_filename("d/train") == "d/train-fold-000-of-001"
    assert R.record_filename("d/train", 2, 4, 1, 8) == "d/train-fold-002-of-004-shard-00001-of-00008"
    for name in ("t-fold-000-of-002", "t-fold-001-of-002", "t-fold-000-of-002.tmp", "tt-fold-000-of-001",
                 ".t-fold-000-of-002.abc.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert [os.path.basename(f) for f in R.record_files(tmp_path / "t")] == \
        ["t-fold-000-of-002", "t-fold-001-of-002"]
    assert R.record_files([tmp_path / "t-fold-001-of-002"]) == [str(tmp_path / "t-fold-001-of-002")]
    with pytest.raises(BpnetError, match="no TFRecord files found"):
        R.record_files(tmp_path / "missing")


def test_bad_joint_shapes():
    with pytest.raises(ValueError, match=r"\[P, J, 3\]"):
        R.serialize_record(dict(_rec(), joints=np.zeros((2, 18))))
    with pytest.raises(ValueError, match="persons"):
        R.serialize_record(dict(_rec(), scales=[1.0]))

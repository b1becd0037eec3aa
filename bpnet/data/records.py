"""The TFRecord schema that dataset_convert writes and the training pipeline reads.

One record is one training sample: an image, the persons labeled in it
(main person first) and where its loss mask is. Files are TFRecord files of
``tf.train.Example`` protos named::

    <output_filename>-fold-000-of-001                       (partition 0 of 1)
    <output_filename>-fold-002-of-004-shard-00001-of-00008  (with shards)

Features (the record schema table of docs/dataset_convert.md):

=============  ==========  ===============================================
image_id       int64       image id from the annotation file
height, width  int64       original image size
image_path     bytes       image path relative to the dataset's root
mask_path      bytes       mask path relative to the root; empty: no mask
dataset        bytes       dataset name (dataset spec ``dataset``)
pose_config    bytes       pose config name the joints are written for
num_joints     int64       J
num_persons    int64       P
joints         float P*J*3 x, y, v in original pixels (v: 0 not labeled,
                           1 occluded, 2 visible); main person first
scales         float P     person bbox heights
centers        float P*2   person bbox centres
=============  ==========  ===============================================

Encoding, writing and the pure-Python reader need no TensorFlow (the
protobuf wire format of tf.train.Example and the TFRecord framing are small
and fixed), so conversion stays light and parallel; ``parse_record`` is the
TensorFlow side for tf.data pipelines.
"""

from __future__ import annotations

import os
import re
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import BpnetError

INT_FEATURES = ("image_id", "height", "width", "num_joints", "num_persons")
BYTES_FEATURES = ("image_path", "mask_path", "dataset", "pose_config")
FLOAT_FEATURES = ("joints", "scales", "centers")

_FILE_RE = re.compile(r"-fold-(\d{3,})-of-(\d{3,})(-shard-(\d{5,})-of-(\d{5,}))?$")
_SHARD_RE = re.compile(r"-shard-(\d{5,})-of-(\d{5,})$")
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


# ------------------------------------------------------------------ names

def record_filename(prefix, partition: int = 0, num_partitions: int = 1,
                    shard: int = 0, num_shards: int = 0) -> str:
    """File name of one partition (and shard) of the records under ``prefix``."""
    name = f"{prefix}-fold-{partition:03d}-of-{num_partitions:03d}"
    if num_shards > 0:
        name += f"-shard-{shard:05d}-of-{num_shards:05d}"
    return name


def is_record_file(path) -> bool:
    return _FILE_RE.search(Path(path).name) is not None


def record_files(prefix_or_paths: str | Path | Sequence[str | Path]) -> list[str]:
    """Expand record prefixes and/or file paths into a sorted list of files.

    A path that is an existing file is taken as is; otherwise it is a prefix
    and every ``<prefix>-fold-...`` file beside it is taken.
    """
    items = [prefix_or_paths] if isinstance(prefix_or_paths, (str, Path)) else list(prefix_or_paths)
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_file():
            out.append(str(p))
            continue
        if p.is_dir():
            raise BpnetError(f"{item} is a folder; give a record file or prefix (e.g. "
                             f"{record_filename(p / 'train')})")
        parent = p.parent if str(p.parent) else Path(".")
        found = sorted(str(f) for f in parent.glob(p.name + "-fold-*")
                       if f.is_file() and _FILE_RE.match(f.name[len(p.name):]))
        if not found and _FILE_RE.search(p.name) and not _FILE_RE.search(p.name).group(3):
            # A fold's name (TAO's specs list "train-fold-000-of-001") when it was sharded.
            found = sorted(str(f) for f in parent.glob(p.name + "-shard-*")
                           if f.is_file() and _SHARD_RE.match(f.name[len(p.name):]))
        if not found:
            raise BpnetError(f"no TFRecord files found for {item} (expected {item} itself or "
                             f"{record_filename(item)}-like files; run bpnet dataset_convert first)")
        out.extend(found)
    seen, unique = set(), []
    for f in out:
        if f not in seen:
            seen.add(f)
            unique.append(f)
    return unique


def split_files(dataset_config, split: str, source=None) -> list[str]:
    """The record files of a train spec's ``train`` or ``val`` split.

    ``dataset_config``: the spec's dataloader.dataset_config; names relative to
    the split's records folder (the val split falls back to the train
    folder). ``source`` (the spec file) prefixes the messages when given.
    """
    if split not in ("train", "val"):
        raise BpnetError(f"split must be 'train' or 'val', got {split!r}")
    dc = dataset_config
    if split == "train":
        folder, names = dc.train_records_folder_path, dc.train_records_path
    else:
        folder, names = dc.val_records_folder_path or dc.train_records_folder_path, dc.val_records_path
    where = f"{source + ': ' if source else ''}dataloader.dataset_config.{split}_records_path"
    if not names:
        raise BpnetError(f"{where} is empty: list the record files (prefixes written by bpnet "
                         f"dataset_convert, relative to {split}_records_folder_path)")
    paths = [n if os.path.isabs(n) else os.path.join(folder, n) for n in names]
    try:
        return record_files(paths)
    except BpnetError as e:
        raise BpnetError(f"{where}: {e}") from None
    except OSError as e:
        raise BpnetError(f"{where}: cannot look for the record files ({e.strerror or e})") from None


def first_record(path, pose=None):
    """The first record of a record file, decoded; None when the file is empty.

    With ``pose`` (a PoseConfig), also checks that the records were written
    for it: the same joint count and, when the records name one, the same topology
    (PoseConfig.matches_record: bpnet's and TAO's spellings of one config agree).
    """
    try:
        data = next(iter_tfrecord(path), None)
    except OSError as e:
        raise BpnetError(f"{path}: cannot read ({e})") from None
    if data is None:
        return None
    try:
        rec = decode_record(data)
    except Exception as e:  # noqa: BLE001  (any parse failure: not our record file)
        raise BpnetError(f"{path}: not a bpnet record file ({type(e).__name__}: {e})") from None
    if pose is not None and (rec["num_joints"] != pose.num_joints
                             or not pose.matches_record(rec["pose_config"])):
        raise BpnetError(
            f"{path}: records are for pose config {rec['pose_config']!r} with {rec['num_joints']} "
            f"joints, but the train spec's pose config is {pose.name!r} with {pose.num_joints} "
            "joints; convert the dataset with that pose config (dataset spec pose_config_path) or "
            "fix dataloader.pose_config.pose_config_path")
    return rec


# ------------------------------------------------------------------ encoding

def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(field_no: int, payload: bytes) -> bytes:
    return _varint((field_no << 3) | 2) + _varint(len(payload)) + payload


def _bytes_feature(value: bytes) -> bytes:
    return _len_field(1, _len_field(1, value))  # Feature.bytes_list{value}


def _float_feature(values: np.ndarray) -> bytes:
    payload = np.ascontiguousarray(values, dtype="<f4").tobytes()
    inner = _len_field(1, payload) if payload else b""  # FloatList.value, packed
    return _len_field(2, inner)


def _int_feature(values: Iterable[int]) -> bytes:
    payload = b"".join(_varint(int(v)) for v in values)
    inner = _len_field(1, payload) if payload else b""  # Int64List.value, packed
    return _len_field(3, inner)


def _as_bytes(v) -> bytes:
    if isinstance(v, bytes):
        return v
    if v is None:
        return b""
    return str(v).encode("utf-8")


def serialize_record(rec: dict) -> bytes:
    """Encode one sample as a serialized ``tf.train.Example``.

    ``rec`` holds image_id, height, width, image_path, mask_path (may be
    empty), dataset, pose_config, joints [P, J, 3]; scales [P] and centers
    [P, 2] are taken from it when given, else computed from the joints'
    labeled extent (for callers that have no boxes). num_joints and
    num_persons are derived from joints.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values: refused below
        return _serialize(rec, np.asarray(rec["joints"], dtype=np.float32))


def _serialize(rec: dict, joints: np.ndarray) -> bytes:
    if joints.ndim != 3 or joints.shape[2] != 3:
        raise ValueError(f"joints must be [P, J, 3], got shape {joints.shape}")
    p, j, _ = joints.shape
    scales = rec.get("scales")
    centers = rec.get("centers")
    if scales is None or centers is None:
        c, s = _extent(joints)
        scales = s if scales is None else scales
        centers = c if centers is None else centers
    scales = np.asarray(scales, dtype=np.float32).reshape(-1)
    centers = np.asarray(centers, dtype=np.float32).reshape(-1, 2)
    if len(scales) != p or len(centers) != p:
        raise ValueError(f"{p} persons but {len(scales)} scales and {len(centers)} centers")
    check_record_values(rec, joints, scales, centers)
    feats = {
        "image_id": _int_feature([rec["image_id"]]),
        "height": _int_feature([rec["height"]]),
        "width": _int_feature([rec["width"]]),
        "num_joints": _int_feature([j]),
        "num_persons": _int_feature([p]),
        "image_path": _bytes_feature(_as_bytes(rec["image_path"])),
        "mask_path": _bytes_feature(_as_bytes(rec.get("mask_path", b""))),
        "dataset": _bytes_feature(_as_bytes(rec.get("dataset", ""))),
        "pose_config": _bytes_feature(_as_bytes(rec.get("pose_config", ""))),
        "joints": _float_feature(joints.reshape(-1)),
        "scales": _float_feature(scales),
        "centers": _float_feature(centers.reshape(-1)),
    }
    entries = b"".join(_len_field(1, _len_field(1, k.encode()) + _len_field(2, v))
                       for k, v in feats.items())
    return _len_field(1, entries)  # Example.features


def check_record_values(rec: dict, joints, scales, centers):
    """BpnetError unless every value can be read back as written: int64 integers,
    finite float32 numbers, UTF-8 text, at least one joint (``decode_record`` and
    TensorFlow's parser read the same)."""
    where = f"record of image id {rec.get('image_id')!r}"
    for k in ("image_id", "height", "width"):
        v = rec.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise BpnetError(f"{where}: {k} must be an integer, got {v!r}")
        if not INT64_MIN <= int(v) <= INT64_MAX:
            raise BpnetError(f"{where}: {k} {v} does not fit a 64-bit signed integer, the "
                             "largest a record holds")
    if joints.shape[1] < 1:
        raise BpnetError(f"{where}: joints must have at least one joint per person")
    for name, arr in (("joints", joints), ("scales", scales), ("centers", centers)):
        if not np.isfinite(arr).all():
            raise BpnetError(f"{where}: {name} has NaN or infinite values (or values beyond "
                             "float32's range)")
    for k in ("image_path", "mask_path", "dataset", "pose_config"):
        v = rec.get(k)
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise BpnetError(f"{where}: {k} {v!r} is not valid Unicode text") from None


def _extent(joints: np.ndarray):
    centers = np.zeros((len(joints), 2), np.float32)
    scales = np.zeros(len(joints), np.float32)
    for i, person in enumerate(joints):
        lab = person[person[:, 2] > 0, :2]
        if len(lab):
            lo, hi = lab.min(0), lab.max(0)
            centers[i] = (lo + hi) / 2
            scales[i] = hi[1] - lo[1]
    return centers, scales


# ------------------------------------------------------------------ decoding

def _read_varint(buf: bytes, pos: int):
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of a protobuf message."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _read_varint(buf, pos)
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            val = buf[pos:pos + n]
            pos += n
        elif wire == 5:
            val = buf[pos:pos + 4]
            pos += 4
        elif wire == 1:
            val = buf[pos:pos + 8]
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field_no, wire, val


def _decode_feature(buf: bytes):
    for kind, _, inner in _fields(buf):
        if kind == 1:  # BytesList
            return [bytes(v) for _, _, v in _fields(inner)]
        if kind == 2:  # FloatList, packed or not
            parts = [np.frombuffer(v, dtype="<f4") for _, _, v in _fields(inner)]
            return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
        if kind == 3:  # Int64List, packed or not
            vals: list[int] = []
            for _, wire, v in _fields(inner):
                if wire == 0:
                    vals.append(v)
                else:
                    pos = 0
                    while pos < len(v):
                        x, pos = _read_varint(v, pos)
                        vals.append(x)
            return np.array([x - (1 << 64) if x >= 1 << 63 else x for x in vals], dtype=np.int64)
    return None


def decode_record(data: bytes) -> dict[str, object]:
    """Serialized tf.train.Example -> dict of NumPy values (no TensorFlow).

    Scalars come out as Python ints / str, joints as [P, J, 3], centers as
    [P, 2], scales as [P].
    """
    raw: dict[str, object] = {}
    for f_no, _, features in _fields(data):
        if f_no != 1:
            continue
        for e_no, _, entry in _fields(features):
            if e_no != 1:
                continue
            key, value = None, b""
            for k_no, _, v in _fields(entry):
                if k_no == 1:
                    key = bytes(v).decode()
                elif k_no == 2:
                    value = v
            raw[key] = _decode_feature(value)
    out: dict[str, object] = {}
    for k in INT_FEATURES:
        out[k] = int(raw[k][0])
    for k in BYTES_FEATURES:
        v = raw.get(k) or [b""]
        out[k] = v[0].decode("utf-8")
    j = out["num_joints"]
    out["joints"] = np.asarray(raw["joints"], np.float32).reshape(-1, j, 3)
    out["scales"] = np.asarray(raw["scales"], np.float32).reshape(-1)
    out["centers"] = np.asarray(raw["centers"], np.float32).reshape(-1, 2)
    return out


def iter_tfrecord(path) -> Iterator[bytes]:
    """Yield the raw payloads of a TFRecord file (CRCs are not checked)."""
    with open(path, "rb") as f:
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise BpnetError(f"{path}: truncated TFRecord file")
            (n,) = struct.unpack("<Q", head[:8])
            data = f.read(n)
            if len(data) < n or len(f.read(4)) < 4:
                raise BpnetError(f"{path}: truncated TFRecord file")
            yield data


def read_records(paths) -> Iterator[dict[str, object]]:
    """Iterate the decoded records of files or prefixes, in file order (NumPy)."""
    for path in record_files(paths):
        for data in iter_tfrecord(path):
            yield decode_record(data)


# ------------------------------------------------------------------ TensorFlow side

def feature_spec():
    """The tf.io feature description of a record."""
    import tensorflow as tf
    spec = {k: tf.io.FixedLenFeature([], tf.int64) for k in INT_FEATURES}
    spec.update({k: tf.io.FixedLenFeature([], tf.string, default_value="") for k in BYTES_FEATURES})
    spec.update({k: tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True)
                 for k in FLOAT_FEATURES})
    return spec


def parse_record(serialized):
    """Parse one serialized record tensor into a dict of tensors.

    joints come out as float32 [P, J, 3], centers [P, 2], scales [P]; the
    scalar features as int64 / string scalars.
    """
    import tensorflow as tf
    f = tf.io.parse_single_example(serialized, feature_spec())
    j = tf.cast(f["num_joints"], tf.int32)
    f["joints"] = tf.reshape(f["joints"], tf.stack([-1, j, 3]))
    f["centers"] = tf.reshape(f["centers"], [-1, 2])
    return f


def _crc_tables():
    poly = 0x82F63B78  # CRC-32C (Castagnoli), reflected
    t0 = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        t0.append(c)
    # Slicing-by-8: table k advances a byte through k further zero bytes.
    tables = [t0]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(prev[i] >> 8) ^ t0[prev[i] & 0xFF] for i in range(256)])
    return tables


_CRC_TABLES = _crc_tables()
_CRC_TABLE = _CRC_TABLES[0]


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data``, pure Python (no TensorFlow, no compiled extension).

    Eight bytes per step; about 0.1-0.2 ms per KiB, small next to mask
    rendering, and it keeps conversion workers free of TensorFlow.
    """
    t0, t1, t2, t3, t4, t5, t6, t7 = _CRC_TABLES
    crc = 0xFFFFFFFF
    n = len(data) // 8 * 8 if sys.byteorder == "little" else 0
    if n:
        for q in memoryview(data)[:n].cast("Q"):
            x = crc ^ (q & 0xFFFFFFFF)
            hi = q >> 32
            crc = (t7[x & 0xFF] ^ t6[(x >> 8) & 0xFF] ^ t5[(x >> 16) & 0xFF] ^ t4[x >> 24]
                   ^ t3[hi & 0xFF] ^ t2[(hi >> 8) & 0xFF] ^ t1[(hi >> 16) & 0xFF] ^ t0[hi >> 24])
    for b in data[n:]:
        crc = t0[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord entry: length, masked CRC of the length, payload, masked CRC of the payload."""
    head = struct.pack("<Q", len(data))
    return head + struct.pack("<I", _masked_crc(head)) + data + struct.pack("<I", _masked_crc(data))


def check_frame(path) -> int:
    """Verify every CRC of a TFRecord file; return the number of records."""
    n = 0
    with open(path, "rb") as f:
        while True:
            head = f.read(12)
            if not head:
                return n
            if len(head) < 12 or struct.unpack("<I", head[8:])[0] != _masked_crc(head[:8]):
                raise BpnetError(f"{path}: corrupt TFRecord length at record {n}")
            (size,) = struct.unpack("<Q", head[:8])
            data, tail = f.read(size), f.read(4)
            if len(data) < size or len(tail) < 4 or struct.unpack("<I", tail)[0] != _masked_crc(data):
                raise BpnetError(f"{path}: corrupt or truncated TFRecord at record {n}")
            n += 1


def write_records(path, recs: Iterable[dict]) -> int:
    """Write record dicts (or serialized Examples) to one TFRecord file, atomically.

    No TensorFlow needed; the files are read by tf.data.TFRecordDataset.
    """
    from ..io import atomic_path
    n = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for rec in recs:
            f.write(frame_record(rec if isinstance(rec, bytes) else serialize_record(rec)))
            n += 1
    return n

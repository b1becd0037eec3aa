"""The tf.data input pipeline: records -> augmented, labeled, normalized batches.

    record files (every file of every dataset)
      -> shuffle files, interleave, shuffle records (seeded)
      -> zip with a seeded stream of per-sample seeds
      -> parallel map: read image (+ mask) files, decode, one affine
         transform for image / mask / joints, render heatmaps and PAFs
         (OpenCV + NumPy in one numpy_function: they release the GIL where
         the time goes, and a sample costs a few milliseconds)
         and normalize (x/scale - offset on RGB)
      -> batch -> prefetch

Every sample's randomness comes from its own seed, drawn from a stream
seeded by ``seed``, so the same seed gives the same batches whatever the
number of parallel calls. A record's image and mask paths are relative to
the root of the dataset spec named by its ``dataset`` field (every entry
of ``dataset_config.dataset_specs`` counts: TAO keeps only the last one),
else to ``root_data_path``.

The validation pipeline reads the val records without augmentation: the
image is scaled by one factor to fit the input and centred (the rest grey,
the mask valid there), as at inference with symmetric padding.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import BpnetError
from . import augment as aug
from .labels import render_labels
from .records import decode_record, iter_tfrecord, record_files

log = logging.getLogger(__name__)

STRIDE = 8
_DECODE_FACTORS = (8, 4, 2)  # JPEG DCT-domain downscaling that OpenCV offers


# ------------------------------------------------------------------ spec side

def _split_files(spec, split: str) -> List[str]:
    if split not in ("train", "val"):
        raise BpnetError(f"split must be 'train' or 'val', got {split!r}")
    dc = spec.dataloader.dataset_config
    if split == "train":
        folder, names, key = dc.train_records_folder_path, dc.train_records_path, "train_records_path"
    else:
        folder = dc.val_records_folder_path or dc.train_records_folder_path
        names, key = dc.val_records_path, "val_records_path"
    if not names:
        raise BpnetError(f"dataloader.dataset_config.{key} is empty: list the record files "
                         f"(prefixes written by bpnet dataset_convert, relative to "
                         f"{'train' if split == 'train' else 'val'}_records_folder_path)")
    paths = [n if os.path.isabs(n) else os.path.join(folder, n) for n in names]
    try:
        return record_files(paths)
    except BpnetError as e:
        raise BpnetError(f"dataloader.dataset_config.{key}: {e}") from None


def dataset_roots(spec) -> Tuple[Dict[str, str], str]:
    """Dataset name -> root folder for every dataset_specs entry, and the fallback root."""
    from ..specs import load_dataset_spec
    dc = spec.dataloader.dataset_config
    roots: Dict[str, str] = {}
    for name, path in dc.dataset_specs.items():
        ds = load_dataset_spec(path)  # a missing or bad file is a BpnetError naming it
        # Records carry the dataset spec's own name; the key of dataset_specs
        # names the same dataset in the train spec. Both resolve.
        roots.setdefault(ds.dataset, ds.root_directory_path)
        roots[name] = ds.root_directory_path
    return roots, dc.root_data_path


def _check_target_shape(spec):
    dl = spec.dataloader
    dims = dl.image_config.image_dims
    th, tw = dl.pose_config.target_shape
    if (th * STRIDE, tw * STRIDE) != (dims.height, dims.width):
        raise BpnetError(
            f"dataloader.pose_config.target_shape {[th, tw]} x stride {STRIDE} = "
            f"{[th * STRIDE, tw * STRIDE]} does not match dataloader.image_config.image_dims "
            f"{[dims.height, dims.width]}; use target_shape {[dims.height // STRIDE, dims.width // STRIDE]}")
    if dims.height % STRIDE or dims.width % STRIDE:
        raise BpnetError(f"dataloader.image_config.image_dims {[dims.height, dims.width]} must be "
                         f"multiples of the stride {STRIDE}")


def _check_files(files: List[str], pose, roots: Dict[str, str], fallback: str):
    """Look at the first record of every file: pose config, and that its image is there."""
    for f in files:
        try:
            first = next(iter_tfrecord(f), None)
        except OSError as e:
            raise BpnetError(f"{f}: cannot read ({e})") from None
        if first is None:
            continue
        try:
            rec = decode_record(first)
        except Exception as e:  # any parse failure means this is not our record file
            raise BpnetError(f"{f}: not a bpnet record file ({type(e).__name__}: {e})") from None
        if rec["num_joints"] != pose.num_joints or (rec["pose_config"] and rec["pose_config"] != pose.name):
            raise BpnetError(
                f"{f}: records are for pose config {rec['pose_config']!r} with {rec['num_joints']} joints, "
                f"but the train spec's pose config is {pose.name!r} with {pose.num_joints} joints; "
                "convert the dataset with that pose config (dataset spec pose_config_path) or "
                "fix dataloader.pose_config.pose_config_path")
        img = _resolve(roots, fallback, rec["dataset"], rec["image_path"])
        if not os.path.isfile(img):
            where = (f"dataset {rec['dataset']!r} root {roots[rec['dataset']]}" if rec["dataset"] in roots
                     else f"root_data_path {fallback} (dataset {rec['dataset']!r} is not in dataset_specs)")
            raise BpnetError(f"{f}: image {img} not found (image paths resolve against the {where}); "
                             "fix dataloader.dataset_config.dataset_specs or root_data_path")


def _resolve(roots: Dict[str, str], fallback: str, dataset: str, rel: str) -> str:
    return os.path.join(roots.get(dataset, fallback), rel)


def count_records(files: List[str]) -> int:
    """Records in TFRecord files, by walking their length headers."""
    n = 0
    for f in files:
        size = os.path.getsize(f)
        with open(f, "rb") as fh:
            pos = 0
            while pos < size:
                head = fh.read(8)
                if len(head) < 8:
                    raise BpnetError(f"{f}: truncated TFRecord file")
                (length,) = struct.unpack("<Q", head)
                pos += 16 + length
                fh.seek(pos)
                n += 1
            if pos != size:
                raise BpnetError(f"{f}: truncated TFRecord file")
    return n


def count_samples(spec, split: str = "train") -> int:
    """Number of records (samples) the split's record files hold."""
    return count_records(_split_files(spec, split))


# ------------------------------------------------------------------ per sample (NumPy)

class SampleProcessor:
    """Turns one parsed record into (image uint8 RGB, heatmaps, PAFs, mask).

    Plain Python/NumPy/OpenCV, so it can be used and tested without tf.data.
    """

    def __init__(self, spec, pose, roots: Dict[str, str], fallback: str, train: bool):
        dl = spec.dataloader
        dims = dl.image_config.image_dims
        self.out_hw = (dims.height, dims.width)
        self.channels = dims.channels
        self.grid = (dims.height // STRIDE, dims.width // STRIDE)
        self.pose = pose
        self.roots, self.fallback = roots, fallback
        self.train = train
        ac = dl.augmentation_config
        self.mode = ac.spatial_augmentation_mode if train else "standard_with_fixed_aspect_ratio"
        self.params = ac.spatial_aug_params
        lp = dl.label_processor_config
        self.sigma, self.paf_thresh = lp.heatmap_gaussian_sigma, lp.paf_ortho_dist_thresh
        norm = dl.normalization_params
        self.mask_scale = float(norm.mask_scale[0])
        self.mask_offset = float(norm.mask_offset[0])
        scale = np.asarray(norm.image_scale[:self.channels], np.float32)
        offset = np.asarray(norm.image_offset[:self.channels], np.float32)
        # x/scale - offset for every uint8 value and channel: one table lookup.
        self._lut = (np.arange(256, dtype=np.float32)[:, None] / scale - offset).reshape(1, 256, -1)

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB [H, W, C] -> float32 x/scale - offset per channel (normalization_params).

        Done per sample with cv2.LUT (0.2 ms at 368x368): the same ops as
        tf.data batch ops, or NumPy broadcasting over a 3-long channel axis,
        measured 5-7x slower.
        """
        import cv2
        out = cv2.LUT(image, self._lut if image.shape[-1] > 1 else self._lut.reshape(1, 256))
        return out.reshape(image.shape)

    def _read(self, path: str, what: str) -> np.ndarray:
        try:
            with open(path, "rb") as fh:
                return np.frombuffer(fh.read(), np.uint8)
        except OSError as e:
            raise BpnetError(f"cannot read the {what} {path}: {e.strerror or e}") from None

    def __call__(self, dataset: str, image_path: str, mask_path: str, height: int, width: int,
                 joints: np.ndarray, centers: np.ndarray, scales: np.ndarray, seed: Optional[int]):
        import cv2
        rng = np.random.default_rng(seed) if (self.train and seed is not None) else (
            np.random.default_rng() if self.train else None)
        centers = np.asarray(centers, np.float32).reshape(-1, 2)
        scales = np.asarray(scales, np.float32).reshape(-1)
        t = aug.sample_transform(rng, (height, width), self.out_hw, self.mode, self.params,
                                 centers[0] if len(centers) else None, scales[0] if len(scales) else None)
        # Decode a JPEG at 1/2, 1/4 or 1/8 when the transform shrinks it that
        # much anyway: DCT-domain scaling is faster and averages like a box filter.
        factor = next((f for f in _DECODE_FACTORS if t.scale * f <= 1.0), 1)
        flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
        path = _resolve(self.roots, self.fallback, dataset, image_path)
        image = cv2.imdecode(self._read(path, "image"), flag)
        if image is None:
            raise BpnetError(f"cannot decode the image {path}")
        h0, w0 = image.shape[:2]
        if factor == 1 and (h0, w0) != (height, width):
            # The record's size is what the joints are measured in; follow the file.
            raise BpnetError(f"{path}: image is {w0}x{h0} but its record says {width}x{height}")
        fx, fy = width / w0, height / h0
        up = np.array([[fx, 0.0, (fx - 1) / 2], [0.0, fy, (fy - 1) / 2], [0.0, 0.0, 1.0]])
        m = t.matrix @ up
        out = aug.warp_image(image, t, m)
        if mask_path:
            mpath = _resolve(self.roots, self.fallback, dataset, mask_path)
            mask = cv2.imdecode(self._read(mpath, "mask"), cv2.IMREAD_GRAYSCALE)
            if mask is None:
                raise BpnetError(f"cannot decode the mask {mpath}")
            if mask.shape != (height, width):
                mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        else:
            mask = None
        grid_mask = aug.warp_mask_to_grid(mask, t, STRIDE)
        moved = aug.transform_joints(joints, t, self.pose)
        heat, paf = render_labels(moved, self.pose, self.out_hw, STRIDE, self.sigma, self.paf_thresh)
        if self.channels == 1:
            out = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)[..., None]
        else:
            out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)  # normalization_params are for RGB
        grid_mask = (grid_mask / self.mask_scale - self.mask_offset).astype(np.float32)[..., None]
        return out, heat, paf, grid_mask, moved


# ------------------------------------------------------------------ tf.data

def _num_calls(spec) -> int:
    n = spec.dataloader.num_parallel_calls
    if n and n > 0:
        return int(n)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_dataset(spec, split: str = "train", seed: Optional[int] = None, repeat: bool = True,
                  shuffle: Optional[bool] = None):
    """tf.data.Dataset of (images [B, H, W, C] float32 normalized, labels).

    labels: {"heatmap": [B, h, w, J+1], "paf": [B, h, w, 2E], "mask": [B, h, w, 1]}.
    split "train" augments per the spec; "val" reads the val records
    without augmentation. seed None: the spec's random_seed. shuffle None:
    shuffle the train split only. A repeated train split drops the last
    partial batch (every batch has the spec's batch size); otherwise the
    last batch may be smaller.
    """
    import tensorflow as tf

    _check_target_shape(spec)
    dl = spec.dataloader
    pose = dl.pose_config.load()
    files = _split_files(spec, split)
    roots, fallback = dataset_roots(spec)
    _check_files(files, pose, roots, fallback)
    train = split == "train"
    shuffle = train if shuffle is None else bool(shuffle)
    seed = int(spec.random_seed if seed is None else seed)
    proc = SampleProcessor(spec, pose, roots, fallback, train)
    J, E = pose.num_joints, pose.num_edges
    H, W = proc.out_hw
    h, w = proc.grid
    C = proc.channels
    nc = _num_calls(spec)

    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle and len(files) > 1:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    if len(files) > 1:
        ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 4),
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.flat_map(tf.data.TFRecordDataset)
    if shuffle and dl.shuffle_buffer_size > 1:
        ds = ds.shuffle(dl.shuffle_buffer_size, seed=seed + 1, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    # One seed per sample, from a stream of its own: augmentation does not
    # depend on which parallel worker runs it.
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed + 2)))

    def py_process(dataset, image_path, mask_path, height, width, joints, centers, scales, s):
        img, heat, paf, mask, _ = proc(dataset.decode(), image_path.decode(), mask_path.decode(),
                                       int(height), int(width), joints, centers, scales,
                                       int(s) & 0xFFFFFFFFFFFFFFFF)
        return proc.normalize(img), heat, paf, mask

    from .records import parse_record

    def load(serialized, s):
        f = parse_record(serialized)
        img, heat, paf, mask = tf.numpy_function(
            py_process,
            [f["dataset"], f["image_path"], f["mask_path"], f["height"], f["width"],
             f["joints"], f["centers"], f["scales"], s],
            [tf.float32, tf.float32, tf.float32, tf.float32], stateful=False)
        img.set_shape([H, W, C])
        heat.set_shape([h, w, J + 1])
        paf.set_shape([h, w, 2 * E])
        mask.set_shape([h, w, 1])
        return img, heat, paf, mask

    ds = ds.map(load, num_parallel_calls=nc, deterministic=True)
    ds = ds.batch(dl.batch_size, drop_remainder=bool(train and repeat))
    ds = ds.map(lambda x, heat, paf, mask: (x, {"heatmap": heat, "paf": paf, "mask": mask}))
    opts = tf.data.Options()
    opts.deterministic = True
    ds = ds.with_options(opts)
    return ds.prefetch(tf.data.AUTOTUNE)

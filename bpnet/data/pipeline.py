"""The tf.data input pipeline: records -> augmented, labeled, normalized batches.

    record files (every file of every dataset)
      -> shuffle files, interleave, shuffle records (seeded)
      -> zip with a seeded stream of per-sample seeds
      -> parallel map, per sample:
           plan (NumPy): draw the affine transform, find the part of the
             image it can see and the JPEG downscale it allows
           read + decode (TF): only that window of the JPEG (decoding is
             the largest cost per sample; a window saves ~25% of it)
           finish (OpenCV + NumPy): one affine warp for image, mask and
             joints, heatmaps and PAFs, normalization (x/scale - offset, RGB)
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

import numpy as np

from ..errors import BpnetError
from ..model.meta import STRIDE
from . import augment as aug
from .images import decode_image, file_problem, normalization_lut
from .labels import render_labels
from .records import first_record, split_files

log = logging.getLogger(__name__)

_DECODE_FACTORS = (8, 4, 2)  # JPEG DCT-domain downscaling that OpenCV and TF offer


# ------------------------------------------------------------------ spec side

def dataset_roots(spec) -> tuple[dict[str, str], str]:
    """Dataset name -> root folder for every dataset_specs entry, and the fallback root."""
    from ..specs import load_dataset_spec
    dc = spec.dataloader.dataset_config
    roots: dict[str, str] = {}
    for name, path in dc.dataset_specs.items():
        ds = load_dataset_spec(path)  # a missing or bad file is a BpnetError naming it
        # Records carry the dataset spec's own name; the key of dataset_specs
        # names the same dataset in the train spec. Both resolve.
        roots.setdefault(ds.dataset, ds.root_directory_path)
        roots[name] = ds.root_directory_path
    return roots, dc.root_data_path


def _check_files(files: list[str], pose, roots: dict[str, str], fallback: str):
    """Look at the first record of every file: pose config, and that its image is there."""
    for f in files:
        rec = first_record(f, pose)
        if rec is None:
            continue
        img = _resolve(roots, fallback, rec["dataset"], rec["image_path"])
        if not os.path.isfile(img):
            where = (f"dataset {rec['dataset']!r} root {roots[rec['dataset']]}" if rec["dataset"] in roots
                     else f"root_data_path {fallback} (dataset {rec['dataset']!r} is not in dataset_specs)")
            raise BpnetError(f"{f}: image {img} not found (image paths resolve against the {where}); "
                             "fix dataloader.dataset_config.dataset_specs or root_data_path")


def _resolve(roots: dict[str, str], fallback: str, dataset: str, rel: str) -> str:
    return os.path.join(roots.get(dataset, fallback), rel)


def count_records(files: list[str]) -> int:
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
    return count_records(split_files(spec.dataloader.dataset_config, split))


# ------------------------------------------------------------------ per sample (NumPy)

class SampleProcessor:
    """Turns one parsed record into (image uint8 RGB, heatmaps, PAFs, mask).

    Plain Python/NumPy/OpenCV, so it can be used and tested without tf.data.
    """

    def __init__(self, spec, pose, roots: dict[str, str], fallback: str, train: bool):
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
        # x/scale - offset for every uint8 value and channel: one table lookup.
        self._lut = normalization_lut(tuple(norm.image_scale[:self.channels]),
                                      tuple(norm.image_offset[:self.channels]))

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
        except IsADirectoryError:
            raise BpnetError(f"the {what} {path} is a folder, not an image file") from None
        except OSError as e:
            raise BpnetError(f"cannot read the {what} {path}: {e.strerror or e}") from None

    def plan(self, height: int, width: int, centers, scales, seed: int | None):
        """Draw the sample's transform and say what part of the image to decode.

        Returns (transform, window (y, x, h, w) in source pixels, factor):
        a JPEG is decoded at 1/factor of its size (DCT-domain scaling, like a
        box filter) when the transform shrinks it at least that much, else
        only the window that the transform can see (plus a bilinear margin)
        is decoded. Both save decoding work, the largest cost per sample.
        """
        rng = np.random.default_rng(seed) if self.train else None
        centers = np.asarray(centers, np.float32).reshape(-1, 2)
        scales = np.asarray(scales, np.float32).reshape(-1)
        t = aug.sample_transform(rng, (height, width), self.out_hw, self.mode, self.params,
                                 centers[0] if len(centers) else None, scales[0] if len(scales) else None)
        factor = next((f for f in _DECODE_FACTORS if t.scale * f <= 1.0), 1)
        if factor > 1:
            return t, (0, 0, int(height), int(width)), factor
        H, W = self.out_hw
        inv = np.linalg.inv(aug._affine(t.matrix))
        corners = np.array([[-1.0, -1.0, W, W], [-1.0, H, -1.0, H], [1.0, 1.0, 1.0, 1.0]])
        src = (inv @ corners)[:2]
        x0 = int(np.clip(np.floor(src[0].min()) - 2, 0, width - 1))
        y0 = int(np.clip(np.floor(src[1].min()) - 2, 0, height - 1))
        x1 = int(np.clip(np.ceil(src[0].max()) + 3, x0 + 1, width))
        y1 = int(np.clip(np.ceil(src[1].max()) + 3, y0 + 1, height))
        return t, (y0, x0, y1 - y0, x1 - x0), 1

    def finish(self, image: np.ndarray, window, t, mask: np.ndarray | None, joints: np.ndarray):
        """Warp the decoded window (RGB, possibly downscaled), the mask and the
        joints; render labels. Returns (image uint8 [H, W, C] RGB, heatmaps,
        PAFs, mask [h, w, 1] normalized, joints moved)."""
        import cv2
        y0, x0, wh, ww = (int(v) for v in window)
        h0, w0 = image.shape[:2]
        # Decoded pixel u sits at source pixel x0 + (u + 0.5) * f - 0.5, f = window / decoded size.
        fx, fy = ww / w0, wh / h0
        up = np.array([[fx, 0.0, x0 + (fx - 1) / 2], [0.0, fy, y0 + (fy - 1) / 2], [0.0, 0.0, 1.0]])
        out = aug.warp_image(image, t, t.matrix @ up)
        grid_mask = aug.warp_mask_to_grid(mask, t, STRIDE)
        moved = aug.transform_joints(joints, t, self.pose)
        heat, paf = render_labels(moved, self.pose, self.out_hw, STRIDE, self.sigma, self.paf_thresh)
        if self.channels == 1:
            out = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)[..., None]
        grid_mask = (grid_mask / self.mask_scale - self.mask_offset).astype(np.float32)[..., None]
        return out, heat, paf, grid_mask, moved

    def read_mask(self, path: str, height: int, width: int) -> np.ndarray | None:
        import cv2
        if not path:
            return None
        mask, problem = decode_image(self._read(path, "mask"), cv2.IMREAD_GRAYSCALE)
        if problem:
            raise BpnetError(f"cannot use the mask {path}: {problem}")
        if mask.shape != (height, width):  # another image's mask: never stretched to fit
            raise BpnetError(f"the mask {path} is {mask.shape[1]}x{mask.shape[0]} but its record's "
                             f"image is {width}x{height}; run bpnet dataset_convert "
                             "--generate_masks again")
        return mask

    def __call__(self, dataset: str, image_path: str, mask_path: str, height: int, width: int,
                 joints: np.ndarray, centers: np.ndarray, scales: np.ndarray, seed: int | None):
        """The whole sample with OpenCV decoding, no TensorFlow (show_labels, tests).

        The tf.data pipeline runs the same plan/finish around TensorFlow's
        JPEG decoder, which can decode just the window.
        """
        import cv2
        t, window, factor = self.plan(height, width, centers, scales, seed)
        flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
        path = _resolve(self.roots, self.fallback, dataset, image_path)
        image, problem = decode_image(self._read(path, "image"), flag)
        if problem:
            raise BpnetError(f"cannot use the image {path}: {problem}")
        if factor == 1:
            if image.shape[:2] != (height, width):
                raise BpnetError(f"{path}: image is {image.shape[1]}x{image.shape[0]} but its record "
                                 f"says {width}x{height}")
            y0, x0, wh, ww = window
            image = image[y0:y0 + wh, x0:x0 + ww]
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        mask = self.read_mask(_resolve(self.roots, self.fallback, dataset, mask_path) if mask_path else "",
                              height, width)
        return self.finish(image, window, t, mask, joints)


# ------------------------------------------------------------------ tf.data

def _num_calls(spec) -> int:
    n = spec.dataloader.num_parallel_calls
    if n and n > 0:
        return int(n)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_dataset(spec, split: str = "train", seed: int | None = None, repeat: bool = True,
                  shuffle: bool | None = None):
    """tf.data.Dataset of (images [B, H, W, C] float32 normalized, labels).

    ``spec``: a TrainSpec from the spec loader, which checked it (e.g. that
    the target shape times the stride is the input size); this does not
    check it again.

    labels: {"heatmap": [B, h, w, J+1], "paf": [B, h, w, 2E], "mask": [B, h, w, 1]}.
    split "train" augments per the spec; "val" reads the val records
    without augmentation. seed None: the spec's random_seed. shuffle None:
    shuffle the train split only. A repeated train split drops the last
    partial batch (every batch has the spec's batch size); otherwise the
    last batch may be smaller.
    """
    import tensorflow as tf

    dl = spec.dataloader
    pose = dl.pose_config.load()
    files = split_files(dl.dataset_config, split)
    if not any(os.path.getsize(f) for f in files):  # else tf.data ends at once, unexplained
        shown = ", ".join(files[:3]) + (f" (and {len(files) - 3} more)" if len(files) > 3 else "")
        raise BpnetError(f"the {split} record files are empty (0 records): {shown}; run bpnet "
                         "dataset_convert again")
    empty = [f for f in files if not os.path.getsize(f)]
    if empty:
        log.warning("%d of the %d %s record files are empty (e.g. %s); the others are read",
                    len(empty), len(files), split, empty[0])
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

    # Dataset name -> root folder, in the graph (records resolve their own root).
    names = sorted(roots)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(names or [""], tf.string),
                                            tf.constant([roots[n] for n in names] or [fallback], tf.string)),
        default_value=fallback)

    def resolve(rel, dataset):
        joined = tf.strings.join([table.lookup(dataset), rel], separator="/")
        return tf.where(tf.strings.regex_full_match(rel, "/.*"), rel, joined)

    def py_plan(path, height, width, centers, scales, s):
        # An empty or cut-off image fails here, named, not later as "Invalid JPEG data".
        problem = file_problem(path.decode())
        if problem:
            raise BpnetError(f"{path.decode()}: {problem} (a record points at it; fix or "
                             "remove the image and run bpnet dataset_convert again)")
        t, window, factor = proc.plan(int(height), int(width), centers, scales, int(s) & 0xFFFFFFFFFFFFFFFF)
        m = np.concatenate([t.matrix.reshape(-1), [t.flip_lr, t.flip_tb]]).astype(np.float64)
        return m, np.asarray(window, np.int32), np.int32({1: 0, 2: 1, 4: 2, 8: 3}[factor])

    def py_finish(image, window, m, mask_path, height, width, joints):
        t = aug.Transform(matrix=m[:6].reshape(2, 3), out_hw=(H, W), flip_lr=bool(m[6]), flip_tb=bool(m[7]))
        mask = proc.read_mask(mask_path.decode(), int(height), int(width))
        img, heat, paf, grid_mask, _ = proc.finish(image, window, t, mask, joints)
        return proc.normalize(img), heat, paf, grid_mask

    def decode(data, window, branch):
        # JPEG: decode only the window, or the whole image at 1/2, 1/4, 1/8.
        def jpeg():
            return tf.switch_case(branch, [
                lambda: tf.io.decode_and_crop_jpeg(data, window, channels=3),
                lambda: tf.io.decode_jpeg(data, channels=3, ratio=2),
                lambda: tf.io.decode_jpeg(data, channels=3, ratio=4),
                lambda: tf.io.decode_jpeg(data, channels=3, ratio=8)])

        def other():  # PNG, BMP, GIF: whole image, then the window
            img = tf.io.decode_image(data, channels=3, expand_animations=False)
            return img[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]

        return tf.cond(tf.strings.substr(data, 0, 3) == b"\xff\xd8\xff", jpeg, other)

    from .records import parse_record

    def load(serialized, s):
        f = parse_record(serialized)
        image_path = resolve(f["image_path"], f["dataset"])
        m, window, branch = tf.numpy_function(
            py_plan, [image_path, f["height"], f["width"], f["centers"], f["scales"], s],
            [tf.float64, tf.int32, tf.int32], stateful=False)
        window.set_shape([4])
        branch.set_shape([])
        # Non-JPEG files ignore the downscale branch: the window is then the whole image.
        image = decode(tf.io.read_file(image_path), window, branch)
        mask_path = tf.where(f["mask_path"] == "", f["mask_path"], resolve(f["mask_path"], f["dataset"]))
        img, heat, paf, mask = tf.numpy_function(
            py_finish, [image, window, m, mask_path, f["height"], f["width"], f["joints"]],
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

"""``bpnet dataset_convert``: COCO keypoints -> TFRecords (+ loss masks).

Flow: read and validate the whole annotation file, pick the main persons
and build the sample list (main process, cheap); check the images
(existence of those in records always; decoding of every image with
--check_files, in worker processes); only
then write anything. Workers render masks and serialize and frame records
(no TensorFlow anywhere); the main process streams them into TFRecord files
under temporary names and renames them at the end, so a failed or interrupted run leaves no
complete-looking output. A re-run overwrites the records of the same prefix
(stale partitions/shards of an earlier layout are removed) and the masks.
The output prefix and the mask folder are locked for the run (bpnet.io.RunLock),
so two conversions never write (or clean up) the same files; a failed run removes
only the mask files it created.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import posixpath
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import BpnetError
from ..io import (LOCK_NAME, RunLock, missing_folders, output_lock, remove_empty_folders,
                  same_file)
from . import records as R

log = logging.getLogger("bpnet.dataset_convert")


# ------------------------------------------------------------------ worker side

def _worker_init():
    try:
        import cv2
        cv2.setNumThreads(1)  # one process per core already
    except Exception:  # pragma: no cover
        pass


def _check_image(job) -> Optional[str]:
    """'path: problem' for an image that is missing, empty, undecodable, corrupt (the
    decoder warned) or not the annotated size."""
    path, height, width, decode = job
    if not decode:  # a stat only: existence and a non-empty file
        import stat
        from .images import FOLDER_PROBLEM, open_problem
        try:
            st = os.stat(path)
        except OSError as e:
            return f"{path}: {open_problem(e)}"
        if stat.S_ISDIR(st.st_mode):
            return f"{path}: {FOLDER_PROBLEM}"
        return f"{path}: empty file (0 bytes)" if st.st_size == 0 else None
    from .images import read_image_file
    img, problem = read_image_file(path)
    if problem:
        return f"{path}: {problem}"
    if img.shape[:2] != (height, width):
        return f"{path}: size {img.shape[1]}x{img.shape[0]} differs from the annotated {width}x{height}"
    return None


def _convert_image(job) -> Tuple[bytes, int, Optional[str], bool]:
    """Frame one image's records and write its mask: (TFRecord bytes, count, mask written,
    whether the mask file is new: only new ones are removed when the run fails)."""
    (meta, joints, scales, centers, orders, mask_job) = job
    mask_written, created = None, False
    if mask_job is not None:
        from ..io import write_bytes_atomic
        from .masks import encode_mask_png, loss_mask
        mask_abs, crowd, unlabeled, labeled = mask_job
        m = loss_mask(meta["height"], meta["width"], crowd, unlabeled, labeled)
        created = not os.path.lexists(mask_abs)
        write_bytes_atomic(mask_abs, encode_mask_png(m))
        mask_written = mask_abs
    out = []
    for order in orders:
        rec = dict(meta)
        rec["joints"] = joints[order]
        rec["scales"] = scales[order]
        rec["centers"] = centers[order]
        out.append(R.frame_record(R.serialize_record(rec)))
    return b"".join(out), len(out), mask_written, created


# ------------------------------------------------------------------ helpers

def _map(fn, jobs: Sequence, workers: int, desc: str, status, unit="img"):
    """Ordered map over jobs with worker processes, a progress bar and status updates."""
    from tqdm import tqdm
    total = len(jobs)
    workers = min(workers, total)  # never more processes than jobs
    bar = tqdm(total=total, desc=desc, unit=unit, disable=None, file=sys.stderr, dynamic_ncols=True)
    try:
        if workers <= 1 or total < 2:
            _worker_init()
            for i, job in enumerate(jobs):
                yield fn(job)
                bar.update(1)
                if status is not None:
                    status.progress(i + 1, total, desc)
        else:
            # spawn, not fork: the caller may already hold TensorFlow's threads.
            ctx = mp.get_context("spawn")
            chunk = max(1, min(64, total // (workers * 8)))
            with ctx.Pool(workers, initializer=_worker_init) as pool:
                for i, res in enumerate(pool.imap(fn, jobs, chunksize=chunk)):
                    yield res
                    bar.update(1)
                    if status is not None:
                        status.progress(i + 1, total, desc)
    finally:
        bar.close()


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects container/taskset limits
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _probe_writable(folder: Path, what: str):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".bpnet-probe-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise BpnetError(f"{what} {folder} is not writable: {e.strerror or e}") from e


def _relpath(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else absolute.

    A folder outside the root stays absolute: "../" steps written relative to
    a root reached through a symbolic link would resolve elsewhere.
    """
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel == ".." or rel.startswith(".." + os.sep):
        return Path(os.path.abspath(path)).as_posix()
    return Path(rel).as_posix()


def _check_layout(num_partitions: int, num_shards: int, n_images: int):
    """Refuse folds or shards that would be empty, and more files than may be open at once."""
    shards = max(num_shards, 1)
    if num_partitions > n_images:
        raise BpnetError(f"-p/--num_partitions {num_partitions} is more than the {n_images} images "
                         f"that give records: {num_partitions - n_images} folds would be empty; "
                         f"use at most -p {n_images}")
    if num_partitions * shards > n_images:
        per = max(n_images // num_partitions, 1)
        raise BpnetError(f"-s/--num_shards {num_shards} x -p {num_partitions} = "
                         f"{num_partitions * shards} files for {n_images} images: some shards "
                         f"would be empty; use at most -s {per}")
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # not on a POSIX system
        soft = -1
    margin = 64  # the interpreter, worker pipes, the images being read
    if soft != -1 and soft != getattr(resource, "RLIM_INFINITY", -1) \
            and num_partitions * shards + margin > soft:
        raise BpnetError(f"-p {num_partitions} x -s {shards} = {num_partitions * shards} record "
                         f"files open at once exceed this process's open-file limit {soft} "
                         f"(less {margin} for everything else); use fewer, or raise the limit "
                         "(ulimit -n)")


def _check_outputs_are_not_inputs(prefix: Path, images_dir, masks_dir, ann_path,
                                  generate_masks: bool):
    """The records never go over the annotation file (a re-run removes record files of an
    earlier layout: the annotation file must not look like one); masks never into the images."""
    if os.path.abspath(prefix) == os.path.abspath(ann_path) or (
            Path(ann_path).name.startswith(prefix.name + "-fold-")
            and same_file(Path(ann_path).parent, prefix.parent)):
        raise BpnetError(f"output {prefix} would write over the annotation file {ann_path}; "
                         "choose another -o")
    if generate_masks and same_file(masks_dir, images_dir):
        raise BpnetError(f"mask_root_dir_path and images_root_dir_path are the same folder "
                         f"({images_dir}); masks would overwrite PNG images: use another folder")


def _stale_files(prefix: Path, keep: Sequence[str]) -> List[Path]:
    keep = {os.path.abspath(k) for k in keep}
    out = []
    for f in prefix.parent.glob(prefix.name + "-fold-*"):
        if R._FILE_RE.match(f.name[len(prefix.name):]) and os.path.abspath(f) not in keep:
            out.append(f)
    return out


# ------------------------------------------------------------------ main entry

def dataset_convert(dataset_spec_path, output_filename, mode: str = "train", num_partitions: int = 1,
                    num_shards: int = 0, generate_masks: bool = False, check_files: bool = False,
                    workers: int = 0, status=None) -> Dict[str, object]:
    """Convert one split of a COCO-format dataset into TFRecords (and masks).

    Returns a summary: records, images, masks, persons (labeled persons in
    the converted images), main_persons, skipped_images and the files written.
    """
    from ..specs import load_dataset_spec

    if mode not in ("train", "test"):
        raise BpnetError(f"mode must be 'train' or 'test', got {mode!r}")
    if num_partitions < 1 or num_shards < 0:
        raise BpnetError("num_partitions must be >= 1 and num_shards >= 0")
    cores = _usable_cores()
    if workers > 4 * cores:
        log.warning("--workers %d is more than 4 per core (%d cores): using %d", workers, cores,
                    4 * cores)
        workers = 4 * cores
    workers = workers or cores

    spec = load_dataset_spec(dataset_spec_path)
    pose = spec.pose_config()
    category = spec.category
    mapping = pose.dataset_mapping(category.keypoints)
    images_dir, masks_dir, ann_path = spec.split_paths(mode)
    root = Path(spec.root_directory_path)

    prefix = Path(output_filename).expanduser().absolute()
    if prefix.is_dir():
        raise BpnetError(f"output_filename {output_filename} is a folder; give a file prefix such as "
                         f"{Path(output_filename) / 'train'}")
    _probe_writable(prefix.parent, "output folder")
    _check_outputs_are_not_inputs(prefix, images_dir, masks_dir, ann_path, generate_masks)
    # One run at a time per output prefix and per mask folder (released on any exit).
    made = missing_folders(masks_dir)  # the mask folders this run makes
    try:
        with contextlib.ExitStack() as locks:
            # The prefix as given names it in messages; the lock file is the same either way.
            locks.enter_context(output_lock(Path(output_filename).expanduser(), "dataset_convert"))
            if generate_masks:
                _probe_writable(masks_dir, "mask folder")
                locks.enter_context(RunLock(Path(masks_dir) / LOCK_NAME,
                                            f"mask folder {masks_dir}", "dataset_convert"))
            return _convert_locked(spec, pose, category, mapping, images_dir, masks_dir,
                                   ann_path, root, prefix, output_filename, num_partitions,
                                   num_shards, generate_masks, check_files, workers, status)
    except BaseException:
        if generate_masks:  # the empty folders this run made
            remove_empty_folders(made)
        raise


def _convert_locked(spec, pose, category, mapping, images_dir, masks_dir, ann_path, root, prefix,
                    output_filename, num_partitions, num_shards, generate_masks, check_files,
                    workers, status):
    from .coco import DROP_RULES, make_samples, parse_coco, read_annotation_file

    t_start = time.perf_counter()
    doc = read_annotation_file(ann_path)
    stats: dict = {}
    images = parse_coco(doc, str(ann_path), category, spec.visibility_flags.table(), mapping,
                        check_segmentation=True, stats=stats)
    del doc
    samples = make_samples(images, spec.data_filtering_params,
                           spec.duplicate_data_with_each_person_as_center, stats=stats)
    if not samples:
        fp = spec.data_filtering_params
        raise BpnetError(
            f"{ann_path}: no main person in {len(images)} images, so there is nothing to convert "
            f"(data_filtering_params: min_acceptable_kpts {fp.min_acceptable_kpts}, "
            f"area >= {fp.min_acceptable_width} x {fp.min_acceptable_height}); check the keypoints and "
            "visibility_flags, or relax the filters")

    # Group samples per image, keeping the annotation file's image order.
    per_image: Dict[int, List] = {}
    for s in samples:
        per_image.setdefault(s.image.id, []).append(s.order)
    conv_images = [im for im in images if im.id in per_image]
    _check_layout(num_partitions, num_shards, len(conv_images))

    t_loaded = time.perf_counter()
    # Check images before writing anything: all problems reported at once.
    # --check_files decodes every image of the annotation file (a dataset
    # check); without it, the images that go into records must exist.
    img_dir = str(images_dir)
    checks = [(os.path.join(img_dir, im.file_name), im.height, im.width, check_files)
              for im in (images if check_files else conv_images)]
    if check_files:
        bad = [r for r in _map(_check_image, checks, workers, "checking images", status) if r]
    else:
        bad = [r for r in map(_check_image, checks) if r]
    if bad:
        listed = "; ".join(bad[:20]) + (f" (and {len(bad) - 20} more)" if len(bad) > 20 else "")
        raise BpnetError(f"{len(bad)} of {len(checks)} images are bad: {listed}")

    t_checked = time.perf_counter()
    needs_mask = sum(1 for im in conv_images if im.needs_mask)
    if not generate_masks and needs_mask:
        log.warning("%d images have crowd regions or persons without keypoints; without "
                    "--generate_masks their records carry no loss mask", needs_mask)

    dataset_name = spec.dataset
    rel_images, rel_masks, mask_dir = _relpath(images_dir, root), _relpath(masks_dir, root), str(masks_dir)
    jobs = []
    mask_owner: Dict[str, str] = {}  # mask file -> the image it is for
    mask_root = os.path.abspath(mask_dir)
    image_files = ({os.path.normpath(os.path.join(os.path.abspath(images_dir), im.file_name))
                    for im in images} if generate_masks else set())
    for im in conv_images:
        p = im.persons
        joints = np.stack([x.joints for x in p]).astype(np.float32)
        scales = np.array([x.scale for x in p], np.float32)
        centers = np.stack([x.center for x in p]).astype(np.float32)
        mask_job, mask_rel = None, ""
        if generate_masks and im.needs_mask:
            mask_name = os.path.splitext(im.file_name)[0] + ".png"
            mask_rel = posixpath.normpath(posixpath.join(rel_masks, mask_name))
            mask_abs = os.path.normpath(os.path.join(mask_root, mask_name))
            if not mask_abs.startswith(mask_root + os.sep):
                raise BpnetError(f"{ann_path}: image id {im.id}: its mask {mask_abs} would lie "
                                 f"outside the mask folder {mask_dir} (file_name "
                                 f"{im.file_name!r}); masks are only written inside it")
            if mask_abs in mask_owner:
                raise BpnetError(f"{ann_path}: images {mask_owner[mask_abs]!r} and "
                                 f"{im.file_name!r} would share the mask file {mask_abs}; "
                                 "rename one of them")
            if mask_abs in image_files:
                raise BpnetError(f"{ann_path}: the mask of image id {im.id} would be written over "
                                 f"the image {mask_abs}; choose a mask folder apart from the images")
            mask_owner[mask_abs] = im.file_name
            mask_job = (mask_abs, im.crowd_segs, im.unlabeled_segs, im.labeled_segs)
        meta = {"image_id": im.id, "height": im.height, "width": im.width,
                "image_path": posixpath.normpath(posixpath.join(rel_images, im.file_name)),
                "mask_path": mask_rel, "dataset": dataset_name, "pose_config": pose.record_tag}
        jobs.append((meta, joints, scales, centers, per_image[im.id], mask_job))

    # Outputs: partition by image (an image's duplicates stay in one fold),
    # then shard round-robin within the partition.
    shards = max(num_shards, 1)
    names = [[R.record_filename(str(prefix), p, num_partitions, s, num_shards) for s in range(shards)]
             for p in range(num_partitions)]
    fill = [0] * num_partitions
    target = []
    for i in range(len(jobs)):
        p = i % num_partitions
        target.append((p, fill[p] % shards))
        fill[p] += 1

    # Leftovers of a killed run (hidden *.tmp files never look complete, but
    # should not pile up either).
    leftovers = list(prefix.parent.glob(f".{prefix.name}-fold-*.tmp"))
    if generate_masks and masks_dir.is_dir():
        leftovers += list(masks_dir.rglob(".*.png.*.tmp"))
    for f in leftovers:
        with contextlib.suppress(OSError):
            f.unlink()

    written_masks: List[str] = []
    created_masks: List[str] = []  # new files of this run: the only masks a failure removes
    tmp_paths: Dict[Tuple[int, int], str] = {}
    writers: Dict[Tuple[int, int], object] = {}
    counts = np.zeros((num_partitions, shards), np.int64)
    ok = False
    try:
        for p in range(num_partitions):
            for s in range(shards):
                fd, tmp = tempfile.mkstemp(prefix=f".{Path(names[p][s]).name}.", suffix=".tmp",
                                           dir=prefix.parent)
                os.close(fd)
                tmp_paths[(p, s)] = tmp
                writers[(p, s)] = open(tmp, "wb", buffering=1 << 20)
        results = _map(_convert_image, jobs, workers, "converting", status)
        for i, (data, n, mask, created) in enumerate(results):
            if mask:
                written_masks.append(mask)
                if created:
                    created_masks.append(mask)
            key = target[i]
            writers[key].write(data)
            counts[key] += n
        for w in writers.values():
            w.close()
        writers.clear()
        from ..io import _UMASK
        for (p, s), tmp in tmp_paths.items():
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, names[p][s])
        ok = True
    finally:
        for w in writers.values():
            with contextlib.suppress(Exception):
                w.close()
        if not ok:
            for tmp in tmp_paths.values():
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            # Masks this failed run created go too; masks that were there before (an
            # earlier run's, which its records use) stay.
            for m in created_masks:
                with contextlib.suppress(OSError):
                    os.unlink(m)

    files = [n for row in names for n in row]
    for stale in _stale_files(prefix, files):
        with contextlib.suppress(OSError):
            stale.unlink()
            log.info("removed stale record file %s", stale)

    n_records = int(counts.sum())
    t_end = time.perf_counter()
    summary = {
        "records": n_records,
        "images": len(conv_images),
        "masks": len(written_masks),
        "persons": int(sum(len(im.persons) for im in conv_images)),
        "main_persons": int(stats["main_persons"]),
        "skipped_images": len(images) - len(conv_images),
        "annotations": int(stats["annotations"]),
        # Annotations whose joints are in no record, per rule (crowd regions and persons
        # without keypoints still shape the loss masks).
        "dropped_annotations": {k: int(stats[k]) for k in DROP_RULES},
        # Labeled persons that are in records but never as the main person, per rule.
        "not_main_persons": {k: int(v) for k, v in stats["not_main_persons"].items()},
        "files": files,
        # Serial part (reading, validating, selecting) vs the parallel parts, for scaling estimates.
        "timings_s": {"load": round(t_loaded - t_start, 3), "check": round(t_checked - t_loaded, 3),
                      "convert": round(t_end - t_checked, 3)},
        "workers": workers,
    }
    dropped = summary["dropped_annotations"]
    log.info("%d annotations: %d main persons; dropped %s; not main (kept as other persons) %s",
             summary["annotations"], summary["main_persons"],
             ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in dropped.items()) or "none",
             ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in summary["not_main_persons"].items()))
    log.info("wrote %d records of %d images (%d masks) to %s", n_records, len(conv_images),
             len(written_masks), ", ".join(files))
    return summary

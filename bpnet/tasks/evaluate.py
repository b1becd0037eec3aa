"""``bpnet evaluate``: COCO keypoint AP/AR of a model on a dataset's test split.

Every image of the dataset spec's test_data goes through the detection loop
that ``bpnet inference`` runs (bpnet.infer.detect: batched through the
Predictor, single-scale, multi-scale or strict, whatever the inference spec
says; any model file the runners load). Detected people come back in the
model's joints and original-image pixels; they are mapped onto the dataset's
keypoints by name (COCO: the synthetic neck is dropped) and scored with
pycocotools' COCOeval on keypoints. Images missing or unreadable are left
out of the metrics, counted and listed under "skipped".

Outputs in the results dir (each written atomically):
- ``detections.json``: TAO's layout (bpnet.infer.outputs), model joints per
  person with (0, 0) for a missing joint;
- ``detections_coco_format.json``: COCO result entries in the dataset's
  keypoints;
- ``results.csv``: one KPI per row, then the timings;
- ``status.json``: the KPIs under "kpi", image counts, and the timings as
  ``bpnet inference`` reports them (ms_per_image and each step's median ms,
  after one untimed warm-up picture).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import logging
from pathlib import Path
from typing import Optional

from ..errors import BpnetError

log = logging.getLogger("bpnet.evaluate")

# COCOeval's stats order for keypoints, under TAO's KPI names.
KPI_NAMES = (
    "AP_0.50:0.95_all", "AP_0.5", "AP_0.75", "AP_0.50:0.95_medium", "AP_0.50:0.95_large",
    "AR_0.50:0.95_all", "AR_0.5", "AR_0.75", "AR_0.50:0.95_medium", "AR_0.50:0.95_large",
)


@contextlib.contextmanager
def _quiet_stdout():
    """pycocotools prints progress to stdout; keep it for --log_level DEBUG only."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    text = buf.getvalue().strip()
    if text:
        log.debug("%s", text)


def load_ground_truth(dataset_spec_path):
    """(dataset spec, COCO object, images dir) of the spec's test_data, validated.

    The annotation file goes through the ground-truth validator that
    dataset_convert uses (bpnet.data.coco.parse_coco): NaN or string keypoints,
    duplicate image or annotation ids, ... are refused, naming the file and ids.
    """
    from pycocotools.coco import COCO

    from ..data.coco import parse_coco, read_annotation_file
    from ..specs import load_dataset_spec

    spec = load_dataset_spec(dataset_spec_path)
    if spec.test_data is None:
        raise BpnetError(f"{dataset_spec_path}: the dataset spec has no test_data section; add "
                         "test_data {images_root_dir_path, annotation_root_dir_path} to evaluate")
    images_dir, _, ann_path = spec.split_paths("test")
    doc = read_annotation_file(ann_path)  # missing, a folder, not JSON, not COCO-shaped
    cat = spec.category
    cats = {c.get("id"): c for c in doc.get("categories") or [] if isinstance(c, dict)}
    if cat.id not in cats:
        raise BpnetError(f"{ann_path}: no category id {cat.id} ({cat.name}) as the dataset spec "
                         f"{dataset_spec_path} names; the file has {sorted(map(str, cats))}")
    file_kps = cats[cat.id].get("keypoints")
    if file_kps and list(file_kps) != list(cat.keypoints):
        raise BpnetError(f"{ann_path}: the category's keypoints {file_kps} differ from the dataset "
                         f"spec's {list(cat.keypoints)} ({dataset_spec_path})")
    parse_coco(doc, str(ann_path), cat, spec.visibility_flags.table(), None,
               check_segmentation=True, for_evaluation=True)
    coco = COCO()
    coco.dataset = doc
    with _quiet_stdout():
        coco.createIndex()
    return spec, coco, images_dir


def listed_images(coco, images_dir) -> tuple[list, list]:
    """(present, missing): an Item (image_id = the COCO id) per image of the annotations, by
    image id, split by whether its file exists under ``images_dir``."""
    from ..infer.sources import Item
    present, missing = [], []
    for iid in sorted(coco.getImgIds()):
        path = Path(images_dir) / coco.imgs[iid]["file_name"]
        (present if path.is_file() else missing).append(Item(str(path), path, int(iid)))
    return present, missing


def check_pose_matches(pose, dataset_keypoints, dataset_spec_path, model_desc):
    """The model's joints must cover the dataset's keypoints (by name): one clear message."""
    try:
        mapping = pose.dataset_mapping(dataset_keypoints)
    except BpnetError as e:
        raise BpnetError(f"model {model_desc} (pose config {pose.name!r}) does not match the "
                         f"dataset of {dataset_spec_path}: {e}") from e
    missing = [k for k, j in zip(dataset_keypoints, mapping.to_dataset) if j is None]
    if missing:
        raise BpnetError(f"model {model_desc} (pose config {pose.name!r}) does not predict the "
                         f"dataset keypoints {missing} of {dataset_spec_path}; evaluate it on a "
                         "dataset with its own keypoints")
    return mapping


def run_cocoeval(coco_gt, results, image_ids):
    """COCOeval on keypoints over ``image_ids``; returns {KPI name: value}."""
    from pycocotools.cocoeval import COCOeval
    if not results:
        log.warning("no person detected on any image: every KPI is 0")
        return {k: 0.0 for k in KPI_NAMES}
    with _quiet_stdout():
        # loadRes rewrites each entry's bbox and area from all keypoints,
        # (0, 0) of missing joints included; keep the caller's entries intact.
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, "keypoints")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where a bucket has no ground truth (e.g. no medium persons).
    return {k: float(v) for k, v in zip(KPI_NAMES, ev.stats)}


def size_mismatch(coco, image_id, hw) -> Optional[str]:
    """Why a picture of ``hw`` (height, width) does not fit its annotation; None if it does
    (or the annotation gives no size)."""
    entry = coco.imgs.get(image_id, {})
    want = entry.get("height"), entry.get("width")
    if None in want or tuple(int(v) for v in want) == tuple(hw):
        return None
    return f"{hw[1]}x{hw[0]} pixels, but the annotations say {want[1]}x{want[0]}"


def format_table(kpi: dict, extra: Optional[dict] = None) -> str:
    rows = list(kpi.items()) + list((extra or {}).items())
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for k, v in rows:
        lines.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)


def _check_people_to_score(coco, image_ids, dataset_spec_path, which: str = ""):
    """COCO's keypoint metrics score non-crowd people with at least one labelled keypoint;
    without one among ``image_ids`` every metric is -1: an error, not a result."""
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_ids))
    if not any(a.get("num_keypoints", 0) > 0 and not a.get("iscrowd") for a in anns):
        raise BpnetError(f"{dataset_spec_path}: the {len(image_ids)} {which}test images hold no "
                         f"person with labelled keypoints (none of their {len(anns)} "
                         "annotations is a non-crowd person with keypoints): nothing to score")


def evaluate(inference_spec_path, dataset_spec_path, results_dir, model_path=None, key=None,
             status=None, show_progress: bool = True, batch_size: int = 4,
             runtime=None, precision=None) -> dict:
    """The ``bpnet evaluate`` task body; returns the summary stored in status.json.

    ``batch_size``: pictures per network call, as in ``bpnet inference``. ``runtime``,
    ``precision``: override the spec's runtime and inference_precision. The pictures run
    one at a time, so the spec's ``streams`` does not apply.
    """
    from tqdm import tqdm

    from ..infer.detect import RunTimer, detect
    from ..infer.outputs import coco_results, image_entry, spec_doc, write_detections
    from ..infer.predictor import Predictor
    from ..infer.preprocess import ImageReadError, read_image
    from ..io import atomic_path
    from ..specs import load_inference_spec
    from ..tao_files import checked_model_path

    infer_spec = load_inference_spec(inference_spec_path)
    if model_path is None and infer_spec.model_path is None:
        raise BpnetError(f"{inference_spec_path}: no model: give -m/--model_filename or set model_path")
    # TAO's names of bpnet files (bpnet_model.hdf5) stand for them; TAO's own models cannot load.
    what = "-m" if model_path is not None else f"{inference_spec_path}: model_path"
    model_path = checked_model_path(model_path or infer_spec.model_path, what)
    spec, coco, images_dir = load_ground_truth(dataset_spec_path)
    cat = spec.category

    image_ids = sorted(coco.getImgIds())
    if not image_ids:
        raise BpnetError(f"{dataset_spec_path}: the test annotation file lists no images")
    present, missing = listed_images(coco, images_dir)
    if missing:
        names = ", ".join(it.file.name for it in missing[:3])
        log.warning("%d of %d images named by the annotations are missing under %s (e.g. %s); "
                    "they are skipped and left out of the metrics", len(missing), len(image_ids),
                    images_dir, names)
    if not present:
        raise BpnetError(f"{dataset_spec_path}: none of the {len(image_ids)} test images exist "
                         f"under {images_dir}; check root_directory_path and images_root_dir_path")
    _check_people_to_score(coco, [it.image_id for it in present], dataset_spec_path)

    predictor = Predictor(infer_spec, model_path=model_path, key=key, batch_size=batch_size,
                          runtime=runtime, precision=precision, streams=1)
    model_desc = str(model_path or infer_spec.model_path)
    mapping = check_pose_matches(predictor.pose, list(cat.keypoints), dataset_spec_path, model_desc)

    # One untimed run first: graph tracing and the decoder's JIT compilation
    # happen once per process and would otherwise be billed to the first image.
    try:
        predictor.predict(read_image(present[0].file))
    except ImageReadError:
        pass  # reported with the other images below

    det_images, coco_dets, evaluated = [], [], []
    skipped = [{"path": it.path, "reason": "file not found"} for it in missing]
    unreadable = resized = 0
    timer = RunTimer()
    bar = tqdm(total=len(present), desc="evaluate", unit="img", disable=not show_progress)
    for n, d in enumerate(detect(predictor, present, batch_size), start=1):
        wrong_size = d.ok and size_mismatch(coco, d.item.image_id, d.image.shape[:2])
        if wrong_size:
            # The keypoints are in the annotated picture's pixels: a resized or another picture
            # would be scored against the wrong places.
            log.warning("%s: %s; skipped", d.item.path, wrong_size)
            skipped.append({"path": d.item.path, "reason": wrong_size})
            resized += 1
        elif d.ok:
            timer.add(d.timings)
            det_images.append(image_entry(d.item.path, d.people, image_id=d.item.image_id,
                                          hw=d.image.shape[:2]))
            coco_dets.extend(coco_results(d.people, d.item.image_id, mapping, cat.id))
            evaluated.append(d.item.image_id)
        else:
            log.warning("%s; skipped", d.error)
            skipped.append({"path": d.item.path, "reason": d.error})
            unreadable += 1
        bar.update(1)
        if status is not None:
            status.progress(n, len(present), message=f"evaluating {d.item.file.name}")
    bar.close()
    if not evaluated:
        why = (f"{resized} differ in size from their annotations (resized copies?)" if resized
               else "none could be decoded")
        raise BpnetError(f"none of the test images under {images_dir} could be evaluated: {why}")
    timing = timer.summary()
    _check_people_to_score(coco, evaluated, dataset_spec_path, "evaluated ")

    kpi = run_cocoeval(coco, coco_dets, evaluated)
    print(format_table(kpi, timing), flush=True)

    results = Path(results_dir)
    write_detections(results, predictor.pose, spec_doc(predictor, inference_spec_path),
                     det_images, coco_dets, skipped)
    with atomic_path(results / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "value"])
        for k, v in kpi.items():
            w.writerow([k, f"{v:.6f}"])
        for k, v in timing.items():
            w.writerow([k, f"{v:.2f}"])
    log.info("evaluated %d images (%d missing, %d unreadable, %d of another size): AP %.4f, "
             "AP50 %.4f, AR %.4f; median network %.1f ms, decoding %.1f ms per image",
             len(evaluated), len(missing), unreadable, resized, kpi["AP_0.50:0.95_all"],
             kpi["AP_0.5"], kpi["AR_0.50:0.95_all"], timing["network_ms_median"],
             timing["decode_ms_median"])
    return {"kpi": kpi, "images_evaluated": len(evaluated), "images_missing": len(missing),
            "images_unreadable": unreadable, "images_wrong_size": resized,
            "detections": len(coco_dets), **timing,
            **predictor.runner.described}

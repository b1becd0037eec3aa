"""Validation AP during training: COCO keypoint AP of the model being trained.

The loss says how close the maps come to the labels; AP says whether the
people come out. At every validation the model in memory (no file written)
runs through the detection loop of ``bpnet evaluate`` (Predictor over a
KerasRunner that shares the training model's weights, the decoder, COCOeval
on keypoints), on the images of the val split's ground truth.

Where the ground truth comes from: the val records are written by
``dataset_convert -m test`` from a dataset spec, so the spec's
``dataloader.dataset_config.dataset_specs`` names it. AP is measured when
exactly one of them is the val records' dataset (by the records' dataset
name when there are several), it has a readable test annotation file (read
and validated as ``bpnet evaluate -d`` reads it) with at least one labeled
person, its test images are there, and the first val record's image is one
of them. Otherwise one info line says why and validation measures the loss
only. ``validation_ap_max_images`` (bpnet extension) caps the images (the
first by image id; 0 turns AP off).

Inference settings: the train spec's ``inference_spec`` when set (TAO's key),
else bpnet's default inference spec; the network input height is the
training image_dims height and the normalization the train spec's (from the
run's model meta).

The best-AP model is kept as ``best_model.keras`` in the results dir
(``keep_best``): written when a validation's AP beats every earlier one of
the run (the first measured AP always), never replaced by a worse epoch;
on resume the earlier APs come back with the checkpoint's val_history.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import BpnetError

log = logging.getLogger("bpnet.train")

BEST_MODEL_NAME = "best_model.keras"
#: Network inputs per call: the val images are few, a small batch keeps memory low.
BATCH_SIZE = 8


# ------------------------------------------------------------------ the best model

def best_entry(history: list[dict]) -> dict | None:
    """The val_history entry with the highest AP (the earliest on ties); None without any."""
    best = None
    for h in history:
        ap = h.get("ap")
        if ap is not None and (best is None or ap > best["ap"]):
            best = h
    return best


def keep_best(path: Path, val: dict, earlier: list[dict],
              save: Callable[[Path, dict], None]) -> bool:
    """Write the best-AP model as ``path`` when ``val``'s AP beats every AP in ``earlier``
    (the run's previous validations); returns whether it was written.

    ``save(path, best)`` writes the model file (atomically) with ``best``
    ({"epoch", "ap", "ap50"}) in its meta. A validation without AP changes nothing.
    """
    ap = val.get("ap")
    if ap is None:
        return False
    prev = best_entry(earlier)
    if prev is not None and not ap > prev["ap"]:
        return False
    save(Path(path), {"epoch": int(val["epoch"]), "ap": float(ap),
                      "ap50": None if val.get("ap50") is None else float(val["ap50"])})
    if prev is None:
        log.info("best model %s: epoch %d, AP %.4f", Path(path).name, val["epoch"], ap)
    else:
        log.info("best model %s: epoch %d, AP %.4f (was %.4f at epoch %d)", Path(path).name,
                 val["epoch"], ap, prev["ap"], prev["epoch"])
    return True


# ------------------------------------------------------------------ measuring

@dataclasses.dataclass
class ValAP:
    """The val split's ground truth and a Predictor over the model in training."""

    predictor: object  # bpnet.infer.predictor.Predictor
    coco: object  # pycocotools COCO of the test annotations
    items: list  # bpnet.infer.sources.Item per image, image_id = the COCO id
    mapping: object  # model joints -> dataset keypoints
    category_id: int
    source: str  # the dataset spec file

    def measure(self) -> dict:
        """{"ap", "ap50", "ap_images", "ap_seconds"}: COCO keypoint AP (0.50:0.95), AP at
        OKS 0.5, the images scored and the seconds it took."""
        import time

        from ..infer.detect import detect
        from ..infer.outputs import coco_results
        from ..tasks.evaluate import run_cocoeval
        t0 = time.perf_counter()
        results, evaluated = [], []
        for d in detect(self.predictor, self.items, self.predictor.batch_size):
            if not d.ok:
                log.debug("validation AP: %s; skipped", d.error)
                continue
            results.extend(coco_results(d.people, d.item.image_id, self.mapping,
                                        self.category_id))
            evaluated.append(d.item.image_id)
        if not evaluated:
            raise BpnetError(f"validation AP: none of the {len(self.items)} test images of "
                             f"{self.source} could be read")
        if results:
            kpi = run_cocoeval(self.coco, results, evaluated)
            ap, ap50 = max(kpi["AP_0.50:0.95_all"], 0.0), max(kpi["AP_0.5"], 0.0)
        else:  # nobody detected (an untrained model): AP 0, without COCOeval's warning
            ap = ap50 = 0.0
        return {"ap": ap, "ap50": ap50, "ap_images": len(evaluated),
                "ap_seconds": round(time.perf_counter() - t0, 2)}


def inference_settings(spec):
    """The InferenceSpec validation AP decodes with: the train spec's inference_spec, else
    bpnet's default, at the training image size, run by Keras on the model in memory."""
    from ..specs import load_inference_spec
    default = Path(__file__).resolve().parent.parent / "configs" / "infer_default.yaml"
    path = spec.inference_spec
    if path and not Path(path).is_file():
        log.warning("inference_spec %s not found; validation AP uses bpnet's default "
                    "inference settings (%s)", path, default.name)
        path = None
    ispec = load_inference_spec(path or default)
    d = spec.dataloader.image_config.image_dims
    return dataclasses.replace(ispec, input_shape=[int(d.height), int(d.width)],
                               model_path=None, train_spec=None, runtime="keras")


def _first_val_records(spec, spec_path) -> list[dict]:
    """The first record of each val record file (files without records left out)."""
    from ..data.records import first_record, split_files
    firsts = (first_record(f) for f in
              split_files(spec.dataloader.dataset_config, "val", source=str(spec_path)))
    return [rec for rec in firsts if rec is not None]


def _choose_dataset_spec(spec, spec_path) -> tuple[str | None, str]:
    """(dataset spec file of the val records, "") or (None, why there is none)."""
    from ..specs import load_dataset_spec
    entries = spec.dataloader.dataset_config.dataset_specs
    if not entries:
        return None, ("the train spec sets no dataloader.dataset_config.dataset_specs to take "
                      "the val split's ground truth from")
    files = {}
    for name, path in entries.items():
        try:
            ds = load_dataset_spec(path)
        except BpnetError as e:
            return None, f"dataset spec {name!r} cannot be read ({e})"
        files.setdefault(str(Path(path).resolve()), set()).update({name, ds.dataset})
    if len(files) == 1:
        return next(iter(files)), ""
    names = {rec["dataset"] for rec in _first_val_records(spec, spec_path)}
    match = [f for f, known in files.items() if known & names]
    if len(match) != 1:
        return None, (f"dataset_specs names {len(files)} datasets and the val records "
                      f"(datasets {sorted(names)}) match {len(match)} of them; validation AP "
                      "needs the one dataset the val records come from")
    return match[0], ""


def make_val_ap(spec, spec_path, model, meta: dict) -> ValAP | None:
    """Validation AP for the model in training, or None (after one info line saying why)
    when the val split's ground truth is not available.

    ``spec``: the TrainSpec; ``meta``: the run's model meta (pose config,
    normalization, stride). A bad inference_spec file is a BpnetError.
    """
    cap = spec.validation_ap_max_images
    if cap == 0:
        log.info("validation AP is off (validation_ap_max_images: 0); validation measures "
                 "the loss only")
        return None
    ispec = inference_settings(spec)  # the user's file: errors are theirs to fix
    found = _ground_truth(spec, spec_path, meta)
    if isinstance(found, str):
        log.info("validation AP is off: %s; validation measures the loss only", found)
        return None
    ds_path, coco, items, mapping, cat_id = found
    if cap is not None and len(items) > cap:
        log.info("validation AP on the first %d of the %d test images of %s "
                 "(validation_ap_max_images)", cap, len(items), ds_path)
        items = items[:cap]
    from ..infer.predictor import Predictor
    from ..infer.runners import KerasRunner
    runner = KerasRunner.from_model(model, meta, stage=ispec.output_stage_to_use,
                                    source="the model in training")
    predictor = Predictor(ispec, runner=runner, batch_size=BATCH_SIZE)
    log.info("validation AP on %d images of %s at %dx%d input (%s)", len(items), ds_path,
             *ispec.input_shape, spec.inference_spec or "bpnet's default inference settings")
    return ValAP(predictor=predictor, coco=coco, items=items, mapping=mapping,
                 category_id=cat_id, source=ds_path)


def _ground_truth(spec, spec_path, meta):
    """(dataset spec, COCO, Items, mapping, category id), or why there is none (a str)."""
    from ..model.meta import parse_meta
    from ..tasks.evaluate import check_pose_matches, listed_images, load_ground_truth
    ds_path, why = _choose_dataset_spec(spec, spec_path)
    if ds_path is None:
        return why
    try:
        ds, coco, images_dir = load_ground_truth(ds_path)
    except BpnetError as e:
        return f"no test-split ground truth ({e})"
    anns = [a for a in coco.dataset.get("annotations") or [] if a.get("num_keypoints", 0) > 0]
    if not anns:
        return f"the test annotations of {ds_path} label no person's keypoints"
    items, absent = listed_images(coco, images_dir)
    missing = len(absent)
    if not items:
        return f"none of the test images of {ds_path} exist under {images_dir}"
    if missing:
        log.info("validation AP: %d of the %d test images of %s are missing under %s; AP "
                 "is measured on the others", missing, missing + len(items), ds_path, images_dir)
    firsts = _first_val_records(spec, spec_path)
    first = (os.path.normpath(os.path.join(ds.root_directory_path, firsts[0]["image_path"]))
             if firsts else None)
    if first is not None and first not in {os.path.normpath(str(it.file)) for it in items}:
        return (f"the val records are not the test split of {ds_path} (their first image "
                f"{first} is not one of its test images)")
    pose = parse_meta(meta, "the model in training").pose
    try:
        mapping = check_pose_matches(pose, list(ds.category.keypoints), ds_path,
                                     "in training")
    except BpnetError as e:
        return str(e)
    return ds_path, coco, items, mapping, ds.category.id

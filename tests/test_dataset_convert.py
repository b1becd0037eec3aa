"""dataset_convert on real COCO (../shared/data/coco_tiny) and on bad inputs.

Expectations are derived in this file from the raw annotation JSON by the
rules of TAO's COCO conversion (main persons, masks; docs/dataset_convert.md),
independently of bpnet.data.coco.
"""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from bpnet.data import records as R
from bpnet.data.convert import dataset_convert
from bpnet.data.masks import read_mask
from bpnet.data.synthetic import make_sample_dataset
from bpnet.errors import BpnetError

from conftest import COCO_TINY, REPO, invoke, need

COCO_NAMES = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
              "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
              "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]
MODEL_NAMES = ["nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder",
               "left_elbow", "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip",
               "left_knee", "left_ankle", "right_eye", "left_eye", "right_ear", "left_ear"]


# ------------------------------------------------------------------ the rules, written again

def expected_joints(kps17):
    """COCO 17 keypoints -> the 18 model joints, neck only when both shoulders are labeled."""
    k = np.asarray(kps17, float).reshape(17, 3)
    out = np.zeros((18, 3))
    for j, name in enumerate(MODEL_NAMES):
        if name == "neck":
            ls, rs = k[COCO_NAMES.index("left_shoulder")], k[COCO_NAMES.index("right_shoulder")]
            if ls[2] > 0 and rs[2] > 0:
                out[j] = [(ls[0] + rs[0]) / 2, (ls[1] + rs[1]) / 2, min(ls[2], rs[2])]
        else:
            src = k[COCO_NAMES.index(name)]
            if src[2] > 0:
                out[j] = src
    return out


def expected_samples(doc, min_kpts=5, min_w=32, min_h=32, ratio=0.3, duplicate=True):
    """{image_id: [ [annotation, ...] per record, main first ]}."""
    by_image = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    out = {}
    for im in doc["images"]:
        anns = by_image.get(im["id"], [])
        labeled = [a for a in anns if not a["iscrowd"] and a["num_keypoints"] > 0]
        mains, centres = [], []
        for a in labeled:
            x, y, w, h = a["bbox"]
            if a["num_keypoints"] < min_kpts or a["area"] < min_w * min_h:
                continue
            c = (x + w / 2, y + h / 2)
            if any(math.dist(c, pc) < ratio * ps for pc, ps in centres):
                continue
            mains.append(a)
            centres.append((c, max(w, h)))
        if not mains:
            continue
        heads = mains if duplicate else mains[:1]
        out[im["id"]] = [[m] + [a for a in labeled if a is not m] for m in heads]
    return out


def expected_mask(im, anns):
    h, w = im["height"], im["width"]

    def union(sel):
        m = np.zeros((h, w), bool)
        for a in sel:
            seg = a["segmentation"]
            if isinstance(seg, dict):
                rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
            else:
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            m |= mask_utils.decode(rle).astype(bool)
        return m

    crowd = union([a for a in anns if a["iscrowd"]])
    labeled = union([a for a in anns if not a["iscrowd"] and a["num_keypoints"] > 0])
    unlabeled = union([a for a in anns if not a["iscrowd"] and a["num_keypoints"] == 0])
    return (~((crowd & ~labeled) | unlabeled)).astype(np.uint8)


# ------------------------------------------------------------------ fixtures

def coco_spec(tmp_path, **over):
    spec = json.loads((REPO / "data_pose_config" / "coco_spec.json").read_text())
    spec["root_directory_path"] = str(COCO_TINY)
    # Masks go to the test's folder: nothing is ever written into ../shared.
    spec["train_data"]["mask_root_dir_path"] = str(tmp_path / "masks_train")
    spec["test_data"]["mask_root_dir_path"] = str(tmp_path / "masks_val")
    spec.pop("pose_config_path", None)
    spec.update(over)
    path = tmp_path / "coco_tiny_spec.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="module")
def tiny_train():
    need(COCO_TINY)
    return json.loads((COCO_TINY / "annotations" / "person_keypoints_train2017.json").read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_train):
    tmp = tmp_path_factory.mktemp("coco_tiny")
    spec = coco_spec(tmp)
    summary = dataset_convert(spec, tmp / "rec" / "train", mode="train", generate_masks=True,
                              check_files=True, workers=2)
    return tmp, summary, list(R.read_records(tmp / "rec" / "train"))


# ------------------------------------------------------------------ real COCO

def test_record_count_equals_main_persons(converted, tiny_train):
    _, summary, recs = converted
    exp = expected_samples(tiny_train)
    n_exp = sum(len(v) for v in exp.values())
    assert n_exp > 20  # coco_tiny has real multi-person images
    assert len(recs) == n_exp == summary["records"]
    assert summary["images"] == len(exp)
    per_image = {}
    for r in recs:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert per_image == {k: len(v) for k, v in exp.items()}


def test_joints_equal_annotations_with_neck_rule(converted, tiny_train):
    _, _, recs = converted
    exp = expected_samples(tiny_train)
    images = {im["id"]: im for im in tiny_train["images"]}
    seen = {}
    necks_missing = 0
    for r in recs:
        iid = r["image_id"]
        k = seen.get(iid, 0)
        seen[iid] = k + 1
        anns = exp[iid][k]  # records of an image come in main-person order
        im = images[iid]
        assert (r["height"], r["width"]) == (im["height"], im["width"])
        assert r["image_path"] == f"train2017/{im['file_name']}"
        assert r["dataset"] == "coco" and r["pose_config"].split("@")[0] == "bpnet_18joints"
        assert r["num_joints"] == 18 and r["num_persons"] == len(anns)
        want = np.stack([expected_joints(a["keypoints"]) for a in anns])
        np.testing.assert_allclose(r["joints"], want, atol=1e-3)
        np.testing.assert_allclose(r["scales"], [a["bbox"][3] for a in anns], atol=1e-3)
        np.testing.assert_allclose(
            r["centers"], [[a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2]
                           for a in anns], atol=1e-3)
        necks_missing += int(np.sum((want[:, 1, 2] == 0) & (want[:, 0:, 2].max(1) > 0)))
    # Real data has persons with a shoulder missing: the neck rule was exercised.
    assert necks_missing > 0


def test_masks_match_pycocotools(converted, tiny_train):
    tmp, summary, recs = converted
    images = {im["id"]: im for im in tiny_train["images"]}
    by_image = {}
    for a in tiny_train["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    crowd_checked = unlabeled_checked = 0
    mask_files = set()
    for r in recs:
        im, anns = images[r["image_id"]], by_image[r["image_id"]]
        want = expected_mask(im, anns)
        if r["mask_path"] == "":
            assert want.all(), "an image that needs a mask got none"
            continue
        path = Path(os.path.normpath(COCO_TINY / r["mask_path"]))
        assert path.parent == tmp / "masks_train" and path.name == Path(im["file_name"]).stem + ".png"
        mask_files.add(path)
        got = read_mask(path)
        assert got.shape == (im["height"], im["width"])
        np.testing.assert_array_equal(got, want)
        crowd_checked += any(a["iscrowd"] for a in anns)
        unlabeled_checked += any(not a["iscrowd"] and a["num_keypoints"] == 0 for a in anns)
    assert crowd_checked > 0 and unlabeled_checked > 0
    assert len(mask_files) == summary["masks"]
    assert set((tmp / "masks_train").iterdir()) == mask_files
    raw = np.unique(__import__("cv2").imread(str(next(iter(mask_files))), 0))
    assert set(raw.tolist()) <= {0, 255}


def test_parse_record_in_tensorflow(converted):
    tf = pytest.importorskip("tensorflow")
    tmp, _, recs = converted
    files = R.record_files(tmp / "rec" / "train")
    for f in files:
        R.check_frame(f)  # our CRCs are the ones TFRecord readers verify
    parsed = list(tf.data.TFRecordDataset(files).map(R.parse_record))
    assert len(parsed) == len(recs)
    for p, r in zip(parsed, recs):
        assert p["joints"].shape == r["joints"].shape
        np.testing.assert_array_equal(p["joints"].numpy(), r["joints"])
        np.testing.assert_array_equal(p["centers"].numpy(), r["centers"])
        assert p["mask_path"].numpy().decode() == r["mask_path"]
        assert int(p["image_id"]) == r["image_id"]


def test_one_record_per_image_without_duplication(tmp_path, tiny_train):
    spec = coco_spec(tmp_path, duplicate_data_with_each_person_as_center=False)
    s = dataset_convert(spec, tmp_path / "train", workers=1)
    exp = expected_samples(tiny_train, duplicate=False)
    recs = list(R.read_records(tmp_path / "train"))
    assert len(recs) == s["records"] == len(exp)
    for r in recs:
        want = np.stack([expected_joints(a["keypoints"]) for a in exp[r["image_id"]][0]])
        np.testing.assert_allclose(r["joints"], want, atol=1e-3)
        assert r["mask_path"] == ""  # no --generate_masks


def test_partitions_and_shards(tmp_path, converted):
    _, _, all_recs = converted
    spec = coco_spec(tmp_path)
    out = tmp_path / "p" / "train"
    # A previous single-file layout must not survive a re-run with shards.
    dataset_convert(spec, out, workers=1)
    assert (tmp_path / "p" / "train-fold-000-of-001").exists()
    s = dataset_convert(spec, out, num_partitions=2, num_shards=3, workers=1)
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == [f"train-fold-{p:03d}-of-002-shard-{k:05d}-of-00003"
                     for p in range(2) for k in range(3)]
    parts = [[list(R.read_records(tmp_path / "p" / f"train-fold-{p:03d}-of-002-shard-{k:05d}-of-00003"))
              for k in range(3)] for p in range(2)]
    flat = [r for p in parts for sh in p for r in sh]
    assert len(flat) == s["records"] == len(all_recs)
    assert all(len(sh) > 0 for p in parts for sh in p)
    # An image's duplicated records stay in one partition.
    ids = [{r["image_id"] for sh in p for r in sh} for p in parts]
    assert not ids[0] & ids[1]
    key = lambda r: (r["image_id"], r["joints"].tobytes())  # noqa: E731
    assert sorted(map(key, flat)) == sorted(map(key, all_recs))


def test_custom_five_joint_dataset(tmp_path, tiny_train):
    """A dataset with its own 5 keypoints and a 5-joint pose config with two synthetic joints."""
    names = ["nose", "left_shoulder", "right_shoulder", "left_hip", "right_hip"]
    idx = [COCO_NAMES.index(n) for n in names]
    doc = json.loads(json.dumps(tiny_train))
    for a in doc["annotations"]:
        k = np.asarray(a["keypoints"], float).reshape(17, 3)[idx]
        a["keypoints"] = k.reshape(-1).tolist()
        a["num_keypoints"] = int((k[:, 2] > 0).sum())
    doc["categories"][0]["keypoints"] = names
    doc["categories"][0]["skeleton"] = [[1, 2], [1, 3], [2, 4], [3, 5]]
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    pose = {"name": "five", "keypoints": ["nose", "neck", "left_shoulder", "right_shoulder", "mid_hip"],
            "skeleton": [[2, 1], [2, 3], [2, 4], [2, 5]],
            "synthetic_joints": {"neck": ["left_shoulder", "right_shoulder"],
                                 "mid_hip": ["left_hip", "right_hip"]}}
    (tmp_path / "five.json").write_text(json.dumps(pose))
    spec = {"dataset": "five_points", "root_directory_path": ".",
            "train_data": {"images_root_dir_path": str(COCO_TINY / "train2017"),
                           "mask_root_dir_path": "masks", "annotation_root_dir_path": "ann.json"},
            "pose_config_path": "five.json",
            "categories": [{"name": "person", "id": 1, "num_joints": 5, "keypoints": names}],
            "data_filtering_params": {"min_acceptable_kpts": 3, "min_acceptable_height": 32,
                                      "min_acceptable_width": 32,
                                      "min_acceptable_interperson_dist_ratio": 0.3}}
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))  # JSON is valid YAML
    s = dataset_convert(tmp_path / "spec.yaml", tmp_path / "out" / "five", generate_masks=True,
                        workers=1)
    recs = list(R.read_records(tmp_path / "out" / "five"))
    exp = expected_samples(doc, min_kpts=3)
    assert len(recs) == s["records"] == sum(len(v) for v in exp.values())
    seen = {}
    for r in recs:
        assert r["num_joints"] == 5 and r["pose_config"].split("@")[0] == "five"
        assert r["dataset"] == "five_points"
        k = seen.get(r["image_id"], 0)
        seen[r["image_id"]] = k + 1
        for got, a in zip(r["joints"], exp[r["image_id"]][k]):
            kp = np.asarray(a["keypoints"], float).reshape(5, 3)
            np.testing.assert_allclose(got[[0, 2, 3]], np.where(kp[[0, 1, 2], 2:] > 0, kp[[0, 1, 2]], 0))
            for j, (p, q) in ((1, (1, 2)), (4, (3, 4))):
                if kp[p, 2] > 0 and kp[q, 2] > 0:
                    np.testing.assert_allclose(got[j, :2], (kp[p, :2] + kp[q, :2]) / 2, atol=1e-3)
                else:
                    assert got[j].tolist() == [0, 0, 0]
    assert s["masks"] > 0 and (tmp_path / "masks").is_dir()


def test_visibility_flags_are_remapped(tmp_path, tiny_train):
    """A dataset that codes visible as 1 and occluded as 2 is mapped onto 2 / 1."""
    doc = json.loads(json.dumps(tiny_train))
    swap = {0: 0, 1: 2, 2: 1}
    for a in doc["annotations"]:
        k = np.asarray(a["keypoints"], float).reshape(17, 3)
        k[:, 2] = [swap[int(v)] for v in k[:, 2]]
        a["keypoints"] = k.reshape(-1).tolist()
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    spec = json.loads((REPO / "data_pose_config" / "coco_spec.json").read_text())
    spec.pop("pose_config_path", None)
    spec.update(root_directory_path=".", visibility_flags={"value": {"visible": 1, "occluded": 2,
                                                                      "not_labeled": 0}})
    spec["train_data"] = {"images_root_dir_path": str(COCO_TINY / "train2017"),
                          "mask_root_dir_path": "m", "annotation_root_dir_path": "ann.json"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    dataset_convert(tmp_path / "spec.json", tmp_path / "t", workers=1)
    exp = expected_samples(tiny_train)
    first = next(iter(R.read_records(tmp_path / "t")))
    want = np.stack([expected_joints(a["keypoints"]) for a in exp[first["image_id"]][0]])
    np.testing.assert_allclose(first["joints"], want, atol=1e-3)


# ------------------------------------------------------------------ bad inputs (CLI)

@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    make_sample_dataset(d, num_train=8, num_val=2, image_size=(128, 128), seed=3)
    return d


def _copy_sample(sample, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(sample, d)
    return d


def _ann(d):
    return d / "annotations" / "person_keypoints_train.json"


def _run_cli(d, *extra, out=None):
    """``bpnet dataset_convert`` on the sample copy in ``d``, results in d/results."""
    return invoke("dataset_convert", "-d", d / "sample_spec.json", "-o", out or (d / "out" / "train"),
                  "--workers", "1", "-r", d / "results", *extra)


def _assert_failed(d, res, *needles):
    assert res.exit_code != 0
    assert res.exception is None or isinstance(res.exception, SystemExit)
    text = res.output.strip()
    errors = [ln for ln in text.splitlines() if "error:" in ln]
    assert len(errors) == 1, text
    assert "Traceback" not in text
    for n in needles:
        assert n in errors[0], errors[0]
    out = d / "out"
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    masks = d / "masks"
    assert not masks.exists() or not any(masks.rglob("*.png"))
    status = json.loads((d / "results" / "status.json").read_text())
    assert status["status"] == "FAILURE" and status["message"]
    return errors[0]


def test_sample_converts_cleanly(sample, tmp_path):
    d = _copy_sample(sample, tmp_path)
    res = _run_cli(d, "--generate_masks", "--check_files")
    assert res.exit_code == 0, res.output
    status = json.loads((d / "results" / "status.json").read_text())
    assert status["status"] == "SUCCESS" and status["records"] > 0
    assert status["records"] == len(list(R.read_records(d / "out" / "train")))
    # Nothing temporary is left behind.
    assert not [p for p in d.rglob(".*.tmp")]


def test_mask_folder_outside_a_symlinked_root_is_stored_absolute(sample, tmp_path):
    # The dataset is reached through a link and the masks go outside it: a
    # relative "../" path from the link would resolve from the link's target.
    real = _copy_sample(sample, tmp_path)
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "link"
    link.symlink_to(real, target_is_directory=True)
    spec = json.loads((real / "sample_spec.json").read_text())
    spec["train_data"]["mask_root_dir_path"] = str(tmp_path / "masks_outside")
    (real / "sample_spec.json").write_text(json.dumps(spec))
    res = invoke("dataset_convert", "-d", link / "sample_spec.json", "-o", tmp_path / "out" / "train",
                 "--generate_masks", "--workers", "1", "-r", tmp_path / "results")
    assert res.exit_code == 0, res.output
    recs = list(R.read_records(tmp_path / "out" / "train"))
    masked = [r for r in recs if r["mask_path"]]
    assert masked, "the sample data has crowd regions, so some records need masks"
    root = Path(spec["root_directory_path"])
    root = root if root.is_absolute() else link / root
    for r in masked:
        assert os.path.isabs(r["mask_path"]), r["mask_path"]
        assert read_mask(os.path.join(root, r["mask_path"])).shape == (128, 128)
    for r in recs:
        assert not os.path.isabs(r["image_path"])  # inside the root: stays relative
        assert (root / r["image_path"]).exists()


def test_rerun_overwrites_and_cleans_leftovers(sample, tmp_path):
    d = _copy_sample(sample, tmp_path)
    assert _run_cli(d, "--generate_masks").exit_code == 0
    rec = d / "out" / "train-fold-000-of-001"
    first = rec.read_bytes()
    masks = sorted((d / "masks" / "train").glob("*.png"))
    assert masks
    # What a killed run leaves: hidden temporary files, and a damaged mask.
    (d / "out" / ".train-fold-000-of-001.x1y2.tmp").write_bytes(b"half")
    (d / "masks" / "train" / ".000000000001.png.abcd.tmp").write_bytes(b"half")
    masks[0].write_bytes(b"broken")
    assert _run_cli(d, "--generate_masks").exit_code == 0
    assert rec.read_bytes() == first  # deterministic output
    assert sorted(p.name for p in (d / "out").iterdir()) == [rec.name]
    assert not list((d / "masks").rglob("*.tmp"))
    assert read_mask(masks[0]).shape == (128, 128)


def test_missing_annotation_file(sample, tmp_path):
    d = _copy_sample(sample, tmp_path)
    _ann(d).unlink()
    _assert_failed(d, _run_cli(d), "annotation file not found", "person_keypoints_train.json")


def test_annotation_not_json(sample, tmp_path):
    d = _copy_sample(sample, tmp_path)
    _ann(d).write_text('{"images": [1, 2,')
    _assert_failed(d, _run_cli(d), "not valid JSON")


def test_annotation_not_coco_shaped(sample, tmp_path):
    d = _copy_sample(sample, tmp_path)
    _ann(d).write_text(json.dumps({"pictures": [], "labels": []}))
    _assert_failed(d, _run_cli(d), "not COCO-shaped", "'images'")


def _edit_first_person(d, fn):
    doc = json.loads(_ann(d).read_text())
    a = next(a for a in doc["annotations"] if not a["iscrowd"] and a["num_keypoints"] >= 5)
    fn(a)
    _ann(d).write_text(json.dumps(doc))
    return a["id"]


def test_keypoints_wrong_length(sample, tmp_path):
    d = _copy_sample(sample, tmp_path)
    aid = _edit_first_person(d, lambda a: a.__setitem__("keypoints", a["keypoints"][:-3]))
    _assert_failed(d, _run_cli(d), f"annotation id {aid}", "48 values, expected 51")


def test_nan_coordinates(sample, tmp_path):
    d = _copy_sample(sample, tmp_path)

    def bad(a):
        a["keypoints"][0] = float("nan")
    aid = _edit_first_person(d, bad)
    _assert_failed(d, _run_cli(d), f"annotation id {aid}", "NaN")


def test_negative_coordinates(sample, tmp_path):
    d = _copy_sample(sample, tmp_path)

    def bad(a):
        i = next(i for i in range(0, 51, 3) if a["keypoints"][i + 2] > 0)
        a["keypoints"][i + 1] = -4.0
    aid = _edit_first_person(d, bad)
    _assert_failed(d, _run_cli(d), f"annotation id {aid}", "negative coordinates")


def test_empty_result_set(sample, tmp_path):
    d = _copy_sample(sample, tmp_path)
    spec = json.loads((d / "sample_spec.json").read_text())
    spec["data_filtering_params"]["min_acceptable_kpts"] = 18
    (d / "sample_spec.json").write_text(json.dumps(spec))
    _assert_failed(d, _run_cli(d, "--generate_masks"), "no main person", "min_acceptable_kpts 18")


def test_missing_image_without_check_files(sample, tmp_path):
    d = _copy_sample(sample, tmp_path)
    doc = json.loads(_ann(d).read_text())
    main_image = next(a["image_id"] for a in doc["annotations"]
                      if not a["iscrowd"] and a["num_keypoints"] >= 5 and a["area"] >= 1024)
    victim = next(im["file_name"] for im in doc["images"] if im["id"] == main_image)
    (d / "images" / "train" / victim).unlink()
    _assert_failed(d, _run_cli(d, "--generate_masks"), "1 of", victim, "missing")


def test_check_files_reports_every_bad_image(sample, tmp_path):
    d = _copy_sample(sample, tmp_path)
    doc = json.loads(_ann(d).read_text())
    with_main = {a["image_id"] for a in doc["annotations"]
                 if not a["iscrowd"] and a["num_keypoints"] >= 5 and a["area"] >= 1024}
    files = [d / "images" / "train" / im["file_name"] for im in doc["images"] if im["id"] in with_main]
    files[0].unlink()  # missing
    files[1].write_bytes(b"this is not an image")  # corrupt
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) // 2])  # cut in half
    data = files[3].read_bytes()
    files[3].write_bytes(data[:-2])  # only the end marker lost: decoders still return pixels
    # An image without any person gives no record, but --check_files checks it too.
    nobody = d / "images" / "train" / "nobody.jpg"
    nobody.write_bytes(b"not a picture either")
    doc["images"].append({"id": 999999, "file_name": nobody.name, "height": 128, "width": 128})
    _ann(d).write_text(json.dumps(doc))
    files.insert(4, nobody)
    line = _assert_failed(d, _run_cli(d, "--check_files", "--generate_masks"), "5 of")
    reasons = [line.split(f.name + ": ")[1] for f in files[:5]]
    assert reasons[0].startswith("file not found")
    for r in reasons[1:]:  # OpenCV versions differ on which truncations still decode
        assert r.startswith("not a decodable image") or r.startswith("truncated JPEG"), line


def test_unwritable_output_folder(sample, tmp_path):
    d = _copy_sample(sample, tmp_path)
    blocker = d / "out"
    blocker.write_text("a file where the output folder should be")
    res = _run_cli(d, out=blocker / "records" / "train")
    assert res.exit_code != 0
    assert "output folder" in res.output and "not writable" in res.output
    assert blocker.read_text().startswith("a file")
    assert not (d / "masks").exists()


def test_bad_dataset_spec_key(sample, tmp_path):
    d = _copy_sample(sample, tmp_path)
    spec = json.loads((d / "sample_spec.json").read_text())
    spec["duplicate_data_with_each_person_as_centre"] = spec.pop("duplicate_data_with_each_person_as_center")
    (d / "sample_spec.json").write_text(json.dumps(spec))
    _assert_failed(d, _run_cli(d), "duplicate_data_with_each_person_as_centre",
                   "did you mean 'duplicate_data_with_each_person_as_center'")


def test_api_raises_bpnet_error(sample, tmp_path):
    d = _copy_sample(sample, tmp_path)
    with pytest.raises(BpnetError, match="mode"):
        dataset_convert(d / "sample_spec.json", d / "x", mode="validation")

"""The synthetic sample dataset: deterministic, consistent, and shaped for the filters and masks."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from conftest import checked_annotation

from bpnet.data.synthetic import COCO_KEYPOINTS, make_sample_dataset
from bpnet.specs import load_dataset_spec

K = {n: i for i, n in enumerate(COCO_KEYPOINTS)}


def _files(d: Path):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("s")
    summary = make_sample_dataset(d, num_train=30, num_val=6, image_size=(192, 256), seed=7)
    return d, summary


def test_layout_and_spec(sample):
    d, summary = sample
    assert len(list((d / "images" / "train").glob("*.jpg"))) == 30
    assert len(list((d / "images" / "val").glob("*.jpg"))) == 6
    spec = load_dataset_spec(d / "sample_spec.json")
    assert spec.dataset == "sample"
    for mode, n in (("train", 30), ("test", 6)):
        images, masks, ann = spec.split_paths(mode)
        assert images.is_dir() and ann.is_file()
        assert masks.parent == d / "masks"
        doc = json.loads(ann.read_text())
        assert len(doc["images"]) == n
        assert doc["categories"][0]["keypoints"] == list(COCO_KEYPOINTS)
        for im in doc["images"]:
            img = cv2.imread(str(images / im["file_name"]))
            assert img.shape == (im["height"], im["width"], 3) == (192, 256, 3)
    assert summary["train"]["images"] == 30 and summary["val"]["images"] == 6


def test_deterministic_by_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_sample_dataset(a, num_train=5, num_val=2, image_size=(128, 128), seed=1)
    make_sample_dataset(b, num_train=5, num_val=2, image_size=(128, 128), seed=1)
    make_sample_dataset(c, num_train=5, num_val=2, image_size=(128, 128), seed=2)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert fa["images/train/000000000001.jpg"] != fc["images/train/000000000001.jpg"]
    # Image i does not depend on how many images are made.
    d = tmp_path / "d"
    make_sample_dataset(d, num_train=3, num_val=1, image_size=(128, 128), seed=1)
    assert _files(d)["images/train/000000000003.jpg"] == fa["images/train/000000000003.jpg"]


def test_annotations_consistent(sample):
    d, _ = sample
    coco = COCO(str(d / "annotations" / "person_keypoints_train.json"))
    ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(ids) == len(set(ids))
    labeled = outside = 0
    for a in coco.dataset["annotations"]:
        im = coco.imgs[a["image_id"]]
        m, kp = checked_annotation(coco, a)
        x, y, w, h = a["bbox"]
        assert set(kp[:, 2].tolist()) <= {0.0, 1.0, 2.0}
        if a["iscrowd"]:
            assert a["num_keypoints"] == 0
            continue
        for px, py, v in kp[kp[:, 2] > 0]:
            labeled += 1
            assert 0 <= px < im["width"] and 0 <= py < im["height"]
            assert x - 0.5 <= px <= x + w + 0.5 and y - 0.5 <= py <= y + h + 0.5
            # Inside the person's own segmentation (1 px slack for the rasterization of thin parts).
            xi, yi = int(px), int(py)
            assert m[max(0, yi - 1):yi + 2, max(0, xi - 1):xi + 2].any()
        outside += int(a["num_keypoints"] < 17)
    assert labeled > 500 and outside > 0


def test_filters_and_masks_have_work(sample):
    """Crowds (RLE and polygon), persons without keypoints, and persons the filters reject."""
    d, _ = sample
    doc = json.loads((d / "annotations" / "person_keypoints_train.json").read_text())
    anns = doc["annotations"]
    crowds = [a for a in anns if a["iscrowd"]]
    assert crowds and all(a["num_keypoints"] == 0 for a in crowds)
    kinds = {type(a["segmentation"]).__name__ for a in crowds}
    assert "dict" in kinds  # COCO-style uncompressed RLE
    persons = [a for a in anns if not a["iscrowd"]]
    assert any(a["num_keypoints"] == 0 for a in persons)
    small = [a for a in persons if a["num_keypoints"] >= 5 and a["area"] < 32 * 32]
    few = [a for a in persons if 0 < a["num_keypoints"] < 5]
    main = [a for a in persons if a["num_keypoints"] >= 5 and a["area"] >= 32 * 32]
    assert small and main
    assert len(main) > len(doc["images"])  # several people per image on average
    occluded = sum(int(v == 1) for a in persons for v in a["keypoints"][2::3])
    assert occluded > 0
    assert few or small  # some persons do not pass the filters


def test_left_and_right_limbs_differ_in_colour(sample):
    """Left forearms are warm, right forearms cool: the cue that makes left/right learnable."""
    d, _ = sample
    doc = json.loads((d / "annotations" / "person_keypoints_train.json").read_text())
    images = {im["id"]: cv2.cvtColor(cv2.imread(str(d / "images" / "train" / im["file_name"])),
                                     cv2.COLOR_BGR2HSV) for im in doc["images"]}
    votes = {"left": [], "right": []}
    for a in doc["annotations"]:
        if a["iscrowd"] or a["area"] < 2000:
            continue
        kp = np.asarray(a["keypoints"], float).reshape(17, 3)
        for side in votes:
            e, w = kp[K[f"{side}_elbow"]], kp[K[f"{side}_wrist"]]
            if e[2] == 2 and w[2] == 2:
                x, y = ((e[:2] + w[:2]) / 2).astype(int)
                votes[side].append(int(images[a["image_id"]][y, x, 0]))
    warm = lambda h: h <= 25 or h >= 165  # noqa: E731 (OpenCV hue 0..179)
    cool = lambda h: 90 <= h <= 135  # noqa: E731
    assert len(votes["left"]) > 10 and len(votes["right"]) > 10
    assert np.mean([warm(h) for h in votes["left"]]) > 0.7
    assert np.mean([cool(h) for h in votes["right"]]) > 0.7

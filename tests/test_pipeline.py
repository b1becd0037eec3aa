"""The tf.data training pipeline on real COCO records and on synthetic data."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from conftest import COCO_TINY, REPO, need

from bpnet.data import augment as aug
from bpnet.data.labels import render_labels
from bpnet.data.records import read_records, serialize_record
from bpnet.errors import BpnetError
from bpnet.specs import TrainSpec, build_spec, default_pose_config_path

SIZE = 128  # small inputs keep the tests cheap; 368 is benchmarked in scripts/


def _convert(spec_path, prefix, mode):
    from bpnet.data.convert import dataset_convert
    dataset_convert(spec_path, prefix, mode=mode, generate_masks=True, workers=1)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """coco_tiny converted into a temp dir: (dir, dataset spec path)."""
    need(COCO_TINY)
    d = tmp_path_factory.mktemp("coco_records")
    spec = json.loads((REPO / "data_pose_config" / "coco_spec.json").read_text())
    spec.pop("pose_config_path", None)
    spec["root_directory_path"] = str(COCO_TINY)
    spec["train_data"] = {"images_root_dir_path": "train2017", "mask_root_dir_path": str(d / "masks_train"),
                          "annotation_root_dir_path": "annotations/person_keypoints_train2017.json"}
    spec["test_data"] = {"images_root_dir_path": "val2017", "mask_root_dir_path": str(d / "masks_val"),
                         "annotation_root_dir_path": "annotations/person_keypoints_val2017.json"}
    (d / "coco_tiny.json").write_text(json.dumps(spec))
    _convert(d / "coco_tiny.json", d / "train", "train")
    _convert(d / "coco_tiny.json", d / "val", "test")
    return d, d / "coco_tiny.json"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The synthetic sample dataset, converted: (dir, dataset spec path)."""
    from bpnet.data.synthetic import make_sample_dataset
    d = tmp_path_factory.mktemp("sample")
    info = make_sample_dataset(d, num_train=6, num_val=3, image_size=(96, 128), seed=3)
    _convert(info["dataset_spec"], d / "train", "train")
    _convert(info["dataset_spec"], d / "val", "test")
    return d, d / "sample_spec.json"


def _spec(*args, **kw):
    return build_spec(TrainSpec, _spec_dict(*args, **kw), "<test>")


def _spec_dict(train_records, dataset_specs, val_records=(), size=SIZE, batch=4, mode="person_centric",
               zoom_ratio_min=0.8, **dl):
    return {
        "random_seed": 5,
        "dataloader": {
            "batch_size": batch, "shuffle_buffer_size": 50, "num_parallel_calls": 2,
            "pose_config": {"target_shape": [size // 8, size // 8]},
            "image_config": {"image_dims": {"height": size, "width": size, "channels": 3}},
            "dataset_config": {"root_data_path": "/nonexistent", "train_records_path": [str(p) for p in train_records],
                               "val_records_path": [str(p) for p in val_records],
                               "dataset_specs": {k: str(v) for k, v in dataset_specs.items()}},
            "augmentation_config": {"spatial_augmentation_mode": mode, "spatial_aug_params": {
                "flip_lr_prob": 0.5, "rotate_deg_max": 30.0, "translate_max_x": 10.0, "translate_max_y": 10.0,
                "zoom_prob": 0.5, "zoom_ratio_min": zoom_ratio_min, "zoom_ratio_max": 1.2}},
            **dl,
        }}


def _take(ds, n):
    out = []
    for x, y in ds.take(n):
        out.append((x.numpy(), {k: v.numpy() for k, v in y.items()}))
    return out


def test_coco_batches_shapes_ranges_and_labels(coco):
    from bpnet.data.pipeline import build_dataset, count_samples
    d, ds_spec = coco
    spec = _spec([d / "train"], {"coco": ds_spec})
    assert count_samples(spec, "train") == sum(1 for _ in read_records(d / "train")) > 20
    batches = _take(build_dataset(spec, "train", seed=1), 6)
    masked = 0
    for x, y in batches:
        assert x.shape == (4, SIZE, SIZE, 3) and x.dtype == np.float32
        assert -0.5 <= x.min() and x.max() < 0.5  # x/256 - 0.5
        assert y["heatmap"].shape == (4, 16, 16, 19) and y["paf"].shape == (4, 16, 16, 38)
        assert y["mask"].shape == (4, 16, 16, 1)
        assert 0 <= y["heatmap"].min() and y["heatmap"].max() <= 1
        assert np.abs(y["paf"]).max() <= 1 + 1e-6
        assert 0 <= y["mask"].min() and y["mask"].max() <= 1
        # Each sample is centred on a real person: its main joints are drawn.
        assert (y["heatmap"][..., :-1].max(axis=(1, 2, 3)) > 0.5).all()
        np.testing.assert_allclose(y["heatmap"][..., -1], 1 - y["heatmap"][..., :-1].max(-1), atol=1e-6)
        masked += int((y["mask"] < 0.5).any(axis=(1, 2, 3)).sum())
    assert masked > 0  # coco_tiny has crowds and unlabeled persons, masked out


def test_same_seed_same_batches_other_seed_differs(coco):
    from bpnet.data.pipeline import build_dataset
    d, ds_spec = coco
    spec = _spec([d / "train"], {"coco": ds_spec})
    a = _take(build_dataset(spec, "train", seed=11), 2)
    b = _take(build_dataset(spec, "train", seed=11), 2)
    c = _take(build_dataset(spec, "train", seed=12), 2)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        for k in ya:
            np.testing.assert_array_equal(ya[k], yb[k])
    assert not np.array_equal(a[0][0], c[0][0])
    # Without an explicit seed the spec's random_seed is used.
    e = _take(build_dataset(spec, "train"), 1)
    f = _take(build_dataset(spec, "train", seed=5), 1)
    np.testing.assert_array_equal(e[0][0], f[0][0])


def test_validation_pipeline_is_the_plain_fitted_image(coco):
    from bpnet.data.pipeline import build_dataset, count_samples
    from bpnet.specs import SpatialAugParams
    d, ds_spec = coco
    spec = _spec([d / "train"], {"coco": ds_spec}, val_records=[d / "val"], batch=5)
    n = count_samples(spec, "val")
    got = _take(build_dataset(spec, "val", seed=1, repeat=False), 100)
    again = _take(build_dataset(spec, "val", seed=2, repeat=False), 100)
    assert sum(len(x) for x, _ in got) == n and [len(x) for x, _ in got][:-1] == [5] * (len(got) - 1)
    np.testing.assert_array_equal(got[0][0], again[0][0])  # no randomness at all
    # The first val sample's labels are its joints under the fit-and-centre transform.
    rec = next(read_records(d / "val"))
    t = aug.sample_transform(None, (rec["height"], rec["width"]), (SIZE, SIZE),
                             "standard_with_fixed_aspect_ratio", SpatialAugParams())
    from bpnet.pose import load_pose_config
    pose = load_pose_config(default_pose_config_path())
    heat, paf = render_labels(aug.transform_joints(rec["joints"], t, pose), pose, (SIZE, SIZE))
    np.testing.assert_allclose(got[0][1]["heatmap"][0], heat, atol=1e-6)
    np.testing.assert_allclose(got[0][1]["paf"][0], paf, atol=1e-6)
    # Rows above and below the fitted (landscape) image are grey padding: 128/256 - 0.5 = 0.
    if rec["width"] > rec["height"]:
        assert np.abs(got[0][0][0, 0]).max() < 1e-6


def test_two_dataset_specs_are_both_read(coco, sample):
    from bpnet.data.pipeline import build_dataset, count_samples
    (cd, cspec), (sd, sspec) = coco, sample
    # The two datasets live under different roots; TAO would resolve every
    # record against the last spec's root and fail to find the other's images.
    spec = _spec([cd / "train", sd / "train"], {"coco": cspec, "sample": sspec}, batch=8)
    n_coco = sum(1 for _ in read_records(cd / "train"))
    n_sample = sum(1 for _ in read_records(sd / "train"))
    assert {r["dataset"] for r in read_records(sd / "train")} == {"sample"}
    assert count_samples(spec, "train") == n_coco + n_sample
    seen = sum(len(x) for x, _ in _take(build_dataset(spec, "train", repeat=False), 1000))
    assert seen == n_coco + n_sample
    # With only one of the specs, the other dataset's images cannot be found: a clear error.
    with pytest.raises(BpnetError, match="not found"):
        build_dataset(_spec([cd / "train", sd / "train"], {"sample": sspec}), "train")


@pytest.mark.parametrize("mode", ["standard", "standard_with_fixed_aspect_ratio", "person_centric"])
def test_synthetic_dataset_in_every_mode(sample, mode):
    from bpnet.data.pipeline import build_dataset
    d, sspec = sample
    spec = _spec([d / "train"], {"sample": sspec}, val_records=[d / "val"], size=96, batch=3, mode=mode)
    (x, y), = _take(build_dataset(spec, "train", seed=0), 1)
    assert x.shape == (3, 96, 96, 3) and y["heatmap"].shape == (3, 12, 12, 19)
    assert y["heatmap"][..., :-1].max() > 0.5 and np.abs(y["paf"]).max() > 0.5
    val = _take(build_dataset(spec, "val", repeat=False), 10)
    assert sum(len(v[0]) for v in val) == sum(1 for _ in read_records(d / "val"))


def test_custom_pose_config_flows_through(sample, tmp_path):
    from bpnet.data.pipeline import build_dataset
    d, sspec = sample
    pose_file = tmp_path / "five.json"
    pose_file.write_text(json.dumps({
        "name": "five", "keypoints": ["nose", "left_shoulder", "right_shoulder", "left_hip", "right_hip"],
        "skeleton": [[1, 2], [1, 3], [2, 4], [3, 5]]}))
    ds = json.loads(sspec.read_text())
    ds["root_directory_path"] = str(d)
    ds["pose_config_path"] = str(pose_file)
    ds["train_data"]["mask_root_dir_path"] = str(tmp_path / "masks")
    (tmp_path / "five_spec.json").write_text(json.dumps(ds))
    _convert(tmp_path / "five_spec.json", tmp_path / "train", "train")
    spec = _spec([tmp_path / "train"], {"sample": tmp_path / "five_spec.json"}, size=96, batch=2,
                 pose_config={"target_shape": [12, 12], "pose_config_path": str(pose_file)})
    (_, y), = _take(build_dataset(spec, "train", seed=0), 1)
    assert y["heatmap"].shape == (2, 12, 12, 6) and y["paf"].shape == (2, 12, 12, 8)
    # ...and records of this 5-joint config are refused by an 18-joint spec.
    with pytest.raises(BpnetError, match=r"pose config 'five(@[0-9a-f]+)?' with 5 joints"):
        build_dataset(_spec([tmp_path / "train"], {"sample": tmp_path / "five_spec.json"}, size=96), "train")


def test_records_of_another_pose_config_are_rejected(tmp_path, sample):
    from bpnet.data.pipeline import build_dataset
    from bpnet.data.records import write_records
    d, sspec = sample
    rec = next(read_records(d / "train"))
    rec["pose_config"] = "someone_elses_18"
    write_records(tmp_path / "other-fold-000-of-001", [rec])
    with pytest.raises(BpnetError, match="someone_elses_18"):
        build_dataset(_spec([tmp_path / "other"], {"sample": sspec}, size=96), "train")
    assert serialize_record(rec)  # the record itself is well formed


def test_spec_errors_are_clear(coco, tmp_path):
    from bpnet.data.pipeline import build_dataset, count_samples
    d, ds_spec = coco
    # The spec loader checks target_shape x stride = image_dims; the pipeline trusts it.
    with pytest.raises(BpnetError, match="target_shape.*does not match"):
        _spec([d / "train"], {"coco": ds_spec}, pose_config={"target_shape": [20, 16]})
    with pytest.raises(BpnetError, match="target_shape"):
        _spec([d / "train"], {"coco": ds_spec}, pose_config={"target_shape": [46, 46]})
    with pytest.raises(BpnetError, match="no TFRecord files found"):
        build_dataset(_spec([tmp_path / "missing"], {"coco": ds_spec}), "train")
    with pytest.raises(BpnetError, match="val_records_path is empty"):
        count_samples(_spec([d / "train"], {"coco": ds_spec}), "val")
    with pytest.raises(BpnetError, match="file not found"):
        build_dataset(_spec([d / "train"], {"coco": tmp_path / "nope.json"}), "train")
    with pytest.raises(BpnetError, match="split must be"):
        build_dataset(_spec([d / "train"], {"coco": ds_spec}), "test")


def test_tf_window_decoding_matches_the_opencv_path(coco):
    """The tf.data path (plan, decode only the JPEG window, finish) gives the
    sample that SampleProcessor gives from a whole OpenCV decode."""
    import tensorflow as tf

    from bpnet.data.pipeline import SampleProcessor, build_dataset, dataset_roots
    from bpnet.pose import load_pose_config
    d, ds_spec = coco
    spec = _spec([d / "train"], {"coco": ds_spec}, size=SIZE, batch=6,
                 zoom_ratio_min=0.3)  # some 1/2 decodes too
    (x, y), = _take(build_dataset(spec, "train", seed=4, shuffle=False), 1)
    # Per-sample seeds: the stream build_dataset zips with the (unshuffled) records.
    seeds = [int(v) & 0xFFFFFFFFFFFFFFFF for v in tf.data.Dataset.random(seed=4 + 2).take(6).as_numpy_iterator()]
    pose = load_pose_config(default_pose_config_path())
    roots, fallback = dataset_roots(spec)
    proc = SampleProcessor(spec, pose, roots, fallback, train=True)
    for i, rec in enumerate(list(read_records(d / "train"))[:6]):
        img, heat, paf, mask, _ = proc(rec["dataset"], rec["image_path"], rec["mask_path"], rec["height"],
                                       rec["width"], rec["joints"], rec["centers"], rec["scales"], seeds[i])
        np.testing.assert_allclose(y["heatmap"][i], heat, atol=1e-6)
        np.testing.assert_allclose(y["paf"][i], paf, atol=1e-6)
        np.testing.assert_allclose(y["mask"][i], mask, atol=1e-6)
        # TF's and OpenCV's JPEG decoders differ by a few levels in chroma.
        diff = np.abs(x[i] - proc.normalize(img))
        assert diff.mean() < 3 / 256 and np.quantile(diff, 0.99) < 16 / 256, (i, diff.mean())


def test_show_labels_script_writes_a_picture(coco, tmp_path):
    import importlib.util

    import cv2
    import yaml
    d, ds_spec = coco
    spec_file = tmp_path / "train.yaml"
    spec_file.write_text(yaml.safe_dump(_spec_dict([d / "train"], {"coco": ds_spec})))
    mod_spec = importlib.util.spec_from_file_location("show_labels", REPO / "scripts" / "show_labels.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    out = tmp_path / "s.png"
    assert mod.main(["--spec", str(spec_file), "--out", str(out), "--index", "2", "--seed", "1"]) == 0
    img = cv2.imread(str(out))
    assert img.shape == (SIZE * 2, SIZE * 2 * 3 + 12, 3)
    assert mod.main(["--spec", str(spec_file), "--out", str(tmp_path / "t.png"), "--index", "100000"]) == 1
    assert not (tmp_path / "t.png").exists()


def test_grayscale_input(sample):
    from bpnet.data.pipeline import build_dataset
    d, sspec = sample
    spec = _spec([d / "train"], {"sample": sspec}, size=96, batch=2,
                 image_config={"image_dims": {"height": 96, "width": 96, "channels": 1}})
    (x, _), = _take(build_dataset(spec, "train", seed=0), 1)
    assert x.shape == (2, 96, 96, 1) and -0.5 <= x.min() and x.max() < 0.5 and x.std() > 0.01

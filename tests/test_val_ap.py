"""Validation AP during training (bpnet.train.val_ap): AP next to the loss, the best model.

Data: a small synthetic sample dataset made and converted by the module's
fixture. Models are tiny (64 px, width 0.125): the tests are about what the
run measures and keeps, not about accuracy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from conftest import bpnet_cli, make_converted_sample
from test_train import ENV, TINY, _merge, state_info, write_spec

# Validation on: TINY turns it off (val_records_path: []).
VAL = _merge(TINY, {"num_epoch": 2, "steps_per_epoch": 3, "validation_every_n_epoch": 1,
                    "dataloader": {"dataset_config": {
                        "val_records_path": ["val-fold-000-of-001"]}}})


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory):
    """24 training and 12 val images (128 px) with train and val records."""
    return make_converted_sample(tmp_path_factory.mktemp("val_ap_data"), 24, 12, (128, 128),
                                 seed=3)


def _event_tags(folder: Path) -> set[str]:
    import tensorflow as tf
    from tensorflow.core.util import event_pb2
    tags = set()
    for f in folder.iterdir():
        for raw in tf.data.TFRecordDataset(str(f)):
            ev = event_pb2.Event.FromString(raw.numpy())
            tags.update(v.tag for v in ev.summary.value)
    return tags


def test_training_measures_ap_and_keeps_the_best_model(small_sample, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", small_sample, **VAL)
    out = tmp_path / "run"
    p = bpnet_cli("train", "-e", spec, "-r", out, env=ENV, check=True)
    assert "validation AP on 12 images" in p.stderr
    assert "validation loss before training" in p.stderr and "AP50" in p.stderr

    _, info = state_info(out / "model.epoch-2.state")
    hist = info["val_history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    for h in hist:
        assert 0.0 <= h["ap"] <= 1.0 and 0.0 <= h["ap50"] <= 1.0 and h["ap_images"] == 12
    best_ap = max(h["ap"] for h in hist)
    best_epoch = next(h["epoch"] for h in hist if h["ap"] == best_ap)

    from bpnet.model.io import load_model
    model, meta = load_model(out / "best_model.keras")
    assert meta["best"]["ap"] == best_ap and meta["best"]["epoch"] == best_epoch
    assert meta["normalization"]["image_scale"] == [256.0, 256.0, 256.0]
    assert meta["pose_config"]["name"] and len(model.outputs) == 4

    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "SUCCESS"
    assert status["best_ap"] == best_ap and status["best_epoch"] == best_epoch
    assert Path(status["best_model"]) == out / "best_model.keras"
    assert status["val_ap"] == hist[-1]["ap"]

    assert {"val/AP", "val/AP50", "val/loss"} <= _event_tags(out / "events")

    # Resumed for one more epoch: the best so far comes back from the checkpoint's
    # val_history; the new epoch replaces best_model.keras only if it beats it.
    before = (out / "best_model.keras").stat().st_mtime_ns
    spec3 = write_spec(tmp_path / "spec3.yaml", small_sample, **_merge(VAL, {"num_epoch": 3}))
    p = bpnet_cli("train", "-e", spec3, "-r", out, env=ENV, check=True)
    assert "resuming from model.epoch-2" in p.stderr
    _, info = state_info(out / "model.epoch-3.state")
    hist3 = info["val_history"]
    assert [h["epoch"] for h in hist3] == [0, 1, 2, 3] and hist3[:3] == hist
    _, meta3 = load_model(out / "best_model.keras")
    assert meta3["best"]["ap"] == max(h["ap"] for h in hist3)
    replaced = (out / "best_model.keras").stat().st_mtime_ns != before
    assert replaced == (hist3[3]["ap"] > best_ap)


def test_without_test_annotations_validation_is_loss_only(small_sample, tmp_path, caplog):
    """A dataset spec whose test split has no annotation file: training runs, validation
    measures the loss, and one info line says why AP is off."""
    from bpnet.train import train
    ds = json.loads((small_sample / "sample_spec.json").read_text())
    ds["root_directory_path"] = str(small_sample)
    ds["test_data"]["annotation_root_dir_path"] = "annotations/not_here.json"
    ds_path = tmp_path / "no_test_ann.json"
    ds_path.write_text(json.dumps(ds))
    spec = write_spec(tmp_path / "spec.yaml", small_sample, **_merge(VAL, {
        "num_epoch": 1, "steps_per_epoch": 2}))
    doc = yaml.safe_load(spec.read_text())
    doc["dataloader"]["dataset_config"]["dataset_specs"] = {"sample": str(ds_path)}
    spec.write_text(yaml.safe_dump(doc))
    with caplog.at_level(logging.INFO, logger="bpnet.train"):
        result = train(spec, tmp_path / "run")
    off = [r.getMessage() for r in caplog.records if "validation AP is off" in r.getMessage()]
    assert len(off) == 1 and "not_here.json" in off[0], off
    assert [h["epoch"] for h in result.val_history] == [0, 1]
    assert all("ap" not in h and h["val_loss"] > 0 for h in result.val_history)
    assert result.best_ap is None and result.best_model is None
    assert not (tmp_path / "run" / "best_model.keras").exists()
    assert result.as_status()["best_ap"] is None


def test_a_worse_epoch_never_replaces_the_best_model(tmp_path):
    from bpnet.train.val_ap import best_entry, keep_best
    path = tmp_path / "best_model.keras"
    saved = []

    def save(p, best):
        p.write_text(json.dumps(best))
        saved.append(best["epoch"])

    history = []
    for epoch, ap in [(0, 0.0), (1, 0.30), (2, 0.25), (3, 0.30), (4, 0.41), (5, None)]:
        val = {"epoch": epoch, "ap": ap, "ap50": None if ap is None else ap + 0.1}
        keep_best(path, val, history, save)
        history.append(val)
    # 0 first, then each strict improvement; the lower 0.25, the tie and no AP: kept.
    assert saved == [0, 1, 4]
    assert json.loads(path.read_text()) == {"epoch": 4, "ap": 0.41, "ap50": pytest.approx(0.51)}
    assert best_entry(history)["epoch"] == 4
    # A resumed run: the earlier validations come from the checkpoint's val_history.
    assert not keep_best(path, {"epoch": 6, "ap": 0.40, "ap50": 0.5}, history, save)
    assert saved == [0, 1, 4] and best_entry([{"epoch": 0}]) is None


def test_validation_ap_switch_and_spec_check(small_sample, tmp_path, caplog):
    from bpnet.errors import BpnetError
    from bpnet.specs import load_train_spec
    from bpnet.train.val_ap import make_val_ap
    spec = load_train_spec(write_spec(tmp_path / "off.yaml", small_sample,
                                      **_merge(VAL, {"validation_ap_max_images": 0})))
    with caplog.at_level(logging.INFO, logger="bpnet.train"):
        assert make_val_ap(spec, tmp_path / "off.yaml", None, {}) is None
    assert any("validation_ap_max_images: 0" in r.getMessage() for r in caplog.records)
    with pytest.raises(BpnetError, match="validation_ap_max_images"):
        load_train_spec(write_spec(tmp_path / "bad.yaml", small_sample,
                                   **_merge(VAL, {"validation_ap_max_images": -1})))

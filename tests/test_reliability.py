"""Reliability (issue 13): bad data is refused alike everywhere, runs never overwrite each
other or their own inputs, interrupted runs leave nothing half-written, and every refusal is
one clear line.

Every case goes through the real command line (in this process with ``invoke``, or in a
subprocess with ``bpnet_cli`` where a second process matters) and checks the exit code, the
message, the files left and status.json. Data: the synthetic sample dataset, made here; the
corrupt-JPEG cases also use a real COCO picture from ../shared when it is there.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import COCO_TINY, ENV, REPO, bpnet_cli, error_lines, invoke, need

from bpnet.data import records as R
from bpnet.data.synthetic import make_sample_dataset

HOST = socket.gethostname()


# ------------------------------------------------------------------ data and helpers

@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    make_sample_dataset(d, num_train=8, num_val=3, image_size=(128, 128), seed=1)
    return d


def _copy(sample, tmp_path) -> Path:
    d = tmp_path / "ds"
    shutil.copytree(sample, d)
    return d


def _ann(d, split="train") -> Path:
    return d / "annotations" / f"person_keypoints_{split}.json"


def _edit(d, split, fn):
    doc = json.loads(_ann(d, split).read_text())
    out = fn(doc)
    _ann(d, split).write_text(json.dumps(doc))
    return out


def _person(doc):
    """The first non-crowd annotation with at least 5 labeled keypoints."""
    return next(a for a in doc["annotations"] if not a["iscrowd"] and a["num_keypoints"] >= 5)


def _status(results) -> dict:
    return json.loads((Path(results) / "status.json").read_text())


def _one_error(output: str, task: str) -> str:
    lines = error_lines(output, task)
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def _convert(d, *extra, out=None, results=None, mode="train"):
    return invoke("dataset_convert", "-d", d / "sample_spec.json", "-o", out or d / "out" / mode,
                  "-m", mode, "--workers", "1", "-r", results or d / "results", *extra)


def _files_under(folder) -> list[str]:
    folder = Path(folder)
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _assert_convert_failed(d, res, *needles, results=None) -> str:
    assert res.exit_code == 1, res.output
    line = _one_error(res.output, "dataset_convert")
    for n in needles:
        assert n in line, line
    assert _files_under(d / "out") == []  # no records, no temporary files
    assert not list((d / "masks").rglob("*.png")) if (d / "masks").exists() else True
    st = _status(results or d / "results")
    assert st["status"] == "FAILURE" and st["message"] in line
    assert not list(Path(results or d / "results").glob(".bpnet.lock"))  # released
    return line


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                       capture_output=True, text=True, check=True)
    return int(p.stdout)


def _write_lock(path, pid, task="other"):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"pid": pid, "host": HOST, "task": task}))


# ------------------------------------------------------------------ one ground-truth validator

def _nan(doc):
    a = _person(doc)
    a["keypoints"][0] = float("nan")
    return f"annotation id {a['id']}"


def _string(doc):
    a = _person(doc)
    i = next(i for i in range(0, len(a["keypoints"]), 3) if a["keypoints"][i + 2] > 0)
    a["keypoints"][i] = str(a["keypoints"][i])
    return f"annotation id {a['id']}"


def _dup_annotation(doc):
    a, b = [x for x in doc["annotations"] if not x["iscrowd"]][:2]
    b["id"] = a["id"]
    return f"annotation id {a['id']} appears twice"


def _dup_image(doc):
    doc["images"][1]["id"] = doc["images"][0]["id"]
    return f"image id {doc['images'][0]['id']} appears twice"


def _huge_id(doc):
    old = doc["images"][0]["id"]
    doc["images"][0]["id"] = 2 ** 70
    for a in doc["annotations"]:
        if a["image_id"] == old:
            a["image_id"] = 2 ** 70
    return "64-bit"


BAD_GT = {"nan": _nan, "string_keypoint": _string, "duplicate_annotation_id": _dup_annotation,
          "duplicate_image_id": _dup_image, "image_id_beyond_64_bits": _huge_id}


@pytest.mark.parametrize("case", sorted(BAD_GT))
def test_bad_ground_truth_is_refused_by_dataset_convert(sample, tmp_path, case):
    d = _copy(sample, tmp_path)
    needle = _edit(d, "val", BAD_GT[case])
    _assert_convert_failed(d, _convert(d, "--generate_masks", mode="test"), needle,
                           "person_keypoints_val.json")


@pytest.mark.parametrize("case", sorted(BAD_GT))
def test_bad_ground_truth_is_refused_by_evaluate(sample, tmp_path, case):
    pytest.importorskip("pycocotools")
    d = _copy(sample, tmp_path)
    needle = _edit(d, "val", BAD_GT[case])
    (tmp_path / "infer.yaml").write_text("input_shape: [64, 64]\n")
    res = invoke("evaluate", "-i", tmp_path / "infer.yaml", "-m", tmp_path / "no_model.keras",
                 "-d", d / "sample_spec.json", "-r", tmp_path / "r")
    assert res.exit_code == 1, res.output
    line = _one_error(res.output, "evaluate")
    assert needle in line and "person_keypoints_val.json" in line, line
    assert _status(tmp_path / "r")["status"] == "FAILURE"
    assert _files_under(tmp_path / "r") == ["status.json"]  # no detections, no results.csv


def test_record_values_are_checked_before_writing():
    big = {"image_id": 2 ** 64, "height": 8, "width": 8, "image_path": "a.jpg",
           "joints": np.zeros((1, 18, 3), np.float32)}
    from bpnet.errors import BpnetError
    with pytest.raises(BpnetError, match="64-bit"):
        R.serialize_record(big)
    with pytest.raises(BpnetError, match="NaN or infinite"):
        R.serialize_record({**big, "image_id": 1, "joints": np.full((1, 18, 3), 1e39)})
    ok = R.decode_record(R.serialize_record({**big, "image_id": -(2 ** 63)}))
    assert ok["image_id"] == -(2 ** 63)  # the extreme that still reads back


def test_dropped_annotations_are_counted_per_rule(sample, tmp_path):
    d = _copy(sample, tmp_path)
    doc = json.loads(_ann(d).read_text())
    doc["annotations"].append({**_person(doc), "id": 10 ** 9, "category_id": 7})  # not a person
    _ann(d).write_text(json.dumps(doc))
    p = bpnet_cli("dataset_convert", "-d", d / "sample_spec.json", "-o", d / "out" / "train",
                  "--workers", "1", "-r", d / "results")
    assert p.returncode == 0, p.stderr
    st = _status(d / "results")
    crowd = sum(1 for a in doc["annotations"] if a["iscrowd"] and a["category_id"] == 1)
    unlabeled = sum(1 for a in doc["annotations"] if not a["iscrowd"] and a["category_id"] == 1
                    and not any(v > 0 for v in a["keypoints"][2::3]))
    assert crowd > 0 and unlabeled > 0  # the sample data exercises both rules
    dropped = st["dropped_annotations"]
    assert dropped["crowd"] == crowd and dropped["no_keypoints"] == unlabeled
    assert dropped["other_category"] == 1
    assert st["annotations"] == len(doc["annotations"])
    labeled = st["annotations"] - crowd - unlabeled - 1
    assert st["main_persons"] + sum(st["not_main_persons"].values()) == labeled
    summary = [ln for ln in p.stderr.splitlines() if "annotations:" in ln]
    assert len(summary) == 1 and f"{crowd} crowd" in summary[0] and \
        f"{unlabeled} no keypoints" in summary[0], p.stderr


# ------------------------------------------------------------------ damaged images

def _corrupt_middle(path: Path):
    """Scramble bytes in the middle of a JPEG: libjpeg still returns pixels, with a warning."""
    b = bytearray(path.read_bytes())
    mid = len(b) // 2
    for i in range(mid, mid + 200):
        b[i] = (b[i] * 7 + 3) & 0xFF
    path.write_bytes(bytes(b))


def test_decoder_warning_means_a_corrupt_image():
    import cv2

    from bpnet.data.images import decode_image
    src = min((need(COCO_TINY) / "train2017").glob("*.jpg"))
    data = bytearray(src.read_bytes())
    img, problem = decode_image(bytes(data))
    assert problem is None and img.shape[2] == 3
    mid = len(data) // 2
    for i in range(mid, mid + 200):
        data[i] = (data[i] * 7 + 3) & 0xFF
    # OpenCV alone returns a full-size picture for it ...
    assert cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_COLOR) is not None
    # ... which is refused here.
    img, problem = decode_image(bytes(data))
    assert img is None and problem.startswith("corrupt JPEG") and "Corrupt JPEG data" in problem


def test_check_files_names_empty_and_corrupt_images(sample, tmp_path):
    d = _copy(sample, tmp_path)
    doc = json.loads(_ann(d).read_text())
    names = [im["file_name"] for im in doc["images"]]
    (d / "images" / "train" / names[0]).write_bytes(b"")  # 0 bytes
    victim = d / "images" / "train" / names[1]
    _corrupt_middle(victim)
    line = _assert_convert_failed(d, _convert(d, "--check_files", "--generate_masks"),
                                  "2 of", f"{names[0]}: empty file (0 bytes)")
    # The synthetic JPEGs are small: scrambling may either warn or break the decode.
    assert f"{names[1]}: corrupt JPEG" in line or f"{names[1]}: not a decodable image" in line


def test_empty_image_is_refused_without_check_files(sample, tmp_path):
    d = _copy(sample, tmp_path)
    doc = json.loads(_ann(d).read_text())
    main = _person(doc)["image_id"]
    name = next(im["file_name"] for im in doc["images"] if im["id"] == main)
    (d / "images" / "train" / name).write_bytes(b"")
    _assert_convert_failed(d, _convert(d), f"{name}: empty file (0 bytes)")


def _tiny_model(path):
    import dataclasses

    import keras

    from bpnet.model.build import build_model
    from bpnet.model.io import save_model
    from bpnet.model.meta import make_meta
    from bpnet.pose import load_pose_config
    from bpnet.specs import ModelConfig, default_pose_config_path
    pose = load_pose_config(default_pose_config_path())
    cfg = ModelConfig(class_name="BpNetLiteModel", stages=2, width_multiplier=0.0625,
                      heat_channels=pose.heat_channels, paf_channels=pose.paf_channels)
    keras.utils.set_random_seed(0)
    model = build_model(cfg, pose)
    norm = {"image_scale": [256.0] * 3, "image_offset": [0.5] * 3}
    save_model(model, path, make_meta(pose, norm, dataclasses.asdict(cfg), num_stages=2))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("keras")
    return _tiny_model(tmp_path_factory.mktemp("model") / "tiny.keras")


def test_inference_skips_a_corrupt_jpeg_and_lists_it(tmp_path, tiny_model):
    src = min((need(COCO_TINY) / "val2017").glob("*.jpg"))
    pics = tmp_path / "pics"
    pics.mkdir()
    shutil.copy(src, pics / "good.jpg")
    shutil.copy(src, pics / "bad.jpg")
    _corrupt_middle(pics / "bad.jpg")
    (tmp_path / "infer.yaml").write_text("input_shape: [64, 64]\n")
    res = invoke("inference", "-i", tmp_path / "infer.yaml", "-m", tiny_model, "--input_type",
                 "dir", "--input", pics, "-r", tmp_path / "r")
    assert res.exit_code == 0, res.output
    det = json.loads((tmp_path / "r" / "detections.json").read_text())
    assert [Path(im["full_image_path"]).name for im in det["images"]] == ["good.jpg"]
    assert [Path(s["path"]).name for s in det["skipped"]] == ["bad.jpg"]
    assert "corrupt JPEG" in det["skipped"][0]["reason"]


def test_evaluate_skips_a_corrupt_jpeg_and_lists_it(sample, tmp_path, tiny_model):
    d = _copy(sample, tmp_path)
    src = min((need(COCO_TINY) / "val2017").glob("*.jpg"))
    import cv2
    h, w = cv2.imread(str(src)).shape[:2]
    target = d / "images" / "val" / "real.jpg"
    shutil.copy(src, target)
    _corrupt_middle(target)
    _edit(d, "val", lambda doc: doc["images"].append(
        {"id": 777, "file_name": "real.jpg", "height": h, "width": w}))
    (tmp_path / "infer.yaml").write_text("input_shape: [64, 64]\n")
    res = invoke("evaluate", "-i", tmp_path / "infer.yaml", "-m", tiny_model, "-d",
                 d / "sample_spec.json", "-r", tmp_path / "r")
    assert res.exit_code == 0, res.output
    st = _status(tmp_path / "r")
    assert st["status"] == "SUCCESS" and st["images_unreadable"] == 1
    assert st["images_evaluated"] == 3
    skipped = json.loads((tmp_path / "r" / "detections.json").read_text())["skipped"]
    assert [Path(s["path"]).name for s in skipped] == ["real.jpg"]
    assert "corrupt JPEG" in skipped[0]["reason"]


# ------------------------------------------------------------------ refusing what is not meant

def test_an_empty_spec_file_is_refused(sample, tmp_path):
    for name in ("empty.yaml", "comments.yaml", "empty.json"):
        path = tmp_path / name
        path.write_text("# nothing here\n" if name == "comments.yaml" else "")
        res = invoke("dataset_convert", "-d", path, "-o", tmp_path / "o" / "t",
                     "-r", tmp_path / "r")
        line = _one_error(res.output, "dataset_convert")
        assert res.exit_code == 1 and f"{path}: the file is empty" in line
    p = bpnet_cli("train", "-e", tmp_path / "empty.yaml", "-r", tmp_path / "t")
    assert p.returncode == 1 and "the file is empty" in _one_error(p.stderr, "train")
    assert _files_under(tmp_path / "o") == []


@pytest.mark.parametrize("over, key", [
    ({"input_shape": [100000, 100000]}, "input_shape"),
])
def test_inference_sizes_beyond_the_bound_are_refused(tmp_path, over, key):
    spec = tmp_path / "infer.yaml"
    spec.write_text(yaml.safe_dump(over))
    res = invoke("evaluate", "-i", spec, "-m", tmp_path / "m.keras", "-d", tmp_path / "none.json",
                 "-r", tmp_path / "r")
    line = _one_error(res.output, "evaluate")
    assert res.exit_code == 1 and key in line and "bound 4096" in line, line


def _train_spec(path: Path, sample: Path, **over):
    base = yaml.safe_load((REPO / "specs" / "bpnet_train_sample.yaml").read_text())
    dc = base["dataloader"]["dataset_config"]
    dc.update(root_data_path=str(sample), train_records_folder_path=str(sample / "records"),
              val_records_folder_path=str(sample / "records"),
              dataset_specs={"sample": str(sample / "sample_spec.json")},
              train_records_path=["train"], val_records_path=[])
    base.update(num_epoch=1, checkpoint_n_epoch=1, steps_per_epoch=2, log_every_n_secs=1,
                validation_every_n_epoch=1)
    base["dataloader"].update(batch_size=2, num_parallel_calls=1, shuffle_buffer_size=10)
    base["dataloader"]["image_config"]["image_dims"].update(height=64, width=64)
    base["dataloader"]["pose_config"]["target_shape"] = [8, 8]
    base["model"]["width_multiplier"] = 0.125
    for k, v in over.items():
        node = base
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.mark.parametrize("over, needles", [
    ({"dataloader.image_config.image_dims": {"height": 370, "width": 370, "channels": 3},
      "dataloader.pose_config.target_shape": [46, 46]},
     ["image_dims", "multiples of the stride 8", "[368, 368]", "target_shape [46, 46]"]),
    ({"dataloader.image_config.image_dims": {"height": 100000, "width": 100000, "channels": 3},
      "dataloader.pose_config.target_shape": [12500, 12500]}, ["bound"]),
    ({"dataloader.normalization_params.mask_scale": [0.0]},
     ["normalization_params.mask_scale", "non-zero"]),
])
def test_train_spec_messages(sample, tmp_path, over, needles):
    spec = _train_spec(tmp_path / "t.yaml", sample, **over)
    p = bpnet_cli("train", "-e", spec, "-r", tmp_path / "r")
    line = _one_error(p.stderr, "train")
    assert p.returncode == 1
    for n in needles:
        assert n in line, line
    assert "image_scale" not in line


# ------------------------------------------------------------------ locks

def test_a_results_dir_in_use_is_refused_and_left_alone(sample, tmp_path):
    d = _copy(sample, tmp_path)
    held = tmp_path / "held"
    _write_lock(held / ".bpnet.lock", os.getpid(), "inference")  # this test process: alive
    (held / "status.json").write_text('{"status": "RUNNING", "task": "inference"}')
    p = bpnet_cli("dataset_convert", "-d", d / "sample_spec.json", "-o", d / "out" / "train",
                  "-r", held)
    line = _one_error(p.stderr, "dataset_convert")
    assert p.returncode == 1
    assert f"pid {os.getpid()}" in line and str(held / ".bpnet.lock") in line, line
    # The other run's files are untouched, and nothing was converted.
    assert json.loads((held / "status.json").read_text())["status"] == "RUNNING"
    assert (held / ".bpnet.lock").exists() and _files_under(d / "out") == []


def test_a_stale_lock_of_a_dead_process_is_taken_over(sample, tmp_path):
    d = _copy(sample, tmp_path)
    _write_lock(d / "results" / ".bpnet.lock", _dead_pid())
    res = _convert(d)
    assert res.exit_code == 0, res.output
    assert _status(d / "results")["status"] == "SUCCESS"
    assert not (d / "results" / ".bpnet.lock").exists()  # released at the end


def test_two_converts_into_one_output_or_mask_folder(sample, tmp_path):
    d = _copy(sample, tmp_path)
    # A first run made masks; a second is still running (its lock is held by a live pid).
    assert _convert(d, "--generate_masks", results=tmp_path / "r1").exit_code == 0
    masks = {p: p.read_bytes() for p in (d / "masks" / "train").glob("*.png")}
    records = (d / "out" / "train-fold-000-of-001").read_bytes()
    assert masks
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for lock, what in ((d / "out" / ".train.bpnet.lock", "output"),
                           (d / "masks" / "train" / ".bpnet.lock", "mask folder")):
            _write_lock(lock, other.pid, "dataset_convert")
            res = _convert(d, "--generate_masks", results=tmp_path / "r2")
            assert res.exit_code == 1
            line = _one_error(res.output, "dataset_convert")
            assert what in line and f"pid {other.pid}" in line and str(lock) in line, line
            lock.unlink()
            assert _status(tmp_path / "r2")["status"] == "FAILURE"
            assert {p: p.read_bytes() for p in (d / "masks" / "train").glob("*.png")} == masks
            assert (d / "out" / "train-fold-000-of-001").read_bytes() == records
    finally:
        other.kill()
        other.wait()


def test_one_folder_in_two_roles_is_refused(sample, tmp_path):
    d = _copy(sample, tmp_path)
    res = _convert(d, "--generate_masks", results=d / "masks" / "train")
    line = _one_error(res.output, "dataset_convert")
    assert res.exit_code == 1 and "already locked by this run" in line, line
    assert not list(d.rglob("*.lock")) and _files_under(d / "out") == []


def test_a_failed_rerun_keeps_the_masks_an_earlier_run_made(sample, tmp_path, monkeypatch):
    d = _copy(sample, tmp_path)
    assert _convert(d, "--generate_masks").exit_code == 0
    before = {p.name: p.read_bytes() for p in (d / "masks" / "train").glob("*.png")}
    # The second run adds one image that needs a mask, then fails while writing records.
    doc = json.loads(_ann(d).read_text())
    im = doc["images"][0]
    shutil.copy(d / "images" / "train" / im["file_name"], d / "images" / "train" / "extra.jpg")
    doc["images"].append({**im, "id": 4242, "file_name": "extra.jpg"})
    for a in [a for a in doc["annotations"] if a["image_id"] == im["id"]]:
        doc["annotations"].append({**a, "id": a["id"] + 10 ** 6, "image_id": 4242})
    _ann(d).write_text(json.dumps(doc))
    from bpnet.data import convert as C
    real = C.R.frame_record
    calls = {"n": 0}

    def failing(data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(28, "No space left on device")
        return real(data)
    monkeypatch.setattr(C.R, "frame_record", failing)
    res = _convert(d, "--generate_masks")
    assert res.exit_code == 1 and "No space left" in _one_error(res.output, "dataset_convert")
    after = {p.name: p.read_bytes() for p in (d / "masks" / "train").glob("*.png")}
    assert after == before  # the earlier masks stay; the failed run's new mask is gone
    assert sorted(p.name for p in (d / "out").iterdir()) == ["train-fold-000-of-001"]


def test_ctrl_c_releases_the_locks(sample, tmp_path, monkeypatch):
    d = _copy(sample, tmp_path)
    from bpnet.data import convert as C

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(C, "_convert_locked", interrupted)
    res = _convert(d, "--generate_masks")
    assert res.exit_code == 130
    assert _status(d / "results")["message"] == "interrupted"
    leftovers = [p for p in d.rglob("*.lock")]
    assert leftovers == []
    assert not (d / "masks").exists()  # the empty mask folders it made are gone too


# ------------------------------------------------------------------ outputs never over inputs

def test_import_model_never_writes_over_its_input(tmp_path):
    pb = tmp_path / "graph_opt.pb"
    pb.write_bytes(b"precious")
    link = tmp_path / "link.pb"
    link.symlink_to(pb)
    for out in (pb, link):
        res = invoke("import_model", "-i", pb, "-o", out, "-r", tmp_path / "r")
        line = _one_error(res.output, "import_model")
        assert res.exit_code == 1 and "the input graph (-i)" in line, line
    assert pb.read_bytes() == b"precious"


def test_export_never_writes_over_its_inputs(tmp_path):
    model = tmp_path / "m.keras"
    model.write_bytes(b"precious")
    (tmp_path / "cal").mkdir()
    for args in (["--data_type", "int8", "--cal_image_dir", tmp_path / "cal", "--cal_data_file",
                  model],
                 ["--data_type", "int8", "--cal_image_dir", tmp_path / "cal", "--cal_cache_file",
                  tmp_path / "m.onnx"]):
        res = invoke("export", "-m", model, "-r", tmp_path / "r", *args)
        line = _one_error(res.output, "export")
        assert res.exit_code == 1 and ("the model (-m)" in line or "output" in line), line
    assert model.read_bytes() == b"precious" and not (tmp_path / "m.onnx").exists()


def test_dataset_convert_never_writes_over_the_annotation_file(sample, tmp_path):
    d = _copy(sample, tmp_path)
    ann = _ann(d)
    before = ann.read_bytes()
    target = ann.parent / "x-fold-000-of-001"
    ann.rename(target)
    spec = json.loads((d / "sample_spec.json").read_text())
    spec["train_data"]["annotation_root_dir_path"] = str(target)
    (d / "sample_spec.json").write_text(json.dumps(spec))
    res = _convert(d, out=ann.parent / "x")
    line = _one_error(res.output, "dataset_convert")
    assert res.exit_code == 1 and "annotation file" in line, line
    assert target.read_bytes() == before


# ------------------------------------------------------------------ clear messages

def test_too_many_partitions_or_shards_are_refused(sample, tmp_path):
    d = _copy(sample, tmp_path)
    _assert_convert_failed(d, _convert(d, "-p", "995"), "-p/--num_partitions 995",
                           "folds would be empty")
    _assert_convert_failed(d, _convert(d, "-p", "2", "-s", "50"), "some shards would be empty")


def test_a_shard_count_beyond_the_open_file_limit_is_refused(tmp_path_factory, tmp_path):
    big = tmp_path_factory.mktemp("big")
    make_sample_dataset(big, num_train=40, num_val=1, image_size=(128, 128), seed=5)
    cmd = (f"ulimit -n 80 && exec {sys.executable} -m bpnet.cli dataset_convert -d "
           f"{big / 'sample_spec.json'} -o {tmp_path / 'out' / 'train'} -p 2 -s 10 --workers 1 "
           f"-r {tmp_path / 'r'}")
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=ENV, cwd=REPO,
                       check=False, timeout=300)
    line = _one_error(p.stderr, "dataset_convert")
    assert p.returncode == 1 and "open-file limit 80" in line, line
    assert _files_under(tmp_path / "out") == []


def test_a_folder_where_a_file_is_expected(sample, tmp_path):
    d = _copy(sample, tmp_path)
    res = invoke("dataset_convert", "-d", d, "-o", tmp_path / "o", "-r", tmp_path / "r")
    assert "is a folder" in _one_error(res.output, "dataset_convert")
    res = invoke("import_model", "-i", d, "-o", tmp_path / "m.keras", "-r", tmp_path / "r2")
    assert "is a folder" in _one_error(res.output, "import_model")
    spec = json.loads((d / "sample_spec.json").read_text())
    spec["test_data"]["annotation_root_dir_path"] = "images"
    (d / "sample_spec.json").write_text(json.dumps(spec))
    (tmp_path / "infer.yaml").write_text("input_shape: [64, 64]\n")
    res = invoke("evaluate", "-i", tmp_path / "infer.yaml", "-m", tmp_path / "m.keras",
                 "-d", d / "sample_spec.json", "-r", tmp_path / "r3")
    line = _one_error(res.output, "evaluate")
    assert "is a folder" in line and "not found" not in line, line
    from bpnet.errors import BpnetError
    with pytest.raises(BpnetError, match="is a folder"):
        R.record_files(d)


def test_a_fold_name_finds_its_shard_files(sample, tmp_path):
    d = _copy(sample, tmp_path)
    assert _convert(d, "-s", "2", out=d / "records" / "train").exit_code == 0
    spec = _train_spec(tmp_path / "t.yaml", d,
                       **{"dataloader.dataset_config.train_records_path": ["train-fold-000-of-001"]})
    from bpnet.specs import load_train_spec
    files = R.split_files(load_train_spec(spec).dataloader.dataset_config, "train")
    assert [Path(f).name for f in files] == [
        "train-fold-000-of-001-shard-00000-of-00002", "train-fold-000-of-001-shard-00001-of-00002"]


@pytest.fixture(scope="module")
def converted(sample, tmp_path_factory):
    d = tmp_path_factory.mktemp("conv") / "ds"
    shutil.copytree(sample, d)
    assert _convert(d, "--generate_masks", out=d / "records" / "train").exit_code == 0
    return d


def test_training_names_a_truncated_image_and_says_validation_is_off(converted, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(converted, d)
    rec = next(R.read_records(d / "records" / "train"))
    img = d / rec["image_path"]
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    # Every record is the first one: the bad image is read at once.
    R.write_records(d / "records" / "train-fold-000-of-001",
                    [R.serialize_record(rec)] * 4)
    spec = _train_spec(tmp_path / "t.yaml", d, **{"dataloader.shuffle_buffer_size": 0})
    p = bpnet_cli("train", "-e", spec, "-r", tmp_path / "r", timeout=600)
    line = _one_error(p.stderr, "train")
    assert p.returncode == 1 and str(img) in line and "truncated JPEG" in line, line
    assert p.stderr.count("validation is off") == 1, p.stderr
    assert _status(tmp_path / "r")["status"] == "FAILURE"


def test_training_on_an_empty_record_file(converted, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(converted, d)
    (d / "records" / "train-fold-000-of-001").write_bytes(b"")
    spec = _train_spec(tmp_path / "t.yaml", d)
    p = bpnet_cli("train", "-e", spec, "-r", tmp_path / "r", timeout=600)
    line = _one_error(p.stderr, "train")
    assert p.returncode == 1 and "StopIteration" not in line, line
    assert "train-fold-000-of-001" in line and "are empty (0 records)" in line, line
    assert _status(tmp_path / "r")["status"] == "FAILURE"


def test_a_mask_of_another_size_is_refused_not_stretched(converted, tmp_path):
    import cv2

    from bpnet.data.pipeline import SampleProcessor, dataset_roots
    from bpnet.errors import BpnetError
    from bpnet.specs import load_train_spec
    d = tmp_path / "ds"
    shutil.copytree(converted, d)
    rec = next(r for r in R.read_records(d / "records" / "train") if r["mask_path"])
    mask = d / rec["mask_path"]
    cv2.imwrite(str(mask), np.full((rec["height"] // 2, rec["width"] // 2), 255, np.uint8))
    spec = load_train_spec(_train_spec(tmp_path / "t.yaml", d))
    roots, fallback = dataset_roots(spec)
    proc = SampleProcessor(spec, spec.dataloader.pose_config.load(), roots, fallback, train=False)
    with pytest.raises(BpnetError, match="is 64x64 but its record's image is 128x128"):
        proc(rec["dataset"], rec["image_path"], rec["mask_path"], rec["height"], rec["width"],
             rec["joints"], rec["centers"], rec["scales"], 0)

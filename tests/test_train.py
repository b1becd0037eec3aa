"""bpnet train: learning, resume, data parallelism, multi-worker, bad inputs.

Every run goes through the real command line in a subprocess (a fresh
TensorFlow runtime, as users get it; --gpus N must configure devices before
TensorFlow starts). Data: the synthetic sample dataset, made and converted
once per module. Models are tiny (width_multiplier 0.125, 64 px input)
except in the learning test, which runs the shipped sample spec.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, bpnet_cli, error_lines, make_converted_sample

SAMPLE_SPEC = REPO / "specs" / "bpnet_train_sample.yaml"
# No GPU (--gpus N then makes N logical CPU devices) and no TF_CONFIG of the caller's.
ENV = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
ENV.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""})


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The sample dataset of `bpnet make_sample_data` (default size) with train/val records."""
    return make_converted_sample(tmp_path_factory.mktemp("sample_data"), 200, 40, seed=0)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def write_spec(path: Path, sample: Path, **over) -> Path:
    """The shipped sample spec pointed at ``sample``, with ``over`` merged in."""
    spec = yaml.safe_load(SAMPLE_SPEC.read_text())
    spec = _merge(spec, {"dataloader": {"dataset_config": {
        "root_data_path": str(sample),
        "train_records_folder_path": str(sample / "records"),
        "val_records_folder_path": str(sample / "records"),
        "dataset_specs": {"sample": str(sample / "sample_spec.json")}}}})
    spec = _merge(spec, over)
    path.write_text(yaml.safe_dump(spec))
    return path


# A model small enough that a step takes milliseconds: the tests below are
# about the training machinery, not about accuracy.
TINY = {
    "num_epoch": 4, "checkpoint_n_epoch": 1, "max_ckpt_to_keep": 5, "steps_per_epoch": 6,
    "validation_every_n_epoch": 1, "log_every_n_secs": 1,
    "dataloader": {"batch_size": 4, "num_parallel_calls": 1,
                   "image_config": {"image_dims": {"height": 64, "width": 64}},
                   "pose_config": {"target_shape": [8, 8]},
                   "dataset_config": {"val_records_path": []}},
    "model": {"width_multiplier": 0.125},
}


def final_weights(path, key=None):
    from bpnet.model.io import load_model
    model, meta = load_model(path, key=key)
    return [np.asarray(w) for w in model.get_weights()], meta


def state_info(path, key=None):
    from bpnet.train.checkpoints import decode_state
    return decode_state(Path(path).read_bytes(), key, path)


def error_line(p) -> str:
    lines = error_lines(p.stderr, "train")
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------ learning

def _true_joint_hits(model, spec_path, radius_cells=2.0):
    """(hits, labeled joints) of the final model on the val records.

    The truth comes from the records' joint coordinates moved by the
    validation transform (not from rendered heatmaps): a labeled joint inside
    the map counts as hit when the predicted heatmap's maximum, over the
    cells nearer to it than to any other labeled joint of its kind, is within
    ``radius_cells`` cells of it.
    """
    from bpnet.data.pipeline import SampleProcessor, dataset_roots
    from bpnet.data.records import read_records, record_files
    from bpnet.specs import load_train_spec
    spec = load_train_spec(spec_path)
    pose = spec.dataloader.pose_config.load()
    roots, fallback = dataset_roots(spec)
    proc = SampleProcessor(spec, pose, roots, fallback, train=False)
    norm = spec.dataloader.normalization_params
    dc = spec.dataloader.dataset_config
    files = record_files([os.path.join(dc.val_records_folder_path, n) for n in dc.val_records_path])
    seen = set()
    hits = total = 0
    for rec in read_records(files):
        if rec["image_id"] in seen:  # one record per main person: same image, same joints
            continue
        seen.add(rec["image_id"])
        img, _, _, mask, joints = proc(rec["dataset"], rec["image_path"], rec["mask_path"],
                                       int(rec["height"]), int(rec["width"]), rec["joints"],
                                       rec["centers"], rec["scales"], None)
        x = img.astype(np.float32) / np.array(norm.image_scale) - np.array(norm.image_offset)
        heat = np.asarray(model(x[None].astype(np.float32), training=False)[len(model.outputs) // 2 - 1])[0]
        h, w = heat.shape[:2]
        cells = (joints[..., :2] - 3.5) / 8.0  # cell i is centred on pixel 8i + 3.5
        yy, xx = np.mgrid[0:h, 0:w]
        for j in range(pose.num_joints):
            lab = [(c[0], c[1]) for c, v in zip(cells[:, j], joints[:, j, 2])
                   if v > 0 and -0.5 <= c[0] < w - 0.5 and -0.5 <= c[1] < h - 0.5
                   and mask[round(c[1]), round(c[0]), 0] > 0.5]
            if not lab:
                continue
            lab = np.array(lab)
            d = (xx[..., None] - lab[:, 0]) ** 2 + (yy[..., None] - lab[:, 1]) ** 2
            owner = d.argmin(-1)
            for k, (cx, cy) in enumerate(lab):
                m = np.where(owner == k, heat[..., j], -np.inf)
                py, px = np.unravel_index(np.argmax(m), m.shape)
                hits += np.hypot(px - cx, py - cy) <= radius_cells
                total += 1
    return int(hits), total


@pytest.mark.slow
def test_sample_spec_learns(sample, tmp_path):
    """The shipped sample spec (lite model, width 0.25, 2 stages, AdamW, loss per map cell,
    batches of 4) on a quarter of its budget: 8 epochs of 80 steps at 128 px instead of 10 of
    250 at 192 px keep the test's CPU time down (the loss per cell makes the same rates work
    at both sizes)."""
    spec = write_spec(tmp_path / "spec.yaml", sample, steps_per_epoch=80, num_epoch=8,
                      dataloader={"image_config": {"image_dims": {"height": 128, "width": 128}},
                                  "pose_config": {"target_shape": [16, 16]}})
    out = tmp_path / "run"
    import resource
    bpnet_cli("train", "-e", spec, "-r", out, env=ENV, check=True)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "SUCCESS" and status["steps"] == 640
    _, info = state_info(out / "model.epoch-8.state")
    hist = info["val_history"]
    assert [h["epoch"] for h in hist] == [0, 2, 4, 6, 8]
    first, last = hist[0]["val_loss"], hist[-1]["val_loss"]
    assert last <= 0.5 * first, f"validation loss {first:.1f} -> {last:.1f} did not halve"

    from bpnet.model.io import load_model
    model, meta = load_model(out / "bpnet_model.keras")
    assert meta["stride"] == 8 and meta["pose_config"]["name"]
    assert meta["normalization"]["image_scale"] == [256.0, 256.0, 256.0]
    hits, total = _true_joint_hits(model, spec)
    assert total > 200
    assert hits / total >= 0.6, f"only {hits}/{total} joints within 2 cells"
    # Outputs a user looks for.
    assert (out / "experiment_spec.yaml").exists() and (out / "events").is_dir()
    assert any((out / "events").iterdir())
    assert sorted(p.name for p in out.glob("model.epoch-*")) == [
        "model.epoch-6.keras", "model.epoch-6.state", "model.epoch-8.keras", "model.epoch-8.state"]
    print(f"val loss {first:.1f} -> {last:.1f}, joints within 2 cells {hits}/{total}, "
          f"training CPU {cpu.ru_utime + cpu.ru_stime:.0f} s")


# ------------------------------------------------------------------ resume

def _kill_after_checkpoint(args, ckpt: Path, timeout=300):
    """Start `bpnet train`, SIGKILL it as soon as ``ckpt`` appears; return its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "bpnet.cli", *map(str, args)], env=ENV,
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    try:
        while not ckpt.exists():
            if proc.poll() is not None:
                raise AssertionError(f"run ended before {ckpt.name}:\n{proc.stderr.read()[-3000:]}")
            if time.time() - t0 > timeout:
                raise AssertionError(f"no {ckpt.name} after {timeout} s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    return proc.stderr.read()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(sample, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", sample, **_merge(TINY, {"steps_per_epoch": 12}))
    full = tmp_path / "full"
    bpnet_cli("train", "-e", spec, "-r", full, env=ENV, check=True)

    # The interrupted run also encrypts its files: the key must not change a weight.
    key = "resume-test-key"
    cut = tmp_path / "cut"
    _kill_after_checkpoint(["train", "-e", spec, "-r", cut, "-k", key, "--encrypt"],
                           cut / "model.epoch-1.keras")
    assert not (cut / "bpnet_model.keras").exists(), "the run finished before it was killed"
    left = sorted(p.name for p in cut.glob("model.epoch-*"))
    assert "model.epoch-1.keras" in left and "model.epoch-1.state" in left
    assert not [p for p in cut.iterdir() if p.name.endswith(".keras") and
                not p.name.startswith("model.epoch-")], "a half-written model file is visible"
    p = bpnet_cli("train", "-e", spec, "-r", cut, "-k", key, "--encrypt", env=ENV, check=True)
    assert "resuming from model.epoch-" in p.stderr

    a, _ = final_weights(full / "bpnet_model.keras")
    b, meta = final_weights(cut / "bpnet_model.keras", key=key)
    assert meta["train"]["steps"] == 48
    # Same data (per-epoch seeds), same optimizer state and step: bit-identical
    # on CPU; allow float32 round-off in case a kernel's threading differs.
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    sa, ia = state_info(full / "model.epoch-4.state")
    sb, ib = state_info(cut / "model.epoch-4.state", key=key)
    assert ia["step"] == ib["step"] == 48
    for k in sa:
        np.testing.assert_allclose(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="key"):
        final_weights(cut / "bpnet_model.keras")


# ------------------------------------------------------------------ data parallel

@pytest.mark.slow
def test_two_replicas_match_one_device(sample, tmp_path):
    """--gpus 2 on a CPU machine: 2 logical devices, half the batch each, synchronized BN."""
    common = _merge(TINY, {"num_epoch": 1, "checkpoint_n_epoch": 1, "steps_per_epoch": 4,
                           "use_stagewise_lr_multipliers": False,
                           # Momentum SGD: Adam's near-sign steps on tiny gradients would
                           # magnify the round-off this test bounds.
                           "optimizer": {"__class_name__": "WeightedMomentumOptimizer",
                                         "weight_decay": None,
                                         "scale_learning_rate_by_replicas": False,
                                         "learning_rate_schedule": {"base_learning_rate": 5e-5,
                                                                    "soft_start": 0.0}}})
    one = write_spec(tmp_path / "one.yaml", sample, **_merge(common, {"dataloader": {"batch_size": 4}}))
    two = write_spec(tmp_path / "two.yaml", sample, **_merge(common, {"dataloader": {"batch_size": 2}}))
    bpnet_cli("train", "-e", one, "-r", tmp_path / "one", env=ENV, check=True)
    p = bpnet_cli("train", "-e", two, "-r", tmp_path / "two", "--gpus", "2", env=ENV, check=True)
    assert "MirroredStrategy: 2 replica(s), batch 2 per replica, 4 global" in p.stderr
    from bpnet.model.io import load_model
    a, _ = load_model(tmp_path / "one" / "bpnet_model.keras")
    b, _ = load_model(tmp_path / "two" / "bpnet_model.keras")
    # Same batches, gradients summed over replicas, BN statistics over the
    # global batch: only the order of float sums differs (and the variance
    # formula of synchronized BN), so the runs agree to round-off that a few
    # steps amplify a little. Measured: outputs 0.17%, kernels 0.01% apart.
    # Per-replica BN or a per-replica loss normalization would be far off.
    for u, v in zip(a.weights, b.weights):
        if u.path.endswith("kernel"):
            x, y = np.asarray(u), np.asarray(v)
            assert np.abs(x - y).max() <= 1e-3 * np.abs(x).max(), u.path
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 64, 64, 3)).astype(np.float32)
    for oa, ob in zip(a(x), b(x)):
        oa, ob = np.asarray(oa), np.asarray(ob)
        assert np.abs(oa - ob).max() <= 1e-2 * np.abs(oa).max()


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_train_together(sample, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", sample,
                      **_merge(TINY, {"num_epoch": 1, "steps_per_epoch": 3, "checkpoint_n_epoch": 1}))
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        env = {**ENV, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bpnet.cli", "train", "-e", str(spec), "-r", str(tmp_path / "run")],
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        errs.append(err)
        assert p.returncode == 0, err[-3000:]
    assert "2 replica(s), batch 4 per replica, 8 global" in errs[0]
    run = tmp_path / "run"
    chief = json.loads((run / "status.json").read_text())
    worker = json.loads((run / "worker-1" / "status.json").read_text())
    assert chief["status"] == worker["status"] == "SUCCESS"
    assert chief["steps"] == worker["steps"] == 3
    assert (run / "bpnet_model.keras").exists() and (run / "model.epoch-1.keras").exists()
    assert not (run / "worker-1" / "bpnet_model.keras").exists()


# ------------------------------------------------------------------ bad inputs

def test_missing_records_is_one_clear_error(sample, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", sample, **_merge(
        TINY, {"dataloader": {"dataset_config": {"train_records_path": ["nope-fold-000-of-001"]}}}))
    p = bpnet_cli("train", "-e", spec, "-r", tmp_path / "run", env=ENV)
    assert p.returncode != 0
    line = error_line(p)
    assert "nope-fold-000-of-001" in line and "dataset_convert" in line
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "FAILURE"


def test_image_deleted_after_conversion_is_one_clear_error(sample, tmp_path):
    # The pipeline checks one record per file before training; files that
    # vanish later fail inside tf.data and must still come out as one line.
    from bpnet.data.records import read_records
    data = tmp_path / "data"
    shutil.copytree(sample, data)
    first = next(iter(read_records(data / "records" / "train-fold-000-of-001")))["image_path"]
    gone = [p for p in (data / "images" / "train").iterdir() if p.name != Path(first).name]
    for p in gone:
        p.unlink()
    spec = write_spec(tmp_path / "spec.yaml", data, **TINY)
    p = bpnet_cli("train", "-e", spec, "-r", tmp_path / "run", env=ENV)
    assert p.returncode != 0
    line = error_line(p)
    # The pipeline names the missing file (its own check, or the OS's message).
    assert ("file not found" in line or "No such file or directory" in line) \
        and str(data / "images" / "train") in line, line
    assert "Traceback" not in p.stderr and "function_node" not in p.stderr and "[[" not in line
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "FAILURE" and status["message"] == line.split("error: ", 1)[1]


def test_records_of_another_pose_config_are_refused(sample, tmp_path):
    from bpnet.data.records import write_records
    joints = np.zeros((1, 5, 3), np.float32)
    joints[0, :, 2] = 2
    joints[0, :, :2] = [[10, 10], [20, 20], [30, 30], [40, 40], [50, 50]]
    write_records(tmp_path / "other-fold-000-of-001", [{
        "image_id": 1, "height": 256, "width": 256, "image_path": "images/train/x.jpg",
        "mask_path": "", "dataset": "sample", "pose_config": "five_points", "joints": joints}])
    spec = write_spec(tmp_path / "spec.yaml", sample, **_merge(TINY, {"dataloader": {"dataset_config": {
        "train_records_folder_path": str(tmp_path), "train_records_path": ["other-fold-000-of-001"]}}}))
    p = bpnet_cli("train", "-e", spec, "-r", tmp_path / "run", env=ENV)
    assert p.returncode != 0
    line = error_line(p)
    assert "five_points" in line and "5 joints" in line


def test_unwritable_results_dir(sample, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", sample, **TINY)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    p = bpnet_cli("train", "-e", spec, "-r", blocker / "run", env=ENV)
    assert p.returncode != 0
    assert "results dir" in error_line(p)


def test_results_dir_from_the_spec_when_no_r(sample, tmp_path):
    """Without -r the spec's checkpoint_dir holds the run and its status.json; a spec
    that names neither is one error line."""
    run = tmp_path / "from_spec"
    spec = write_spec(tmp_path / "spec.yaml", sample,
                      **_merge(TINY, {"num_epoch": 1, "steps_per_epoch": 1,
                                      "checkpoint_dir": str(run)}))
    bpnet_cli("train", "-e", spec, env=ENV, check=True)
    assert json.loads((run / "status.json").read_text())["status"] == "SUCCESS"
    assert (run / "bpnet_model.keras").is_file()
    bare = write_spec(tmp_path / "bare.yaml", sample, **_merge(TINY, {"checkpoint_dir": None}))
    p = bpnet_cli("train", "-e", bare, env=ENV)
    assert p.returncode != 0 and "no results dir" in error_line(p)


@pytest.fixture(scope="module")
def one_checkpoint_run(sample, tmp_path_factory):
    """A finished tiny run with checkpoints of epochs 1 and 2 (and its spec)."""
    d = tmp_path_factory.mktemp("ckpt_run")
    spec = write_spec(d / "spec.yaml", sample, **_merge(TINY, {"num_epoch": 2, "steps_per_epoch": 2}))
    bpnet_cli("train", "-e", spec, "-r", d / "run", env=ENV, check=True)
    return spec, d / "run"


@pytest.mark.parametrize("which", ["bpnet_model.keras", "model.epoch-1.keras"])
def test_a_run_never_writes_over_its_own_pretrained_weights(sample, one_checkpoint_run,
                                                            tmp_path, which):
    """Fine-tuning from a finished run's model into that same results dir would replace the
    input at the end (or at a checkpoint): refused before any work, the file untouched."""
    _, run = one_checkpoint_run
    src = run / which
    before = src.read_bytes()
    spec = write_spec(tmp_path / "ft.yaml", sample, **_merge(TINY, {"pretrained_weights": str(src)}))
    p = bpnet_cli("train", "-e", spec, "-r", run, env=ENV)
    assert p.returncode == 1
    assert "is a file this run writes" in error_line(p)
    assert src.read_bytes() == before


def test_corrupt_checkpoint_is_reported_and_kept(one_checkpoint_run, tmp_path):
    spec, run = one_checkpoint_run
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    (bad / "bpnet_model.keras").unlink()
    data = (bad / "model.epoch-2.keras").read_bytes()
    (bad / "model.epoch-2.keras").write_bytes(data[: len(data) // 2])
    before = sorted(p.name for p in bad.iterdir())
    p = bpnet_cli("train", "-e", spec, "-r", bad, env=ENV)
    assert p.returncode != 0
    line = error_line(p)
    assert "model.epoch-2.keras" in line and "resume from epoch 1" in line
    assert sorted(p.name for p in bad.iterdir()) == before  # nothing deleted or added
    assert (bad / "model.epoch-1.keras").read_bytes() == (run / "model.epoch-1.keras").read_bytes()


def test_full_disk_keeps_earlier_checkpoints(one_checkpoint_run, tmp_path):
    """A results dir on a tmpfs too small for one more checkpoint (needs root for mount)."""
    spec, run = one_checkpoint_run
    mnt = tmp_path / "small"
    mnt.mkdir()
    ckpt = (run / "model.epoch-1.keras").stat().st_size + (run / "model.epoch-1.state").stat().st_size
    # Room for epoch 1's checkpoint, the spec copies and status.json, and half a checkpoint more.
    size = ckpt + 64 * 1024 + ckpt // 2
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); full disk not simulated")
    try:
        dst = mnt / "run"
        dst.mkdir()
        for name in ("model.epoch-1.keras", "model.epoch-1.state"):
            shutil.copy(run / name, dst / name)
        keep = (dst / "model.epoch-1.keras").read_bytes()
        p = bpnet_cli("train", "-e", spec, "-r", dst, env=ENV)
        assert p.returncode != 0
        line = error_line(p)
        assert "No space left" in line, line
        assert "resuming from model.epoch-1.keras" in p.stderr
        assert (dst / "model.epoch-1.keras").read_bytes() == keep
        assert (dst / "model.epoch-1.state").exists()
        assert not (dst / "model.epoch-2.keras").exists()
        assert not [n.name for n in dst.iterdir() if n.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)


def test_nan_loss_stops_with_the_step_and_a_hint(sample, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", sample, **_merge(TINY, {
        "num_epoch": 1, "steps_per_epoch": 30,
        "optimizer": {"learning_rate_schedule": {"base_learning_rate": 50.0, "soft_start": 0.0,
                                                 "min_learning_rate": 1.0}}}))
    p = bpnet_cli("train", "-e", spec, "-r", tmp_path / "run", env=ENV)
    assert p.returncode != 0
    line = error_line(p)
    assert "at step" in line and "lower the learning rate" in line


# ------------------------------------------------------------------ pretrained weights

def test_pretrained_weights_copy_by_name_and_skip_shape_mismatches():
    """A 2-stage 18-joint model into a 3-stage model of a 14-joint (no face) pose config."""
    import keras

    from bpnet.model.build import build_model
    from bpnet.model.weights import copy_weights_by_name
    from bpnet.pose import pose_config_from_dict
    from bpnet.specs import ModelConfig, default_pose_config_path

    full = json.loads(default_pose_config_path().read_text())
    keep = full["keypoints"][:14]  # drop eyes and ears
    no_face = {"name": "no_face", "keypoints": keep, "synthetic_joints": full["synthetic_joints"],
               "skeleton": [e for e in full["skeleton"] if max(e) <= 14]}
    pose18 = pose_config_from_dict(full)
    pose14 = pose_config_from_dict(no_face)
    keras.utils.set_random_seed(1)
    src = build_model(ModelConfig(stages=2, width_multiplier=0.125), pose18, (None, None, 3))
    dst = build_model(ModelConfig(stages=3, width_multiplier=0.125, heat_channels=pose14.heat_channels,
                                  paf_channels=pose14.paf_channels), pose14, (None, None, 3))
    report = copy_weights_by_name(src, dst)
    skipped = dict(report["skipped"])
    # Output layers change with the joint count; stage 2's first conv reads the outputs too.
    assert {"heatmap_stage1", "paf_stage1", "heatmap_out", "paf_out", "stage2_conv1"} <= set(skipped)
    assert "shape mismatch" in skipped["heatmap_out"]
    assert set(report["missing"]) >= {"stage3_conv2", "heatmap_stage2"}
    assert "block1_conv1" in report["loaded"] and "stage1_conv1" in report["loaded"]
    for name in report["loaded"]:
        for a, b in zip(src.get_layer(name).get_weights(), dst.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)


def test_amp_load_graph_and_finetuning(one_checkpoint_run, tmp_path):
    """--use_amp trains and saves a float32 model; load_graph trains the file's model as is;
    finetuning_config continues another run's checkpoint at its epoch."""
    spec, run = one_checkpoint_run
    base = yaml.safe_load(spec.read_text())
    src_w, src_meta = final_weights(run / "bpnet_model.keras")

    amp = tmp_path / "amp.yaml"
    amp.write_text(yaml.safe_dump(_merge(base, {"num_epoch": 1, "checkpoint_n_epoch": 1,
                                                "pretrained_weights": str(run / "bpnet_model.keras"),
                                                "load_graph": True,
                                                # ignored with load_graph: the file's model is trained
                                                "model": {"width_multiplier": 0.5}})))
    p = bpnet_cli("train", "-e", amp, "-r", tmp_path / "amp", "--use_amp", env=ENV, check=True)
    assert "load_graph: training the whole model" in p.stderr
    from bpnet.model.io import load_model
    model, meta = load_model(tmp_path / "amp" / "bpnet_model.keras")
    assert {l.dtype_policy.name for l in model.layers} == {"float32"}
    assert [w.shape for w in model.get_weights()] == [w.shape for w in src_w]
    assert meta["model"]["width_multiplier"] == src_meta["model"]["width_multiplier"] == 0.125
    assert any(np.abs(a - b).max() > 0 for a, b in zip(model.get_weights(), src_w))

    ft = tmp_path / "ft.yaml"
    ft.write_text(yaml.safe_dump(_merge(base, {"num_epoch": 3, "checkpoint_n_epoch": 1, "finetuning_config": {
        "is_finetune_exp": True, "checkpoint_path": str(run / "model.epoch-2.keras"), "ckpt_epoch_num": 2}})))
    p = bpnet_cli("train", "-e", ft, "-r", tmp_path / "ft", env=ENV, check=True)
    assert "finetuning from" in p.stderr
    _, info = state_info(tmp_path / "ft" / "model.epoch-3.state")
    assert info["step"] == 3 * base["steps_per_epoch"]
    assert not (tmp_path / "ft" / "model.epoch-1.keras").exists()

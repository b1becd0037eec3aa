"""TAO drop-in: TAO's own files and the notebook's command lines, run by bpnet.

The files are NVIDIA's, unchanged (../shared/data/tao_specs: the tutorial notebook, both train
specs, six inference specs, coco_spec.json, TAO's bpnet_18joints.json). The test copies them into
a folder laid out like TAO's container (``examples/bpnet/...`` and ``tao-experiments/bpnet/...``),
rewrites only their ``/workspace/`` paths to that folder, links COCO images and annotations from
../shared/data/coco_tiny where the notebook keeps its data (the val annotations cut to two
images), and runs every notebook stage through
bpnet's command line with the notebook's own arguments (``tao model bpnet`` -> ``bpnet``, the
notebook's environment variables expanded):

dataset_convert (train, test) -> train -> evaluate -> inference -> prune -> retrain (TAO's
retrain spec) -> evaluate and inference of the retrained model -> export.

Two things are the test's, not the notebook's: NGC's pretrained ``model.tlt`` is replaced by a
bpnet model of the spec's architecture made here (TAO's encrypted file cannot be read: the
message saying so is checked first), and ``--max_steps 1`` keeps each training run to one step
of TAO's full-size VGG network on the CPU (TAO's specs ask for 20 and 50 epochs).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import COCO_TINY, SHARED, invoke, need

TAO_SPECS = SHARED / "data" / "tao_specs"
KEY = "nvidia_tlt"  # the notebook's %env KEY
TRAIN_SPECS = ("bpnet_train_m1_coco.yaml", "bpnet_retrain_m1_coco.yaml")
INFER_SPECS = ("infer_spec.yaml", "infer_spec_refine.yaml", "infer_spec_retrained.yaml",
               "infer_spec_retrained_refine.yaml", "infer_spec_retrained_strict.yaml",
               "infer_spec_strict.yaml")


def _workspace(root: Path) -> dict:
    """TAO's container layout under ``root``, with TAO's files copied in, paths rewritten."""
    need(TAO_SPECS)
    need(COCO_TINY)
    ws = root / "workspace"
    specs = ws / "examples" / "bpnet" / "specs"
    data_pose = ws / "examples" / "bpnet" / "data_pose_config"
    model_pose = ws / "examples" / "bpnet" / "model_pose_config"
    exp = ws / "tao-experiments" / "bpnet"
    data = exp / "data"
    for d in (specs, data_pose, model_pose, data):
        d.mkdir(parents=True)

    def copy(name, dest):
        text = (TAO_SPECS / name).read_text()
        (dest / name).write_text(text.replace("/workspace/", f"{ws}/"))

    for name in TRAIN_SPECS + INFER_SPECS:
        copy(name, specs)
    copy("coco_spec.json", data_pose)
    copy("bpnet_18joints.json", model_pose)
    # The notebook's data folder: COCO's train2017 and val2017, and their annotations (val
    # cut to its first two images: validation and evaluation on the CPU stay short).
    for name in ("train2017", "val2017"):
        (data / name).symlink_to(COCO_TINY / name, target_is_directory=True)
    ann = data / "annotations"
    ann.mkdir()
    train_ann = "person_keypoints_train2017.json"
    (ann / train_ann).symlink_to(COCO_TINY / "annotations" / train_ann)
    val = json.loads((COCO_TINY / "annotations" / "person_keypoints_val2017.json").read_text())
    keep = sorted(im["id"] for im in val["images"])[:2]
    val["images"] = [im for im in val["images"] if im["id"] in keep]
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in keep]
    (ann / "person_keypoints_val2017.json").write_text(json.dumps(val))
    return {"WS": ws, "SPECS_DIR": specs, "DATA_POSE_SPECS_DIR": data_pose,
            "MODEL_POSE_SPECS_DIR": model_pose, "USER_EXPERIMENT_DIR": exp, "DATA_DIR": data}


def _run(*args, ok=True):
    """``bpnet ARGS`` through the command line (click, in this process)."""
    res = invoke(*args)
    if ok:
        assert res.exit_code == 0, f"bpnet {' '.join(map(str, args))}:\n{res.output[-3000:]}"
    return res


@pytest.fixture(autouse=True)
def _restore_logging():
    # Each command sets up logging on the stream click captures; put it back afterwards.
    yield
    logging.basicConfig(force=True, level=logging.WARNING)


def test_tao_files_load_as_bpnet_specs(tmp_path, caplog):
    """Every TAO file loads: train specs, inference specs, dataset spec, TAO's pose config."""
    from bpnet.pose import load_pose_config
    from bpnet.specs import (
        default_pose_config_path,
        load_dataset_spec,
        load_inference_spec,
        load_train_spec,
    )
    env = _workspace(tmp_path)
    with caplog.at_level(logging.WARNING, logger="bpnet"):
        for name in TRAIN_SPECS:
            spec = load_train_spec(env["SPECS_DIR"] / name)
            assert spec.model.class_name == "BpNetLiteModel" and spec.model.stages == 3
            assert spec.optimizer.weight_default_value == 1.0
            assert spec.optimizer.grad_weights_dict is None
            assert spec.optimizer.learning_rate_schedule.last_step is None
            pose = spec.dataloader.pose_config.load()
            assert pose.name == "bpnet_18_joints" and pose.num_joints == 18
        for name in INFER_SPECS:
            spec = load_inference_spec(env["SPECS_DIR"] / name)
            assert Path(spec.train_spec).is_file()
    # TAO's shipped files use TAO's defaults everywhere: not one warning.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    ds = load_dataset_spec(env["DATA_POSE_SPECS_DIR"] / "coco_spec.json")
    assert ds.category.num_joints == 17 and len(ds.category.skeleton_edge_names) == 19
    # TAO's pose config and bpnet's are one topology, neck included.
    tao = load_pose_config(env["MODEL_POSE_SPECS_DIR"] / "bpnet_18joints.json")
    ours = load_pose_config(default_pose_config_path())
    assert (tao.keypoints, tao.skeleton, tao.flip_pairs, tao.no_start_limbs) == \
        (ours.keypoints, ours.skeleton, ours.flip_pairs, ours.no_start_limbs)
    assert tao.synthetic_joints == ours.synthetic_joints == {
        "neck": ("left_shoulder", "right_shoulder")}
    assert tao.topology_id == ours.topology_id and tao.name != ours.name
    assert tao.matches_record(ours.record_tag) and ours.matches_record(tao.record_tag)


def _standin_pretrained(spec_path: Path, out: Path):
    """A bpnet model of the train spec's architecture: what stands in for NGC's model.tlt."""
    from bpnet.model.build import build_model
    from bpnet.model.io import save_model
    from bpnet.model.meta import make_meta
    from bpnet.specs import load_train_spec, spec_to_dict
    spec = load_train_spec(spec_path)
    pose = spec.dataloader.pose_config.load()
    model = build_model(spec.model, pose)
    save_model(model, out, make_meta(pose, spec.dataloader.normalization_params,
                                     spec_to_dict(spec.model)))


@pytest.mark.slow
def test_notebook_stages_run_on_tao_files(tmp_path):
    env = _workspace(tmp_path)
    specs, exp, data = env["SPECS_DIR"], env["USER_EXPERIMENT_DIR"], env["DATA_DIR"]
    coco_spec = env["DATA_POSE_SPECS_DIR"] / "coco_spec.json"

    # --- dataset_convert, train and test, as the notebook writes them
    for mode, out in (("train", "train"), ("test", "val")):
        _run("dataset_convert", "-m", mode, "-o", data / out, "-r", f"{exp}/",
             "--generate_masks", "--dataset_spec", coco_spec)
        assert (data / f"{out}-fold-000-of-001").is_file()
    assert any((data / "train_mask2017").iterdir())

    # --- train: NGC's encrypted model.tlt cannot be read; the message says what can
    unpruned = exp / "models" / "exp_m1_unpruned"
    tlt = exp / "pretrained_model" / "bodyposenet_vtrainable_v1.0" / "model.tlt"
    tlt.parent.mkdir(parents=True)
    tlt.write_bytes(b"\x00TAO-encrypted-bytes" * 8)
    train_cmd = ["train", "-e", specs / "bpnet_train_m1_coco.yaml", "-r", unpruned,
                 "-k", KEY, "--gpus", "1"]
    res = _run(*train_cmd, ok=False)
    assert res.exit_code == 1
    err = [ln for ln in res.output.splitlines() if ln.startswith("bpnet train: error:")]
    assert len(err) == 1 and "model.tlt" in err[0] and "import_model" in err[0], res.output
    assert "Traceback" not in res.output
    # A bpnet model of the same name beside it (.keras) stands in for it, spec unchanged.
    tlt.unlink()
    _standin_pretrained(specs / "bpnet_train_m1_coco.yaml", tlt.with_suffix(".keras"))
    # The records were converted for bpnet's 18-joint config (coco_spec.json names none); the
    # train spec names TAO's file: one topology, so they train together.
    res = _run(*train_cmd, "--max_steps", "1")
    final = unpruned / "bpnet_model.keras"
    assert final.is_file()
    # -k is TAO's: the key of encrypted inputs. The run's files stay plain, so the notebook's
    # later commands, which pass no key, read them.
    assert final.read_bytes()[:2] == b"PK"
    status = json.loads((unpruned / "status.json").read_text())
    assert status["status"] == "SUCCESS" and status["steps"] == 1
    assert "layers loaded" in res.output  # the stand-in's weights were copied by name

    # --- evaluate, the notebook's line: TAO's name bpnet_model.hdf5 for bpnet_model.keras
    model = unpruned / "bpnet_model.hdf5"
    eval_dir = exp / "results" / "exp_m1_unpruned" / "eval_default"
    _run("evaluate", "--inference_spec", specs / "infer_spec.yaml", "--model_filename", model,
         "--dataset_spec", coco_spec, "--results_dir", eval_dir)
    rows = (eval_dir / "results.csv").read_text().splitlines()
    assert rows[0] == "metric,value" and any(r.startswith("AP_0.50:0.95_all,") for r in rows)
    det = json.loads((eval_dir / "detections.json").read_text())
    cat = det["categories"][0]
    # The categories describe the 18 joints the keypoints are given in, with TAO's keys.
    assert cat["num_joints"] == len(cat["keypoints"]) == 18 and cat["keypoints"][1] == "neck"
    assert len(cat["skeleton_edge_names"]) == len(cat["skeleton"]) == 19
    assert all(len(p) == 18 for im in det["images"] for p in im["keypoints"])

    # --- inference on the notebook's viz_example_data.json (a list of full paths)
    viz = data / "viz_example_data.json"
    pictures = sorted((data / "val2017").glob("*.jpg"))[:2]
    viz.write_text(json.dumps([str(p) for p in pictures]))
    infer_dir = exp / "results" / "exp_m1_unpruned" / "infer_default"
    _run("inference", "--inference_spec", specs / "infer_spec.yaml", "--model_filename", model,
         "--input_type", "json", "--input", viz, "--results_dir", infer_dir,
         "--dump_visualizations")
    det = json.loads((infer_dir / "detections.json").read_text())
    assert [im["full_image_path"] for im in det["images"]] == [str(p) for p in pictures]
    assert [im["viz_id"] for im in det["images"]] == [0, 1]
    assert det["categories"][0]["skeleton"][0] == [2, 9]  # what the notebook's drawing reads
    assert len(list((infer_dir / "images_annotated").iterdir())) == 2

    # --- prune, as written: its output keeps TAO's .hdf5 name, a bpnet model inside
    pruned = exp / "models" / "exp_m1_pruned" / "bpnet_model.pruned-0.2.hdf5"
    pruned.parent.mkdir(parents=True)
    _run("prune", "-m", model, "-o", pruned, "-r", f"{exp}/", "-eq", "union", "-pth", "0.2")
    assert pruned.is_file()

    # --- retrain with TAO's retrain spec: load_graph on the pruned file
    retrain = exp / "models" / "exp_m1_retrain"
    log_file = exp / "logs" / "retrain.log"
    res = _run("train", "-e", specs / "bpnet_retrain_m1_coco.yaml", "-r", retrain,
               "--gpus", "1", "--max_steps", "1", "--log_file", log_file)
    assert "load_graph" in res.output
    assert "load_graph" in log_file.read_text()
    assert (retrain / "bpnet_model.keras").is_file()
    retrained = retrain / "bpnet_model.hdf5"
    eval_dir = exp / "results" / "exp_m1_retrain" / "eval_strict_288_384"
    _run("evaluate", "--inference_spec", specs / "infer_spec_retrained_strict.yaml",
         "--model_filename", retrained, "--dataset_spec", coco_spec, "--results_dir", eval_dir)
    assert (eval_dir / "results.csv").is_file()

    # --- export, the notebook's first (fp32) line
    final_dir = exp / "models" / "exp_m1_final"
    final_dir.mkdir(parents=True)
    onnx_file = final_dir / "bpnet_model.onnx"
    _run("export", "-m", retrained, "-e", specs / "bpnet_retrain_m1_coco.yaml", "-r", f"{exp}/",
         "-o", onnx_file, "-t", "tfonnx")
    assert onnx_file.stat().st_size > 1000


def test_tao_model_names_and_files_get_one_clear_message(tmp_path):
    """A TAO name with no bpnet file behind it, and a real Keras 2 HDF5 file, each one line."""
    from bpnet.tao_files import HDF5_MAGIC
    need(TAO_SPECS)
    ckpt = tmp_path / "model.step-1.hdf5"  # the name TAO's inference specs carry
    res = _run("inference", "-m", ckpt, "--input", tmp_path / "x.jpg", "-r", tmp_path / "r",
               ok=False)
    assert res.exit_code == 1
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("bpnet inference: error: -m ") and "not found" in line
    assert ".keras" in line and "Traceback" not in res.output
    h5 = tmp_path / "bpnet_model.hdf5"
    h5.write_bytes(HDF5_MAGIC + b"\x00" * 64)
    res = _run("evaluate", "-m", h5, "-d", tmp_path / "spec.json", "-r", tmp_path / "r",
               ok=False)
    assert res.exit_code == 1 and "Keras 2 HDF5" in res.output and "import_model" in res.output


def test_tao_log_levels_and_flags_parse():
    """TAO's spellings of the options: CRITICAL in any case, --dataset, -t, -np, --gpu_index."""
    for level in ("critical", "CRITICAL", "Warning"):
        res = invoke("train", "-e", "/nonexistent/spec.yaml", "-ll", level)
        assert res.exit_code == 1 and "Invalid value" not in res.output, res.output
    from bpnet.cli import default_inference_spec, main

    def param(cmd, name):
        return next(p for p in main.commands[cmd].params if p.name == name)

    assert param("evaluate", "dataset").default == "coco"
    assert param("evaluate", "results_dir").default == "results/evaluate"
    assert param("evaluate", "inference_spec").default is default_inference_spec
    assert Path(default_inference_spec()).is_file()
    assert param("inference", "input_type").default == "image"
    assert param("export", "backend").opts == ["-t", "--backend"]
    names = {o for p in main.commands["train"].params for o in p.opts}
    assert {"--gpu_index", "-np", "--num_processes", "--log_file", "--use_amp", "-k", "--gpus",
            "--max_steps"} <= names
    res = invoke("train", "-e", "x.yaml", "--gpu_index", "0,a")
    assert res.exit_code == 1 and "--gpu_index" in res.output


def test_tao_optimizer_weights_are_honoured():
    """weight_default_value for variables without a multiplier; grad_weights_dict over them."""
    import keras

    from bpnet.errors import BpnetError
    from bpnet.model.build import build_model
    from bpnet.model.optimizer import make_optimizer
    from bpnet.pose import load_pose_config
    from bpnet.specs import (
        LearningRateSchedule,
        ModelConfig,
        OptimizerConfig,
        default_pose_config_path,
    )
    pose = load_pose_config(default_pose_config_path())
    model = build_model(ModelConfig(class_name="BpNetLiteModel", stages=2,
                                    width_multiplier=0.0625), pose, (16, 16, 3))
    paths = [v.path for v in model.trainable_variables]
    gamma = next(p for p in paths if p.endswith("gamma"))

    def weights(use_stagewise, **kw):
        cfg = OptimizerConfig(learning_rate_schedule=LearningRateSchedule(), **kw)
        opt = make_optimizer(cfg, model, 1e-3, use_stagewise)
        opt.build(model.trainable_variables)
        return {v.path: opt.weight_of(v) for v in model.trainable_variables}

    w = weights(True, weight_default_value=0.5,
                grad_weights_dict={"paf_out/bias:0": 3.0, "heatmap_out/kernel": 0.0})
    assert w["paf_out/bias"] == 3.0 and w["heatmap_out/kernel"] == 0.0
    assert w["paf_out/kernel"] == 4.0 and w["channel_reduction_conv/kernel"] == 1.0
    assert w[gamma] == 0.5  # no multiplier: TAO's default weight
    w = weights(False, weight_default_value=0.25)
    assert set(w.values()) == {0.25}
    with pytest.raises(BpnetError, match="did you mean 'paf_out/bias'"):
        weights(True, grad_weights_dict={"paf_out/bais": 2.0})
    keras.backend.clear_session()


def test_inference_spec_model_path_with_tao_name_runs_the_bpnet_model(tmp_path):
    """An inference spec whose model_path is TAO's ``bpnet_model.hdf5`` (no -m) runs the
    ``bpnet_model.keras`` beside it, in every runtime's loader."""
    import yaml
    from conftest import SHARED_IMAGES, save_tiny_model

    from bpnet.pose import load_pose_config
    from bpnet.specs import default_pose_config_path
    picture = need(SHARED_IMAGES / "ski.jpg")
    save_tiny_model(tmp_path / "bpnet_model.keras", load_pose_config(default_pose_config_path()),
                    stages=1)
    spec = tmp_path / "infer_spec.yaml"
    spec.write_text(yaml.safe_dump({"model_path": str(tmp_path / "bpnet_model.hdf5"),
                                    "input_shape": [96, 96]}))
    res = _run("inference", "-i", spec, "--input", picture, "-r", tmp_path / "r")
    doc = json.loads((tmp_path / "r" / "detections.json").read_text())
    assert res.exit_code == 0
    assert [Path(e["full_image_path"]).name for e in doc["images"]] == ["ski.jpg"]
    assert Path(doc["inference_spec"]["model_path"]).name == "bpnet_model.keras", \
        doc["inference_spec"]

"""Spec files: every shipped spec loads; bad specs fail with file, key path and a hint."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from bpnet.errors import BpnetError
from bpnet.model.build import MODEL_CLASSES
from bpnet.pose import load_pose_config
from bpnet.specs import (AUGMENTATION_MODES, DatasetSpec, DecoderConfig, InferenceSpec,
                         ModelConfig, TrainSpec, build_spec, load_dataset_spec,
                         load_inference_spec, load_train_spec, spec_to_dict)

from conftest import REPO, SHARED, need

TRAIN = REPO / "specs" / "bpnet_train_m1_coco.yaml"


def _shipped(pattern):
    return sorted((REPO / "specs").glob(pattern))


@pytest.mark.parametrize("path", _shipped("*train*.yaml"), ids=lambda p: p.name)
def test_shipped_train_specs_load(path):
    spec = load_train_spec(path)
    assert isinstance(spec, TrainSpec)
    dims = spec.dataloader.image_config.image_dims
    assert [t * 8 for t in spec.dataloader.pose_config.target_shape] == [dims.height, dims.width]
    assert spec.num_epoch % spec.checkpoint_n_epoch == 0
    pose = spec.dataloader.pose_config.load()
    assert pose.num_joints >= 2


@pytest.mark.parametrize("path", _shipped("infer_spec*.yaml"), ids=lambda p: p.name)
def test_shipped_inference_specs_load(path):
    spec = load_inference_spec(path)
    assert isinstance(spec, InferenceSpec)
    if spec.train_spec:  # paths resolve against the spec's own folder
        assert Path(spec.train_spec).is_absolute()
        assert Path(spec.train_spec).parent == path.parent.resolve()


def test_tao_tutorial_values():
    spec = load_train_spec(TRAIN)
    assert spec.model.class_name == "BpNetLiteModel" and spec.model.stages == 3
    assert (spec.model.heat_channels, spec.model.paf_channels) == (19, 38)
    assert spec.checkpoint_n_epoch == 5 and spec.dataloader.batch_size == 10
    aug = spec.dataloader.augmentation_config.spatial_aug_params
    assert (aug.flip_lr_prob, aug.rotate_deg_max, aug.rotate_deg_min) == (0.5, 40.0, -40.0)
    lr = spec.optimizer.learning_rate_schedule
    assert (lr.base_learning_rate, lr.min_learning_rate, lr.soft_start, lr.annealing) == \
        (2e-5, 8e-8, 0.05, 0.5)
    norm = spec.dataloader.normalization_params
    assert norm.image_scale == [256.0] * 3 and norm.image_offset == [0.5] * 3
    # The spec round-trips through its plain-dict form.
    again = build_spec(TrainSpec, spec_to_dict(spec))
    assert spec_to_dict(again) == spec_to_dict(spec)


def test_tao_inference_specs_load_unchanged():
    """TAO's own inference specs: their top-level thresholds are the decoder's."""
    folder = need(SHARED / "data" / "tao_specs")
    paths = sorted(folder.glob("infer_spec*.yaml"))
    assert len(paths) >= 6
    for path in paths:
        spec = load_inference_spec(path)
        assert spec.decoder == DecoderConfig(heatmap_threshold=0.1, paf_threshold=0.05), path
        assert spec.keep_aspect_ratio_mode in ("adjust_network_input", "pad_image_input")


def test_shipped_bpnet_inference_specs_use_the_decoder_section():
    spec = load_inference_spec(REPO / "specs" / "infer_spec_mobilenet_thin.yaml")
    assert spec.decoder == DecoderConfig(heatmap_threshold=0.05, paf_threshold=0.05,
                                         min_parts=4, min_person_score=0.2)
    sample = load_inference_spec(REPO / "specs" / "infer_spec_sample.yaml")
    assert sample.decoder.min_person_score == 0.2 and sample.flip_test
    # The spec round-trips through its plain-dict form, decoder section included.
    again = build_spec(InferenceSpec, spec_to_dict(spec))
    assert again == spec


def test_inference_spec_variants():
    base = load_inference_spec(REPO / "specs" / "infer_spec.yaml")
    refine = load_inference_spec(REPO / "specs" / "infer_spec_refine.yaml")
    strict = load_inference_spec(REPO / "specs" / "infer_spec_strict.yaml")
    assert base.keep_aspect_ratio_mode == "adjust_network_input" and not base.multi_scale_inference
    assert refine.multi_scale_inference and len(refine.scales) > 1
    assert strict.keep_aspect_ratio_mode == "pad_image_input"
    assert strict.input_shape == [288, 384]


def test_coco_dataset_spec_loads():
    spec = load_dataset_spec(REPO / "data_pose_config" / "coco_spec.json")
    assert isinstance(spec, DatasetSpec)
    assert spec.dataset == "coco" and spec.category.num_joints == 17
    assert spec.category.keypoints[5:7] == ["left_shoulder", "right_shoulder"]
    assert spec.visibility_flags.table() == {2: 2, 1: 1, 0: 0}
    fp = spec.data_filtering_params
    assert (fp.min_acceptable_height, fp.min_acceptable_width, fp.min_acceptable_kpts,
            fp.min_acceptable_interperson_dist_ratio) == (32, 32, 5, 0.3)
    root = Path(spec.root_directory_path)
    assert root.is_absolute() and root == (REPO / "data" / "coco").resolve()
    images, masks, ann = spec.split_paths("train")
    assert images == root / "train2017" and ann == root / "annotations/person_keypoints_train2017.json"
    pose = spec.pose_config()
    assert pose.num_joints == 18 and pose.keypoints[1] == "neck"


@pytest.mark.parametrize("path", [REPO / "model_pose_config" / "bpnet_18joints.json",
                                  REPO / "bpnet" / "configs" / "bpnet_18joints.json"],
                         ids=["model_pose_config", "package"])
def test_shipped_pose_configs_load(path):
    pose = load_pose_config(path)
    assert pose.num_joints == 18 and pose.num_edges == 19
    assert (pose.heat_channels, pose.paf_channels) == (19, 38)


# ------------------------------------------------------------------ bad specs

def _train_dict():
    return yaml.safe_load(TRAIN.read_text())


def _write(tmp_path, data, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return p


def _fails(tmp_path, data, *needles, loader=load_train_spec, name="spec.yaml"):
    p = _write(tmp_path, data, name)
    with pytest.raises(BpnetError) as e:
        loader(p)
    msg = str(e.value)
    assert str(p) in msg, msg
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_misspelled_nested_key(tmp_path):
    d = _train_dict()
    sp = d["dataloader"]["augmentation_config"]["spatial_aug_params"]
    sp["flip_lr_prb"] = sp.pop("flip_lr_prob")
    _fails(tmp_path, d, "dataloader.augmentation_config.spatial_aug_params.flip_lr_prb",
           "did you mean 'flip_lr_prob'")


def test_unknown_top_level_key(tmp_path):
    d = _train_dict()
    d["num_epochs"] = 3
    _fails(tmp_path, d, "num_epochs", "did you mean 'num_epoch'")


def test_unknown_key_without_near_match_lists_known_keys(tmp_path):
    d = _train_dict()
    d["model"]["zzzz"] = 1
    _fails(tmp_path, d, "model.zzzz", "known keys:", "stages")


@pytest.mark.parametrize("path,value,needle", [
    (("num_epoch",), "ten", "expected an integer"),
    (("dataloader", "batch_size"), 2.5, "expected an integer"),
    (("model", "use_bias"), "yes", "expected true or false"),
    (("dataloader", "augmentation_config", "spatial_aug_params", "flip_lr_prob"), [0.5],
     "expected a number"),
    (("dataloader", "pose_config", "target_shape"), 32, "expected a list"),
    (("model",), "BpNetLiteModel", "expected a mapping"),
])
def test_wrong_types(tmp_path, path, value, needle):
    d = _train_dict()
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    _fails(tmp_path, d, ".".join(path), needle)


def test_checkpoint_n_epoch_must_divide_num_epoch(tmp_path):
    d = _train_dict()
    d["num_epoch"], d["checkpoint_n_epoch"] = 12, 5
    _fails(tmp_path, d, "checkpoint_n_epoch", "does not divide num_epoch 12")


def test_target_shape_must_match_image_dims(tmp_path):
    d = _train_dict()
    d["dataloader"]["pose_config"]["target_shape"] = [46, 46]
    _fails(tmp_path, d, "dataloader.pose_config.target_shape", "image_dims [256, 256]", "[32, 32]")


def test_stages_at_least_two(tmp_path):
    d = _train_dict()
    d["model"]["stages"] = 1
    _fails(tmp_path, d, "model.stages", ">= 2")


def test_unknown_augmentation_mode(tmp_path):
    d = _train_dict()
    d["dataloader"]["augmentation_config"]["spatial_augmentation_mode"] = "person_center"
    msg = _fails(tmp_path, d, "dataloader.augmentation_config.spatial_augmentation_mode",
                 "'person_center' is not allowed")
    for mode in AUGMENTATION_MODES:
        assert mode in msg


def test_unknown_class_name(tmp_path):
    d = _train_dict()
    d["model"]["__class_name__"] = "BpNetModelLite"
    _fails(tmp_path, d, "model.__class_name__", "unknown class", "BpNetLiteModel")


def test_impossible_values(tmp_path):
    d = _train_dict()
    d["dataloader"]["augmentation_config"]["spatial_aug_params"]["flip_lr_prob"] = 1.5
    _fails(tmp_path, d, "flip_lr_prob", "probability")
    d = _train_dict()
    d["optimizer"]["learning_rate_schedule"]["soft_start"] = 0.7
    _fails(tmp_path, d, "soft_start", "annealing")


def test_inference_spec_errors(tmp_path):
    d = yaml.safe_load((REPO / "specs" / "infer_spec.yaml").read_text())
    d["keep_aspect_ratio_mode"] = "pad"
    _fails(tmp_path, d, "keep_aspect_ratio_mode", "pad_image_input", loader=load_inference_spec)
    d = yaml.safe_load((REPO / "specs" / "infer_spec.yaml").read_text())
    d["heatmap_treshold"] = 0.2
    _fails(tmp_path, d, "heatmap_treshold", "did you mean 'heatmap_threshold'",
           loader=load_inference_spec)


def test_dataset_spec_errors(tmp_path):
    d = json.loads((REPO / "data_pose_config" / "coco_spec.json").read_text())
    d["data_filtering_params"]["min_acceptable_kpt"] = 3
    _fails(tmp_path, d, "data_filtering_params.min_acceptable_kpt", "min_acceptable_kpts",
           loader=load_dataset_spec, name="ds.json")
    d = json.loads((REPO / "data_pose_config" / "coco_spec.json").read_text())
    d["categories"][0]["num_joints"] = 18
    _fails(tmp_path, d, "categories[0].num_joints", "17 keypoints", loader=load_dataset_spec,
           name="ds.json")


def test_unreadable_files(tmp_path):
    with pytest.raises(BpnetError, match="file not found"):
        load_train_spec(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("dataloader: [unclosed\n")
    with pytest.raises(BpnetError, match="not valid YAML"):
        load_train_spec(p)
    # Where the error is, and a hint when the file is protobuf text (name { ... } blocks).
    p.write_text("model_config: {stages: 3}\ndataloader: [1, 2\nbatch_size: 3\n")
    with pytest.raises(BpnetError, match=r"not valid YAML: line 3, column 11: expected ',' or "
                                         r"']', but got ':' \(while parsing a flow sequence\)$"):
        load_train_spec(p)
    p.write_text("dataloader {\n  batch_size: 3\n  image_ofset: 0.5\n}\n")
    with pytest.raises(BpnetError, match=r"line 2, column 13: .*looks like a protobuf-text spec"):
        load_train_spec(p)
    p = tmp_path / "list.json"
    p.write_text("[1, 2]")
    with pytest.raises(BpnetError, match="top level must be a mapping"):
        load_train_spec(p)


def test_paths_resolve_against_spec_folder(tmp_path):
    sub = tmp_path / "cfg"
    sub.mkdir()
    d = _train_dict()
    d["checkpoint_dir"] = "out/run1"
    d["dataloader"]["dataset_config"]["dataset_specs"] = {"coco": "../ds/coco.json"}
    spec = load_train_spec(_write(sub, d))
    assert Path(spec.checkpoint_dir) == sub / "out" / "run1"
    assert Path(spec.dataloader.dataset_config.dataset_specs["coco"]) == tmp_path / "ds" / "coco.json"


# ------------------------------------------------------------------ the decoder section

INFER = REPO / "specs" / "infer_spec.yaml"


def _infer_dict(**changes):
    d = yaml.safe_load(INFER.read_text())
    d.update(changes)
    return d


def test_decoder_section_sets_every_decoder_value(tmp_path):
    values = {"heatmap_threshold": 0.2, "paf_threshold": 0.1, "refine": "quadratic",
              "min_pass_fraction": 0.7, "min_samples": 3, "max_samples": 12,
              "max_limb_length": 40.0, "length_weight": 0.0, "min_parts": 3,
              "min_person_score": 0.3, "small_person_score": 0.9, "completeness": 2.0,
              "merge_max_hops": 2, "merge_ratio": 0.5, "max_peaks": 64}
    assert set(values) == {f.name for f in dataclasses.fields(DecoderConfig)}
    d = _infer_dict()
    del d["heatmap_threshold"], d["paf_threshold"]
    d["decoder"] = values
    spec = load_inference_spec(_write(tmp_path, d))
    assert spec.decoder == DecoderConfig(**values)
    # Unset values keep DecoderConfig's defaults.
    d["decoder"] = {"min_parts": 3}
    spec = load_inference_spec(_write(tmp_path, d))
    assert spec.decoder == DecoderConfig(min_parts=3)


def test_tao_top_level_thresholds_set_the_decoder(tmp_path):
    spec = load_inference_spec(_write(tmp_path, _infer_dict(heatmap_threshold=0.3,
                                                            decoder={"min_parts": 2})))
    assert (spec.decoder.heatmap_threshold, spec.decoder.min_parts) == (0.3, 2)
    # The same value in both places is no conflict.
    spec = load_inference_spec(_write(tmp_path, _infer_dict(paf_threshold=0.05,
                                                            decoder={"paf_threshold": 0.05})))
    assert spec.decoder.paf_threshold == 0.05
    assert not hasattr(spec, "heatmap_threshold")  # the decoder section is its one home


def test_tao_threshold_conflicting_with_the_decoder_section(tmp_path):
    # The decoder's value equals its default: still a conflict, it was written.
    d = _infer_dict(heatmap_threshold=0.2, decoder={"heatmap_threshold": 0.1})
    _fails(tmp_path, d, "heatmap_threshold: is 0.2 but decoder.heatmap_threshold is 0.1",
           "one place", loader=load_inference_spec)
    d = _infer_dict(paf_threshold=0.05, decoder={"paf_threshold": 0.2})
    _fails(tmp_path, d, "paf_threshold: is 0.05 but decoder.paf_threshold is 0.2",
           loader=load_inference_spec)


@pytest.mark.parametrize("key,value", [("min_parts", 3), ("min_person_score", 0.2)])
def test_moved_top_level_keys_say_where_they_went(tmp_path, key, value):
    _fails(tmp_path, _infer_dict(**{key: value}), f"{key}: has moved into the decoder section",
           f"decoder: {{{key}: {value}}}", loader=load_inference_spec)


@pytest.mark.parametrize("changes,needles", [
    ({"decoder": {"min_parts": 0}}, ["decoder.min_parts", "must be >= 1"]),
    ({"decoder": {"refine": "cubic"}}, ["decoder.refine", "'gaussian', 'quadratic', 'none'"]),
    ({"decoder": {"refien": "none"}}, ["decoder.refien", "did you mean 'refine'"]),
    ({"decoder": {"max_samples": 2}}, ["decoder.max_samples", "min_samples 4"]),
    ({"decoder": {"max_limb_length": -1}}, ["decoder.max_limb_length", "> 0"]),
    ({"decoder": 3}, ["decoder", "expected a mapping"]),
    # A bad TAO top-level value is reported where it was written.
    ({"heatmap_threshold": 1.5}, ["spec.yaml: heatmap_threshold: must be in [0, 1)"]),
    ({"paf_threshold": "high"}, ["spec.yaml: paf_threshold: expected a number"]),
])
def test_bad_decoder_values(tmp_path, changes, needles):
    _fails(tmp_path, _infer_dict(**changes), *needles, loader=load_inference_spec)


# ------------------------------------------------------------------ one home per fact

def test_model_classes_come_from_the_model_registry(tmp_path):
    assert ModelConfig.CLASS_NAMES is MODEL_CLASSES
    d = _train_dict()
    d["model"]["__class_name__"] = "NoSuchModel"
    _fails(tmp_path, d, "model.__class_name__", *MODEL_CLASSES)


def test_an_empty_optional_path_is_unset(tmp_path):
    """``pretrained_weights: ""`` means none (not the spec's folder), so the checks that
    need the path fire; a real relative path still resolves against the spec's folder."""
    spec = tmp_path / "train.yaml"
    spec.write_text(yaml.safe_dump({"checkpoint_dir": "", "pretrained_weights": " ",
                                    "inference_spec": "infer.yaml"}))
    loaded = load_train_spec(spec)
    assert loaded.checkpoint_dir is None and loaded.pretrained_weights is None
    assert loaded.inference_spec == str(tmp_path / "infer.yaml")


# ------------------------------------------------------------------ TAO's keys

@pytest.mark.parametrize("name", ["bpnet_train_m1_coco.yaml", "bpnet_retrain_m1_coco.yaml",
                                  "coco_spec.json", "bpnet_18joints.json"])
def test_tao_shipped_train_dataset_and_pose_files_load(name):
    """TAO's own files, unchanged (their /workspace paths are only resolved, not read here)."""
    path = need(SHARED / "data" / "tao_specs" / name)
    if name.endswith("yaml"):
        spec = load_train_spec(path)
        assert spec.optimizer.grad_weights_dict is None and spec.loss.class_name == "BpNetLoss"
    elif name == "coco_spec.json":
        assert load_dataset_spec(path).category.skeleton_edge_names[0] == ["left_ankle", "left_knee"]
    else:
        assert load_pose_config(path).name == "bpnet_18_joints"


def _tao_keys(d):
    """TAO's schema keys at TAO's values (as TAO's own experiment specs write them)."""
    d["infrequent_summary_every_n_steps"] = 0
    d["model"]["backbone_attributes"]["add_final_c128_conv"] = True
    d["model"]["stage1_kernel_sizes"] = None
    d["optimizer"]["learning_rate_schedule"]["last_step"] = None
    d["optimizer"]["grad_weights_dict"] = None
    d["optimizer"]["weight_default_value"] = 1.0
    d["loss"] = {"__class_name__": "BpNetLoss", "focal_loss_params": {
        "use_focal_loss": False, "alpha": 0.1, "beta": 0.02, "bkg_thresh": 0.01, "gamma": 1}}
    d["dataloader"]["augmentation_config"]["color_aug_params"] = {}
    return d


def test_tao_keys_at_tao_values_load_silently(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="bpnet"):
        spec = load_train_spec(_write(tmp_path, _tao_keys(_train_dict())))
    assert not caplog.records, caplog.text
    assert not spec.loss.use_focal and spec.optimizer.weight_default_value == 1.0


@pytest.mark.parametrize("path, value", [
    ("infrequent_summary_every_n_steps", 100),
    ("model.backbone_attributes.add_final_c128_conv", False),
    ("model.stageT_kernel_sizes", [[7, 7]]),
    ("optimizer.learning_rate_schedule.last_step", 1000),
    ("dataloader.augmentation_config.color_aug_params", {"hue_rotation_max": 25.0}),
])
def test_tao_keys_bpnet_cannot_honour_get_one_warning(tmp_path, caplog, path, value):
    d = _tao_keys(_train_dict())
    *parents, key = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[key] = value
    spec_file = _write(tmp_path, d)
    with caplog.at_level("WARNING", logger="bpnet"):
        load_train_spec(spec_file)
        load_train_spec(spec_file)  # loaded twice, warned once
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and path in warned[0] and "not honoured" in warned[0], warned


def test_tao_focal_switch_and_schedule_class_names(tmp_path):
    from bpnet.model.loss import BpNetLoss
    from bpnet.model.schedules import make_schedule
    d = _tao_keys(_train_dict())
    d["loss"]["focal_loss_params"]["use_focal_loss"] = True
    d["optimizer"]["learning_rate_schedule"] = {
        "__class_name__": "BpNetExponentialDecayLRSchedule", "learning_rate": 2e-5,
        "decay_epochs": 17, "decay_rate": 0.333, "min_learning_rate": 8.18938e-08,
        "staircase": True}
    spec = load_train_spec(_write(tmp_path, d))
    assert spec.loss.use_focal and BpNetLoss.from_config(spec.loss, 3).focal is not None
    sched = make_schedule(spec.optimizer.learning_rate_schedule, total_steps=1000,
                          steps_per_epoch=10)
    assert float(sched(169)) == pytest.approx(2e-5) and float(sched(170)) == pytest.approx(2e-5 * 0.333)
    d["loss"]["focal_loss_params"] = None  # TAO's null: the plain loss
    d["optimizer"]["learning_rate_schedule"] = {
        "__class_name__": "ExponentialDecayLearningRateSchedule", "learning_rate": 1e-3,
        "decay_steps": 5, "decay_rate": 0.5, "staircase": True}
    spec = load_train_spec(_write(tmp_path, d))
    assert BpNetLoss.from_config(spec.loss, 3).focal is None
    sched = make_schedule(spec.optimizer.learning_rate_schedule, 1000, 10)
    assert float(sched(5)) == pytest.approx(5e-4)


def test_tao_dataset_spec_edge_names_must_match_the_skeleton(tmp_path):
    d = json.loads((REPO / "data_pose_config" / "coco_spec.json").read_text())
    cat = d["categories"][0]
    names = cat["keypoints"]
    cat["skeleton_edge_names"] = [[names[a - 1], names[b - 1]] for a, b in cat["skeleton"]]
    assert load_dataset_spec(_write(tmp_path, d, "ok.json")).category.skeleton_edge_names
    cat["skeleton_edge_names"][3] = ["nose", "left_eye"]
    _fails(tmp_path, d, "categories[0].skeleton_edge_names", "[3]", loader=load_dataset_spec,
           name="bad.json")

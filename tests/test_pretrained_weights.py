"""pretrained_weights from Keras applications' ImageNet VGG19 weights file.

These machines cannot download the real file, so the tests write files of
its layout from keras.applications.VGG19(weights=None): the published
layout (root attribute ``layer_names``, one group per layer whose
``weight_names`` lists ``<layer>_W_1:0`` and ``<layer>_b_1:0``), a Keras
HDF5 model file (``model.save("x.h5")``) and Keras 3's ``save_weights``
file. The weights are random, which is all the mapping needs: every value
must land in the right layer, in the right channel order.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import REPO, make_converted_sample

SAMPLE_SPEC = REPO / "specs" / "bpnet_train_sample.yaml"
LOADED = ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2", "block3_conv1",
          "block3_conv2", "block3_conv3", "block3_conv4", "block4_conv1", "block4_conv2"]
UNUSED = ["block4_conv4", "block5_conv1", "block5_conv2", "block5_conv3", "block5_conv4"]


def _vgg19(include_top=False):
    import keras
    keras.utils.set_random_seed(3)
    # Random biases too (Keras starts them at 0): a dropped or copied bias must show.
    model = keras.applications.VGG19(weights=None, include_top=include_top)
    for layer in model.layers:
        if layer.weights and not layer.name.startswith(("fc", "predictions")):
            k, b = layer.get_weights()
            layer.set_weights([k, np.random.default_rng(len(layer.name)).normal(size=b.shape)])
    return model


def write_published(model, path, with_top=False):
    """``model``'s weights in the layout of vgg19_weights_tf_dim_ordering_tf_kernels[_notop].h5."""
    import h5py
    names = [layer.name for layer in model.layers]
    if with_top:
        names += ["flatten", "fc1", "fc2", "predictions"]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.0.8"
        for layer in model.layers:
            g = f.create_group(layer.name)
            ws = layer.get_weights()
            wnames = [f"{layer.name}_{t}_1:0" for t in "Wb"][:len(ws)]
            g.attrs["weight_names"] = np.array([w.encode() for w in wnames])
            for n, w in zip(wnames, ws):
                g.create_dataset(n, data=w)
        if with_top:
            f.create_group("flatten").attrs["weight_names"] = np.array([], dtype="S1")
            for name, shape in (("fc1", (25088, 4096)), ("fc2", (4096, 4096)),
                                ("predictions", (4096, 1000))):
                g = f.create_group(name)
                wnames = [f"{name}_W_1:0", f"{name}_b_1:0"]
                g.attrs["weight_names"] = np.array([w.encode() for w in wnames])
                # Never written, so never stored: the file stays small, the shapes are real.
                g.create_dataset(wnames[0], shape=shape, dtype="float32")
                g.create_dataset(wnames[1], shape=shape[1:], dtype="float32")
    return path


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    d = tmp_path_factory.mktemp("vgg19")
    model = _vgg19()
    notop = d / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    files = {"published": write_published(model, notop),
             "with_top": write_published(model, d / "vgg19_weights_tf_dim_ordering_tf_kernels.h5",
                                         with_top=True)}
    model.save_weights(d / "vgg19.weights.h5")  # Keras 3's layout
    files["keras3"] = d / "vgg19.weights.h5"
    model.save(d / "vgg19_model.h5")  # a Keras HDF5 model file (weights under model_weights)
    files["model_h5"] = d / "vgg19_model.h5"
    weights = {layer.name: layer.get_weights() for layer in model.layers if layer.weights}
    return files, weights


def _bpnet(channels=3, width=1.0, use_bias=False):
    import keras

    from bpnet.model.build import build_model
    from bpnet.pose import pose_config_from_dict
    from bpnet.specs import BackboneAttributes, ModelConfig, default_pose_config_path
    keras.utils.set_random_seed(0)
    pose = pose_config_from_dict(json.loads(default_pose_config_path().read_text()))
    cfg = ModelConfig(stages=2, width_multiplier=width,
                      backbone_attributes=BackboneAttributes(use_bias=use_bias))
    return build_model(cfg, pose, (None, None, channels))


def test_published_file_loads_into_the_vgg_backbone(vgg):
    """Kernels by layer name, the first one's input channels reversed (BGR -> RGB), biases
    dropped before BN, block4_conv3 (256 filters in bpnet) skipped, the rest reported unused."""
    import keras

    from bpnet.model.imagenet import load_vgg19_imagenet
    files, weights = vgg
    model = _bpnet()
    bn_before = model.get_layer("block1_conv1_bn").get_weights()
    report = load_vgg19_imagenet(files["published"], model)
    assert report["loaded"] == LOADED
    assert [n for n, _ in report["skipped"]] == ["block4_conv3"]
    assert "(3, 3, 512, 512) vs model (3, 3, 512, 256)" in report["skipped"][0][1]
    assert report["unused"] == UNUSED
    assert "block1_conv1_bn" in report["missing"] and "heatmap_out" in report["missing"]
    assert not set(report["missing"]) & set(LOADED)
    assert any("BGR" in n for n in report["notes"]) and any("biases" in n for n in report["notes"])
    for name in LOADED:
        (kernel,) = model.get_layer(name).get_weights()  # no bias: use_bias false
        want = weights[name][0][:, :, ::-1, :] if name == "block1_conv1" else weights[name][0]
        np.testing.assert_array_equal(kernel, want)
    for a, b in zip(model.get_layer("block1_conv1_bn").get_weights(), bn_before):
        np.testing.assert_array_equal(a, b)
    assert not any("normalization_params" in n for n in report["notes"])  # none given

    # The channel order is the point: bpnet's first conv on an RGB picture computes what
    # VGG19's first conv (less its bias) computes on the same picture in BGR.
    rgb = np.random.default_rng(0).uniform(0, 255, (1, 16, 16, 3)).astype("float32")
    ours = keras.Model(model.input, model.get_layer("block1_conv1").output)(rgb)
    k, b = weights["block1_conv1"]
    theirs = keras.ops.conv(rgb[..., ::-1], k, padding="same")
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-3)


def test_weights_file_answer_follows_the_file(vgg, tmp_path):
    """The answer is kept per file version: a file rewritten in place is looked at again."""
    import shutil
    from bpnet.model.imagenet import is_keras_weights_file
    files, _ = vgg
    path = tmp_path / "start.h5"
    path.write_bytes(b"not HDF5 at all")
    assert not is_keras_weights_file(path)
    shutil.copyfile(files["keras3"], path)
    assert is_keras_weights_file(path) and is_keras_weights_file(str(path))
    path.unlink()
    assert not is_keras_weights_file(path)


@pytest.mark.parametrize("layout", ["with_top", "keras3", "model_h5"])
def test_other_layouts_load_the_same(vgg, layout):
    from bpnet.model.imagenet import is_keras_weights_file, load_vgg19_imagenet
    files, weights = vgg
    assert is_keras_weights_file(files[layout])
    model = _bpnet(use_bias=True)
    report = load_vgg19_imagenet(files[layout], model)
    assert report["loaded"] == LOADED
    unused = UNUSED + (["fc1", "fc2", "predictions"] if layout == "with_top" else [])
    assert report["unused"] == unused
    assert not any("biases" in n for n in report["notes"])  # the convs have biases: copied
    for name in LOADED[1:]:
        for got, want in zip(model.get_layer(name).get_weights(), weights[name]):
            np.testing.assert_array_equal(got, want)


def test_imagenet_normalization_is_recognized():
    from bpnet.model.imagenet import IMAGENET_NORMALIZATION, is_imagenet_normalization
    from bpnet.specs import NormalizationParams
    assert is_imagenet_normalization(NormalizationParams(**IMAGENET_NORMALIZATION))
    assert not is_imagenet_normalization(NormalizationParams())  # bpnet's default, x/256 - 0.5
    bgr = NormalizationParams(image_scale=[1.0] * 3,
                              image_offset=IMAGENET_NORMALIZATION["image_offset"][::-1])
    assert not is_imagenet_normalization(bgr)
    gray = NormalizationParams(image_scale=[1.0] * 3, image_offset=[117.4] * 3)
    assert is_imagenet_normalization(gray, channels=1) and not is_imagenet_normalization(gray)


def test_grayscale_model_gets_the_summed_first_kernel(vgg):
    from bpnet.model.imagenet import load_vgg19_imagenet
    files, weights = vgg
    model = _bpnet(channels=1)
    report = load_vgg19_imagenet(files["published"], model)
    assert report["loaded"] == LOADED
    np.testing.assert_allclose(model.get_layer("block1_conv1").get_weights()[0],
                               weights["block1_conv1"][0].sum(axis=2, keepdims=True), rtol=1e-6)


# ------------------------------------------------------------------ through bpnet train

@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_converted_sample(tmp_path_factory.mktemp("sample_data"), 4, 2, (128, 128),
                                 seed=0, val_records=False)


def _spec(path, sample, weights, **model):
    spec = yaml.safe_load(SAMPLE_SPEC.read_text())
    spec.update(pretrained_weights=str(weights), num_epoch=1, steps_per_epoch=1,
                checkpoint_n_epoch=1, validation_every_n_epoch=1, log_every_n_secs=1)
    dl = spec["dataloader"]
    dl.update(batch_size=2, num_parallel_calls=1)
    dl["image_config"]["image_dims"].update(height=64, width=64)
    dl["pose_config"]["target_shape"] = [8, 8]
    dl["dataset_config"].update(root_data_path=str(sample),
                                train_records_folder_path=str(sample / "records"),
                                val_records_folder_path=str(sample / "records"),
                                val_records_path=[],
                                dataset_specs={"sample": str(sample / "sample_spec.json")})
    spec["model"].update({"width_multiplier": 1.0, **model})
    # A rate so small that one step leaves the loaded kernels where they were.
    spec["optimizer"]["learning_rate_schedule"].update(base_learning_rate=1e-12,
                                                       min_learning_rate=1e-13)
    path.write_text(yaml.safe_dump(spec))
    return path


def test_train_starts_from_the_imagenet_file(vgg, sample, tmp_path):
    from bpnet.model.io import load_model
    from bpnet.train import train
    files, weights = vgg
    result = train(_spec(tmp_path / "spec.yaml", sample, files["published"]), tmp_path / "run")
    assert result.steps == 1 and np.isfinite(result.train_loss)
    report = json.loads((tmp_path / "run" / "pretrained_weights_report.json").read_text())
    assert report["file"] == str(files["published"])
    assert report["loaded"] == LOADED and report["unused"] == UNUSED
    assert [n for n, _ in report["skipped"]] == ["block4_conv3"]
    # The sample spec's x/256 - 0.5 is not the weights' normalization: the report says so.
    assert any("normalization_params are not the weights' own" in n for n in report["notes"])
    model, _ = load_model(result.final_model)
    np.testing.assert_allclose(model.get_layer("block1_conv1").get_weights()[0],
                               weights["block1_conv1"][0][:, :, ::-1, :], atol=1e-6)
    np.testing.assert_allclose(model.get_layer("block4_conv2").get_weights()[0],
                               weights["block4_conv2"][0], atol=1e-6)


def _one_error(spec_path, tmp_path) -> str:
    from bpnet.errors import BpnetError
    from bpnet.train import train
    with pytest.raises(BpnetError) as e:
        train(spec_path, tmp_path / "run")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_imagenet_file_for_a_mobilenet_model_is_one_error(vgg, sample, tmp_path):
    files, _ = vgg
    spec = _spec(tmp_path / "spec.yaml", sample, files["published"],
                 **{"__class_name__": "MobileNetThinModel",
                    "backbone_attributes": {"architecture": "mobilenet_v1"}})
    msg = _one_error(spec, tmp_path)
    assert "VGG backbone" in msg and "MobileNetThinModel" in msg and "import_model" in msg


def test_imagenet_file_needs_width_multiplier_1(vgg, sample, tmp_path):
    """Through the command line: one error line, before anything is built."""
    from conftest import bpnet_cli, error_lines
    files, _ = vgg
    spec = _spec(tmp_path / "spec.yaml", sample, files["published"], width_multiplier=0.25)
    p = bpnet_cli("train", "-e", str(spec), "-r", str(tmp_path / "run"))
    assert p.returncode != 0
    lines = error_lines(p.stderr, "train")
    assert len(lines) == 1, p.stderr[-3000:]
    assert "ImageNet weights need model.width_multiplier 1 (the spec has 0.25)" in lines[0]


def test_load_graph_with_an_imagenet_file_is_one_error(vgg, sample, tmp_path):
    files, _ = vgg
    spec = _spec(tmp_path / "spec.yaml", sample, files["published"])
    d = yaml.safe_load(spec.read_text())
    spec.write_text(yaml.safe_dump({**d, "load_graph": True}))
    assert "load_graph: false" in _one_error(spec, tmp_path)


def test_files_that_are_neither_give_one_error(vgg, sample, tmp_path):
    import h5py
    files, weights = vgg
    # VGG16's file: the same names, less block3_conv4, block4_conv4 and block5_conv4.
    vgg16 = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(vgg16, "w") as f:
        names = [n for n in weights if not n.endswith("conv4")]
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        for n in names:
            g = f.create_group(n)
            g.attrs["weight_names"] = np.array([f"{n}_W_1:0".encode(), f"{n}_b_1:0".encode()])
            for w, a in zip(g.attrs["weight_names"], weights[n]):
                g.create_dataset(w.decode(), data=a)
    msg = _one_error(_spec(tmp_path / "a.yaml", sample, vgg16), tmp_path)
    assert "not VGG19's" in msg and "VGG16" in msg and "block3_conv4" in msg

    text = tmp_path / "weights.h5"
    text.write_text("not weights at all\n")
    msg = _one_error(_spec(tmp_path / "b.yaml", sample, text), tmp_path)
    assert "neither a bpnet model file" in msg and "ImageNet VGG19 weights file" in msg

    # A Keras HDF5 model of another network: the TAO-format message, naming the ImageNet file.
    import keras
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, name="dense")])
    other.save(tmp_path / "other.h5")
    msg = _one_error(_spec(tmp_path / "c.yaml", sample, tmp_path / "other.h5"), tmp_path)
    assert "cannot read" in msg and "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg

"""bpnet prune: exactness on zeroed filters, the counts the options imply, retraining, bad input.

Models are tiny (width_multiplier 0.125, 64 px inputs) except the imported
mobilenet_thin network (../shared), whose real weights are pruned. The retrain
test goes through the real commands in subprocesses: prune, train with
load_graph, evaluate, inference, and an ONNX conversion of the result.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import yaml
from conftest import (
    REPO,
    TFPOSE_PB,
    bpnet_cli,
    error_lines,
    invoke,
    keras_to_onnx,
    need,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")

from bpnet.errors import BpnetError
from bpnet.model.build import build_model
from bpnet.model.io import load_model, save_model
from bpnet.model.meta import DEFAULT_NORMALIZATION, make_meta
from bpnet.model.prune import PruneOptions, prune_model
from bpnet.pose import load_pose_config
from bpnet.specs import ModelConfig, default_pose_config_path, spec_to_dict

POSE = load_pose_config(default_pose_config_path())
OUTPUTS = {"heatmap_out", "paf_out"} | {f"{b}_stage{t}" for b in ("heatmap", "paf") for t in range(1, 9)}
ENV = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
ENV.update({"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})

ARCHS = {
    "two_branch": {"class_name": "BpNetModel", "stages": 2},
    "lite": {"class_name": "BpNetLiteModel", "stages": 3},
    "lite_attention": {"class_name": "BpNetLiteModel", "stages": 2, "use_self_attention": True},
    "two_branch_attention": {"class_name": "BpNetModel", "stages": 2, "use_self_attention": True},
}


def tiny(arch, width=0.125):
    cfg = ModelConfig(width_multiplier=width, **ARCHS[arch])
    return build_model(cfg, POSE), cfg


def convs(model):
    return [l for l in model.layers if l.__class__.__name__ in ("Conv2D", "SeparableConv2D")]


def prunable(model):
    return [l for l in convs(model) if l.name not in OUTPUTS]


def _kernel_index(layer):
    return 1 if layer.__class__.__name__ == "SeparableConv2D" else 0


def zero_filters(model, rng, every=3, rescale=True):
    """Give every weight a realistic random value, then make filters i % every == 1 of
    every prunable conv exactly zero (kernel, bias, and the following BN's beta and
    mean), so removing them cannot change the outputs. Returns {layer: kept indices}."""
    kept = {}
    for layer in convs(model):
        w = layer.get_weights()
        k = _kernel_index(layer)
        if rescale:
            for i in range(k + 1):
                fan_in = int(np.prod(w[i].shape[:-1])) if i == k else int(np.prod(w[i].shape[:2]))
                w[i] = rng.normal(0, math.sqrt(2.0 / fan_in), w[i].shape).astype(np.float32)
        if len(w) > k + 1:
            w[k + 1] = rng.normal(0, 0.05, w[k + 1].shape).astype(np.float32)
        n = w[k].shape[-1]
        idx = np.arange(n)
        if layer.name not in OUTPUTS:
            # (the imported network has a few all-zero filters of its own: they go too)
            norms = np.linalg.norm(w[k].reshape(-1, n), axis=0)
            drop = (idx % every == 1) | (norms < 1e-2 * norms.max())
            w[k][..., drop] = 0
            if len(w) > k + 1:
                w[k + 1][drop] = 0
            kept[layer.name] = idx[~drop]
        layer.set_weights(w)
        try:
            bn = model.get_layer(f"{layer.name}_bn")
        except ValueError:
            continue
        gamma, beta, mean, var = bn.get_weights()
        gamma = rng.uniform(0.5, 1.5, n).astype(np.float32)
        beta = rng.normal(0, 0.1, n).astype(np.float32)
        mean = rng.normal(0, 0.1, n).astype(np.float32)
        var = rng.uniform(0.5, 2.0, n).astype(np.float32)
        if layer.name in kept:
            beta[drop] = 0
            mean[drop] = 0
        bn.set_weights([gamma, beta, mean, var])
    return kept


def assert_same_outputs(a, b, x):
    ya, yb = a(x, training=False), b(x, training=False)
    assert len(ya) == len(yb) == len(a.outputs)
    for p, q in zip(ya, yb):
        p, q = np.asarray(p), np.asarray(q)
        assert p.shape == q.shape
        scale = max(1.0, float(np.abs(p).max()))
        assert float(np.abs(p).max()) > 1e-3  # the check means something
        assert float(np.abs(p - q).max()) <= 1e-5 * scale, float(np.abs(p - q).max())


EXACT = PruneOptions(pruning_threshold=1e-3, pruning_granularity=1, min_num_filters=1)


@pytest.fixture(scope="module")
def mobilenet_thin():
    need(TFPOSE_PB)
    from bpnet.tasks.import_model import import_tfpose
    return import_tfpose(TFPOSE_PB)


# ------------------------------------------------------------------ exactness

@pytest.mark.parametrize("arch,criterion,normalizer", [
    ("two_branch", "union", "max"), ("lite", "union", "L2"),
    ("lite_attention", "intersection", "max"), ("two_branch_attention", "union", "max")])
def test_zeroed_filters_prune_away_exactly(arch, criterion, normalizer):
    model, _ = tiny(arch)
    kept = zero_filters(model, np.random.default_rng(0))
    opts = PruneOptions(pruning_threshold=1e-3, pruning_granularity=1, min_num_filters=1,
                        normalizer=normalizer, equalization_criterion=criterion)
    pruned, report = prune_model(model, opts)
    got = {l.name: l.kept for l in report.layers}
    for name, idx in kept.items():
        assert got[name] == len(idx), name
        assert pruned.get_layer(name).filters == len(idx)
    for name in OUTPUTS & got.keys():
        assert pruned.get_layer(name).filters == model.get_layer(name).filters
    assert report.params_after == pruned.count_params() < report.params_before == model.count_params()
    assert pruned.output_names == model.output_names
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (2, 64, 48, 3)).astype(np.float32)
    assert_same_outputs(model, pruned, x)
    if "attention" in arch:  # the tied pairs keep the same filters
        for b in ("heat", "paf"):
            conv6 = next(l for l in report.layers if l.name == f"stage2_{b}_conv6")
            att = next(l for l in report.layers if l.name == f"stage2_{b}_attention_conv")
            assert conv6.kept == att.kept and "tied" in conv6.reason


def _copy(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def test_imported_mobilenet_thin_prunes_exactly(mobilenet_thin):
    model = _copy(mobilenet_thin[0])
    kept = zero_filters(model, np.random.default_rng(2), every=4, rescale=False)
    pruned, report = prune_model(model, EXACT)
    got = {l.name: l.kept for l in report.layers}
    assert {n: got[n] for n in kept} == {n: len(i) for n, i in kept.items()}
    assert pruned.get_layer("backbone_sep11").filters == len(kept["backbone_sep11"])
    # real images' scale: the network takes rgb / 256
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (1, 96, 80, 3)).astype(np.float32)
    assert_same_outputs(model, pruned, x)


def test_dead_filters_with_a_bias_are_folded_into_the_next_layer(mobilenet_thin):
    """Kernels zeroed, biases kept: a removed filter still outputs a constant, which the
    next layer's bias takes over, so the pruned model equals the zeroed one away from
    the zero-padded border (the real network: 10 of its first conv's 24 filters are dead)."""
    model = _copy(mobilenet_thin[0])
    rng = np.random.default_rng(6)
    # the last stage only: a border effect spreads one cell per 3x3 layer
    for layer in [l for l in prunable(model) if l.name.startswith("stage6_")]:
        w = layer.get_weights()
        k = _kernel_index(layer)
        w[k][..., np.arange(w[k].shape[-1]) % 4 == 1] = 0
        layer.set_weights(w)
    pruned, report = prune_model(model, EXACT)
    assert {l.name: l.kept for l in report.layers}["stage6_paf_sep4"] == 48
    x = rng.uniform(0, 1, (1, 192, 192, 3)).astype(np.float32)
    for a, b in zip(model(x), pruned(x)):
        a, b = np.asarray(a), np.asarray(b)
        inner = np.abs(a - b)[:, 5:-5, 5:-5]
        assert float(inner.max()) <= 1e-4 * max(1.0, float(np.abs(a).max())), float(inner.max())


# ------------------------------------------------------------------ the counts

def plant_norms(model):
    """Filter j of every prunable conv with n filters gets kernel norm (j + 1) / n (the
    order shuffled), so its max-normalized score is exactly (j + 1) / n."""
    rng = np.random.default_rng(4)
    scores = {}
    for layer in prunable(model):
        w = layer.get_weights()
        k = _kernel_index(layer)
        n = w[k].shape[-1]
        target = (rng.permutation(n) + 1) / n
        cols = w[k].reshape(-1, n)
        cols = cols / np.linalg.norm(cols, axis=0) * target
        w[k] = cols.reshape(w[k].shape).astype(np.float32)
        layer.set_weights(w)
        scores[layer.name] = target
    return scores


def expected_kept(n, pth, g, nf):
    above = sum(1 for j in range(n) if (j + 1) / n >= pth - 1e-7)
    return min(n, int(math.ceil(max(above, nf) / g) * g))


def expected_params(model, kept):
    cfg = model.get_config()
    for layer_cfg in cfg["layers"]:
        layer_cfg.pop("build_config", None)
        if layer_cfg["config"]["name"] in kept:
            layer_cfg["config"]["filters"] = kept[layer_cfg["config"]["name"]]
    return keras.Model.from_config(cfg).count_params()


@pytest.mark.parametrize("pth,g,nf", [(0.3, 8, 16), (0.55, 4, 4), (0.8, 2, 6)])
def test_parameter_counts_are_what_the_thresholds_imply(pth, g, nf):
    model, _ = tiny("lite", width=0.25)
    plant_norms(model)
    pruned, report = prune_model(model, PruneOptions(pruning_threshold=pth, pruning_granularity=g,
                                                     min_num_filters=nf))
    want = {l.name: expected_kept(l.filters, pth, g, nf) for l in prunable(model)}
    got = {l.name: l.kept for l in report.layers if l.name in want}
    assert got == want
    for l in report.layers:
        assert l.kept == l.total or l.kept % g == 0  # granularity
        assert l.kept >= min(l.total, nf)
    assert report.params_after == pruned.count_params() == expected_params(model, want)
    assert report.param_ratio == pytest.approx(report.params_after / report.params_before)
    # the first conv sees the image, so its kept filters' norms are untouched: the top ones
    n = model.get_layer("block1_conv1").filters
    norms = np.linalg.norm(pruned.get_layer("block1_conv1").get_weights()[0].reshape(-1, want["block1_conv1"]), axis=0)
    np.testing.assert_allclose(np.sort(norms), (np.arange(n - want["block1_conv1"], n) + 1) / n, rtol=1e-5)


@pytest.mark.parametrize("criterion,expect", [
    # conv6 scores s, attention conv scores 1.05 - s (both max-normalized): per filter
    ("union", lambda a, b: np.maximum(a, b)), ("intersection", lambda a, b: np.minimum(a, b)),
    ("arithmetic_mean", lambda a, b: (a + b) / 2), ("geometric_mean", lambda a, b: np.sqrt(a * b))])
def test_equalization_criteria(criterion, expect):
    model, _ = tiny("lite_attention", width=0.25)
    plant_norms(model)
    a_layer, b_layer = model.get_layer("stage2_paf_conv6"), model.get_layer("stage2_paf_attention_conv")
    n = a_layer.filters
    a = (np.arange(n) + 1) / n
    b = np.clip(1.05 - a, 0.01, None)
    for layer, s in ((a_layer, a), (b_layer, b)):
        w = layer.get_weights()
        cols = w[0].reshape(-1, n)
        w[0] = (cols / np.linalg.norm(cols, axis=0) * s).reshape(w[0].shape).astype(np.float32)
        layer.set_weights(w)
    pth = 0.62
    _, report = prune_model(model, PruneOptions(pruning_threshold=pth, pruning_granularity=1,
                                                min_num_filters=1, equalization_criterion=criterion))
    combined = expect(a / a.max(), b / b.max())
    want = int((combined >= pth).sum())
    got = {l.name: l.kept for l in report.layers}
    assert got["stage2_paf_conv6"] == got["stage2_paf_attention_conv"] == max(1, want)


def test_zero_threshold_removes_nothing():
    model, _ = tiny("lite_attention")
    pruned, report = prune_model(model, PruneOptions(pruning_threshold=0))
    assert report.params_after == report.params_before and report.param_ratio == 1.0
    assert all(l.kept == l.total for l in report.layers)
    for p, q in zip(model.get_weights(), pruned.get_weights()):
        np.testing.assert_array_equal(p, q)


def test_huge_threshold_stops_at_the_minimum_and_excluded_layers_keep_all():
    model, _ = tiny("two_branch", width=0.25)
    excluded = ("block3_conv2", "stage1_heat_conv4")
    _, report = prune_model(model, PruneOptions(pruning_threshold=1e6, min_num_filters=16,
                                                excluded_layers=excluded))
    for l in report.layers:
        if l.name in OUTPUTS:
            assert l.kept == l.total and l.reason == "output"
        elif l.name in excluded:
            assert l.kept == l.total and l.reason == "excluded"
        else:
            assert l.kept == min(16, l.total), l


def test_bad_options_are_one_clear_error():
    model, _ = tiny("lite")
    with pytest.raises(BpnetError, match=r"'stage1_conv9' is not a layer.*did you mean stage1_conv\d"):
        prune_model(model, PruneOptions(excluded_layers=("stage1_conv9",)))
    for bad in ({"pruning_threshold": -0.1}, {"pruning_threshold": float("nan")},
                {"pruning_granularity": 0}, {"min_num_filters": 0}, {"normalizer": "L1"}):
        with pytest.raises(BpnetError):
            prune_model(model, PruneOptions(**bad))


# ------------------------------------------------------------------ the command, retraining

@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A small sample dataset with train and val records, made by the commands."""
    root = tmp_path_factory.mktemp("prune_sample")
    data = root / "data"
    bpnet_cli("make_sample_data", "-o", data, "--num_train", "48", "--num_val", "8",
              "--image_size", "96", "96", "-r", root / "r0", env=ENV, check=True)
    bpnet_cli("dataset_convert", "-d", data / "sample_spec.json", "-o", data / "records" / "train",
              "--generate_masks", "--workers", "1", "-r", root / "r1", env=ENV, check=True)
    bpnet_cli("dataset_convert", "-d", data / "sample_spec.json", "-m", "test",
              "-o", data / "records" / "val", "--generate_masks", "--workers", "1",
              "-r", root / "r2", env=ENV, check=True)
    return data


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("prune_model")
    model, cfg = tiny("lite_attention")
    path = d / "tiny.keras"
    save_model(model, path, make_meta(POSE, DEFAULT_NORMALIZATION, spec_to_dict(cfg)))
    return path


def test_pruned_model_retrains_evaluates_infers_and_converts(sample, tiny_file, tmp_path):
    pruned = tmp_path / "pruned.keras"
    p = bpnet_cli("prune", "-m", tiny_file, "-o", pruned, "-pth", "0.9", "-pg", "2", "-nf", "4",
                  "-el", "stage1_conv1", "stage1_conv2", "-r", tmp_path / "prune", "-ll", "DEBUG",
                  env=ENV, check=True)
    status = json.loads((tmp_path / "prune" / "status.json").read_text())
    assert status["status"] == "SUCCESS"
    assert status["params_after"] < status["params_before"]
    assert status["param_ratio"] == pytest.approx(status["params_after"] / status["params_before"], abs=1e-6)
    assert re.search(r"stage1_conv1\s+kept\s+16 of\s+16 filters \(excluded\)", p.stderr)
    assert re.search(rf"parameters: {status['params_before']} before, {status['params_after']} after", p.stderr)
    model, meta = load_model(pruned)
    _src, src_meta = load_model(tiny_file)
    assert model.count_params() == status["params_after"]
    assert meta["pose_config"] == src_meta["pose_config"] and meta["model"] == src_meta["model"]
    assert meta["pruned"]["pruning_threshold"] == 0.9
    assert model.get_layer("stage1_conv1").filters == 16
    assert model.get_layer("stage1_conv3").filters < 16

    spec = yaml.safe_load((REPO / "specs" / "bpnet_train_sample.yaml").read_text())
    spec.update({"num_epoch": 3, "checkpoint_n_epoch": 3, "steps_per_epoch": 8,
                 "validation_every_n_epoch": 3, "pretrained_weights": str(pruned),
                 "load_graph": True, "log_every_n_secs": 100})
    dl = spec["dataloader"]
    dl.update({"batch_size": 4, "num_parallel_calls": 1})
    dl["image_config"]["image_dims"].update({"height": 64, "width": 64})
    dl["pose_config"]["target_shape"] = [8, 8]
    dl["dataset_config"].update({"root_data_path": str(sample),
                                 "train_records_folder_path": str(sample / "records"),
                                 "val_records_folder_path": str(sample / "records"),
                                 "dataset_specs": {"sample": str(sample / "sample_spec.json")}})
    spec_path = tmp_path / "retrain.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    run = tmp_path / "retrain"
    p = bpnet_cli("train", "-e", spec_path, "-r", run, env=ENV, check=True)
    assert "load_graph: training the whole model" in p.stderr
    before = float(re.search(r"validation loss before training ([\d.e+-]+)", p.stderr).group(1))
    after = float(re.findall(r"epoch \d+ validation loss ([\d.e+-]+)", p.stderr)[-1])
    assert after < before, (before, after)
    trained, tmeta = load_model(run / "bpnet_model.keras")
    assert [w.shape for w in trained.get_weights()] == [w.shape for w in model.get_weights()]

    infer = tmp_path / "infer.yaml"
    infer.write_text(yaml.safe_dump({"model_path": str(run / "bpnet_model.keras"),
                                     "input_shape": [64, 64], "flip_test": False}))
    bpnet_cli("evaluate", "-i", infer, "-d", sample / "sample_spec.json", "-r", tmp_path / "ev",
              env=ENV, check=True)
    ev = json.loads((tmp_path / "ev" / "status.json").read_text())
    assert ev["status"] == "SUCCESS"
    bpnet_cli("inference", "-i", infer, "--input_type", "dir", "--input", sample / "images" / "val",
              "-r", tmp_path / "inf", env=ENV, check=True)
    det = json.loads((tmp_path / "inf" / "detections.json").read_text())
    assert len(det["images"] if isinstance(det, dict) else det) == 8

    from bpnet.infer.runners import load_runner
    onnx_path = keras_to_onnx(trained, tmeta, tmp_path / "pruned.onnx")
    x = np.random.default_rng(5).uniform(-0.5, 0.5, (2, 64, 64, 3)).astype(np.float32)
    hk, pk = load_runner(run / "bpnet_model.keras").run(x)
    ho, po = load_runner(onnx_path).run(x)
    np.testing.assert_allclose(ho, hk, atol=1e-4)
    np.testing.assert_allclose(po, pk, atol=1e-4)
    from bpnet.cli import main as cli_main
    if "export" in cli_main.commands:  # bpnet export on the pruned, retrained model
        bpnet_cli("export", "-m", run / "bpnet_model.keras", "-o", tmp_path / "exported.onnx",
                  "-r", tmp_path / "export", env=ENV, check=True)
        he, pe = load_runner(tmp_path / "exported.onnx").run(x)
        np.testing.assert_allclose(he, hk, atol=1e-4)
        np.testing.assert_allclose(pe, pk, atol=1e-4)


def _prune_fails(args, tmp_path, needle):
    out = tmp_path / "out.keras"
    res = invoke("prune", *args, "-o", out, "-r", tmp_path / "res")
    lines = error_lines(res.stderr, "prune")
    assert res.exit_code != 0 and len(lines) == 1, res.stderr
    assert re.search(needle, lines[0]), lines[0]
    assert "Traceback" not in res.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    status = json.loads((tmp_path / "res" / "status.json").read_text()) if (tmp_path / "res" / "status.json").exists() else None
    if status is not None:
        assert status["status"] == "FAILURE"
    return lines[0]


def test_bad_input_through_the_command(tiny_file, tmp_path):
    m = ["-m", tiny_file]
    _prune_fails(m + ["-el", "stage2_paf_attenton_conv"], tmp_path,
                 r"'stage2_paf_attenton_conv' is not a layer.*did you mean stage2_paf_attention_conv")
    _prune_fails(m + ["-pth", "-0.5"], tmp_path, r"pruning_threshold is -0.5")
    _prune_fails(m + ["-pth", "inf"], tmp_path, r"pruning_threshold is inf")
    _prune_fails(m + ["-pg", "0"], tmp_path, r"pruning_granularity is 0")
    _prune_fails(m + ["-nf", "-3"], tmp_path, r"min_num_filters is -3")
    bad = tmp_path / "notamodel.keras"
    bad.write_text("hello")
    _prune_fails(["-m", bad], tmp_path, r"not a bpnet model file")
    # a plain Keras model without bpnet's meta
    plain = tmp_path / "plain.keras"
    tiny("lite")[0].save(plain)
    _prune_fails(["-m", plain], tmp_path, r"no bpnet meta")
    _prune_fails(["-m", tmp_path / "missing.keras"], tmp_path, r"file not found")
    # -o equal to -m: the input stays as it was
    before = tiny_file.read_bytes()
    res = invoke("prune", "-m", tiny_file, "-o", tiny_file, "-r", tmp_path / "res")
    assert res.exit_code != 0 and "is the input model" in error_lines(res.stderr, "prune")[0]
    assert tiny_file.read_bytes() == before
    # wrong key on an encrypted model
    enc = tmp_path / "enc.keras"
    model, meta = load_model(tiny_file)
    save_model(model, enc, meta, key="right")
    _prune_fails(["-m", enc, "-k", "wrong"], tmp_path, r"wrong key")
    _prune_fails(["-m", enc], tmp_path, r"key")
    res = invoke("prune", "-m", enc, "-k", "right", "-o", tmp_path / "ok.keras", "-r", tmp_path / "res")
    assert res.exit_code == 0, res.stderr
    with pytest.raises(BpnetError, match="wrong key"):
        load_model(tmp_path / "ok.keras", key="wrong")
    assert load_model(tmp_path / "ok.keras", key="right")[1]["pruned"]["params_after"] > 0

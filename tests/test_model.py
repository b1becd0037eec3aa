"""The model family: architecture fidelity, outputs, stage selection, regularization, JAX."""

import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from bpnet.errors import BpnetError
from bpnet.pose import load_pose_config, pose_config_from_dict
from bpnet.specs import BackboneAttributes, ModelConfig, default_pose_config_path

keras = pytest.importorskip("keras")

from bpnet.model.build import (build_model, num_stages_of, select_stage_outputs,  # noqa: E402
                               stage_model)

POSE18 = load_pose_config(default_pose_config_path())
# A custom 5-joint, 4-limb keypoint set: 6 heatmap and 8 PAF channels.
POSE5 = pose_config_from_dict({
    "name": "five",
    "keypoints": ["head", "left_hand", "right_hand", "left_foot", "right_foot"],
    "skeleton": [[1, 2], [1, 3], [1, 4], [1, 5]],
})


def tiny(cls="BpNetLiteModel", stages=2, pose=POSE5, **kw):
    kw.setdefault("width_multiplier", 0.0625)
    kw.setdefault("heat_channels", pose.heat_channels)
    kw.setdefault("paf_channels", pose.paf_channels)
    return ModelConfig(class_name=cls, stages=stages, **kw)


# TAO's published parameter counts for its BodyPoseNet models: VGG backbone
# without bias, stages with bias, no attention, 18-joint COCO config.
@pytest.mark.parametrize("cls,stages,expected", [
    ("BpNetModel", 6, 52_319_510),
    ("BpNetModel", 3, 25_965_035),
    ("BpNetLiteModel", 6, 30_015_638),
    ("BpNetLiteModel", 3, 16_777_835),
])
def test_parameter_counts_match_tao(cls, stages, expected):
    cfg = ModelConfig(class_name=cls, stages=stages,
                      backbone_attributes=BackboneAttributes(use_bias=False), use_bias=True)
    model = build_model(cfg, POSE18, input_shape=(16, 16, 3))
    assert model.count_params() == expected
    keras.backend.clear_session()


@pytest.mark.parametrize("cls", ["BpNetModel", "BpNetLiteModel"])
def test_attention_and_bias_switches_change_exactly_the_expected_parameters(cls):
    base = build_model(tiny(cls, 3, width_multiplier=1.0, pose=POSE5), POSE5, (16, 16, 3))
    att = build_model(tiny(cls, 3, width_multiplier=1.0, pose=POSE5, use_self_attention=True),
                      POSE5, (16, 16, 3))
    # One 3x3 128->128 conv with bias per branch (2) per refinement stage (2).
    assert att.count_params() - base.count_params() == 2 * 2 * (9 * 128 * 128 + 128)
    assert {"stage2_heat_attention_conv", "stage3_paf_attention_conv"} <= {l.name for l in att.layers}
    assert att.get_layer("stage2_heat_attention_conv_sigmoid") is not None
    assert att.get_layer("stage2_paf_attention_conv_tanh") is not None
    bb_bias = build_model(tiny(cls, 3, width_multiplier=1.0, pose=POSE5,
                               backbone_attributes=BackboneAttributes(use_bias=True)),
                          POSE5, (16, 16, 3))
    backbone_channels = 2 * 64 + 2 * 128 + 4 * 256 + 2 * 512 + 256
    assert bb_bias.count_params() - base.count_params() == backbone_channels
    no_bias = build_model(tiny(cls, 3, width_multiplier=1.0, pose=POSE5, use_bias=False),
                          POSE5, (16, 16, 3))
    head_biases = sum(int(np.prod(w.shape)) for l in base.layers for w in l.weights
                      if w.name == "bias")
    assert base.count_params() - no_bias.count_params() == head_biases
    keras.backend.clear_session()


@pytest.mark.parametrize("cls", ["BpNetModel", "BpNetLiteModel"])
def test_outputs_names_shapes_and_order_follow_the_pose_config(cls):
    # xavier: with sigma 0.01 the untrained outputs are ~1e-21, too small to compare.
    model = build_model(tiny(cls, stages=3, kernel_initializer="xavier"), POSE5)
    assert model.output_names == ["heatmap_stage1", "heatmap_stage2", "heatmap_out",
                                  "paf_stage1", "paf_stage2", "paf_out"]
    assert num_stages_of(model) == 3
    # Input size not a multiple of 8: maps are ceil(size / 8) like the labels.
    x = np.random.default_rng(0).normal(size=(2, 36, 44, 3)).astype("float32")
    outs = model.predict(x, verbose=0)
    for o in outs[:3]:
        assert o.shape == (2, 5, 6, 6)
    for o in outs[3:]:
        assert o.shape == (2, 5, 6, 8)
    # Each stage's outputs really come from that stage: stage t feeds t+1.
    assert np.abs(outs[0] - outs[1]).max() > 1e-3 * np.abs(outs[0]).max() > 0
    keras.backend.clear_session()


def test_output_layers_are_linear_float32_and_final_names_are_fixed():
    model = build_model(tiny("BpNetModel", stages=2), POSE5)
    for name in ("heatmap_out", "paf_out", "heatmap_stage1", "paf_stage1"):
        layer = model.get_layer(name)
        assert layer.activation.__name__ == "linear"
        assert layer.dtype_policy.compute_dtype == "float32"
    assert model.get_layer("heatmap_out").filters == POSE5.heat_channels
    assert model.get_layer("paf_out").filters == POSE5.paf_channels
    keras.backend.clear_session()


def test_backbone_is_stride_8_with_batch_norm_and_no_pooling():
    model = build_model(tiny("BpNetLiteModel", width_multiplier=0.125), POSE5, (64, 64, 3))
    kinds = {type(l).__name__ for l in model.layers}
    assert "MaxPooling2D" not in kinds
    strided = [l.name for l in model.layers if isinstance(l, keras.layers.Conv2D)
               and l.strides == (2, 2)]
    assert strided == ["block2_conv1", "block3_conv1", "block4_conv1"]
    bns = [l.name for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 11 and "channel_reduction_conv_bn" not in bns
    assert model.outputs[0].shape[1:3] == (8, 8)
    keras.backend.clear_session()


def test_channel_counts_must_agree_with_the_pose_config():
    cfg = ModelConfig(class_name="BpNetLiteModel", stages=2)  # 19 / 38 channels
    with pytest.raises(BpnetError, match=r"heat_channels is 19 .*5 joints.*6"):
        build_model(cfg, POSE5)
    cfg = tiny(paf_channels=10)
    with pytest.raises(BpnetError, match=r"paf_channels is 10.*4 limbs x 2 = 8"):
        build_model(cfg, POSE5)


def test_bad_model_settings_are_clear_errors():
    # (Value rules such as stages >= 2 belong to the spec layer: tests/test_specs.py.)
    with pytest.raises(BpnetError, match="architecture 'mobilenet_v1'"):
        build_model(tiny(backbone_attributes=BackboneAttributes(architecture="mobilenet_v1",
                                                                nlayers=19)), POSE5)
    with pytest.raises(BpnetError, match="input shape"):
        build_model(tiny(), POSE5, input_shape=(32, 32))


def test_stage_selection_is_one_based_and_none_is_last():
    model = build_model(tiny("BpNetModel", stages=3), POSE5)
    x = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype("float32")
    outs = model.predict(x, verbose=0)
    h, p = select_stage_outputs(outs, 3, None)
    assert h is outs[2] and p is outs[5]
    h, p = select_stage_outputs(outs, 3, 1)
    assert h is outs[0] and p is outs[3]
    two = stage_model(model, 2)
    sh, sp = two.predict(x, verbose=0)
    np.testing.assert_allclose(sh, outs[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sp, outs[4], rtol=1e-5, atol=1e-6)
    for bad in (0, 4):
        with pytest.raises(BpnetError, match=r"output_stage_to_use is .* 3 stages"):
            select_stage_outputs(outs, 3, bad)
    keras.backend.clear_session()


@pytest.mark.parametrize("kind", ["l1", "l2", "l1_l2"])
def test_regularization_losses_match_numpy(kind):
    k, b = 5e-4, 1e-3
    model = build_model(tiny("BpNetLiteModel", regularization_type=kind,
                             kernel_regularization_factor=k, bias_regularization_factor=b), POSE5)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    biased = [l for l in convs if l.use_bias]
    assert len(model.losses) == len(convs) + len(biased)

    def reg(w, f):
        w = np.asarray(w, dtype=np.float64)
        l1, l2 = f * np.abs(w).sum(), f * np.square(w).sum()
        return {"l1": l1, "l2": l2, "l1_l2": l1 + l2}[kind]

    # Non-zero biases, so the bias terms are really checked.
    for l in biased:
        l.bias.assign(np.full(l.bias.shape, 0.3, dtype="float32"))
    expected = sum(reg(l.kernel.numpy(), k) for l in convs) + sum(reg(l.bias.numpy(), b)
                                                                   for l in biased)
    got = float(sum(np.asarray(x) for x in model.losses))
    assert got == pytest.approx(expected, rel=1e-4)
    keras.backend.clear_session()


def test_zero_bias_factor_adds_no_bias_regularizer_and_initializers():
    model = build_model(tiny("BpNetModel", width_multiplier=0.5, bias_regularization_factor=0.0),
                        POSE5, (16, 16, 3))
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(model.losses) == len(convs)
    # random_normal: sigma 0.01 (checked on the largest kernel); biases start at 0.
    big = max(convs, key=lambda l: int(np.prod(l.kernel.shape)))
    assert np.std(big.kernel.numpy()) == pytest.approx(0.01, rel=0.05)
    assert all(np.all(l.bias.numpy() == 0) for l in convs if l.use_bias)
    xav = build_model(tiny("BpNetModel", width_multiplier=0.5, kernel_initializer="xavier"),
                      POSE5, (16, 16, 3))
    layer = xav.get_layer("stage2_heat_conv1")
    kh, kw, cin, cout = layer.kernel.shape
    fan_in, fan_out = kh * kw * cin, kh * kw * cout
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    w = layer.kernel.numpy()
    assert np.abs(w).max() <= limit and np.std(w) == pytest.approx(limit / np.sqrt(3), rel=0.05)
    keras.backend.clear_session()


def test_width_multiplier_scales_every_conv_but_the_outputs():
    model = build_model(tiny("BpNetModel", width_multiplier=0.25), POSE5, (16, 16, 3))
    assert model.get_layer("block1_conv1").filters == 16
    assert model.get_layer("block4_conv2").filters == 128
    assert model.get_layer("channel_reduction_conv").filters == 32
    assert model.get_layer("stage1_paf_conv4").filters == 128
    assert model.get_layer("paf_out").filters == 8
    keras.backend.clear_session()


def test_mobilenet_thin_class_dispatches_to_its_builder(monkeypatch):
    calls = []

    def fake_build(model_cfg, pose, input_shape):
        calls.append((model_cfg.class_name, pose.name, input_shape))
        return "built"

    mod = types.ModuleType("bpnet.model.mobilenet_thin")
    mod.build_mobilenet_thin = fake_build
    monkeypatch.setitem(sys.modules, "bpnet.model.mobilenet_thin", mod)
    out = build_model(tiny("MobileNetThinModel"), POSE5, (64, 64, 3))
    assert out == "built" and calls == [("MobileNetThinModel", "five", (64, 64, 3))]


JAX_SCRIPT = textwrap.dedent("""
    import json, os, numpy as np
    import keras
    assert keras.backend.backend() == "jax", keras.backend.backend()
    import jax
    from bpnet.pose import pose_config_from_dict
    from bpnet.specs import ModelConfig
    from bpnet.model.build import build_model
    from bpnet.model.loss import BpNetLoss, regularization_loss
    from bpnet.model.optimizer import WeightedMomentumOptimizer, stagewise_gradient_weights
    pose = pose_config_from_dict(json.loads(os.environ["POSE"]))
    out = {}
    for cls in ("BpNetModel", "BpNetLiteModel"):
        cfg = ModelConfig(class_name=cls, stages=2, heat_channels=pose.heat_channels,
                          paf_channels=pose.paf_channels, width_multiplier=0.0625,
                          use_self_attention=True)
        model = build_model(cfg, pose, (32, 32, 3))
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
        labels = {"heatmap": rng.random((2, 4, 4, pose.heat_channels)).astype("float32"),
                  "paf": rng.normal(size=(2, 4, 4, pose.paf_channels)).astype("float32"),
                  "mask": np.ones((2, 4, 4, 1), "float32")}
        outs = jax.jit(lambda tv, ntv: model.stateless_call(tv, ntv, x)[0])(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables])
        loss_fn = BpNetLoss(2)
        opt = WeightedMomentumOptimizer(1e-4, gradient_weights=stagewise_gradient_weights(model))
        opt.build(model.trainable_variables)
        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]

        def compute(tv, ntv):
            y, ntv2 = model.stateless_call(tv, ntv, x, training=True)
            total, _ = loss_fn(labels, y)
            return total, ntv2

        # jit: op-by-op eager JAX compiles every op separately (minutes on 2 cores).
        grad_fn = jax.jit(jax.value_and_grad(compute, has_aux=True))
        (loss0, ntv2), grads = grad_fn(tv, ntv)
        ov = [v.value for v in opt.variables]
        tv2, ov2 = jax.jit(opt.stateless_apply)(ov, grads, tv)
        (loss1, _), _ = grad_fn(tv2, ntv2)
        out[cls] = {"shapes": [list(o.shape) for o in outs], "loss0": float(loss0),
                    "loss1": float(loss1),
                    "finite_grads": bool(all(np.isfinite(np.asarray(g)).all() for g in grads))}
    # Loss (plain and focal) and schedule values on fixed arrays, checked
    # against the formulas by the test.
    from bpnet.specs import FocalLossParams
    from bpnet.model.schedules import SoftstartAnnealingLearningRateSchedule
    rng = np.random.default_rng(7)
    lab = {"heatmap": rng.random((2, 3, 3, 6)).astype("float32"),
           "paf": rng.uniform(-1, 1, (2, 3, 3, 8)).astype("float32"),
           "mask": (rng.random((2, 3, 3, 1)) > 0.3).astype("float32")}
    preds = [rng.normal(size=(2, 3, 3, 6)).astype("float32"),
             rng.normal(size=(2, 3, 3, 8)).astype("float32")]
    out["loss"] = float(BpNetLoss(1)(lab, preds)[0])
    out["focal"] = float(BpNetLoss(1, focal=FocalLossParams())(lab, preds)[0])
    sched = SoftstartAnnealingLearningRateSchedule(2e-5, 8e-8, 0.05, 0.5, total_steps=100)
    out["lr"] = [float(sched(s)) for s in (0, 2, 30, 75, 100)]
    print("RESULT " + json.dumps(out))
""")


def test_model_builds_runs_and_trains_one_step_on_the_jax_backend(tmp_path):
    try:
        import jax  # noqa: F401
    except ImportError:
        pytest.skip("jax is not installed (pip install 'bpnet[test]' or pip install jax jaxlib)")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               POSE=json.dumps(POSE5.to_dict()))
    script = tmp_path / "jax_check.py"
    script.write_text(JAX_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    for cls in ("BpNetModel", "BpNetLiteModel"):
        r = res[cls]
        assert r["shapes"] == [[2, 4, 4, 6]] * 2 + [[2, 4, 4, 8]] * 2
        assert r["finite_grads"]
        # One small SGD step along the JAX gradient lowers the loss.
        assert 0 < r["loss1"] < r["loss0"]
    rng = np.random.default_rng(7)
    lab = [rng.random((2, 3, 3, 6)), rng.uniform(-1, 1, (2, 3, 3, 8)),
           (rng.random((2, 3, 3, 1)) > 0.3).astype("float32")]
    preds = [rng.normal(size=(2, 3, 3, 6)), rng.normal(size=(2, 3, 3, 8))]
    lab = [a.astype("float32").astype(np.float64) for a in lab]
    preds = [a.astype("float32").astype(np.float64) for a in preds]

    def np_loss(focal):
        total = 0.0
        for p, g in zip(preds, lab[:2]):
            w = 1.0
            if focal:
                s = np.where(np.abs(g) >= 0.01, np.sign(g) * p - 0.1, 1 - np.abs(p) - 0.02)
                w = np.abs(1 - s)
            total += 0.5 * (w * ((p - g) * lab[2]) ** 2).sum() / 2
        return total

    assert res["loss"] == pytest.approx(np_loss(False), rel=1e-5)
    assert res["focal"] == pytest.approx(np_loss(True), rel=1e-5)
    expected_lr = [8e-8, np.exp(np.log(8e-8) + 0.4 * (np.log(2e-5) - np.log(8e-8))), 2e-5,
                   np.exp(np.log(8e-8) + 0.5 * (np.log(2e-5) - np.log(8e-8))), 8e-8]
    assert res["lr"] == pytest.approx(expected_lr, rel=1e-5)


@pytest.mark.parametrize("cls", ["BpNetLiteModel", "MobileNetThinModel"])
def test_clone_with_regularizers_follows_the_spec_not_the_file(cls):
    """A retrained (load_graph) model gets its train spec's regularization: same weights and
    outputs, and a regularization loss of exactly factor x sum of squared kernels."""
    from bpnet.model.weights import clone_with_regularizers
    extra = ({"backbone_attributes": BackboneAttributes(architecture="mobilenet_v1")}
             if cls == "MobileNetThinModel" else {})
    plain = build_model(tiny(cls, kernel_regularization_factor=0.0, **extra), POSE5)
    assert not plain.losses
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
    factor = 1e-3
    reg = clone_with_regularizers(plain, tiny(cls, kernel_regularization_factor=factor,
                                              regularization_type="l2", **extra))
    for a, b in zip(plain(x), reg(x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    kernels = [w for w in reg.weights
               if w.path.rsplit("/", 1)[-1] in ("kernel", "depthwise_kernel", "pointwise_kernel")]
    expect = factor * sum(float(np.sum(np.asarray(w) ** 2)) for w in kernels)
    got = float(sum(np.asarray(v) for v in reg.losses))
    assert kernels and got == pytest.approx(expect, rel=1e-4)
    back = clone_with_regularizers(reg, tiny(cls, kernel_regularization_factor=0.0, **extra))
    assert not back.losses

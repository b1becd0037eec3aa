"""Adam / AdamW with per-variable learning-rate multipliers, gradient clipping by global norm
(also under tf.distribute and --use_amp), the per-cell loss, their spec keys, and the same
AdamW + per-cell recipe learning the sample data at 128 and at 256 px."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import POSE5, TWO_CPU_TINY_PRELUDE, bpnet_cli, make_converted_sample
from bpnet.errors import SpecError
from bpnet.specs import LossConfig, ModelConfig, OptimizerConfig, TrainSpec, build_spec

keras = pytest.importorskip("keras")

from bpnet.model.build import build_model
from bpnet.model.loss import BpNetLoss
from bpnet.model.optimizer import (
    AdamOptimizer,
    AdamWOptimizer,
    WeightedMomentumOptimizer,
    clip_by_global_norm,
    make_optimizer,
)


def tiny_model(seed=0, **kw):
    keras.utils.set_random_seed(seed)
    cfg = ModelConfig(class_name="BpNetLiteModel", stages=2, heat_channels=6, paf_channels=8,
                      width_multiplier=0.0625, kernel_initializer="xavier", **kw)
    return build_model(cfg, POSE5, (16, 16, 3))


def one_gradient(model, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 16, 16, 3)).astype("float32")
    labels = {"heatmap": rng.random((2, 2, 2, 6)).astype("float32"),
              "paf": rng.normal(size=(2, 2, 2, 8)).astype("float32"),
              "mask": np.ones((2, 2, 2, 1), "float32")}
    import tensorflow as tf
    with tf.GradientTape() as tape:
        total, _ = BpNetLoss(2)(labels, model(x, training=False))
    return [g.numpy() for g in tape.gradient(total, model.trainable_variables)]


def step_deltas(opt, model, grads):
    """{variable path: update} of one step of ``opt`` from the model's current weights."""
    before = [v.numpy().copy() for v in model.trainable_variables]
    opt.apply(grads, model.trainable_variables)
    out = {v.path: v.numpy() - b for v, b in zip(model.trainable_variables, before)}
    for v, b in zip(model.trainable_variables, before):
        v.assign(b)
    return out


# ------------------------------------------------------------------ Adam / AdamW

def adam_reference(grads, lr, b1=0.9, b2=0.999, eps=1e-7, mult=1.0, wd=0.0, v0=0.0):
    v, m, s = np.float64(v0), 0.0, 0.0
    for t, g in enumerate(grads, 1):
        v -= lr * mult * wd * v
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * g * g
        v -= lr * mult * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(s) + eps)
    return v


def test_adam_multiplier_scales_the_learning_rate_not_the_gradient():
    a = keras.Variable(np.array([1.0, -2.0], "float32"), name="a")
    b = keras.Variable(np.array([0.5, 0.25], "float32"), name="b")
    opt = AdamOptimizer(0.01, lr_multipliers={a.path: 4.0})
    gs = [np.array([0.2, -0.4], "float32"), np.array([0.3, 0.1], "float32"),
          np.array([-0.1, 0.5], "float32")]
    for g in gs:
        opt.apply([g, g], [a, b])
    for i in range(2):
        seq = [float(g[i]) for g in gs]
        assert a.numpy()[i] == pytest.approx(adam_reference(seq, 0.01, mult=4.0, v0=[1.0, -2.0][i]),
                                             rel=1e-5)
        assert b.numpy()[i] == pytest.approx(adam_reference(seq, 0.01, v0=[0.5, 0.25][i]), rel=1e-5)
    # Why a multiplier cannot scale Adam's gradient: 100x the gradient, the same step.
    c = keras.Variable(np.array([1.0], "float32"), name="c")
    d = keras.Variable(np.array([1.0], "float32"), name="d")
    AdamOptimizer(0.01).apply([np.array([0.3], "float32"), np.array([30.0], "float32")], [c, d])
    assert c.numpy()[0] == pytest.approx(d.numpy()[0], rel=1e-6)


def test_stagewise_multipliers_move_adam_variables_4x_and_8x_on_a_model():
    model = tiny_model()
    grads = one_gradient(model)
    deltas = {}
    for on in (False, True):
        for cls in ("AdamOptimizer", "AdamWOptimizer"):
            cfg = OptimizerConfig(class_name=cls, weight_decay=0.0 if cls == "AdamWOptimizer" else None)
            opt = make_optimizer(cfg, model, 1e-3, use_stagewise_lr_multipliers=on)
            deltas[on, cls] = step_deltas(opt, model, grads)
    for cls in ("AdamOptimizer", "AdamWOptimizer"):
        one, staged = deltas[False, cls], deltas[True, cls]
        for path, ratio in (("block1_conv1/kernel", 1), ("heatmap_stage1/bias", 2),
                            ("stage2_conv3/kernel", 4), ("heatmap_out/kernel", 4),
                            ("paf_out/bias", 8)):
            moved = np.abs(one[path]) > 1e-5  # Adam's first step: up to lr, where g is not ~0
            assert moved.any(), path
            np.testing.assert_allclose(staged[path][moved], ratio * one[path][moved], rtol=1e-4,
                                       atol=3e-7)  # float32 round-off of (v + dv) - v
        # Adam's first step moves no element further than lr (times its multiplier).
        assert np.abs(one["stage2_conv3/kernel"]).max() <= 1e-3 * (1 + 1e-5)
    keras.backend.clear_session()


def test_adamw_decays_kernels_only_at_the_variables_own_rate():
    model = tiny_model()
    zero = [np.zeros(v.shape, "float32") for v in model.trainable_variables]
    cfg = OptimizerConfig(class_name="AdamWOptimizer", weight_decay=0.1)
    opt = make_optimizer(cfg, model, 0.01, use_stagewise_lr_multipliers=True)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    opt.apply(zero, model.trainable_variables)  # zero gradient: Adam's step is 0, only decay
    after = {v.path: v.numpy() for v in model.trainable_variables}
    np.testing.assert_allclose(after["block1_conv1/kernel"],
                               before["block1_conv1/kernel"] * (1 - 0.01 * 0.1), rtol=1e-6)
    np.testing.assert_allclose(after["stage2_conv3/kernel"],
                               before["stage2_conv3/kernel"] * (1 - 4 * 0.01 * 0.1), rtol=1e-6)
    kept = [p for p in before if not p.endswith("kernel")]
    assert any(p.endswith("/gamma") for p in kept) and any(p.endswith("/bias") for p in kept)
    for p in kept:
        np.testing.assert_array_equal(after[p], before[p])
    # Keras' own (base-rate) decay stays off: nothing decays twice.
    assert opt.weight_decay is None and opt.decoupled_weight_decay == 0.1
    keras.backend.clear_session()


def test_adam_classes_serialize_and_resume_from_a_checkpoint(tmp_path):
    """Optimizer state through bpnet's checkpoint files: training continues identically."""
    from bpnet.model.meta import make_meta
    from bpnet.train.checkpoints import load_checkpoint, save_checkpoint
    for opt in (AdamOptimizer(1e-3, beta_1=0.8, lr_multipliers={"x/kernel": 4.0}),
                AdamWOptimizer(1e-3, weight_decay=0.02, epsilon=1e-8, default_multiplier=2.0)):
        back = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(opt))
        assert type(back) is type(opt) and back.get_config() == opt.get_config()
        json.dumps(keras.saving.serialize_keras_object(opt))
    assert back.decoupled_weight_decay == 0.02 and back.default_multiplier == 2.0

    cfg = OptimizerConfig(class_name="AdamWOptimizer", weight_decay=0.01)

    def net():
        model = tiny_model(seed=5)
        opt = make_optimizer(cfg, model, 1e-3, use_stagewise_lr_multipliers=True)
        opt.build(model.trainable_variables)
        return model, opt

    model, opt = net()
    gs = [one_gradient(model, seed=s) for s in range(4)]
    for g in gs[:2]:
        opt.apply(g, model.trainable_variables)
    meta = make_meta(POSE5, {"image_scale": [256.0] * 3, "image_offset": [0.5] * 3},
                     {"class_name": "BpNetLiteModel"})
    save_checkpoint(tmp_path, 1, 2, model, opt, meta, run_info={}, train_loss=None,
                    val_history=[], key=None, use_amp=False, keep=2)
    model2, opt2 = net()
    load_checkpoint(tmp_path, tmp_path / "model.epoch-1.keras", tmp_path / "model.epoch-1.state",
                    1, model2, opt2, None)
    assert int(opt2.iterations.numpy()) == 2
    for g in gs[2:]:
        opt.apply(g, model.trainable_variables)
        opt2.apply(g, model2.trainable_variables)
    for a, b in zip(model.trainable_variables, model2.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-8)
    keras.backend.clear_session()


# ------------------------------------------------------------------ clipping

def test_clip_by_global_norm():
    g = [np.array([3.0, 0.0], "float32"), np.array([[4.0]], "float32"), None]
    out, norm = clip_by_global_norm(g, 1.0)
    assert float(norm) == pytest.approx(5.0)
    np.testing.assert_allclose(np.asarray(out[0]), [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out[1]), [[0.8]], rtol=1e-6)
    assert out[2] is None
    same, _ = clip_by_global_norm(g, 10.0)  # under the bound: unchanged
    np.testing.assert_allclose(np.asarray(same[0]), [3.0, 0.0])
    # A loss-scaled gradient: the bound applies to the unscaled one, the scale stays on.
    scaled, norm = clip_by_global_norm([x * 1024 for x in g[:2]], 1.0, unscale=1024.0)
    assert float(norm) == pytest.approx(5.0)
    np.testing.assert_allclose(np.asarray(scaled[0]), [0.6 * 1024, 0.0], rtol=1e-6)
    bad, _ = clip_by_global_norm([np.array([np.inf, 1.0], "float32")], 1.0)
    assert not np.isfinite(np.asarray(bad[0])).any()  # a loss-scale optimizer skips the step


CLIP_SCRIPT = TWO_CPU_TINY_PRELUDE + textwrap.dedent("""
    from bpnet.specs import LossConfig
    from bpnet.model.optimizer import WeightedMomentumOptimizer
    from bpnet.model.weights import set_bn_sync
    from bpnet.train.loop import make_train_step, stage_loss_fn
    # Targets far off: a gradient norm in the thousands, far above the bound.
    labels = {"heatmap": (300 * rng.random((4, 2, 2, 6))).astype("float32"),
              "paf": (300 * rng.normal(size=(4, 2, 2, 8))).astype("float32"),
              "mask": np.ones((4, 2, 2, 1), "float32")}
    LR, CLIP = 0.01, 0.5

    def run(strategy, clip, amp):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            model = build_model(cfg, pose, (16, 16, 3))
            if strategy.num_replicas_in_sync > 1:
                set_bn_sync(model, True)
            opt = WeightedMomentumOptimizer(LR, momentum=0.0)
            if amp:
                opt = keras.optimizers.LossScaleOptimizer(opt)
            opt.build(model.trainable_variables)
        step = make_train_step(model, opt, stage_loss_fn(LossConfig(), 2), strategy, 4, amp,
                               clip_norm=clip)
        before = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
        ds = tf.data.Dataset.from_tensor_slices((x, labels)).batch(4)
        for batch in strategy.experimental_distribute_dataset(ds):
            step(batch)
        after = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
        return (after - before) / -LR  # the gradient the optimizer applied

    one = tf.distribute.get_strategy()
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
        cross_device_ops=tf.distribute.ReductionToOneDevice(reduce_to_device="/cpu:0"))
    g_raw = run(one, None, False)
    out = {"raw": float(np.linalg.norm(g_raw))}
    for name, strategy, amp in (("one", one, False), ("two", two, False), ("two_amp", two, True)):
        g = run(strategy, CLIP, amp)
        cos = float(g @ g_raw / np.linalg.norm(g) / np.linalg.norm(g_raw))
        out[name] = {"norm": float(np.linalg.norm(g)), "cos": cos}
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow  # a subprocess with 2 logical CPUs: 40-100 s on 2 shared cores
def test_clipping_bounds_the_global_batch_gradient_under_distribution_and_amp(tmp_path):
    """One step of the loop's train step with gradient_clip_norm 0.5 on a gradient of norm
    ~1e3: the applied gradient (momentum 0: the step / -lr) has norm 0.5 and the unclipped
    direction, on one device, over 2 mirrored replicas (clipped after the all-reduce: per-replica
    clipping would apply up to twice the bound) and under a LossScaleOptimizer (clipped
    unscaled: scaled, the bound would shrink the step 2**15 times)."""
    script = tmp_path / "clip.py"
    script.write_text(CLIP_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert res["raw"] > 100
    for name in ("one", "two", "two_amp"):
        assert res[name]["norm"] == pytest.approx(0.5, rel=1e-3), (name, res)
        # Two replicas normalize with synchronized BN: the same gradient up to round-off.
        assert res[name]["cos"] > 0.999, (name, res)


# ------------------------------------------------------------------ the per-cell loss

def test_cells_normalization_is_the_same_at_twice_the_map_size():
    rng = np.random.default_rng(0)
    h, w = 4, 5
    labels = {"heatmap": rng.random((2, h, w, 6)).astype("float32"),
              "paf": rng.normal(size=(2, h, w, 8)).astype("float32"),
              "mask": (rng.random((2, h, w, 1)) > 0.2).astype("float32")}
    outputs = [rng.random((2, h, w, 6)).astype("float32") for _ in range(2)] + \
              [rng.normal(size=(2, h, w, 8)).astype("float32") for _ in range(2)]
    big_labels = {k: np.tile(v, (1, 2, 2, 1)) for k, v in labels.items()}
    big_outputs = [np.tile(o, (1, 2, 2, 1)) for o in outputs]
    cells = BpNetLoss.from_config(LossConfig(normalization="cells"), 2)
    summed = BpNetLoss.from_config(LossConfig(), 2)
    small, big = float(cells(labels, outputs)[0]), float(cells(big_labels, big_outputs)[0])
    assert big == pytest.approx(small, rel=1e-5)
    assert float(summed(big_labels, big_outputs)[0]) == pytest.approx(
        4 * float(summed(labels, outputs)[0]), rel=1e-5)
    assert small == pytest.approx(float(summed(labels, outputs)[0]) / (h * w), rel=1e-5)
    # The loop's per-stage losses (training and validation) carry the same normalization.
    from bpnet.train.loop import stage_loss_fn
    heat, paf = stage_loss_fn(LossConfig(normalization="cells"), 2)(big_outputs, big_labels)
    assert float(np.sum(heat) + np.sum(paf)) / 2 == pytest.approx(big, rel=1e-5)


def test_cells_with_a_large_l2_factor_warns(caplog):
    from bpnet.train.loop import _warn_regularizer_vs_cells
    base = {"loss": {"normalization": "cells"}, "model": {"kernel_regularization_factor": 5e-4}}
    with caplog.at_level("WARNING", logger="bpnet.train"):
        _warn_regularizer_vs_cells(build_spec(TrainSpec, base))
    assert "weight_decay" in caplog.text and "kernel_regularization_factor is 0.0005" in caplog.text
    caplog.clear()
    for over in ({"model": {"kernel_regularization_factor": 0.0}}, {"loss": {}}):
        with caplog.at_level("WARNING", logger="bpnet.train"):
            _warn_regularizer_vs_cells(build_spec(TrainSpec, {**base, **over}))
        assert not caplog.text


# ------------------------------------------------------------------ spec keys

def test_spec_keys_load_and_bad_values_are_clear_errors():
    spec = build_spec(TrainSpec, {"optimizer": {
        "__class_name__": "AdamWOptimizer", "beta_1": 0.85, "weight_decay": 0.001,
        "gradient_clip_norm": 10, "learning_rate_schedule": {
            "__class_name__": "ConstantLearningRateSchedule", "learning_rate": 1e-3}},
        "loss": {"normalization": "cells"}})
    o = spec.optimizer
    assert o.adam_settings() == {"beta_1": 0.85, "beta_2": 0.999, "epsilon": 1e-7,
                                 "weight_decay": 0.001}
    assert o.clip_norm == 10.0 and spec.loss.normalization == "cells"
    default = build_spec(TrainSpec, {})
    assert default.loss.normalization == "sum" and default.optimizer.clip_norm is None
    assert default.optimizer.class_name == "WeightedMomentumOptimizer"
    assert build_spec(TrainSpec, {"optimizer": {"gradient_clip_norm": 0}}).optimizer.clip_norm is None
    model = tiny_model()
    assert isinstance(make_optimizer(default.optimizer, model, 1e-3, False),
                      WeightedMomentumOptimizer)
    assert type(make_optimizer(build_spec(TrainSpec, {"optimizer": {
        "__class_name__": "AdamOptimizer"}}).optimizer, model, 1e-3, False)) is AdamOptimizer
    keras.backend.clear_session()
    bad = [
        ({"__class_name__": "AdamOptimizer", "beta_1": 1.0}, r"optimizer\.beta_1: must be in \[0, 1\)"),
        ({"__class_name__": "AdamWOptimizer", "beta_2": -0.1}, r"optimizer\.beta_2: must be in"),
        ({"__class_name__": "AdamOptimizer", "epsilon": 0}, r"optimizer\.epsilon: must be > 0"),
        ({"__class_name__": "AdamWOptimizer", "weight_decay": -1e-4},
         r"optimizer\.weight_decay: must be >= 0"),
        ({"gradient_clip_norm": -1}, r"optimizer\.gradient_clip_norm: must be > 0"),
        ({"beta_1": 0.9}, r"optimizer\.beta_1: is a key of AdamOptimizer"),
        ({"__class_name__": "AdamOptimizer", "weight_decay": 1e-4},
         r"optimizer\.weight_decay: is AdamWOptimizer's key"),
        ({"__class_name__": "AdamOptimizer", "use_nesterov": True}, r"optimizer\.use_nesterov"),
        ({"__class_name__": "Adam"}, r"unknown class 'Adam'.*AdamWOptimizer"),
    ]
    for section, msg in bad:
        with pytest.raises(SpecError, match=msg):
            build_spec(TrainSpec, {"optimizer": section})
    with pytest.raises(SpecError, match=r"loss\.normalization: 'mean' is not allowed"):
        build_spec(TrainSpec, {"loss": {"normalization": "mean"}})


# ------------------------------------------------------------------ learning at two sizes

@pytest.fixture(scope="module")
def small_sample(tmp_path_factory):
    """The sample data of `bpnet make_sample_data` (256 px images), fewer images than
    test_train's fixture, with train/val records."""
    return make_converted_sample(tmp_path_factory.mktemp("sample_small"), 120, 16, seed=1)


# One recipe for both sizes: only image_dims and target_shape change.
RECIPE = {
    "num_epoch": 1, "checkpoint_n_epoch": 1, "validation_every_n_epoch": 1,
    "log_every_n_secs": 100,
    "model": {"kernel_regularization_factor": 0.0},
    "loss": {"normalization": "cells"},
    "optimizer": {"__class_name__": "AdamWOptimizer", "weight_decay": 1e-4,
                  "gradient_clip_norm": 10.0,
                  "learning_rate_schedule": {
                      "__class_name__": "SoftstartAnnealingLearningRateSchedule",
                      "base_learning_rate": 2e-3, "min_learning_rate": 1e-4,
                      "soft_start": 0.05, "annealing": 0.6}},
}


@pytest.mark.slow
@pytest.mark.parametrize("size,steps", [(128, 50), (256, 80)])
def test_one_recipe_learns_the_sample_data_at_128_and_256_px(small_sample, tmp_path, size, steps):
    from test_train import ENV, _merge, state_info, write_spec

    spec = write_spec(tmp_path / "spec.yaml", small_sample, **_merge(RECIPE, {
        "steps_per_epoch": steps,
        "dataloader": {"image_config": {"image_dims": {"height": size, "width": size}},
                       "pose_config": {"target_shape": [size // 8, size // 8]}}}))
    bpnet_cli("train", "-e", spec, "-r", tmp_path / "run", env=ENV, check=True)
    _, info = state_info(tmp_path / "run" / "model.epoch-1.state")
    first, last = info["val_history"][0], info["val_history"][-1]
    assert last["epoch"] == 1
    assert last["val_loss"] <= 0.7 * first["val_loss"], (size, first["val_loss"], last["val_loss"])
    print(f"{size} px: val loss {first['val_loss']:.3f} -> {last['val_loss']:.3f}, peaks "
          f"{first['peak_accuracy']:.3f} -> {last['peak_accuracy']:.3f}")

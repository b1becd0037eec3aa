"""Loss, stagewise-weighted momentum SGD and learning-rate schedules against their formulas."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import POSE5, TWO_CPU_TINY_PRELUDE

from bpnet.errors import BpnetError
from bpnet.specs import FocalLossParams, LearningRateSchedule, LossConfig, ModelConfig

keras = pytest.importorskip("keras")

from bpnet.model.build import build_model
from bpnet.model.loss import BpNetLoss, masked_l2, regularization_loss
from bpnet.model.optimizer import WeightedMomentumOptimizer, stagewise_gradient_weights
from bpnet.model.schedules import (
    ExponentialDecayLearningRateSchedule,
    SoftstartAnnealingLearningRateSchedule,
    make_schedule,
)


def tiny_cfg(cls="BpNetLiteModel", stages=2, **kw):
    return ModelConfig(class_name=cls, stages=stages, heat_channels=6, paf_channels=8,
                       width_multiplier=0.0625, **kw)


def random_batch(rng, b=3, h=4, w=5, stages=2):
    labels = {"heatmap": rng.random((b, h, w, 6)).astype("float32"),
              "paf": rng.uniform(-1, 1, (b, h, w, 8)).astype("float32"),
              "mask": (rng.random((b, h, w, 1)) > 0.3).astype("float32")}
    # Exact zeros in the targets exercise the focal loss' background branch.
    labels["heatmap"][labels["heatmap"] < 0.4] = 0
    labels["paf"][np.abs(labels["paf"]) < 0.5] = 0
    outputs = ([rng.normal(0.3, 0.5, (b, h, w, 6)).astype("float32") for _ in range(stages)]
               + [rng.normal(0, 0.5, (b, h, w, 8)).astype("float32") for _ in range(stages)])
    return labels, outputs


def np_loss(pred, gt, mask, focal=None):
    pred, gt, mask = (np.asarray(a, np.float64) for a in (pred, gt, mask))
    sq = ((pred - gt) * mask) ** 2
    if focal is not None:
        fg = np.abs(gt) >= focal.bkg_thresh
        s = np.where(fg, np.sign(gt) * pred - focal.alpha, 1 - np.abs(pred) - focal.beta)
        sq = sq * np.abs(1 - s) ** focal.gamma
    return 0.5 * sq.sum()


@pytest.mark.parametrize("focal", [None, FocalLossParams(),
                                   FocalLossParams(alpha=0.2, beta=0.05, bkg_thresh=0.1, gamma=2)])
def test_loss_matches_numpy_per_stage_and_total(focal):
    rng = np.random.default_rng(0)
    labels, outputs = random_batch(rng, stages=3)
    cfg = LossConfig(class_name="BpNetFocalLoss" if focal else "BpNetLoss",
                     focal_loss_params=focal or FocalLossParams())
    loss = BpNetLoss.from_config(cfg, num_stages=3)
    total, per_stage = loss(labels, outputs)
    assert sorted(per_stage) == sorted([f"heatmap_stage{t}" for t in (1, 2, 3)]
                                       + [f"paf_stage{t}" for t in (1, 2, 3)])
    expected_total = 0.0
    for t in (1, 2, 3):
        eh = np_loss(outputs[t - 1], labels["heatmap"], labels["mask"], focal) / 3
        ep = np_loss(outputs[3 + t - 1], labels["paf"], labels["mask"], focal) / 3
        assert float(per_stage[f"heatmap_stage{t}"]) == pytest.approx(eh, rel=1e-5)
        assert float(per_stage[f"paf_stage{t}"]) == pytest.approx(ep, rel=1e-5)
        expected_total += eh + ep
    assert float(total) == pytest.approx(expected_total, rel=1e-5)


def test_loss_mask_zero_cells_do_not_count_and_global_batch_divides():
    rng = np.random.default_rng(1)
    labels, outputs = random_batch(rng)
    labels["mask"][:] = 0
    total, _ = BpNetLoss(2)(labels, outputs)
    assert float(total) == 0.0
    labels, outputs = random_batch(rng)
    t_local, _ = BpNetLoss(2)(labels, outputs)
    t_global, _ = BpNetLoss(2, global_batch_size=6)(labels, outputs)
    assert float(t_global) == pytest.approx(float(t_local) / 2, rel=1e-6)


def test_focal_weights_favor_hard_elements():
    f = FocalLossParams()
    gt = np.array([1.0, 1.0, 0.0, 0.0], "float32")
    pred = np.array([1.0, 0.0, 0.0, 1.0], "float32")
    ones = np.ones(4, "float32")
    per = [float(masked_l2(pred[i:i + 1], gt[i:i + 1], ones[i:i + 1], f)) for i in range(4)]
    # An exact prediction costs nothing; a missed peak (weight 1.1) costs more
    # than a false peak (weight 1.02) here, and both get full weight.
    assert per[0] == 0.0 and per[2] == 0.0
    assert per[1] == pytest.approx(0.5 * 1.1) and per[3] == pytest.approx(0.5 * 1.02)


def test_loss_rejects_wrong_output_count_and_unknown_class():
    rng = np.random.default_rng(2)
    labels, outputs = random_batch(rng)
    with pytest.raises(BpnetError, match="expected 6 model outputs"):
        BpNetLoss(3)(labels, outputs)
    with pytest.raises(BpnetError, match="unknown class"):
        BpNetLoss.from_config(LossConfig(class_name="Nope"), 2)


def test_regularization_loss_is_the_sum_of_model_losses():
    model = build_model(tiny_cfg(kernel_regularization_factor=1e-3), POSE5, (16, 16, 3))
    expected = sum(1e-3 * np.square(l.kernel.numpy().astype(np.float64)).sum()
                   for l in model.layers if isinstance(l, keras.layers.Conv2D))
    assert float(regularization_loss(model)) == pytest.approx(expected, rel=1e-4)
    none = build_model(tiny_cfg(kernel_regularization_factor=0.0), POSE5, (16, 16, 3))
    assert float(regularization_loss(none)) == 0.0
    keras.backend.clear_session()


# ------------------------------------------------------------------ optimizer

@pytest.mark.parametrize("cls", ["BpNetModel", "BpNetLiteModel"])
def test_stagewise_gradient_weights_per_variable(cls):
    model = build_model(tiny_cfg(cls, stages=3), POSE5, (16, 16, 3))
    w = stagewise_gradient_weights(model)
    trunk = "stage1_conv1" if cls == "BpNetLiteModel" else "stage1_heat_conv1"
    expect = {
        "block1_conv1/kernel": 1, "block4_conv3/kernel": 1,
        "channel_reduction_conv/kernel": 1, "channel_reduction_conv/bias": 2,
        f"{trunk}/kernel": 1, f"{trunk}/bias": 2,
        "stage1_paf_conv4/kernel": 1, "stage1_paf_conv4/bias": 2,
        "heatmap_stage1/kernel": 1, "heatmap_stage1/bias": 2,
        "stage2_heat_conv6/kernel": 4, "stage2_heat_conv6/bias": 8,
        "paf_stage2/kernel": 4, "paf_stage2/bias": 8,
        "heatmap_out/kernel": 4, "heatmap_out/bias": 8,
        "paf_out/kernel": 4, "paf_out/bias": 8,
    }
    for path, value in expect.items():
        assert w[path] == value, path
    # Every conv kernel and bias has a weight; BatchNorm parameters keep 1 (not listed).
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(w) == sum(1 + int(l.use_bias) for l in convs)
    assert not any("gamma" in p or "beta" in p for p in w)
    off = stagewise_gradient_weights(model, enabled=False)
    assert set(off) == set(w) and set(off.values()) == {1.0}
    keras.backend.clear_session()


@pytest.mark.parametrize("nesterov", [False, True])
def test_weighted_momentum_update_matches_the_formula(nesterov):
    a = keras.Variable(np.array([1.0, -2.0], "float32"), name="a")
    b = keras.Variable(np.array([0.5], "float32"), name="b")
    weights = {a.path: 4.0}  # b keeps 1
    opt = WeightedMomentumOptimizer(0.1, momentum=0.9, nesterov=nesterov, gradient_weights=weights)
    grads = [[np.array([0.2, 0.4], "float32"), np.array([1.0], "float32")],
             [np.array([-0.1, 0.3], "float32"), np.array([0.5], "float32")]]
    va, vb = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    ma, mb = np.zeros(2), np.zeros(1)
    for ga, gb in grads:
        opt.apply([ga, gb], [a, b])
        for v, m, g, wt in ((va, ma, ga, 4.0), (vb, mb, gb, 1.0)):
            m[:] = 0.9 * m - 0.1 * wt * g
            v += (0.9 * m - 0.1 * wt * g) if nesterov else m
    np.testing.assert_allclose(a.numpy(), va, rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), vb, rtol=1e-6)
    assert opt.weight_of(a) == 4.0 and opt.weight_of(b) == 1.0
    cfg = opt.get_config()
    assert cfg["gradient_weights"] == weights and cfg["nesterov"] == nesterov
    clone = WeightedMomentumOptimizer.from_config(cfg)
    assert clone.gradient_weights == weights


def test_optimizer_state_survives_save_and_load_and_training_continues_identically(tmp_path):
    from bpnet.model.io import load_model, save_model
    keras.utils.set_random_seed(3)
    model = build_model(tiny_cfg(), POSE5, (16, 16, 3))
    sched = make_schedule(LearningRateSchedule(base_learning_rate=1e-2, min_learning_rate=1e-4),
                          total_steps=20, steps_per_epoch=5)
    opt = WeightedMomentumOptimizer(sched, gradient_weights=stagewise_gradient_weights(model))
    model.compile(optimizer=opt, loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 16, 3)).astype("float32")
    ys = [rng.random((2, 2, 2, o.shape[-1])).astype("float32") for o in model.outputs]
    model.fit(x, ys, epochs=2, batch_size=2, verbose=0)
    save_model(model, tmp_path / "ckpt.keras", {"note": "x"})
    loaded, _ = load_model(tmp_path / "ckpt.keras", compile=True)
    lo = loaded.optimizer
    assert isinstance(lo, WeightedMomentumOptimizer)
    assert int(lo.iterations.numpy()) == 2
    assert lo.gradient_weights == opt.gradient_weights
    assert lo._learning_rate.get_config() == sched.get_config()
    for m1, m2 in zip(opt.momentums, lo.momentums):
        np.testing.assert_array_equal(m1.numpy(), m2.numpy())
    model.fit(x, ys, epochs=1, batch_size=2, verbose=0)
    loaded.fit(x, ys, epochs=1, batch_size=2, verbose=0)
    for w1, w2 in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(w1.numpy(), w2.numpy(), rtol=1e-5, atol=1e-7)
    keras.backend.clear_session()


DISTRIBUTED = TWO_CPU_TINY_PRELUDE + textwrap.dedent("""
    from bpnet.model.loss import BpNetLoss
    from bpnet.model.optimizer import WeightedMomentumOptimizer, stagewise_gradient_weights
    labels = {"heatmap": rng.random((4, 2, 2, 6)).astype("float32"),
              "paf": rng.normal(size=(4, 2, 2, 8)).astype("float32"),
              "mask": np.ones((4, 2, 2, 1), "float32")}

    def run(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            model = build_model(cfg, pose, (16, 16, 3))
            opt = WeightedMomentumOptimizer(1e-3, gradient_weights=stagewise_gradient_weights(model))
            loss_fn = BpNetLoss(2, global_batch_size=4)
            # Slot variables must exist before the tf.function (mirrored vars
            # cannot be created lazily inside it).
            opt.build(model.trainable_variables)
        ds = tf.data.Dataset.from_tensor_slices((x, labels)).batch(4)
        dist = strategy.experimental_distribute_dataset(ds)

        @tf.function
        def step(xb, yb):
            def replica(xb, yb):
                with tf.GradientTape() as tape:
                    total, _ = loss_fn(yb, model(xb, training=False))
                grads = tape.gradient(total, model.trainable_variables)
                opt.apply(grads, model.trainable_variables)
                return total
            per = strategy.run(replica, args=(xb, yb))
            return strategy.reduce("SUM", per, axis=None)

        for _ in range(2):
            for xb, yb in dist:
                loss = step(xb, yb)
        return float(loss), [w.numpy() for w in model.trainable_weights], int(opt.iterations.numpy())

    one = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
    two = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(one[1], two[1]))
    print("RESULT " + json.dumps({"loss": [one[0], two[0]], "diff": diff, "iters": [one[2], two[2]],
                                  "replicas": 2}))
""")


def test_optimizer_under_mirrored_strategy_matches_one_device(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(DISTRIBUTED)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    assert res["iters"] == [2, 2]
    assert res["loss"][0] == pytest.approx(res["loss"][1], rel=1e-4)
    assert res["diff"] < 1e-5


# ------------------------------------------------------------------ schedules

def softstart_formula(step, total, base, mn, ss, ann):
    p = step / total
    if p < ss:
        t = p / ss
    elif p < ann:
        t = 1.0
    else:
        t = (1 - p) / (1 - ann)
    t = min(max(t, 0.0), 1.0)
    return math.exp(math.log(mn) + t * (math.log(base) - math.log(mn)))


def test_softstart_annealing_matches_the_formula():
    s = SoftstartAnnealingLearningRateSchedule(2e-5, 8e-8, 0.05, 0.5, total_steps=1000)
    for step in [0, 1, 10, 49, 50, 51, 200, 499, 500, 501, 750, 999, 1000, 1200]:
        assert float(s(step)) == pytest.approx(softstart_formula(step, 1000, 2e-5, 8e-8, 0.05, 0.5),
                                               rel=1e-5), step
    assert float(s(0)) == pytest.approx(8e-8, rel=1e-5)
    assert float(s(300)) == pytest.approx(2e-5, rel=1e-5)
    assert float(s(1000)) == pytest.approx(8e-8, rel=1e-5)
    # No warm-up and no annealing are allowed edge cases.
    flat = SoftstartAnnealingLearningRateSchedule(1e-3, 1e-5, 0.0, 1.0, total_steps=10)
    assert [float(flat(i)) for i in (0, 5, 10)] == pytest.approx([1e-3] * 3, rel=1e-5)


def test_exponential_decay_matches_the_formula():
    s = ExponentialDecayLearningRateSchedule(0.1, decay_steps=10, decay_rate=0.5, staircase=False,
                                             min_learning_rate=1e-3)
    st = ExponentialDecayLearningRateSchedule(0.1, decay_steps=10, decay_rate=0.5, staircase=True,
                                              min_learning_rate=1e-3)
    for step in [0, 5, 10, 15, 33, 200]:
        assert float(s(step)) == pytest.approx(max(1e-3, 0.1 * 0.5 ** (step / 10)), rel=1e-5)
        assert float(st(step)) == pytest.approx(max(1e-3, 0.1 * 0.5 ** (step // 10)), rel=1e-5)


def test_make_schedule_scales_by_replicas_and_serializes():
    cfg = LearningRateSchedule(base_learning_rate=2e-5, min_learning_rate=8e-8)
    one = make_schedule(cfg, 100, 10, num_replicas=1)
    four = make_schedule(cfg, 100, 10, num_replicas=4)
    kept = make_schedule(cfg, 100, 10, num_replicas=4, scale_by_replicas=False)
    for step in (0, 3, 40, 90):
        assert float(four(step)) == pytest.approx(4 * float(one(step)), rel=1e-5)
        assert float(kept(step)) == pytest.approx(float(one(step)), rel=1e-6)
    exp_cfg = LearningRateSchedule(class_name="ExponentialDecayLearningRateSchedule",
                                   learning_rate=0.01, decay_epochs=2, decay_rate=0.9,
                                   staircase=True, min_learning_rate=1e-6)
    e = make_schedule(exp_cfg, 100, steps_per_epoch=5, num_replicas=2)
    assert e.decay_steps == 10 and float(e(25)) == pytest.approx(0.02 * 0.9 ** 2, rel=1e-5)
    for sched in (one, e):
        back = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sched))
        assert type(back) is type(sched) and back.get_config() == sched.get_config()
        json.dumps(keras.saving.serialize_keras_object(sched))  # JSON-clean


def test_schedule_rejects_bad_settings():
    with pytest.raises(BpnetError, match="total_steps"):
        SoftstartAnnealingLearningRateSchedule(1e-3, 1e-5, 0.1, 0.5, total_steps=0)
    with pytest.raises(BpnetError, match="min_learning_rate"):
        SoftstartAnnealingLearningRateSchedule(1e-5, 1e-3, 0.1, 0.5, total_steps=10)
    with pytest.raises(BpnetError, match="soft_start <= annealing"):
        SoftstartAnnealingLearningRateSchedule(1e-3, 1e-5, 0.6, 0.5, total_steps=10)
    with pytest.raises(BpnetError, match="steps_per_epoch"):
        make_schedule(LearningRateSchedule(class_name="ExponentialDecayLearningRateSchedule"),
                      10, steps_per_epoch=0)

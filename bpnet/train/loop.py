"""The training loop: what a run works with, where it starts, and its epochs.

Three records, each complete when made (nothing is set on them later):

* ``RunConfig``: the run's settings and devices, fixed before a model exists;
* ``Net``: the model, its optimizer and the compiled steps;
* ``TrainState``: what changes as training goes (step, epochs done, losses).

and plain functions over them: ``build_net``, ``resume_or_init``,
``warm_start_bn``, ``run_epoch``, ``validate``, ``fit``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import BpnetError
from .checkpoints import (
    CKPT_MODEL_SUFFIX,
    CKPT_STATE_SUFFIX,
    ckpt_model_path,
    ckpt_state_path,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .distribute import distribute_dataset, sync_from_chief
from .metrics import joint_peak_hits, loss_scalars, val_scalars, write_scalars

log = logging.getLogger("bpnet.train")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A run's settings, fixed before the model is built."""

    spec: object  # the TrainSpec, its checkpoint_dir set to ``results``
    spec_path: Path
    results: Path
    key: str | None
    use_amp: bool
    chief: bool  # this process writes checkpoints, summaries and the final model
    multi_worker: bool
    pose: object  # the spec's PoseConfig
    has_val: bool  # the spec lists validation records
    strategy: object
    global_batch: int
    steps_per_epoch: int
    data_spec: object  # the spec the training pipeline reads: its batch is the global batch
    max_steps: int | None = None  # --max_steps: stop after this many steps (a smoke run)
    encrypt: bool = False  # --encrypt: write model and state files encrypted with ``key``

    @property
    def save_key(self) -> str | None:
        """The key the run's files are written with: -k with --encrypt, else none (TAO's -k
        only reads encrypted inputs)."""
        return self.key if self.encrypt else None

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.spec.num_epoch


@dataclasses.dataclass(frozen=True)
class Net:
    """The model being trained, with what trains and evaluates it."""

    model: object
    optimizer: object
    num_stages: int
    train_step: Callable  # distributed batch -> (total, heatmap [T], PAF [T], regularization)
    eval_step: Callable  # (images, labels) -> (heatmap [T], PAF [T], batch size, last heatmaps)
    description: dict  # the model meta's "model": the spec's model section or the loaded file's


@dataclasses.dataclass
class TrainState:
    step: int = 0
    epoch: int = 0  # epochs done: the next one to run
    train_loss: float | None = None  # mean loss of the last epoch trained
    val_history: list[dict] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------ building

def epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1000003 + int(epoch)) % (2 ** 31 - 1)


def stage_loss_fn(loss_cfg, num_stages: int):
    """(outputs, labels) -> (heatmap losses [T], PAF losses [T]), each summed over the batch.

    Summed, not averaged: under data parallelism every replica divides by the
    global batch so that the all-reduced gradient equals one big batch's.
    """
    import tensorflow as tf

    from ..model.loss import BpNetLoss
    loss = BpNetLoss.from_config(loss_cfg, num_stages, global_batch_size=1)

    def fn(outputs, labels):
        _, parts = loss(labels, outputs)
        heat = tf.stack([parts[f"heatmap_stage{t}"] for t in range(1, num_stages + 1)])
        paf = tf.stack([parts[f"paf_stage{t}"] for t in range(1, num_stages + 1)])
        return heat, paf
    return fn


def make_train_step(model, optimizer, stage_losses, strategy, global_batch: int, use_amp: bool):
    """A tf.function: one distributed batch -> (total loss, heatmap [T], PAF [T], regularization).

    Each replica divides its summed loss by the global batch and its share of
    the regularization by the replica count; the optimizer all-reduces
    (sums) the gradients, so N replicas take the step one device would take
    on the whole batch. Under --use_amp the optimizer is a LossScaleOptimizer:
    the loss is scaled before differentiation and the gradients unscaled
    (and the step skipped on overflow) inside apply_gradients.
    """
    import tensorflow as tf
    gb = float(global_batch)
    nrep = float(strategy.num_replicas_in_sync)

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            heat, paf = stage_losses(outputs, labels)
            heat = tf.cast(heat, tf.float32) / gb
            paf = tf.cast(paf, tf.float32) / gb
            data = tf.reduce_sum(heat) + tf.reduce_sum(paf)
            reg = (tf.add_n([tf.cast(x, tf.float32) for x in model.losses]) / nrep
                   if model.losses else tf.constant(0.0))
            total = data + reg
            scaled = optimizer.scale_loss(total) if use_amp else total
        tvars = model.trainable_variables
        grads = tape.gradient(scaled, tvars)
        optimizer.apply_gradients(zip(grads, tvars))
        return total, heat, paf, reg

    @tf.function
    def train_step(dist_batch):
        images, labels = dist_batch
        out = strategy.run(replica_step, args=(images, labels))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, o, axis=None) for o in out]

    return train_step


def make_eval_step(model, stage_losses, num_stages: int):
    """A tf.function: (images, labels) -> (heatmap [T], PAF [T], batch size, last stage's heatmaps).

    Validation runs on this worker alone: small, and free of cross-worker
    collectives that uneven last batches would deadlock.
    """
    import tensorflow as tf

    def eval_fn(images, labels):
        outputs = model(images, training=False)
        heat, paf = stage_losses(outputs, labels)
        return (tf.cast(heat, tf.float32), tf.cast(paf, tf.float32),
                tf.cast(tf.shape(images)[0], tf.float32),
                tf.cast(outputs[num_stages - 1], tf.float32))

    return tf.function(eval_fn)


def _load_graph(cfg: RunConfig):
    """(model, description) of the pretrained_weights file, trained whole (load_graph)."""
    from ..model.weights import clone_with_policy, clone_with_regularizers, load_model_file
    from ..specs import spec_to_dict
    spec = cfg.spec
    if not spec.pretrained_weights:
        raise BpnetError(f"{cfg.spec_path}: load_graph is true but pretrained_weights is "
                         "empty; name the (pruned) model file to retrain")
    model, meta = load_model_file(spec.pretrained_weights, cfg.key, "pretrained_weights")
    if meta and meta.get("pose_config"):
        from ..pose import pose_config_from_dict
        other = pose_config_from_dict(meta["pose_config"])
        if other.heat_channels != cfg.pose.heat_channels or \
                other.paf_channels != cfg.pose.paf_channels:
            raise BpnetError(f"{spec.pretrained_weights}: the model is for pose config "
                             f"{other.name!r}, the spec for {cfg.pose.name!r}; with "
                             "load_graph the whole model is kept, so they must agree")
    log.info("load_graph: training the whole model of %s (%d parameters)",
             spec.pretrained_weights, model.count_params())
    # The spec's regularization, not the one saved in the file (TAO's retrain flow).
    model = clone_with_regularizers(model, spec.model)
    if cfg.use_amp:
        model = clone_with_policy(model, "mixed_float16")
    # A loaded (pruned) graph is not the spec's model: keep its own description.
    return model, (meta or {}).get("model") or spec_to_dict(spec.model)


def build_net(cfg: RunConfig) -> Net:
    """The model (built from the spec, or loaded whole with load_graph), its optimizer
    (built, so a checkpoint's variables can be assigned) and the steps."""
    import keras

    from ..model.build import build_model
    from ..model.optimizer import make_optimizer
    from ..model.schedules import make_schedule
    from ..model.weights import set_bn_sync
    from ..specs import spec_to_dict

    spec = cfg.spec
    with cfg.strategy.scope():
        if spec.load_graph:
            model, description = _load_graph(cfg)
        else:
            channels = spec.dataloader.image_config.image_dims.channels
            model = build_model(spec.model, cfg.pose, input_shape=(None, None, channels))
            description = spec_to_dict(spec.model)
        num_stages = len(model.outputs) // 2
        if cfg.num_replicas > 1:
            set_bn_sync(model, True)
        schedule = make_schedule(spec.optimizer.learning_rate_schedule, cfg.total_steps,
                                 cfg.steps_per_epoch, cfg.num_replicas,
                                 spec.optimizer.scale_learning_rate_by_replicas)
        optimizer = make_optimizer(spec.optimizer, model, schedule,
                                   spec.use_stagewise_lr_multipliers)
        if cfg.use_amp:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    stage_losses = stage_loss_fn(spec.loss, num_stages)
    return Net(model=model, optimizer=optimizer, num_stages=num_stages,
               train_step=make_train_step(model, optimizer, stage_losses, cfg.strategy,
                                          cfg.global_batch, cfg.use_amp),
               eval_step=make_eval_step(model, stage_losses, num_stages),
               description=description)


def model_meta(cfg: RunConfig, net: Net, **extra) -> dict:
    """The meta of the model files the run writes (checkpoints and the final model)."""
    from ..model.meta import make_meta
    d = cfg.spec.dataloader.image_config.image_dims
    return make_meta(cfg.pose, cfg.spec.dataloader.normalization_params, net.description,
                     input_channels=d.channels, train_input_shape=[d.height, d.width], **extra)


# ------------------------------------------------------------------ where to start

def resume_or_init(cfg: RunConfig, net: Net) -> TrainState:
    """The state to start from: resume > finetuning checkpoint > pretrained weights > fresh.

    Loads weights (and optimizer state) into ``net``; in a multi-worker run
    every worker then takes the chief's.
    """
    from ..model.weights import copy_weights_by_name, load_model_file
    spec = cfg.spec
    state = TrainState()
    epoch = 0
    done = list_checkpoints(cfg.results)
    if done:
        epoch = done[-1]
        info = load_checkpoint(cfg.results, ckpt_model_path(cfg.results, epoch),
                               ckpt_state_path(cfg.results, epoch), epoch,
                               net.model, net.optimizer, cfg.key)
        state.step = int(info["step"]) if info else epoch * cfg.steps_per_epoch
        if info:
            state.val_history = list(info.get("val_history") or [])
            state.train_loss = info.get("train_loss")
            if info.get("global_batch") != cfg.global_batch:
                log.warning("resuming with global batch %d; the checkpoint was trained with %s",
                            cfg.global_batch, info.get("global_batch"))
        log.info("resuming from %s: epoch %d, step %d",
                 ckpt_model_path(cfg.results, epoch).name, epoch, state.step)
    elif spec.finetuning_config.is_finetune_exp:
        fc = spec.finetuning_config
        if not fc.checkpoint_path:
            raise BpnetError(f"{cfg.spec_path}: finetuning_config.is_finetune_exp is true but "
                             "checkpoint_path is empty")
        p = Path(fc.checkpoint_path)
        state_path = p.with_suffix(CKPT_STATE_SUFFIX) if p.suffix == CKPT_MODEL_SUFFIX else None
        info = load_checkpoint(cfg.results, p, state_path, fc.ckpt_epoch_num,
                               net.model, net.optimizer, cfg.key)
        epoch = fc.ckpt_epoch_num
        state.step = int(info["step"]) if info else epoch * cfg.steps_per_epoch
        if not info:
            # No optimizer state: keep the schedule in step with the epoch.
            net.optimizer.iterations.assign(state.step)
        log.info("finetuning from %s at epoch %d (step %d)", p, epoch, state.step)
    elif spec.pretrained_weights and not spec.load_graph:
        src, _ = load_model_file(spec.pretrained_weights, cfg.key, "pretrained_weights")
        _report_pretrained(cfg, copy_weights_by_name(src, net.model))
    if cfg.multi_worker:
        epoch, state.step = sync_from_chief(
            cfg.strategy, cfg.chief, list(net.model.variables) + list(net.optimizer.variables),
            epoch, state.step)
    state.epoch = epoch
    if epoch >= spec.num_epoch:
        log.info("training already complete (checkpoint of epoch %d)", epoch)
    return state


def _report_pretrained(cfg: RunConfig, report: dict):
    from ..io import write_json_atomic
    file = cfg.spec.pretrained_weights
    log.info("pretrained weights %s: %d layers loaded, %d skipped (shape mismatch), "
             "%d not in the file", file, len(report["loaded"]),
             len(report["skipped"]), len(report["missing"]))
    for name, why in report["skipped"]:
        log.info("  skipped %s: %s", name, why)
    if not report["loaded"]:
        raise BpnetError(f"pretrained_weights {file}: no layer matched "
                         "the model by name; is it a model of this family?")
    if cfg.chief:
        write_json_atomic(cfg.results / "pretrained_weights_report.json", {"file": file, **report})


def starts_fresh(cfg: RunConfig, state: TrainState) -> bool:
    """No weights came from a file. Decided after the chief's broadcast: every worker
    must take the same branch (the BN warm start runs collectives under synchronized BN)."""
    spec = cfg.spec
    return (state.epoch == 0 and not spec.pretrained_weights
            and not spec.finetuning_config.is_finetune_exp)


# ------------------------------------------------------------------ data

def train_batches(cfg: RunConfig, epoch: int):
    """The epoch's training batches, distributed; seeded by (random_seed, epoch), so a
    run resumed at this epoch sees exactly the batches an unbroken run would."""
    from ..data.pipeline import build_dataset
    ds = build_dataset(cfg.data_spec, "train", seed=epoch_seed(cfg.spec.random_seed, epoch),
                       repeat=True)
    return distribute_dataset(cfg.strategy, ds.take(cfg.steps_per_epoch), cfg.multi_worker)


def warm_start_bn(cfg: RunConfig, net: Net):
    """Start BatchNorm's moving statistics at the first batch's, not at (0, 1).

    Keras' moving averages (momentum 0.99) keep 0.99**n of their initial
    values after n steps: after a few hundred steps the inference-mode
    model still normalizes with a variance part made up, and short runs
    validate far worse than they train. One forward pass with momentum 0
    on the first batch (same seed as epoch 1, so resume is unaffected)
    removes that bias; long runs do not notice.
    """
    import tensorflow as tf

    from ..model.weights import bn_layers
    bns = bn_layers(net.model)
    if not bns:
        return
    saved = [layer.momentum for layer in bns]
    for layer in bns:
        layer.momentum = 0.0
    try:
        batch = next(iter(train_batches(cfg, 0)))
        model, strategy = net.model, cfg.strategy

        @tf.function
        def forward(b):
            strategy.run(lambda x: model(x, training=True), args=(b[0],))
        forward(batch)
    finally:
        for layer, m in zip(bns, saved):
            layer.momentum = m


def current_lr(optimizer) -> float:
    opt = getattr(optimizer, "inner_optimizer", optimizer)
    lr = opt.learning_rate
    try:
        return float(np.asarray(lr))
    except Exception:  # noqa: BLE001  (a schedule object: called with the step)
        return float(np.asarray(lr(opt.iterations)))


# ------------------------------------------------------------------ epochs

class _Progress:
    """The progress bar, the periodic log line and status.json's progress, per step."""

    def __init__(self, cfg: RunConfig, net: Net, step: int, status):
        from tqdm import tqdm
        self.cfg, self.net, self.status = cfg, net, status
        self.bar = tqdm(total=cfg.total_steps, initial=step, unit="step", dynamic_ncols=True,
                        disable=not cfg.chief, mininterval=1.0, desc="train")
        self.log_every = max(1, cfg.spec.log_every_n_secs)
        self.last_log = self.t0 = time.time()
        self.s0 = step

    def update(self, step: int, epoch: int, loss: float):
        cfg = self.cfg
        num_epoch = cfg.spec.num_epoch
        self.bar.update(1)
        self.bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4g}", refresh=False)
        now = time.time()
        if now - self.last_log >= self.log_every:
            rate = (step - self.s0) * cfg.global_batch / max(now - self.t0, 1e-9)
            log.info("epoch %d/%d step %d/%d loss %.5g lr %.3g %.1f img/s",
                     epoch + 1, num_epoch, step, cfg.total_steps, loss,
                     current_lr(self.net.optimizer), rate)
            self.last_log = now
        if self.status is not None and cfg.chief:
            self.status.progress(step, cfg.total_steps, f"epoch {epoch + 1}/{num_epoch}",
                                 epoch=epoch + 1, loss=loss, lr=current_lr(self.net.optimizer))

    def close(self):
        self.bar.close()


def run_epoch(cfg: RunConfig, net: Net, state: TrainState, epoch: int, writer, progress):
    """Train one epoch; ``state`` gets the new step and the epoch's mean loss."""
    import keras
    spec = cfg.spec
    # Global RNGs (python, numpy, TF) restart from a per-epoch seed, so a
    # run resumed at this epoch draws the same numbers as an unbroken one.
    keras.utils.set_random_seed(epoch_seed(spec.random_seed, epoch))
    sums, n = None, 0
    for batch in train_batches(cfg, epoch):
        total, heat, paf, reg = net.train_step(batch)
        state.step += 1
        total_v = float(total)
        if not math.isfinite(total_v):
            raise BpnetError(
                f"the loss became {total_v} at step {state.step} (epoch {epoch + 1}); "
                "lower the learning rate (optimizer.learning_rate_schedule) or check "
                "the data (dataset_convert --check_files, normalization_params); "
                "checkpoints so far are kept")
        vals = np.concatenate([[total_v, float(reg)], heat.numpy(), paf.numpy()])
        sums = vals if sums is None else sums + vals
        n += 1
        if writer is not None and (state.step % spec.summary_every_n_steps == 0 or state.step == 1):
            write_scalars(writer, state.step, loss_scalars("train", vals, net.num_stages,
                                                           current_lr(net.optimizer)))
        progress.update(state.step, epoch, total_v)
        if cfg.max_steps and state.step >= cfg.max_steps:
            break
    if n == 0:
        raise BpnetError("the training dataset produced no batches; check the records")
    state.train_loss = float(sums[0] / n)
    if writer is not None:
        write_scalars(writer, state.step, loss_scalars("epoch", sums / n, net.num_stages,
                                                       current_lr(net.optimizer)))


def validate(cfg: RunConfig, net: Net) -> dict:
    """Mean data loss per validation image (no regularization), per stage and in total,
    and the share of labeled joints whose heatmap peak is within 2 cells."""
    from ..data.pipeline import build_dataset
    ds = build_dataset(cfg.spec, "val", seed=cfg.spec.random_seed, repeat=False, shuffle=False)
    heat = paf = None
    count = 0.0
    hits = total = 0
    J = cfg.pose.num_joints
    for images, labels in ds:
        h, p, b, pred = net.eval_step(images, labels)
        heat = h.numpy() if heat is None else heat + h.numpy()
        paf = p.numpy() if paf is None else paf + p.numpy()
        count += float(b)
        k, n = joint_peak_hits(pred.numpy()[..., :J], labels["heatmap"].numpy()[..., :J],
                               labels["mask"].numpy())
        hits, total = hits + k, total + n
    if not count:
        raise BpnetError("the validation records produced no samples")
    heat, paf = heat / count, paf / count
    return {"val_loss": float(heat.sum() + paf.sum()), "heatmap": heat.tolist(),
            "paf": paf.tolist(), "num_images": int(count),
            "peak_accuracy": hits / total if total else None, "num_joints": int(total)}


def validate_untrained(cfg: RunConfig, net: Net, state: TrainState):
    """The untrained model's validation loss: the yardstick for "it learned"."""
    if state.epoch == 0 and cfg.has_val and cfg.chief and not state.val_history:
        val = validate(cfg, net)
        val["epoch"] = 0
        state.val_history.append(val)
        log.info("validation loss before training %.5g", val["val_loss"])


def _save_checkpoint(cfg: RunConfig, net: Net, state: TrainState, epoch: int):
    spec = cfg.spec
    save_checkpoint(
        cfg.results, epoch, state.step, net.model, net.optimizer, model_meta(cfg, net),
        run_info={"global_batch": cfg.global_batch, "steps_per_epoch": cfg.steps_per_epoch,
                  "num_epoch": spec.num_epoch, "random_seed": spec.random_seed},
        train_loss=state.train_loss, val_history=state.val_history,
        key=cfg.save_key, use_amp=cfg.use_amp, keep=spec.max_ckpt_to_keep)


def fit(cfg: RunConfig, net: Net, state: TrainState, writer, status=None):
    """The epochs from ``state.epoch`` on: train, validate and checkpoint when due."""
    spec = cfg.spec
    progress = _Progress(cfg, net, state.step, status)
    try:
        for epoch in range(state.epoch, spec.num_epoch):
            run_epoch(cfg, net, state, epoch, writer, progress)
            e1 = epoch + 1
            if cfg.max_steps and state.step >= cfg.max_steps and e1 < spec.num_epoch:
                # A smoke run: no checkpoint of a cut epoch (resuming would skip its rest).
                log.info("stopping at step %d (--max_steps) in epoch %d of %d; the final model "
                         "is saved", state.step, e1, spec.num_epoch)
                state.epoch = e1
                break
            if cfg.has_val and cfg.chief and (e1 % spec.validation_every_n_epoch == 0
                                              or e1 == spec.num_epoch):
                val = validate(cfg, net)
                val["epoch"] = e1
                state.val_history.append(val)
                log.info("epoch %d validation loss %.5g (train %.5g), heatmap peaks within "
                         "2 cells: %s", e1, val["val_loss"], state.train_loss,
                         "n/a" if val["peak_accuracy"] is None else f"{val['peak_accuracy']:.1%}")
                if writer is not None:
                    write_scalars(writer, state.step, val_scalars(val))
            if e1 % spec.checkpoint_n_epoch == 0 and cfg.chief:
                _save_checkpoint(cfg, net, state, e1)
            state.epoch = e1
    finally:
        progress.close()

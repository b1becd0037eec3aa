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
from .val_ap import BEST_MODEL_NAME, best_entry, keep_best

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

    @property
    def best(self) -> dict | None:
        """The validation with the highest AP so far (resumed runs: the checkpoint's
        val_history included); None without validation AP."""
        return best_entry(self.val_history)


# ------------------------------------------------------------------ building

def epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1000003 + int(epoch)) % (2 ** 31 - 1)


def stage_loss_fn(loss_cfg, num_stages: int):
    """(outputs, labels) -> (heatmap losses [T], PAF losses [T]), each summed over the batch.

    Summed, not averaged: under data parallelism every replica divides by the
    global batch so that the all-reduced gradient equals one big batch's.
    With ``loss.normalization: cells`` each image's loss is already divided by
    the label maps' h * w (bpnet.model.loss); training and validation both use
    this function, so their losses are on the same scale.
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


def make_train_step(model, optimizer, stage_losses, strategy, global_batch: int, use_amp: bool,
                    clip_norm: float | None = None):
    """A tf.function: one distributed batch -> (total loss, heatmap [T], PAF [T], regularization).

    Each replica divides its summed loss by the global batch and its share of
    the regularization by the replica count; the optimizer all-reduces
    (sums) the gradients, so N replicas take the step one device would take
    on the whole batch. Under --use_amp the optimizer is a LossScaleOptimizer:
    the loss is scaled before differentiation and the gradients unscaled
    (and the step skipped on overflow) inside apply_gradients.

    ``clip_norm`` (optimizer.gradient_clip_norm): the gradient of the whole
    global batch is clipped to that global norm. With several replicas each
    first sums the replicas' gradients itself (one more all-reduce per step),
    clips that sum, and hands the optimizer its 1/N share of the clipped sum,
    which the optimizer's own all-reduce adds back up; Keras' global_clipnorm
    would clip each replica's part instead. Under --use_amp the norm is that of
    the unscaled gradient (the scaled one divided by the current loss scale);
    an overflow (non-finite norm) still reaches the LossScaleOptimizer as
    non-finite gradients, so it skips the step and lowers the scale.
    """
    import tensorflow as tf

    from ..model.optimizer import clip_by_global_norm
    gb = float(global_batch)
    nrep = float(strategy.num_replicas_in_sync)

    def clip(grads):
        if nrep > 1:
            grads = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, grads)
        grads, _ = clip_by_global_norm(grads, clip_norm,
                                       optimizer.dynamic_scale if use_amp else None)
        return [g / nrep for g in grads] if nrep > 1 else grads

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
        if clip_norm:
            grads = clip(grads)
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


# kernel_regularization_factor x map cells above this, under loss.normalization cells, is
# an L2 penalty at least twice as strong against the data loss as TAO's 5e-4 on its
# summed loss: warned about.
CELLS_REGULARIZER_WARN = 1e-3


def _warn_regularizer_vs_cells(spec):
    """One warning when a per-cell loss meets an L2 kernel regularizer that outweighs it."""
    if spec.loss.normalization != "cells":
        return
    factor = float(spec.model.kernel_regularization_factor or 0.0)
    if factor <= 0:
        return
    th, tw = spec.dataloader.pose_config.target_shape
    cells = th * tw
    if factor * cells > CELLS_REGULARIZER_WARN:
        log.warning(
            "loss.normalization is cells (the data loss divided by %d map cells) but "
            "model.kernel_regularization_factor is %g: against that loss the penalty "
            "weighs as %.3g would on TAO's summed loss (TAO ships 5e-4). Prefer "
            "optimizer AdamWOptimizer's weight_decay with kernel_regularization_factor 0, "
            "or a factor near %.2g (5e-4 / %d)", cells, factor, factor * cells,
            5e-4 / cells, cells)


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
    _warn_regularizer_vs_cells(spec)
    stage_losses = stage_loss_fn(spec.loss, num_stages)
    return Net(model=model, optimizer=optimizer, num_stages=num_stages,
               train_step=make_train_step(model, optimizer, stage_losses, cfg.strategy,
                                          cfg.global_batch, cfg.use_amp,
                                          spec.optimizer.clip_norm),
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
        from ..model.imagenet import is_keras_weights_file, load_vgg19_imagenet
        if is_keras_weights_file(spec.pretrained_weights):
            # Keras applications' ImageNet VGG19 weights into the VGG backbone.
            report = load_vgg19_imagenet(spec.pretrained_weights, net.model,
                                         width_multiplier=spec.model.width_multiplier,
                                         normalization=spec.dataloader.normalization_params)
        else:
            src, _ = load_model_file(spec.pretrained_weights, cfg.key, "pretrained_weights")
            report = copy_weights_by_name(src, net.model)
        _report_pretrained(cfg, report)
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
             "%d not in the file, %d in the file not used", file, len(report["loaded"]),
             len(report["skipped"]), len(report["missing"]), len(report.get("unused", [])))
    for name, why in report["skipped"]:
        log.info("  skipped %s: %s", name, why)
    if report.get("unused"):
        log.info("  not used: %s", ", ".join(report["unused"]))
    for note in report.get("notes", []):
        log.info("  %s", note)
    if not report["loaded"]:
        raise BpnetError(f"pretrained_weights {file}: no layer matched "
                         "the model by name; is it a model of this family?")
    if cfg.chief:
        write_json_atomic(cfg.results / "pretrained_weights_report.json", {"file": file, **report})


def starts_fresh(cfg: RunConfig, state: TrainState) -> bool:
    """No BatchNorm statistics came from a file: a fresh model, or an ImageNet start (whose
    weights file has none). Decided from the spec and the epoch alone, so every worker takes
    the same branch (the BN warm start runs collectives under synchronized BN)."""
    from ..model.imagenet import is_keras_weights_file
    spec = cfg.spec
    return (state.epoch == 0 and not spec.finetuning_config.is_finetune_exp
            and (not spec.pretrained_weights or is_keras_weights_file(spec.pretrained_weights)))


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


def validate(cfg: RunConfig, net: Net, ap=None) -> dict:
    """Mean data loss per validation image (no regularization), per stage and in total,
    and the share of labeled joints whose heatmap peak is within 2 cells; with ``ap`` (a
    bpnet.train.val_ap.ValAP), COCO keypoint "ap" and "ap50" on the val images too."""
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
    val = {"val_loss": float(heat.sum() + paf.sum()), "heatmap": heat.tolist(),
           "paf": paf.tolist(), "num_images": int(count),
           "peak_accuracy": hits / total if total else None, "num_joints": int(total)}
    if ap is not None:
        val.update(ap.measure())
    return val


def _ap_text(val: dict) -> str:
    return ("" if val.get("ap") is None else
            f", AP {val['ap']:.4f} AP50 {val['ap50']:.4f} ({val['ap_images']} images, "
            f"{val['ap_seconds']:.1f} s)")


def _keep_best(cfg: RunConfig, net: Net, state: TrainState, val: dict, earlier: list[dict]):
    """best_model.keras: the model of the highest validation AP, with its epoch and AP."""
    from .checkpoints import save_model_file

    def save(path, best):
        meta = model_meta(cfg, net, best={**best, "step": int(state.step)},
                          train={"epochs": int(val["epoch"]), "steps": int(state.step),
                                 "train_loss": state.train_loss, "val_loss": val["val_loss"]})
        save_model_file(net.model, path, meta, cfg.save_key, cfg.use_amp)

    keep_best(cfg.results / BEST_MODEL_NAME, val, earlier, save)


def _validate_and_keep(cfg: RunConfig, net: Net, state: TrainState, epoch: int, ap,
                       report: Callable[[dict], None]) -> dict:
    """Validate, add the result to the history, ``report`` it, keep the best model."""
    val = validate(cfg, net, ap)
    val["epoch"] = epoch
    earlier = list(state.val_history)
    state.val_history.append(val)
    report(val)
    _keep_best(cfg, net, state, val, earlier)
    return val


def validate_untrained(cfg: RunConfig, net: Net, state: TrainState, ap=None):
    """The untrained model's validation loss (and AP with ``ap``): the yardstick for
    "it learned"."""
    if state.epoch == 0 and cfg.has_val and cfg.chief and not state.val_history:
        _validate_and_keep(cfg, net, state, 0, ap, lambda val: log.info(
            "validation loss before training %.5g%s", val["val_loss"], _ap_text(val)))


def _save_checkpoint(cfg: RunConfig, net: Net, state: TrainState, epoch: int):
    spec = cfg.spec
    save_checkpoint(
        cfg.results, epoch, state.step, net.model, net.optimizer, model_meta(cfg, net),
        run_info={"global_batch": cfg.global_batch, "steps_per_epoch": cfg.steps_per_epoch,
                  "num_epoch": spec.num_epoch, "random_seed": spec.random_seed},
        train_loss=state.train_loss, val_history=state.val_history,
        key=cfg.save_key, use_amp=cfg.use_amp, keep=spec.max_ckpt_to_keep)


def _show_ap(status, state: TrainState):
    """status.json: the latest validation AP and the best so far, in every later write."""
    last = next((h for h in reversed(state.val_history) if h.get("ap") is not None), None)
    if status is None or last is None:
        return
    best = state.best
    status.extra.update(val_ap=last["ap"], val_ap50=last["ap50"], val_ap_epoch=last["epoch"],
                        best_ap=best["ap"], best_epoch=best["epoch"])


def _report_val(val: dict, state: TrainState, writer, status):
    """An epoch's validation in the log, TensorBoard and status.json."""
    log.info("epoch %d validation loss %.5g (train %.5g), heatmap peaks within 2 cells: %s%s",
             val["epoch"], val["val_loss"], state.train_loss,
             "n/a" if val["peak_accuracy"] is None else f"{val['peak_accuracy']:.1%}",
             _ap_text(val))
    if writer is not None:
        write_scalars(writer, state.step, val_scalars(val))
    _show_ap(status, state)


def fit(cfg: RunConfig, net: Net, state: TrainState, writer, status=None, ap=None):
    """The epochs from ``state.epoch`` on: train, validate (loss, and AP with ``ap``, a
    bpnet.train.val_ap.ValAP; the best-AP model kept) and checkpoint when due."""
    spec = cfg.spec
    if writer is not None and state.step == 0 and state.val_history \
            and state.val_history[0]["epoch"] == 0:
        write_scalars(writer, 0, val_scalars(state.val_history[0]))  # the untrained model
    _show_ap(status, state)
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
                _validate_and_keep(cfg, net, state, e1, ap,
                                   lambda val: _report_val(val, state, writer, status))
            if e1 % spec.checkpoint_n_epoch == 0 and cfg.chief:
                _save_checkpoint(cfg, net, state, e1)
            state.epoch = e1
    finally:
        progress.close()

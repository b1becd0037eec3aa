"""The training run behind ``bpnet train``.

A custom loop: a ``tf.function`` train step run under a ``tf.distribute``
strategy (default, Mirrored over N GPUs or N logical CPUs, or MultiWorker
from TF_CONFIG). The loop owns everything TAO leaves to Horovod hooks:

* checkpoints every ``checkpoint_n_epoch`` epochs, written atomically as
  ``model.epoch-N.keras`` (a complete bpnet model file, loadable by every
  later command) plus ``model.epoch-N.state`` (optimizer variables, step and
  epoch); the last ``max_ckpt_to_keep`` are kept, older ones deleted only
  after a newer one is complete;
* resume: re-running the same command continues from the newest checkpoint
  with the same step, learning rate and optimizer state. Each epoch's input
  order and augmentation are seeded from (random_seed, epoch), so a resumed
  run replays exactly the batches the uninterrupted run would have seen;
* validation loss on the val records (TAO reads them but never uses them),
  and COCO keypoint AP on the val split's images, with the best-AP model
  kept as ``best_model.keras`` (``val_ap``);
* TensorBoard scalars, a progress bar, status.json, a NaN-loss stop;
* the final model saved with its pose config, normalization and stride.

The package: ``distribute`` (TF_CONFIG, strategy, the chief's broadcast),
``checkpoints`` (paths, state file, save, load, pruning), ``loop`` (the
run's records and the epochs), ``metrics`` (TensorBoard scalars, joint peak
hits), ``val_ap`` (validation AP, the best model). TensorFlow and Keras are
imported inside the functions, never at module import, so ``bpnet --help``
stays fast.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from ..errors import BpnetError
from . import loop
from .checkpoints import save_model_file
from .distribute import (
    is_chief,
    is_multi_worker,
    make_strategy,
    tf_config,
    worker_folder,
)
from .val_ap import BEST_MODEL_NAME

log = logging.getLogger("bpnet.train")


@dataclasses.dataclass
class TrainResult:
    final_model: str
    epochs: int
    steps: int
    train_loss: float | None
    val_loss: float | None
    val_history: list[dict]
    resumed_from_epoch: int
    best_ap: float | None = None  # the highest validation AP of the run (None: AP off)
    best_epoch: int | None = None  # the epoch it was measured at (0: before training)
    best_model: str | None = None  # best_model.keras, the model of that epoch

    def as_status(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "val_history"}


# ------------------------------------------------------------------ the spec and the results dir

def _spec_and_results(spec_path, results_dir, spec=None):
    """(spec, results dir): -r, else the spec's checkpoint_dir. ``spec``: already loaded."""
    if spec is None:
        from ..specs import load_train_spec
        spec = load_train_spec(spec_path)
    if results_dir is None:
        if not spec.checkpoint_dir:
            raise BpnetError(f"{spec_path}: no results dir: pass -r/--results_dir or set checkpoint_dir")
        results_dir = spec.checkpoint_dir
    return spec, Path(results_dir)


def status_dir_for(spec_path, results_dir=None, spec=None) -> tuple[Path, Path]:
    """(results dir, folder for this process's status.json).

    The results dir is -r or else the spec's checkpoint_dir (``spec``: the
    loaded spec, read from ``spec_path`` when needed and not given). In a multi-worker
    run only the chief writes there; the other workers keep their status.json
    in a ``worker-<index>`` subfolder so a shared filesystem holds one of each.
    """
    out = Path(results_dir) if results_dir is not None else _spec_and_results(spec_path, None, spec)[1]
    sub = worker_folder(tf_config())
    return out, (out / sub if sub else out)


# ------------------------------------------------------------------ checks before the run

def _check_results_dir(results: Path):
    """Prove the results dir takes a write before hours of training depend on it."""
    from ..io import write_bytes_atomic
    try:
        results.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(results / ".write_test", b"ok")
        (results / ".write_test").unlink()
    except OSError as e:
        raise BpnetError(f"results dir {results} is not writable: "
                         f"{e.strerror or e}; free space or choose another -r") from e


def _check_records(spec, spec_path, pose) -> bool:
    """Fail early, with one message, on record files that would fail mid-run.

    Returns whether the spec lists validation records.
    """
    from ..data.records import first_record, split_files
    dc = spec.dataloader.dataset_config
    splits = ["train"] + (["val"] if dc.val_records_path else [])
    for split in splits:
        for f in split_files(dc, split, source=str(spec_path)):
            first_record(f, pose)
    if len(splits) == 1:
        log.warning("validation is off: %s sets no dataloader.dataset_config.val_records_path "
                    "(list the val record prefixes there to get a validation loss)", spec_path)
    return len(splits) > 1


def _save_spec(spec, spec_path: Path, results: Path):
    """The spec file as given and as resolved (defaults filled in, paths absolute)."""
    from ..io import write_json_atomic, write_text_atomic
    from ..specs import spec_to_dict
    try:
        text = spec_path.read_text()
    except OSError:
        text = None
    if text is not None:
        write_text_atomic(results / f"experiment_spec{spec_path.suffix or '.yaml'}", text)
    write_json_atomic(results / "experiment_spec.resolved.json", spec_to_dict(spec))


def _check_pretrained(spec):
    """TAO's names of bpnet files resolved, TAO's own model files refused, before the run."""
    if not spec.pretrained_weights:
        return spec
    from ..model.imagenet import check_vgg19_start, is_keras_weights_file
    from ..tao_files import resolve_model_path, tao_model_problem
    path = resolve_model_path(spec.pretrained_weights)
    if is_keras_weights_file(path):
        # Keras applications' ImageNet VGG19 weights (model/imagenet.py), not a model file.
        if spec.load_graph:
            raise BpnetError(f"pretrained_weights {path}: Keras weights (no model) cannot be "
                             "trained whole; load_graph needs a bpnet model file. Set "
                             "load_graph: false to start the spec's VGG backbone from them")
        check_vgg19_start(path, spec.model, spec.dataloader.image_config.image_dims.channels)
        return dataclasses.replace(spec, pretrained_weights=path)
    problem = tao_model_problem(path, "pretrained_weights")
    if problem:
        if not spec.load_graph:
            problem += "; or set pretrained_weights: null to train from scratch"
        raise BpnetError(problem)
    _check_model_file_head(path)
    return dataclasses.replace(spec, pretrained_weights=path)


def _check_model_file_head(path):
    """A file that is no bpnet model (by its first bytes) fails before the model is built."""
    from ..model.imagenet import WEIGHTS_FILE
    from ..tao_files import BPNET_MAGICS, file_head
    head = file_head(path)
    if head is None:
        return  # missing or unreadable: load_model_file says so
    if not head.startswith(BPNET_MAGICS):
        raise BpnetError(f"pretrained_weights {path}: neither a bpnet model file (a .keras "
                         "archive or an encrypted bpnet model) nor Keras' ImageNet VGG19 "
                         f"weights file ({WEIGHTS_FILE}, for a VGG spec)")


def _check_not_overwritten(spec, results: Path):
    """The run must not write over its own pretrained_weights (the final model or a checkpoint)."""
    from ..io import same_file
    from .checkpoints import _CKPT_RE
    src = spec.pretrained_weights
    if not src or not Path(src).exists():
        return
    src = Path(src)
    final = results / f"{spec.final_model_name}.keras"
    ours = same_file(src, final) or (
        _CKPT_RE.match(src.name) is not None and same_file(src.parent, results))
    if ours:
        raise BpnetError(f"pretrained_weights {src} is a file this run writes in its results dir "
                         f"{results}; copy it elsewhere first or train into another -r")


def _steps_per_epoch(spec, spec_path, data_spec, global_batch: int) -> int:
    from ..data.pipeline import count_samples
    n_train = count_samples(data_spec, "train")
    if spec.steps_per_epoch:
        return int(spec.steps_per_epoch)
    steps = n_train // global_batch
    if steps == 0:
        raise BpnetError(f"{spec_path}: {n_train} training samples are fewer than one "
                         f"global batch ({global_batch}); lower dataloader.batch_size "
                         "or set steps_per_epoch")
    return steps


# ------------------------------------------------------------------ the run

def train(spec_path, results_dir=None, key: str | None = None, gpus: int = 1,
          use_amp: bool = False, status=None, spec=None,
          max_steps: int | None = None, encrypt: bool = False) -> TrainResult:
    """Train the model of the train spec at ``spec_path``; see the module docstring.

    ``spec``: the spec already loaded from ``spec_path`` (it is read once).
    ``max_steps``: stop after this many steps in all (a smoke run of a spec); the
    learning-rate schedule still spans the whole run. ``key`` decrypts encrypted inputs
    (pretrained weights, checkpoints); with ``encrypt`` the run's files are written
    encrypted with it too.
    """
    if encrypt and not key:
        raise BpnetError("--encrypt needs the key to encrypt with: give -k/--key")
    t_start = time.time()
    spec, results = _spec_and_results(spec_path, results_dir, spec)
    spec = dataclasses.replace(spec, checkpoint_dir=str(results))
    spec = _check_pretrained(spec)
    _check_not_overwritten(spec, results)
    spec_path = Path(spec_path)
    cluster = tf_config()
    chief = is_chief(cluster)
    pose = spec.dataloader.pose_config.load()
    if chief:
        _check_results_dir(results)
    has_val = _check_records(spec, spec_path, pose)
    if chief:
        _save_spec(spec, spec_path, results)

    strategy = make_strategy(gpus)
    import keras

    num_replicas = strategy.num_replicas_in_sync
    per_replica = spec.dataloader.batch_size
    global_batch = per_replica * num_replicas
    log.info("strategy %s: %d replica(s), batch %d per replica, %d global",
             type(strategy).__name__, num_replicas, per_replica, global_batch)
    # The input pipeline batches globally; the strategy splits each batch across replicas.
    data_spec = dataclasses.replace(
        spec, dataloader=dataclasses.replace(spec.dataloader, batch_size=global_batch))
    cfg = loop.RunConfig(
        spec=spec, spec_path=spec_path, results=results, key=key or None, use_amp=use_amp,
        chief=chief, multi_worker=is_multi_worker(cluster), pose=pose, has_val=has_val,
        strategy=strategy, global_batch=global_batch,
        steps_per_epoch=_steps_per_epoch(spec, spec_path, data_spec, global_batch),
        data_spec=data_spec, max_steps=max_steps, encrypt=encrypt)

    keras.utils.set_random_seed(spec.random_seed)
    if use_amp:
        keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        return _run(cfg, status, t_start)
    finally:
        if use_amp:
            keras.mixed_precision.set_dtype_policy("float32")


def _run(cfg, status, t_start) -> TrainResult:
    import tensorflow as tf

    spec = cfg.spec
    net = loop.build_net(cfg)
    state = loop.resume_or_init(cfg, net)
    start_epoch = state.epoch
    if loop.starts_fresh(cfg, state):
        loop.warm_start_bn(cfg, net)
    ap = None
    if cfg.has_val and cfg.chief:
        from .val_ap import make_val_ap
        ap = make_val_ap(spec, cfg.spec_path, net.model, loop.model_meta(cfg, net))
    loop.validate_untrained(cfg, net, state, ap)
    writer = tf.summary.create_file_writer(str(cfg.results / "events")) if cfg.chief else None
    try:
        loop.fit(cfg, net, state, writer, status, ap)
    finally:
        if writer is not None:
            writer.close()

    final = cfg.results / f"{spec.final_model_name}.keras"
    val_loss = state.val_history[-1]["val_loss"] if state.val_history else None
    if cfg.chief:
        meta = loop.model_meta(cfg, net, train={"epochs": spec.num_epoch, "steps": int(state.step),
                                                "train_loss": state.train_loss, "val_loss": val_loss})
        save_model_file(net.model, final, meta, cfg.save_key, cfg.use_amp)
        log.info("final model %s (%.0f s)", final, time.time() - t_start)
    best = state.best
    best_file = cfg.results / BEST_MODEL_NAME
    if best is not None:
        log.info("best validation AP %.4f at epoch %d: %s", best["ap"], best["epoch"], best_file)
    return TrainResult(final_model=str(final), epochs=spec.num_epoch, steps=int(state.step),
                       train_loss=state.train_loss, val_loss=val_loss,
                       val_history=state.val_history, resumed_from_epoch=start_epoch,
                       best_ap=None if best is None else best["ap"],
                       best_epoch=None if best is None else best["epoch"],
                       best_model=str(best_file) if best is not None and best_file.exists()
                       else None)

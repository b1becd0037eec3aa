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
* validation loss on the val records (TAO reads them but never uses them);
* TensorBoard scalars, a progress bar, status.json, a NaN-loss stop;
* the final model saved with its pose config, normalization and stride.

TensorFlow and Keras are imported inside the functions, never at module
import, so ``bpnet --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import io as _io
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import BpnetError

log = logging.getLogger("bpnet.train")

CKPT_PREFIX = "model.epoch-"
CKPT_MODEL_SUFFIX = ".keras"
CKPT_STATE_SUFFIX = ".state"
_CKPT_RE = re.compile(r"^model\.epoch-(\d+)\.keras$")
STATE_FORMAT = "bpnet-train-state-1"


# ====================================================================== devices

def tf_config() -> Optional[dict]:
    """The parsed TF_CONFIG environment variable, or None when unset/empty."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BpnetError(f"TF_CONFIG is not valid JSON ({e.msg}); see the multi-machine "
                         "section of the README for its format") from e
    if not isinstance(cfg, dict) or "cluster" not in cfg or "task" not in cfg:
        raise BpnetError("TF_CONFIG needs a 'cluster' and a 'task' entry, e.g. "
                         '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                         '"task": {"type": "worker", "index": 0}}')
    return cfg


def is_multi_worker(cfg: Optional[dict]) -> bool:
    if not cfg:
        return False
    cluster = cfg.get("cluster", {})
    return sum(len(cluster.get(k, [])) for k in ("chief", "worker")) > 1


def is_chief(cfg: Optional[dict]) -> bool:
    """True for the process that writes checkpoints, summaries and the final model."""
    if not is_multi_worker(cfg):
        return True
    task = cfg.get("task", {})
    if "chief" in cfg.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def make_strategy(gpus: int = 1):
    """The tf.distribute strategy for ``gpus`` devices on this machine (or TF_CONFIG's cluster).

    Without GPUs, ``gpus`` > 1 splits the CPU into that many logical devices:
    slower than one device, but it runs the real multi-replica code path
    (used by the tests). This must happen before TensorFlow starts its runtime.
    """
    import tensorflow as tf

    if gpus < 1:
        raise BpnetError(f"--gpus must be >= 1, got {gpus}")
    cfg = tf_config()
    if cfg is None:
        # TensorFlow's own TF_CONFIG reader chokes on an empty value.
        os.environ.pop("TF_CONFIG", None)
    physical = tf.config.list_physical_devices("GPU")
    try:
        if physical:
            if gpus > len(physical):
                raise BpnetError(f"--gpus {gpus} asked, but this machine has {len(physical)} "
                                 f"GPU(s) visible; lower --gpus or check CUDA_VISIBLE_DEVICES")
            tf.config.set_visible_devices(physical[:gpus], "GPU")
            for g in physical[:gpus]:
                # Share the GPU politely with the input pipeline and other processes.
                tf.config.experimental.set_memory_growth(g, True)
        elif gpus > 1:
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(gpus)])
    except RuntimeError as e:
        raise BpnetError(f"cannot set up {gpus} device(s): TensorFlow was already started in this "
                         f"process ({e}); run training in a fresh process") from e

    if is_multi_worker(cfg):
        comm = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=comm)
    if physical and gpus > 1:
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(gpus)])
    if not physical and gpus > 1:
        # NCCL is GPU-only; CPU replicas reduce through plain copies.
        return tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(gpus)],
            cross_device_ops=tf.distribute.ReductionToOneDevice(reduce_to_device="/cpu:0"))
    return tf.distribute.get_strategy()


def status_dir_for(spec_path, results_dir=None) -> Tuple[Path, Path]:
    """(results dir, folder for this process's status.json).

    The results dir is -r or else the spec's checkpoint_dir. In a multi-worker
    run only the chief writes there; the other workers keep their status.json
    in a ``worker-<index>`` subfolder so a shared filesystem holds one of each.
    """
    if results_dir is None:
        from .specs import load_train_spec
        spec = load_train_spec(spec_path)
        if not spec.checkpoint_dir:
            raise BpnetError(f"{spec_path}: no results dir: pass -r/--results_dir or set checkpoint_dir")
        results_dir = spec.checkpoint_dir
    out = Path(results_dir)
    cfg = tf_config()
    if is_multi_worker(cfg) and not is_chief(cfg):
        task = cfg.get("task", {})
        return out, out / f"{task.get('type', 'worker')}-{int(task.get('index', 0))}"
    return out, out


# ==================================================================== checkpoints

def ckpt_model_path(results_dir, epoch: int) -> Path:
    return Path(results_dir) / f"{CKPT_PREFIX}{epoch}{CKPT_MODEL_SUFFIX}"


def ckpt_state_path(results_dir, epoch: int) -> Path:
    return Path(results_dir) / f"{CKPT_PREFIX}{epoch}{CKPT_STATE_SUFFIX}"


def list_checkpoints(results_dir) -> List[int]:
    """Epochs with a complete checkpoint (model and state file) in ``results_dir``, ascending.

    Both files are written atomically, the state first and the model last,
    so a model file under its final name means the checkpoint is complete.
    """
    d = Path(results_dir)
    if not d.is_dir():
        return []
    epochs = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and ckpt_state_path(d, int(m.group(1))).exists():
            epochs.append(int(m.group(1)))
    return sorted(epochs)


def _encode_state(arrays: Dict[str, np.ndarray], info: dict, key: Optional[str]) -> bytes:
    buf = _io.BytesIO()
    np.savez(buf, __info__=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8), **arrays)
    data = buf.getvalue()
    if key:
        data = _crypto().encrypt_bytes(data, key)
    return data


def _decode_state(data: bytes, key: Optional[str], source) -> Tuple[Dict[str, np.ndarray], dict]:
    if key:
        data = _crypto().decrypt_bytes(data, key, source=str(source))
    with np.load(_io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    info = json.loads(arrays.pop("__info__").tobytes().decode())
    if info.get("format") != STATE_FORMAT:
        raise ValueError(f"unknown state format {info.get('format')!r}")
    return arrays, info


def _crypto():
    """The model-file encryption helpers of bpnet.model.io (one key format for every file)."""
    from .model import io as mio
    return mio


# ==================================================================== losses

def _stage_loss_fn(loss_cfg, num_stages: int):
    """(outputs, labels) -> (heatmap losses [T], PAF losses [T]), each summed over the batch.

    Summed, not averaged: under data parallelism every replica divides by the
    global batch so that the all-reduced gradient equals one big batch's.
    """
    import tensorflow as tf
    from .model.loss import BpNetLoss
    loss = BpNetLoss.from_config(loss_cfg, num_stages, global_batch_size=1)

    def fn(outputs, labels):
        _, parts = loss(labels, outputs)
        heat = tf.stack([parts[f"heatmap_stage{t}"] for t in range(1, num_stages + 1)])
        paf = tf.stack([parts[f"paf_stage{t}"] for t in range(1, num_stages + 1)])
        return heat, paf
    return fn


# ==================================================================== the run

@dataclasses.dataclass
class TrainResult:
    final_model: str
    epochs: int
    steps: int
    train_loss: Optional[float]
    val_loss: Optional[float]
    val_history: List[dict]
    resumed_from_epoch: int

    def as_status(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "val_history"}


def train(spec_path, results_dir=None, key: Optional[str] = None, gpus: int = 1,
          use_amp: bool = False, status=None) -> TrainResult:
    """Train the model of the train spec at ``spec_path``; see the module docstring."""
    from .specs import load_train_spec
    spec = load_train_spec(spec_path)
    if results_dir is None:
        if not spec.checkpoint_dir:
            raise BpnetError(f"{spec_path}: no results dir: pass -r/--results_dir or set checkpoint_dir")
        results_dir = spec.checkpoint_dir
    results_dir = Path(results_dir)
    spec = dataclasses.replace(spec, checkpoint_dir=str(results_dir))
    run = _Run(spec, Path(spec_path), results_dir, key, gpus, use_amp, status)
    return run.execute()


class _Run:
    def __init__(self, spec, spec_path: Path, results_dir: Path, key, gpus, use_amp, status):
        self.spec = spec
        self.spec_path = spec_path
        self.results = results_dir
        self.key = key or None
        self.gpus = gpus
        self.use_amp = use_amp
        self.status = status
        self.cluster = tf_config()
        self.chief = is_chief(self.cluster)
        self.pose = spec.dataloader.pose_config.load()

    # ------------------------------------------------------------------ checks

    def _check_inputs(self):
        """Fail early, with one message, on inputs that would fail mid-run."""
        from .data import records as rec
        dc = self.spec.dataloader.dataset_config
        self.train_files = self._records(dc.train_records_folder_path, dc.train_records_path,
                                         "train_records_path")
        self.val_files = []
        if dc.val_records_path:
            self.val_files = self._records(dc.val_records_folder_path or dc.train_records_folder_path,
                                           dc.val_records_path, "val_records_path")
        for files in (self.train_files, self.val_files):
            for f in files[:1] + files[-1:]:
                try:
                    first = next(iter(rec.read_records([f])), None)
                except Exception as e:  # truncated or foreign files fail in many ways
                    raise BpnetError(f"{f}: not a readable bpnet record file ({type(e).__name__}: "
                                     f"{e}); re-run dataset_convert") from e
                if first is None:
                    continue
                name = _as_str(first.get("pose_config", b""))
                joints = int(np.asarray(first.get("num_joints", -1)).reshape(-1)[0])
                if (name and name != self.pose.name) or joints != self.pose.num_joints:
                    raise BpnetError(
                        f"{f}: records were written for pose config {name!r} ({joints} joints) but "
                        f"the train spec uses {self.pose.name!r} ({self.pose.num_joints} joints, "
                        f"dataloader.pose_config.pose_config_path); re-run dataset_convert with "
                        f"the matching pose config or point the spec at the right records")

    def _records(self, folder, names, key) -> List[str]:
        from .data import records as rec
        where = f"{self.spec_path}: dataloader.dataset_config.{key}"
        if not names:
            raise BpnetError(f"{where}: no records listed")
        files = []
        for n in names:
            p = Path(n) if os.path.isabs(n) else Path(folder) / n
            try:
                found = rec.record_files(str(p))
            except BpnetError as e:
                raise BpnetError(f"{where}: {e}; run `bpnet dataset_convert` first") from e
            except OSError:
                found = []
            if not found:
                raise BpnetError(f"{where}: no TFRecord files at {p}; run `bpnet dataset_convert` "
                                 "first or fix the path (relative to the spec file)")
            files += [str(x) for x in found]
        return files

    def _check_results_dir(self):
        """Prove the results dir takes a write before hours of training depend on it."""
        try:
            self.results.mkdir(parents=True, exist_ok=True)
            from .io import write_bytes_atomic
            write_bytes_atomic(self.results / ".write_test", b"ok")
            (self.results / ".write_test").unlink()
        except OSError as e:
            raise BpnetError(f"results dir {self.results} is not writable: "
                             f"{e.strerror or e}; free space or choose another -r") from e

    # ------------------------------------------------------------------ setup

    def _save_spec(self):
        from .io import write_json_atomic, write_text_atomic
        from .specs import spec_to_dict
        try:
            text = self.spec_path.read_text()
        except OSError:
            text = None
        if text is not None:
            write_text_atomic(self.results / f"experiment_spec{self.spec_path.suffix or '.yaml'}", text)
        write_json_atomic(self.results / "experiment_spec.resolved.json", spec_to_dict(self.spec))

    def _input_shape(self):
        d = self.spec.dataloader.image_config.image_dims
        return (d.height, d.width, d.channels)

    def _build_model(self):
        from .model.build import build_model
        if self.spec.load_graph:
            if not self.spec.pretrained_weights:
                raise BpnetError(f"{self.spec_path}: load_graph is true but pretrained_weights is "
                                 "empty; name the (pruned) model file to retrain")
            model, meta = _load_model_file(self.spec.pretrained_weights, self.key, "pretrained_weights")
            if meta and meta.get("pose_config"):
                from .pose import pose_config_from_dict
                other = pose_config_from_dict(meta["pose_config"])
                if other.heat_channels != self.pose.heat_channels or \
                        other.paf_channels != self.pose.paf_channels:
                    raise BpnetError(f"{self.spec.pretrained_weights}: the model is for pose config "
                                     f"{other.name!r}, the spec for {self.pose.name!r}; with "
                                     "load_graph the whole model is kept, so they must agree")
            self.graph_meta = meta or {}
            log.info("load_graph: training the whole model of %s (%d parameters)",
                     self.spec.pretrained_weights, model.count_params())
            if self.use_amp:
                model = _clone_with_policy(model, "mixed_float16")
            return model
        return build_model(self.spec.model, self.pose, input_shape=(None, None, self._input_shape()[2]))

    def _meta(self) -> dict:
        from .specs import spec_to_dict
        norm = self.spec.dataloader.normalization_params
        h, w, c = self._input_shape()
        return {
            "pose_config": self.pose.to_dict(),
            "normalization": {"image_scale": list(norm.image_scale),
                              "image_offset": list(norm.image_offset)},
            "stride": self.spec.STRIDE,
            # A loaded (pruned) graph is not the spec's model: keep its own description.
            "model": (getattr(self, "graph_meta", None) or {}).get("model") or spec_to_dict(self.spec.model),
            "input_channels": c,
            "train_input_shape": [h, w],
        }

    # ------------------------------------------------------------------ save/load

    def _float32_model(self):
        """The model as saved: float32 layers, BN not synchronized (both training-only settings)."""
        if self.use_amp:
            return _clone_with_policy(self.model, "float32")
        return self.model

    def _save_model_file(self, path: Path, extra_meta: Optional[dict] = None):
        from .model import io as mio
        meta = self._meta()
        if extra_meta:
            meta.update(extra_meta)
        with _unsynced_bn(self.model):
            m = self._float32_model()
            # save_model writes atomically (temp name + rename).
            mio.save_model(m, str(path), meta, key=self.key)

    def _save_checkpoint(self, epoch: int):
        if not self.chief:
            return
        from .io import write_bytes_atomic
        arrays = {f"opt_{i:05d}": np.asarray(v.numpy() if hasattr(v, "numpy") else v)
                  for i, v in enumerate(self.optimizer.variables)}
        info = {"format": STATE_FORMAT, "epoch": epoch, "step": int(self.step),
                "global_batch": self.global_batch, "steps_per_epoch": self.steps_per_epoch,
                "num_epoch": self.spec.num_epoch, "random_seed": self.spec.random_seed,
                "optimizer_variables": [v.path if hasattr(v, "path") else v.name
                                        for v in self.optimizer.variables],
                "train_loss": self.last_train_loss, "val_history": self.val_history}
        state = _encode_state(arrays, info, self.key)
        write_bytes_atomic(ckpt_state_path(self.results, epoch), state)
        self._save_model_file(ckpt_model_path(self.results, epoch),
                              {"checkpoint": {"epoch": epoch, "step": int(self.step)}})
        log.info("checkpoint %s (epoch %d, step %d)", ckpt_model_path(self.results, epoch).name,
                 epoch, self.step)
        # Old checkpoints go only now that the new one is complete.
        keep = self.spec.max_ckpt_to_keep
        for old in list_checkpoints(self.results)[:-keep]:
            for p in (ckpt_model_path(self.results, old), ckpt_state_path(self.results, old)):
                try:
                    p.unlink()
                except OSError:
                    pass

    def _load_checkpoint(self, model_path: Path, state_path: Optional[Path], epoch_hint: int,
                         strict: bool = True) -> Optional[dict]:
        """Weights (and optimizer state when ``state_path``) from a checkpoint; its info dict."""
        prev = [e for e in list_checkpoints(self.results) if e < epoch_hint]
        fallback = (f"delete {model_path.name} and {model_path.with_suffix(CKPT_STATE_SUFFIX).name} "
                    f"to resume from epoch {prev[-1]}" if prev else
                    "delete it to start over, or choose a new -r results dir")
        try:
            src, _meta = _load_model_file(str(model_path), self.key, "checkpoint")
        except BpnetError as e:
            raise BpnetError(f"checkpoint {model_path} cannot be loaded: {e}; if it is damaged, "
                             f"{fallback}") from e
        report = copy_weights_by_name(src, self.model)
        if strict and (report["skipped"] or report["missing"]):
            bad = (report["skipped"] + [(n, "not in the checkpoint") for n in report["missing"]])[:3]
            raise BpnetError(f"checkpoint {model_path} does not match the model of the spec "
                             f"({'; '.join(f'{n}: {r}' for n, r in bad)}); use a new -r results dir "
                             "for a different model")
        if state_path is None or not state_path.exists():
            return None
        try:
            arrays, info = _decode_state(state_path.read_bytes(), self.key, state_path)
        except BpnetError as e:
            raise BpnetError(f"checkpoint state {state_path} cannot be read: {e}") from e
        except Exception as e:  # zip, JSON, numpy errors all mean a damaged file
            raise BpnetError(f"checkpoint state {state_path} is damaged ({type(e).__name__}: {e}); "
                             f"{fallback}") from e
        values = [arrays[k] for k in sorted(arrays)]
        variables = list(self.optimizer.variables)
        if len(values) != len(variables) or any(
                tuple(v.shape) != tuple(a.shape) for v, a in zip(variables, values)):
            raise BpnetError(f"checkpoint state {state_path} holds {len(values)} optimizer variables "
                             f"that do not fit this run's {len(variables)}; the model or optimizer "
                             "settings changed: use a new -r results dir")
        for v, a in zip(variables, values):
            v.assign(a)
        return info

    # ------------------------------------------------------------------ main

    def execute(self) -> TrainResult:
        t_start = time.time()
        if self.chief:
            self._check_results_dir()
        self._check_inputs()
        if self.chief:
            self._save_spec()

        self.strategy = make_strategy(self.gpus)
        import keras

        self.num_replicas = self.strategy.num_replicas_in_sync
        self.per_replica_batch = self.spec.dataloader.batch_size
        self.global_batch = self.per_replica_batch * self.num_replicas
        log.info("strategy %s: %d replica(s), batch %d per replica, %d global",
                 type(self.strategy).__name__, self.num_replicas, self.per_replica_batch,
                 self.global_batch)

        from .data.pipeline import build_dataset, count_samples
        self.build_dataset = build_dataset
        n_train = count_samples(self._data_spec(), "train")
        if self.spec.steps_per_epoch:
            self.steps_per_epoch = int(self.spec.steps_per_epoch)
        else:
            self.steps_per_epoch = n_train // self.global_batch
            if self.steps_per_epoch == 0:
                raise BpnetError(f"{self.spec_path}: {n_train} training samples are fewer than one "
                                 f"global batch ({self.global_batch}); lower dataloader.batch_size "
                                 "or set steps_per_epoch")
        self.total_steps = self.steps_per_epoch * self.spec.num_epoch

        keras.utils.set_random_seed(self.spec.random_seed)
        if self.use_amp:
            keras.mixed_precision.set_dtype_policy("mixed_float16")
        try:
            return self._train(t_start)
        finally:
            if self.use_amp:
                keras.mixed_precision.set_dtype_policy("float32")

    def _data_spec(self):
        """The spec the input pipeline sees: its batch is the global batch (split across replicas)."""
        dl = dataclasses.replace(self.spec.dataloader,
                                 batch_size=self.spec.dataloader.batch_size * getattr(self, "num_replicas", 1))
        return dataclasses.replace(self.spec, dataloader=dl)

    def _train(self, t_start) -> TrainResult:
        import tensorflow as tf
        import keras
        from .model.optimizer import make_optimizer
        from .model.schedules import make_schedule

        spec = self.spec
        with self.strategy.scope():
            self.model = self._build_model()
            self.num_stages = len(self.model.outputs) // 2
            if self.num_replicas > 1:
                _set_bn_sync(self.model, True)
            schedule = make_schedule(spec.optimizer.learning_rate_schedule, self.total_steps,
                                     self.steps_per_epoch, self.num_replicas,
                                     spec.optimizer.scale_learning_rate_by_replicas)
            self.optimizer = make_optimizer(spec.optimizer, self.model, schedule,
                                            spec.use_stagewise_lr_multipliers)
            if self.use_amp:
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(self.model.trainable_variables)
        self.stage_losses = _stage_loss_fn(spec.loss, self.num_stages)

        # ---- where to start: resume > finetuning checkpoint > pretrained weights
        self.step = 0
        self.val_history: List[dict] = []
        self.last_train_loss: Optional[float] = None
        start_epoch = 0
        done = list_checkpoints(self.results)
        if done:
            start_epoch = done[-1]
            info = self._load_checkpoint(ckpt_model_path(self.results, start_epoch),
                                         ckpt_state_path(self.results, start_epoch), start_epoch)
            self.step = int(info["step"]) if info else start_epoch * self.steps_per_epoch
            if info:
                self.val_history = list(info.get("val_history") or [])
                self.last_train_loss = info.get("train_loss")
                if info.get("global_batch") != self.global_batch:
                    log.warning("resuming with global batch %d; the checkpoint was trained with %s",
                                self.global_batch, info.get("global_batch"))
            log.info("resuming from %s: epoch %d, step %d",
                     ckpt_model_path(self.results, start_epoch).name, start_epoch, self.step)
        elif spec.finetuning_config.is_finetune_exp:
            fc = spec.finetuning_config
            if not fc.checkpoint_path:
                raise BpnetError(f"{self.spec_path}: finetuning_config.is_finetune_exp is true but "
                                 "checkpoint_path is empty")
            p = Path(fc.checkpoint_path)
            state = p.with_suffix(CKPT_STATE_SUFFIX) if p.suffix == CKPT_MODEL_SUFFIX else None
            info = self._load_checkpoint(p, state, fc.ckpt_epoch_num)
            start_epoch = fc.ckpt_epoch_num
            self.step = int(info["step"]) if info else start_epoch * self.steps_per_epoch
            if not info:
                # No optimizer state: keep the schedule in step with the epoch.
                self.optimizer.iterations.assign(self.step)
            log.info("finetuning from %s at epoch %d (step %d)", p, start_epoch, self.step)
        elif spec.pretrained_weights and not spec.load_graph:
            src, _ = _load_model_file(spec.pretrained_weights, self.key, "pretrained_weights")
            report = copy_weights_by_name(src, self.model)
            self._report_pretrained(report)
        if self.cluster and is_multi_worker(self.cluster):
            start_epoch, self.step = self._sync_from_chief(start_epoch, self.step)
        # Decided after the broadcast: every worker must take the same branch
        # (the warm start runs collectives under synchronized BN).
        fresh = (start_epoch == 0 and not spec.pretrained_weights
                 and not spec.finetuning_config.is_finetune_exp)

        if start_epoch >= spec.num_epoch:
            log.info("training already complete (checkpoint of epoch %d)", start_epoch)
        self.start_epoch = start_epoch

        self._make_steps()
        if fresh:
            self._warm_start_bn()
        if start_epoch == 0 and self.val_files and self.chief and not self.val_history:
            # The untrained model's validation loss: the yardstick for "it learned".
            val = self.validate()
            val["epoch"] = 0
            self.val_history.append(val)
            log.info("validation loss before training %.5g", val["val_loss"])
        writer = None
        if self.chief:
            writer = tf.summary.create_file_writer(str(self.results / "events"))
        try:
            self._loop(start_epoch, writer)
        finally:
            if writer is not None:
                writer.close()

        final = self.results / f"{spec.final_model_name}.keras"
        if self.chief:
            self._save_model_file(final, {"train": {
                "epochs": spec.num_epoch, "steps": int(self.step),
                "train_loss": self.last_train_loss,
                "val_loss": self.val_history[-1]["val_loss"] if self.val_history else None}})
            log.info("final model %s (%.0f s)", final, time.time() - t_start)
        return TrainResult(final_model=str(final), epochs=spec.num_epoch, steps=int(self.step),
                           train_loss=self.last_train_loss,
                           val_loss=self.val_history[-1]["val_loss"] if self.val_history else None,
                           val_history=self.val_history, resumed_from_epoch=start_epoch)

    def _report_pretrained(self, report):
        from .io import write_json_atomic
        log.info("pretrained weights %s: %d layers loaded, %d skipped (shape mismatch), "
                 "%d not in the file", self.spec.pretrained_weights, len(report["loaded"]),
                 len(report["skipped"]), len(report["missing"]))
        for name, why in report["skipped"]:
            log.info("  skipped %s: %s", name, why)
        if not report["loaded"]:
            raise BpnetError(f"pretrained_weights {self.spec.pretrained_weights}: no layer matched "
                             "the model by name; is it a model of this family?")
        if self.chief:
            write_json_atomic(self.results / "pretrained_weights_report.json",
                              {"file": self.spec.pretrained_weights, **report})

    def _sync_from_chief(self, epoch: int, step: int):
        """Give every worker the chief's weights, optimizer state and position.

        Workers read checkpoints from their own -r folder; if it is not a shared
        filesystem, theirs may differ from the chief's. One broadcast at the start
        keeps all replicas identical (the all-reduce keeps them so afterwards).
        """
        import tensorflow as tf
        chief = 1.0 if self.chief else 0.0
        pos = np.array([epoch, step], np.float64)
        variables = list(self.model.variables) + list(self.optimizer.variables)

        @tf.function
        def bcast(pos_in):
            ctx = tf.distribute.get_replica_context()
            first = tf.cast(tf.equal(ctx.replica_id_in_sync_group, 0), tf.float64)
            w = chief * first
            out_pos = ctx.all_reduce(tf.distribute.ReduceOp.SUM, pos_in * w)
            for v in variables:
                val = tf.convert_to_tensor(v)
                mixed = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                       tf.cast(val, tf.float64) * w)
                v.assign(tf.cast(mixed, val.dtype))
            return out_pos

        out = self.strategy.run(bcast, args=(tf.constant(pos),))
        out = self.strategy.experimental_local_results(out)[0].numpy()
        return int(round(out[0])), int(round(out[1]))

    # ------------------------------------------------------------------ steps

    def _make_steps(self):
        import tensorflow as tf
        model, stage_losses = self.model, self.stage_losses
        self.train_step = make_train_step(model, self.optimizer, stage_losses, self.strategy,
                                          self.global_batch, self.use_amp)
        T = self.num_stages

        def eval_fn(images, labels):
            outputs = model(images, training=False)
            heat, paf = stage_losses(outputs, labels)
            return (tf.cast(heat, tf.float32), tf.cast(paf, tf.float32),
                    tf.cast(tf.shape(images)[0], tf.float32), tf.cast(outputs[T - 1], tf.float32))

        # Validation runs on this worker alone: small, and free of cross-worker
        # collectives that uneven last batches would deadlock.
        self.eval_step = tf.function(eval_fn)

    def _warm_start_bn(self):
        """Start BatchNorm's moving statistics at the first batch's, not at (0, 1).

        Keras' moving averages (momentum 0.99) keep 0.99**n of their initial
        values after n steps: after a few hundred steps the inference-mode
        model still normalizes with a variance part made up, and short runs
        validate far worse than they train. One forward pass with momentum 0
        on the first batch (same seed as epoch 1, so resume is unaffected)
        removes that bias; long runs do not notice.
        """
        import tensorflow as tf
        bns = _bn_layers(self.model)
        if not bns:
            return
        saved = [l.momentum for l in bns]
        for l in bns:
            l.momentum = 0.0
        try:
            batch = next(iter(self._dataset(0)))
            model, strategy = self.model, self.strategy

            @tf.function
            def forward(b):
                strategy.run(lambda x: model(x, training=True), args=(b[0],))
            forward(batch)
        finally:
            for l, m in zip(bns, saved):
                l.momentum = m

    def _current_lr(self) -> float:
        opt = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        lr = opt.learning_rate
        try:
            return float(np.asarray(lr))
        except Exception:  # a schedule object
            return float(np.asarray(lr(opt.iterations)))

    def _dataset(self, epoch: int):
        import tensorflow as tf
        seed = _epoch_seed(self.spec.random_seed, epoch)
        ds = self.build_dataset(self._data_spec(), "train", seed=seed, repeat=True)
        ds = ds.take(self.steps_per_epoch)
        if is_multi_worker(self.cluster):
            opts = tf.data.Options()
            # Every worker reads all records with the same seed and keeps its share:
            # the record files are often fewer than the workers.
            opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
            ds = ds.with_options(opts)
        return self.strategy.experimental_distribute_dataset(ds)

    def _loop(self, start_epoch: int, writer):
        import keras
        from tqdm import tqdm

        spec = self.spec
        log_every = max(1, spec.log_every_n_secs)
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not self.chief, mininterval=1.0, desc="train")
        last_log = time.time()
        t0, s0 = time.time(), self.step
        try:
            for epoch in range(start_epoch, spec.num_epoch):
                # Global RNGs (python, numpy, TF) restart from a per-epoch seed, so a
                # run resumed at this epoch draws the same numbers as an unbroken one.
                keras.utils.set_random_seed(_epoch_seed(spec.random_seed, epoch))
                sums, n = None, 0
                for batch in self._dataset(epoch):
                    total, heat, paf, reg = self.train_step(batch)
                    self.step += 1
                    total_v = float(total)
                    if not math.isfinite(total_v):
                        raise BpnetError(
                            f"the loss became {total_v} at step {self.step} (epoch {epoch + 1}); "
                            "lower the learning rate (optimizer.learning_rate_schedule) or check "
                            "the data (dataset_convert --check_files, normalization_params); "
                            "checkpoints so far are kept")
                    vals = np.concatenate([[total_v, float(reg)], heat.numpy(), paf.numpy()])
                    sums = vals if sums is None else sums + vals
                    n += 1
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{total_v:.4g}", refresh=False)
                    if writer is not None and (self.step % spec.summary_every_n_steps == 0
                                               or self.step == 1):
                        self._summaries(writer, "train", vals)
                    now = time.time()
                    if now - last_log >= log_every:
                        rate = (self.step - s0) * self.global_batch / max(now - t0, 1e-9)
                        log.info("epoch %d/%d step %d/%d loss %.5g lr %.3g %.1f img/s",
                                 epoch + 1, spec.num_epoch, self.step, self.total_steps, total_v,
                                 self._current_lr(), rate)
                        last_log = now
                    if self.status is not None and self.chief:
                        self.status.progress(self.step, self.total_steps,
                                             f"epoch {epoch + 1}/{spec.num_epoch}",
                                             epoch=epoch + 1, loss=total_v, lr=self._current_lr())
                if n == 0:
                    raise BpnetError("the training dataset produced no batches; check the records")
                self.last_train_loss = float(sums[0] / n)
                if writer is not None:
                    self._summaries(writer, "epoch", sums / n)
                e1 = epoch + 1
                if self.val_files and self.chief and (e1 % spec.validation_every_n_epoch == 0
                                                      or e1 == spec.num_epoch):
                    val = self.validate()
                    val["epoch"] = e1
                    self.val_history.append(val)
                    log.info("epoch %d validation loss %.5g (train %.5g), heatmap peaks within "
                             "2 cells: %s", e1, val["val_loss"], self.last_train_loss,
                             "n/a" if val["peak_accuracy"] is None else f"{val['peak_accuracy']:.1%}")
                    if writer is not None:
                        scalars = {"val/loss": val["val_loss"]}
                        for t, (h, p) in enumerate(zip(val["heatmap"], val["paf"]), 1):
                            scalars[f"val/heatmap_stage{t}"] = h
                            scalars[f"val/paf_stage{t}"] = p
                        if val.get("peak_accuracy") is not None:
                            scalars["val/peak_accuracy"] = val["peak_accuracy"]
                        write_scalars(writer, self.step, scalars)
                if e1 % spec.checkpoint_n_epoch == 0:
                    self._save_checkpoint(e1)
        finally:
            bar.close()

    def _summaries(self, writer, prefix, vals):
        T = self.num_stages
        scalars = {f"{prefix}/loss": vals[0], f"{prefix}/regularization_loss": vals[1]}
        for t in range(T):
            scalars[f"{prefix}/heatmap_stage{t + 1}"] = vals[2 + t]
            scalars[f"{prefix}/paf_stage{t + 1}"] = vals[2 + T + t]
        scalars["learning_rate"] = self._current_lr()
        write_scalars(writer, self.step, scalars)

    def validate(self) -> dict:
        """Mean data loss per validation image (no regularization), per stage and in total."""
        ds = self.build_dataset(self._val_spec(), "val", seed=self.spec.random_seed,
                                repeat=False, shuffle=False)
        heat = paf = None
        count = 0.0
        hits = total = 0
        J = self.pose.num_joints
        for images, labels in ds:
            h, p, b, pred = self.eval_step(images, labels)
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

    def _val_spec(self):
        return self.spec


# ====================================================================== helpers

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


def write_scalars(writer, step: int, scalars: Dict[str, float]):
    """TensorBoard scalars through TensorFlow's core summary op.

    tf.summary.scalar lives in the tensorboard package; the event files it
    writes are plain tensor summaries tagged for the "scalars" plugin, which
    core TensorFlow writes as well. So training needs no tensorboard install,
    only viewing the curves does.
    """
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2
    meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    with writer.as_default(step=int(step)):
        for tag, value in scalars.items():
            tf.summary.write(tag, tf.constant(float(value), tf.float32), metadata=meta)
    writer.flush()


def joint_peak_hits(pred, gt, mask=None, radius: float = 2.0, peak_min: float = 0.6):
    """(hits, labeled joints) of a batch of heatmaps [B, h, w, J] (no background channel).

    The labeled joints are the peaks of the target heatmaps (3x3 local maxima
    of at least ``peak_min``; a joint renders >= 0.72 at its nearest cell with
    sigma 7 px, stride 8) where the mask counts. A joint is hit when the
    predicted map's maximum over the cells nearer to it than to any other
    labeled joint of the same kind lies within ``radius`` cells. With one
    person this is the maximum of the whole map.
    """
    pred = np.asarray(pred, np.float32)
    gt = np.asarray(gt, np.float32)
    B, h, w, J = gt.shape
    pad = np.pad(gt, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    local = np.max(np.stack([pad[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                             for dy in (-1, 0, 1) for dx in (-1, 0, 1)]), axis=0)
    is_peak = (gt >= peak_min) & (gt >= local)
    if mask is not None:
        is_peak &= np.asarray(mask).reshape(B, h, w, 1) > 0.5
    yy, xx = np.mgrid[0:h, 0:w]
    cells = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float32)  # [h*w, 2]
    hits = total = 0
    for b in range(B):
        for j in range(J):
            ys, xs = np.nonzero(is_peak[b, :, :, j])
            if not len(ys):
                continue
            peaks = np.stack([ys, xs], 1).astype(np.float32)
            # A joint half-way between two cells renders two equal peaks: keep one.
            keep = []
            for k, pk in enumerate(peaks):
                if all(np.hypot(*(pk - peaks[q])) > 1.5 for q in keep):
                    keep.append(k)
            peaks = peaks[keep]
            owner = np.argmin(((cells[:, None, :] - peaks[None]) ** 2).sum(-1), axis=1)
            flat = pred[b, :, :, j].ravel()
            for k, pk in enumerate(peaks):
                region = np.nonzero(owner == k)[0]
                best = cells[region[np.argmax(flat[region])]]
                hits += int(np.hypot(*(best - pk)) <= radius)
                total += 1
    return hits, total


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1000003 + int(epoch)) % (2 ** 31 - 1)


def _as_str(v) -> str:
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return _as_str(v.reshape(-1)[0]) if v.size else ""
    return str(v)


def _load_model_file(path, key, what: str):
    """(keras.Model, meta) from a bpnet model file (encrypted with ``key`` or plain)."""
    p = Path(path)
    if not p.exists():
        raise BpnetError(f"{what} {p}: file not found")
    from .model import io as mio
    try:
        return mio.load_model(str(p), key=key)
    except BpnetError:
        raise
    except Exception as e:  # zip/h5/JSON errors all mean an unreadable file
        raise BpnetError(f"{what} {p}: not a readable model file ({type(e).__name__}: {e})") from e


def _weighted_layers(model):
    """name -> layer for every layer with weights (nested models flattened)."""
    out = {}
    for layer in model.layers:
        if getattr(layer, "layers", None):
            out.update(_weighted_layers(layer))
        elif layer.weights:
            out[layer.name] = layer
    return out


def copy_weights_by_name(src, dst) -> dict:
    """Copy ``src``'s weights into ``dst`` layer by layer, matching layer names.

    Returns {"loaded": [names], "skipped": [(name, reason)], "missing": [names
    of dst layers with weights that src lacks]}. A layer is copied only when
    every one of its weights has the same shape; otherwise it keeps its
    initial values (e.g. output layers of a different pose config).
    """
    s_layers = _weighted_layers(src)
    loaded, skipped, missing = [], [], []
    for name, layer in _weighted_layers(dst).items():
        s = s_layers.get(name)
        if s is None:
            missing.append(name)
            continue
        sw, dw = s.get_weights(), layer.get_weights()
        if len(sw) != len(dw):
            skipped.append((name, f"{len(sw)} weights in the file, {len(dw)} in the model"))
            continue
        bad = [(a.shape, b.shape) for a, b in zip(sw, dw) if tuple(a.shape) != tuple(b.shape)]
        if bad:
            skipped.append((name, f"shape mismatch: file {bad[0][0]} vs model {bad[0][1]}"))
            continue
        layer.set_weights(sw)
        loaded.append(name)
    return {"loaded": loaded, "skipped": skipped, "missing": missing}


def _bn_layers(model):
    return [l for l in _all_layers(model) if l.__class__.__name__ == "BatchNormalization"]


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if getattr(layer, "layers", None):
            yield from _all_layers(layer)


def _set_bn_sync(model, on: bool):
    """Batch statistics over the global batch, so N replicas train like one device.

    Keras reads ``synchronized`` at call time (TensorFlow backend only).
    """
    for l in _bn_layers(model):
        l.synchronized = on


class _unsynced_bn:
    """Saved models never carry synchronized BN: other backends refuse to load it."""

    def __init__(self, model):
        self.layers = [l for l in _bn_layers(model) if getattr(l, "synchronized", False)]

    def __enter__(self):
        for l in self.layers:
            l.synchronized = False

    def __exit__(self, *exc):
        for l in self.layers:
            l.synchronized = True
        return False


def _clone_with_policy(model, policy: str):
    """A copy of a functional ``model`` whose layers compute in ``policy``, same weights.

    Layers the builder pinned to float32 (the outputs, whose squares the loss
    sums) stay float32 when switching to a mixed policy.
    """
    import keras

    pinned = {l.name for l in _all_layers(model)
              if getattr(getattr(l, "dtype_policy", None), "name", None) == "float32"
              and l.name in set(model.output_names)}

    def fix_layer(layer_cfg):
        cfg = layer_cfg.get("config", {})
        if layer_cfg.get("class_name") == "InputLayer" or (
                cfg.get("name") in pinned and policy != "float32"):
            return layer_cfg  # inputs carry a plain dtype, not a policy
        dt = cfg.get("dtype")
        if isinstance(dt, dict) and dt.get("class_name") == "DTypePolicy":
            cfg = {**cfg, "dtype": {**dt, "config": {**dt.get("config", {}), "name": policy}}}
        return {**layer_cfg, "config": cfg}

    config = model.get_config()
    config = {**config, "layers": [fix_layer(l) for l in config["layers"]]}
    clone = keras.Model.from_config(config)
    clone.set_weights(model.get_weights())
    return clone

"""Devices and workers: TF_CONFIG, the chief, the tf.distribute strategy, and
giving every worker the chief's starting point."""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import BpnetError


def tf_config() -> dict | None:
    """The parsed TF_CONFIG environment variable, or None when unset/empty."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BpnetError(f'TF_CONFIG is not valid JSON ({e.msg}); see "Several machines" '
                         "in docs/train.md for its format") from e
    if not isinstance(cfg, dict) or "cluster" not in cfg or "task" not in cfg:
        raise BpnetError("TF_CONFIG needs a 'cluster' and a 'task' entry, e.g. "
                         '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                         '"task": {"type": "worker", "index": 0}}')
    return cfg


def is_multi_worker(cfg: dict | None) -> bool:
    if not cfg:
        return False
    cluster = cfg.get("cluster", {})
    return sum(len(cluster.get(k, [])) for k in ("chief", "worker")) > 1


def is_chief(cfg: dict | None) -> bool:
    """True for the process that writes checkpoints, summaries and the final model."""
    if not is_multi_worker(cfg):
        return True
    task = cfg.get("task", {})
    if "chief" in cfg.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def worker_folder(cfg: dict | None) -> str | None:
    """The results subfolder of a worker that is not the chief (None for the chief)."""
    if is_chief(cfg):
        return None
    task = cfg.get("task", {})
    return f"{task.get('type', 'worker')}-{int(task.get('index', 0))}"


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


def distribute_dataset(strategy, ds, multi_worker: bool):
    """``ds`` split across the strategy's replicas (and, with several workers, across workers)."""
    import tensorflow as tf
    if multi_worker:
        opts = tf.data.Options()
        # Every worker reads all records with the same seed and keeps its share:
        # the record files are often fewer than the workers.
        opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        ds = ds.with_options(opts)
    return strategy.experimental_distribute_dataset(ds)


def sync_from_chief(strategy, chief: bool, variables, epoch: int, step: int):
    """Give every worker the chief's ``variables`` and position; returns (epoch, step).

    Workers read checkpoints from their own -r folder; if it is not a shared
    filesystem, theirs may differ from the chief's. One broadcast at the start
    keeps all replicas identical (the all-reduce keeps them so afterwards).
    """
    import tensorflow as tf
    weight = 1.0 if chief else 0.0
    pos = np.array([epoch, step], np.float64)
    variables = list(variables)

    @tf.function
    def bcast(pos_in):
        ctx = tf.distribute.get_replica_context()
        first = tf.cast(tf.equal(ctx.replica_id_in_sync_group, 0), tf.float64)
        w = weight * first
        out_pos = ctx.all_reduce(tf.distribute.ReduceOp.SUM, pos_in * w)
        for v in variables:
            val = tf.convert_to_tensor(v)
            mixed = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                   tf.cast(val, tf.float64) * w)
            v.assign(tf.cast(mixed, val.dtype))
        return out_pos

    out = strategy.run(bcast, args=(tf.constant(pos),))
    out = strategy.experimental_local_results(out)[0].numpy()
    return int(np.rint(out[0])), int(np.rint(out[1]))

#!/usr/bin/env python
"""Training throughput: images per second of bpnet's train step, and peak memory.

Prints ONE JSON line, e.g.
  python scripts/bench_train.py --model BpNetLiteModel --stages 3 --input 368 368 --batch 2
It times the real train step of ``bpnet train`` (bpnet.train.loop.make_train_step:
forward, masked L2 loss of every stage, regularization, backward, weighted
momentum SGD) on random inputs and labels of the right shapes, so the figure
is the network's cost without the input pipeline (see bench_pipeline.py for
that). Median of --steps timed steps after --warmup steps (tracing
included in the warm-up). --gpus N uses the same MirroredStrategy as
`bpnet train --gpus N`; --use_amp the same mixed precision.
peak_mem_mb: the GPU allocator's peak on a GPU, else the process's peak RSS.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="BpNetLiteModel", choices=["BpNetModel", "BpNetLiteModel"])
    ap.add_argument("--stages", type=int, default=None,
                    help="default: 6 for BpNetModel, 3 for BpNetLiteModel (TAO's tutorial)")
    ap.add_argument("--input", type=int, nargs=2, default=[368, 368], metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=2, help="batch per replica")
    ap.add_argument("--width_multiplier", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--use_amp", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from bpnet.model.weights import set_bn_sync
    from bpnet.train.distribute import make_strategy
    from bpnet.train.loop import make_train_step, stage_loss_fn
    strategy = make_strategy(args.gpus)

    import keras
    import numpy as np
    import tensorflow as tf

    from bpnet.model.build import build_model
    from bpnet.model.optimizer import make_optimizer
    from bpnet.pose import load_pose_config
    from bpnet.specs import (
        LossConfig,
        ModelConfig,
        OptimizerConfig,
        default_pose_config_path,
    )

    stages = args.stages or (6 if args.model == "BpNetModel" else 3)
    pose = load_pose_config(default_pose_config_path())
    cfg = ModelConfig(class_name=args.model, stages=stages, heat_channels=pose.heat_channels,
                      paf_channels=pose.paf_channels, width_multiplier=args.width_multiplier)
    keras.utils.set_random_seed(0)
    if args.use_amp:
        keras.mixed_precision.set_dtype_policy("mixed_float16")
    nrep = strategy.num_replicas_in_sync
    gb = args.batch * nrep
    with strategy.scope():
        model = build_model(cfg, pose, input_shape=(None, None, 3))
        if nrep > 1:
            set_bn_sync(model, True)
        opt = make_optimizer(OptimizerConfig(), model, 2e-5, True)
        if args.use_amp:
            opt = keras.optimizers.LossScaleOptimizer(opt)
        opt.build(model.trainable_variables)
    step = make_train_step(model, opt, stage_loss_fn(LossConfig(), stages), strategy, gb,
                           args.use_amp)

    H, W = args.input
    h, w = -(-H // 8), -(-W // 8)
    rng = np.random.default_rng(0)
    images = rng.uniform(-0.5, 0.5, (gb, H, W, 3)).astype(np.float32)
    labels = {"heatmap": rng.uniform(0, 1, (gb, h, w, pose.heat_channels)).astype(np.float32),
              "paf": rng.uniform(-1, 1, (gb, h, w, pose.paf_channels)).astype(np.float32),
              "mask": np.ones((gb, h, w, 1), np.float32)}
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat()
    it = iter(strategy.experimental_distribute_dataset(ds))

    for _ in range(args.warmup):
        float(step(next(it))[0])
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        float(step(next(it))[0])  # float() waits for the step to finish
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)

    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        peak = max(tf.config.experimental.get_memory_info(g.name)["peak"] for g in gpus) / 2 ** 20
        device = tf.config.experimental.get_device_details(
            tf.config.list_physical_devices("GPU")[0]).get("device_name", "GPU")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
        device = f"CPU ({platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores)"
    print(json.dumps({
        "model": f"{args.model} stages={stages}" + (f" width={args.width_multiplier}"
                                                     if args.width_multiplier != 1.0 else ""),
        "input": [H, W], "batch": gb, "backend": keras.backend.backend(), "device": device,
        "replicas": nrep, "amp": bool(args.use_amp), "params": int(model.count_params()),
        "step_s": round(med, 4), "img_per_s": round(gb / med, 3), "peak_mem_mb": round(peak, 1)}))


if __name__ == "__main__":
    main()

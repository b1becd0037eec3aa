"""Learning-rate schedules of the train spec (keras LearningRateSchedule subclasses).

Soft-start annealing (TAO's default), with progress p = step / total_steps:

    t = p / soft_start              while p < soft_start   (warm-up)
    t = 1                           while soft_start <= p < annealing
    t = (1 - p) / (1 - annealing)   once p >= annealing    (annealing)
    lr = exp(log(min_lr) + t * (log(base_lr) - log(min_lr)))

so the rate rises geometrically from min_lr to base_lr, stays there, and falls
geometrically back to min_lr at the last step (t is clipped to [0, 1]).

Exponential decay:

    lr = max(min_lr, lr0 * decay_rate ** (step / decay_steps)),
    decay_steps = decay_epochs * steps_per_epoch, the exponent floored
    when staircase is true.

TAO's class names: ``BpNetExponentialDecayLRSchedule`` (decay_epochs, as
above; TAO recomputes decay_steps from it), ``ExponentialDecayLearningRateSchedule``
(decay_steps when given, else decay_epochs) and ``ConstantLearningRateSchedule``
(learning_rate throughout; decay_rate 1).

Both are written with keras.ops so they run on any Keras backend, and both
serialize (get_config / registered) so checkpoints restore them.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from bpnet.errors import BpnetError


@keras.saving.register_keras_serializable(package="bpnet")
class SoftstartAnnealingLearningRateSchedule(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, base_learning_rate, min_learning_rate, soft_start, annealing,
                 total_steps, name="softstart_annealing"):
        super().__init__()
        if total_steps < 1:
            raise BpnetError(f"learning-rate schedule: total_steps must be >= 1, got {total_steps}")
        if not 0 < min_learning_rate <= base_learning_rate:
            raise BpnetError("learning-rate schedule: need 0 < min_learning_rate <= "
                             f"base_learning_rate, got {min_learning_rate} and {base_learning_rate}")
        if not 0.0 <= soft_start <= annealing <= 1.0:
            raise BpnetError("learning-rate schedule: need 0 <= soft_start <= annealing <= 1, "
                             f"got {soft_start} and {annealing}")
        self.base_learning_rate = float(base_learning_rate)
        self.min_learning_rate = float(min_learning_rate)
        self.soft_start = float(soft_start)
        self.annealing = float(annealing)
        self.total_steps = int(total_steps)
        self.name = name

    def __call__(self, step):
        p = ops.cast(step, "float32") / float(self.total_steps)
        one = ops.ones_like(p)
        if self.soft_start > 0:
            warm = p / self.soft_start
        else:
            warm = one
        if self.annealing < 1:
            anneal = (1.0 - p) / (1.0 - self.annealing)
        else:
            anneal = one
        t = ops.where(p < self.soft_start, warm, ops.where(p < self.annealing, one, anneal))
        t = ops.clip(t, 0.0, 1.0)
        log_min = math.log(self.min_learning_rate)
        log_base = math.log(self.base_learning_rate)
        return ops.exp(log_min + t * (log_base - log_min))

    def get_config(self):
        return {"base_learning_rate": self.base_learning_rate,
                "min_learning_rate": self.min_learning_rate,
                "soft_start": self.soft_start, "annealing": self.annealing,
                "total_steps": self.total_steps, "name": self.name}


@keras.saving.register_keras_serializable(package="bpnet")
class ExponentialDecayLearningRateSchedule(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, learning_rate, decay_steps, decay_rate, staircase=False,
                 min_learning_rate=0.0, name="exponential_decay"):
        super().__init__()
        if decay_steps <= 0:
            raise BpnetError(f"learning-rate schedule: decay steps must be > 0, got {decay_steps}")
        if learning_rate <= 0 or decay_rate <= 0:
            raise BpnetError("learning-rate schedule: learning_rate and decay_rate must be > 0")
        self.learning_rate = float(learning_rate)
        self.decay_steps = float(decay_steps)
        self.decay_rate = float(decay_rate)
        self.staircase = bool(staircase)
        self.min_learning_rate = float(min_learning_rate)
        self.name = name

    def __call__(self, step):
        e = ops.cast(step, "float32") / self.decay_steps
        if self.staircase:
            e = ops.floor(e)
        lr = self.learning_rate * ops.power(self.decay_rate, e)
        return ops.maximum(lr, self.min_learning_rate)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "decay_steps": self.decay_steps,
                "decay_rate": self.decay_rate, "staircase": self.staircase,
                "min_learning_rate": self.min_learning_rate, "name": self.name}


def make_schedule(sched_cfg, total_steps: int, steps_per_epoch: int, num_replicas: int = 1,
                  scale_by_replicas: bool = True):
    """The schedule of a train spec's ``optimizer.learning_rate_schedule``.

    TAO's rates are for one GPU; with ``scale_by_replicas`` the whole curve
    (base and minimum rates) is multiplied by the replica count, so its shape
    in log space stays the same.
    """
    k = float(num_replicas) if scale_by_replicas else 1.0
    cls = getattr(sched_cfg, "class_name", "SoftstartAnnealingLearningRateSchedule")
    if cls == "SoftstartAnnealingLearningRateSchedule":
        return SoftstartAnnealingLearningRateSchedule(
            sched_cfg.base_learning_rate * k, sched_cfg.min_learning_rate * k,
            sched_cfg.soft_start, sched_cfg.annealing, total_steps)
    if cls == "ConstantLearningRateSchedule":
        return ExponentialDecayLearningRateSchedule(
            sched_cfg.learning_rate * k, 1, 1.0, False, 0.0, name="constant")
    if cls == "ExponentialDecayLearningRateSchedule" and sched_cfg.decay_steps:
        return ExponentialDecayLearningRateSchedule(
            sched_cfg.learning_rate * k, sched_cfg.decay_steps, sched_cfg.decay_rate,
            sched_cfg.staircase, sched_cfg.min_learning_rate * k)
    if cls in ("ExponentialDecayLearningRateSchedule", "BpNetExponentialDecayLRSchedule"):
        if steps_per_epoch < 1:
            raise BpnetError(f"learning-rate schedule: steps_per_epoch must be >= 1, "
                             f"got {steps_per_epoch}")
        return ExponentialDecayLearningRateSchedule(
            sched_cfg.learning_rate * k, sched_cfg.decay_epochs * steps_per_epoch,
            sched_cfg.decay_rate, sched_cfg.staircase, sched_cfg.min_learning_rate * k)
    raise BpnetError(f"optimizer.learning_rate_schedule: unknown class {cls!r}")

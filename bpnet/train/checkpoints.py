"""Checkpoints of a training run: paths, listing, the state file, save, load and
pruning old ones.

A checkpoint of epoch N is two files in the results dir: ``model.epoch-N.keras``
(a complete bpnet model file, loadable by every later command) and
``model.epoch-N.state`` (optimizer variables, step, epoch and the run's
history, as an npz archive, encrypted like the model when a key is given).
Both are written atomically, the state first and the model last, so a model
file under its final name means the checkpoint is complete.
"""

from __future__ import annotations

import io as _io
import json
import logging
import re
from pathlib import Path

import numpy as np

from ..errors import BpnetError

log = logging.getLogger("bpnet.train")

CKPT_PREFIX = "model.epoch-"
CKPT_MODEL_SUFFIX = ".keras"
CKPT_STATE_SUFFIX = ".state"
_CKPT_RE = re.compile(r"^model\.epoch-(\d+)\.keras$")
STATE_FORMAT = "bpnet-train-state-1"


# ------------------------------------------------------------------ paths

def ckpt_model_path(results_dir, epoch: int) -> Path:
    return Path(results_dir) / f"{CKPT_PREFIX}{epoch}{CKPT_MODEL_SUFFIX}"


def ckpt_state_path(results_dir, epoch: int) -> Path:
    return Path(results_dir) / f"{CKPT_PREFIX}{epoch}{CKPT_STATE_SUFFIX}"


def list_checkpoints(results_dir) -> list[int]:
    """Epochs with a complete checkpoint (model and state file) in ``results_dir``, ascending."""
    d = Path(results_dir)
    if not d.is_dir():
        return []
    epochs = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and ckpt_state_path(d, int(m.group(1))).exists():
            epochs.append(int(m.group(1)))
    return sorted(epochs)


def prune_checkpoints(results_dir, keep: int):
    """Delete all but the newest ``keep`` complete checkpoints."""
    for old in list_checkpoints(results_dir)[:-keep]:
        for p in (ckpt_model_path(results_dir, old), ckpt_state_path(results_dir, old)):
            try:
                p.unlink()
            except OSError:
                pass


# ------------------------------------------------------------------ the state file

def encode_state(arrays: dict[str, np.ndarray], info: dict, key: str | None) -> bytes:
    from ..model import io as mio
    buf = _io.BytesIO()
    np.savez(buf, __info__=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8), **arrays)
    data = buf.getvalue()
    if key:
        # The model files' encryption: one key format for every file of a run.
        data = mio.encrypt_bytes(data, key)
    return data


def decode_state(data: bytes, key: str | None, source) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, info) of a state file's bytes."""
    from ..model import io as mio
    # Encrypted or plain, whatever the key: a run resumed with -k may have written plain files.
    if data.startswith(mio.ENC_MAGIC):
        data = mio.decrypt_bytes(data, key, source=str(source))
    with np.load(_io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    info = json.loads(arrays.pop("__info__").tobytes().decode())
    if info.get("format") != STATE_FORMAT:
        raise ValueError(f"unknown state format {info.get('format')!r}")
    return arrays, info


# ------------------------------------------------------------------ save

def save_model_file(model, path: Path, meta: dict, key: str | None, use_amp: bool):
    """Write ``model`` as saved models are: float32 layers, BN not synchronized
    (both are training-only settings)."""
    from ..model import io as mio
    from ..model.weights import clone_with_policy, unsynced_bn
    with unsynced_bn(model):
        m = clone_with_policy(model, "float32") if use_amp else model
        # save_model writes atomically (temp name + rename).
        mio.save_model(m, str(path), meta, key=key)


def save_checkpoint(results_dir: Path, epoch: int, step: int, model, optimizer, meta: dict, *,
                    run_info: dict, train_loss: float | None, val_history: list[dict],
                    key: str | None, use_amp: bool, keep: int):
    """Write the checkpoint of ``epoch``, then delete all but the newest ``keep``.

    ``run_info``: what the state file records of the run's settings (global
    batch, steps per epoch, ...); ``meta``: the model file's meta.
    """
    from ..io import write_bytes_atomic
    arrays = {f"opt_{i:05d}": np.asarray(v.numpy() if hasattr(v, "numpy") else v)
              for i, v in enumerate(optimizer.variables)}
    info = {"format": STATE_FORMAT, "epoch": epoch, "step": int(step), **run_info,
            "optimizer_variables": [v.path if hasattr(v, "path") else v.name
                                    for v in optimizer.variables],
            "train_loss": train_loss, "val_history": val_history}
    write_bytes_atomic(ckpt_state_path(results_dir, epoch), encode_state(arrays, info, key))
    save_model_file(model, ckpt_model_path(results_dir, epoch),
                    {**meta, "checkpoint": {"epoch": epoch, "step": int(step)}}, key, use_amp)
    log.info("checkpoint %s (epoch %d, step %d)", ckpt_model_path(results_dir, epoch).name,
             epoch, step)
    # Old checkpoints go only now that the new one is complete.
    prune_checkpoints(results_dir, keep)


# ------------------------------------------------------------------ load

def load_checkpoint(results_dir: Path, model_path: Path, state_path: Path | None,
                    epoch_hint: int, model, optimizer, key: str | None) -> dict | None:
    """Weights (and optimizer state when ``state_path`` exists) from a checkpoint into
    ``model`` and ``optimizer``; the state's info dict, or None without a state file.

    ``epoch_hint``: the checkpoint's epoch, to name an older one to fall back to
    when this one is damaged.
    """
    from ..model.weights import copy_weights_by_name, load_model_file
    prev = [e for e in list_checkpoints(results_dir) if e < epoch_hint]
    fallback = (f"delete {model_path.name} and {model_path.with_suffix(CKPT_STATE_SUFFIX).name} "
                f"to resume from epoch {prev[-1]}" if prev else
                "delete it to start over, or choose a new -r results dir")
    try:
        src, _meta = load_model_file(str(model_path), key, "checkpoint")
    except BpnetError as e:
        raise BpnetError(f"checkpoint {model_path} cannot be loaded: {e}; if it is damaged, "
                         f"{fallback}") from e
    report = copy_weights_by_name(src, model)
    if report["skipped"] or report["missing"]:
        bad = (report["skipped"] + [(n, "not in the checkpoint") for n in report["missing"]])[:3]
        raise BpnetError(f"checkpoint {model_path} does not match the model of the spec "
                         f"({'; '.join(f'{n}: {r}' for n, r in bad)}); use a new -r results dir "
                         "for a different model")
    if state_path is None or not state_path.exists():
        return None
    try:
        arrays, info = decode_state(state_path.read_bytes(), key, state_path)
    except BpnetError as e:
        raise BpnetError(f"checkpoint state {state_path} cannot be read: {e}") from e
    except Exception as e:  # zip, JSON, numpy errors all mean a damaged file
        raise BpnetError(f"checkpoint state {state_path} is damaged ({type(e).__name__}: {e}); "
                         f"{fallback}") from e
    values = [arrays[k] for k in sorted(arrays)]
    variables = list(optimizer.variables)
    if len(values) != len(variables) or any(
            tuple(v.shape) != tuple(a.shape) for v, a in zip(variables, values)):
        raise BpnetError(f"checkpoint state {state_path} holds {len(values)} optimizer variables "
                         f"that do not fit this run's {len(variables)}; the model or optimizer "
                         "settings changed: use a new -r results dir")
    for v, a in zip(variables, values):
        v.assign(a)
    return info

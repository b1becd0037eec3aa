"""Weights between models: loading a model file, copying weights by layer name,
the precision clone and the BatchNorm switches.

Training, ``import_model``, pruning and export all need these: a model file
loaded with one clear error, weights carried over where layer names and
shapes agree, a copy of a model computing in another precision, and the
BatchNorm settings that hold while training only.

Keras is imported inside the functions, never at module import.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..errors import BpnetError


def walk_layers(model) -> Iterator:
    """Every layer of ``model``, depth first; a nested model comes before its own layers."""
    for layer in model.layers:
        yield layer
        if getattr(layer, "layers", None):
            yield from walk_layers(layer)


def weighted_layers(model) -> dict[str, object]:
    """name -> layer for every layer that holds weights itself (nested models flattened)."""
    return {layer.name: layer for layer in walk_layers(model)
            if not getattr(layer, "layers", None) and layer.weights}


def bn_layers(model) -> list:
    return [layer for layer in walk_layers(model)
            if layer.__class__.__name__ == "BatchNormalization"]


def load_model_file(path, key, what: str):
    """(keras.Model, meta) from a bpnet model file (encrypted with ``key`` or plain).

    ``what`` names the file's role in messages ("pretrained_weights", "checkpoint").
    """
    from ..tao_files import checked_model_path
    p = Path(checked_model_path(path, what))
    if not p.exists():
        raise BpnetError(f"{what} {p}: file not found")
    if p.is_dir():
        raise BpnetError(f"{what} {p}: is a folder; give the model file (.keras)")
    from . import io as mio
    try:
        return mio.load_model(str(p), key=key)
    except BpnetError:
        raise
    except Exception as e:  # zip/h5/JSON errors all mean an unreadable file
        takes = ("; pretrained_weights takes a bpnet model file (.keras) or, for a VGG spec, "
                 "Keras' ImageNet VGG19 weights file (.h5)" if what == "pretrained_weights" else "")
        raise BpnetError(f"{what} {p}: not a readable model file "
                         f"({type(e).__name__}: {e}){takes}") from e


def copy_weights_by_name(src, dst) -> dict:
    """Copy ``src``'s weights into ``dst`` layer by layer, matching layer names.

    Returns {"loaded": [names], "skipped": [(name, reason)], "missing": [names
    of dst layers with weights that src lacks], "unused": [names of src layers
    with weights that dst lacks]}. A layer is copied only when every one of its
    weights has the same shape; otherwise it keeps its initial values (e.g.
    output layers of a different pose config).
    """
    s_layers = weighted_layers(src)
    loaded, skipped, missing = [], [], []
    for name, layer in weighted_layers(dst).items():
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
    d_names = set(weighted_layers(dst))
    unused = [name for name in s_layers if name not in d_names]
    return {"loaded": loaded, "skipped": skipped, "missing": missing, "unused": unused}


def clone_with_policy(model, policy: str):
    """A copy of a functional ``model`` whose layers compute in ``policy``, same weights.

    Layers the builder pinned to float32 (the outputs, whose squares the loss
    sums) stay float32 when switching to a mixed policy.
    """
    outputs = set(model.output_names)
    pinned = {layer.name for layer in walk_layers(model)
              if getattr(getattr(layer, "dtype_policy", None), "name", None) == "float32"
              and layer.name in outputs}

    def fix_layer(layer_cfg):
        cfg = layer_cfg.get("config", {})
        if layer_cfg.get("class_name") == "InputLayer" or (
                cfg.get("name") in pinned and policy != "float32"):
            return layer_cfg  # inputs carry a plain dtype, not a policy
        dt = cfg.get("dtype")
        if isinstance(dt, dict) and dt.get("class_name") == "DTypePolicy":
            cfg = {**cfg, "dtype": {**dt, "config": {**dt.get("config", {}), "name": policy}}}
        return {**layer_cfg, "config": cfg}

    return _clone(model, fix_layer)


def clone_with_regularizers(model, model_cfg):
    """A copy of a functional ``model`` regularized as the model section ``model_cfg`` says.

    Every kernel (conv, depthwise and pointwise) gets the section's kernel
    regularizer and every bias its bias regularizer, replacing what the file
    carried: a retrained (pruned) graph follows its train spec, as TAO's retrain does.
    """
    import keras

    from .layers import regularizers
    kernel, bias = (keras.regularizers.serialize(r) if r is not None else None
                    for r in regularizers(model_cfg))

    def fix_layer(layer_cfg):
        cfg = dict(layer_cfg.get("config", {}))
        for key in ("kernel_regularizer", "depthwise_regularizer", "pointwise_regularizer"):
            if key in cfg:
                cfg[key] = kernel
        if "bias_regularizer" in cfg:
            cfg["bias_regularizer"] = bias if cfg.get("use_bias", True) else None
        return {**layer_cfg, "config": cfg}

    return _clone(model, fix_layer)


def _clone(model, fix_layer):
    """``model`` rebuilt from its config with ``fix_layer`` applied to each layer's, same weights."""
    import keras
    config = model.get_config()
    config = {**config, "layers": [fix_layer(c) for c in config["layers"]]}
    clone = keras.Model.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def set_bn_sync(model, on: bool):
    """Batch statistics over the global batch, so N replicas train like one device.

    Keras reads ``synchronized`` at call time (TensorFlow backend only).
    """
    for layer in bn_layers(model):
        layer.synchronized = on


class unsynced_bn:
    """Context: BN layers not synchronized while a model is saved.

    Saved models never carry synchronized BN: other backends refuse to load it.
    """

    def __init__(self, model):
        self.layers = [layer for layer in bn_layers(model) if getattr(layer, "synchronized", False)]

    def __enter__(self):
        for layer in self.layers:
            layer.synchronized = False

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.synchronized = True
        return False

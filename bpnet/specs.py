"""Spec files as typed, validated dataclasses.

Every spec (train, inference, dataset, and the pose config) is read from
YAML or JSON with TAO's key names. Loading rejects unknown keys (with a
suggestion), wrong types and impossible values, naming the file and the
full key path. Fields marked as paths are resolved against the folder of
the spec file that names them.

TAO's ``__class_name__`` keys are accepted: where a section has variants
(model, loss, learning-rate schedule) they select one; elsewhere they are
checked against the section's own class name. Every key of TAO's schema is
accepted; one that bpnet cannot honour (``tao_field``) gets one warning
naming it when set to anything but TAO's default (docs/tao_compat.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import SpecError
from .io import read_mapping
from .model.build import MODEL_CLASSES
from .model.meta import DEFAULT_NORMALIZATION, STRIDE


def path_field(default=None, **kw):
    """A path, resolved against the folder of the spec file that names it."""
    return field(default=default, metadata={"path": True, **kw})


def choice_field(default, choices, **kw):
    return field(default=default, metadata={"choices": tuple(choices), **kw})


log = logging.getLogger("bpnet.specs")


def tao_field(default, ignored_unless, why: str, **kw):
    """A key of TAO's spec schema that bpnet accepts but cannot honour.

    ``ignored_unless(value)`` is true for the values that change nothing
    (TAO's defaults); any other value gets one warning naming the key and
    ``why``, never a refusal.
    """
    if callable(default):
        return field(default_factory=default,
                     metadata={"tao_unhonoured": (ignored_unless, why), **kw})
    return field(default=default, metadata={"tao_unhonoured": (ignored_unless, why), **kw})


_WARNED: set = set()


def _warn_once(source: str, kpath: str, why: str):
    if (source, kpath) in _WARNED:
        return
    _WARNED.add((source, kpath))
    log.warning("%s: %s: accepted for TAO compatibility but not honoured by bpnet: %s",
                source, kpath, why)


# ----------------------------------------------------------------- building

class _Ctx:
    def __init__(self, source: str, base_dir: Optional[Path]):
        self.source = source
        self.base_dir = base_dir

    def fail(self, where: str, msg: str):
        raise SpecError(f"{self.source}: {where}: {msg}" if where else f"{self.source}: {msg}")


def _typename(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_typename(a) for a in args) + " or null"
    if origin in (list, List):
        return f"list of {_typename(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return f"mapping of {_typename(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, where: str, ctx: _Ctx, is_path: bool):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        # An optional path written as "" (TAO's specs do) is unset, not the spec's folder.
        if value is None or (is_path and isinstance(value, str) and not value.strip()):
            return None
        return _convert(args[0], value, where, ctx, is_path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            ctx.fail(where, f"expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, where, ctx)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            ctx.fail(where, f"expected a list, got {type(value).__name__} {value!r}")
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v, f"{where}[{i}]", ctx, is_path) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            ctx.fail(where, f"expected a mapping, got {type(value).__name__} {value!r}")
        _, inner = typing.get_args(tp)
        return {str(k): _convert(inner, v, f"{where}.{k}", ctx, is_path) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            ctx.fail(where, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            ctx.fail(where, f"expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads 2.e-5 fine but "2e-5" as a string: accept that.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            ctx.fail(where, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            ctx.fail(where, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            ctx.fail(where, f"expected a string, got {type(value).__name__} {value!r}")
        if is_path:
            p = Path(value).expanduser()
            if not p.is_absolute() and ctx.base_dir is not None:
                p = ctx.base_dir / p
            return os.path.normpath(str(p))
        return value
    raise TypeError(f"unsupported spec type {tp}")  # a bug in the spec classes


def _build(cls, data: dict, where: str, ctx: _Ctx):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # A class whose files may spell a value in another place than its field
    # (TAO's top-level decoder keys) rewrites the mapping first.
    rewrite = getattr(cls, "_rewrite_mapping", None)
    if rewrite is not None:
        data = rewrite(data, where, ctx)
    aliases = getattr(cls, "KEY_ALIASES", ())
    kwargs = {}
    class_names = getattr(cls, "CLASS_NAMES", None)
    for key, value in data.items():
        kpath = f"{where}.{key}" if where else key
        if key == "__class_name__":
            if class_names is not None and value not in class_names:
                ctx.fail(kpath, f"unknown class {value!r}; choose one of {', '.join(class_names)}")
            if class_names is not None:
                kwargs["class_name"] = value
            continue
        if key not in fields or key == "class_name":
            known = list(fields) + list(aliases)
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; known keys: {', '.join(sorted(known))}"
            ctx.fail(kpath, f"unknown key{hint}")
        f = fields[key]
        conv = _convert(hints[key], value, kpath, ctx, f.metadata.get("path", False))
        choices = f.metadata.get("choices")
        if choices is not None and conv not in choices:
            ctx.fail(kpath, f"{conv!r} is not allowed; choose one of "
                     f"{', '.join('null' if c is None else repr(c) for c in choices)}")
        unhonoured = f.metadata.get("tao_unhonoured")
        if unhonoured is not None and not unhonoured[0](conv):
            _warn_once(ctx.source, kpath, unhonoured[1])
        kwargs[key] = conv
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        for bad_key, msg in check() or []:
            ctx.fail(f"{where}.{bad_key}" if where else bad_key, msg)
    return obj


def build_spec(cls, data: dict, source: str = "<dict>", base_dir=None):
    """Build spec class ``cls`` from a mapping (paths relative to base_dir)."""
    return _build(cls, data, "", _Ctx(source, Path(base_dir) if base_dir else None))


def load_spec(cls, path):
    path = Path(path)
    data = read_mapping(path)
    return build_spec(cls, data, str(path), path.resolve().parent)


def spec_to_dict(obj) -> dict:
    """Plain dict of a spec (for writing the spec a run used next to its outputs)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = "__class_name__" if f.name == "class_name" else f.name
        if dataclasses.is_dataclass(v):
            v = spec_to_dict(v)
        elif isinstance(v, list):
            v = [spec_to_dict(x) if dataclasses.is_dataclass(x) else x for x in v]
        out[key] = v
    return out


# Largest network input side (pixels) a spec may ask for: 4096, as for inference inputs
# (bpnet.infer.preprocess.MAX_NETWORK_SIDE); a 100000-pixel input would run for minutes.
MAX_INPUT_SIDE = 4096


def _too_large(values, bound: int, what: str = "sides"):
    return [] if max(values, default=0) <= bound else [
        f"{what} {list(values)} exceed the bound {bound}"]


def _positive(obj, names):
    return [(n, f"must be > 0, got {getattr(obj, n)}") for n in names if getattr(obj, n) <= 0]


# ================================================================ dataset spec

@dataclass
class DataSplit:
    images_root_dir_path: str = "images"
    mask_root_dir_path: str = "masks"
    annotation_root_dir_path: str = "annotations.json"


@dataclass
class DatasetCategory:
    supercategory: str = "person"
    id: int = 1
    name: str = "person"
    num_joints: int = 17
    keypoints: List[str] = field(default_factory=list)
    skeleton: List[List[int]] = field(default_factory=list)
    # TAO's key: the skeleton's limbs by joint name; checked against skeleton.
    skeleton_edge_names: Optional[List[List[str]]] = None

    def check(self):
        if not self.keypoints:
            return [("keypoints", "list the dataset's keypoint names in annotation order")]
        if self.num_joints != len(self.keypoints):
            return [("num_joints", f"is {self.num_joints} but {len(self.keypoints)} keypoints are listed")]
        if self.skeleton_edge_names is not None:
            msg = edge_names_mismatch(self.keypoints, self.skeleton, self.skeleton_edge_names)
            if msg:
                return [("skeleton_edge_names", msg)]
        return []


def edge_names_mismatch(keypoints, skeleton, edge_names):
    from .pose import edge_names_mismatch as check
    return check(keypoints, skeleton, edge_names)


@dataclass
class VisibilityValues:
    visible: int = 2
    occluded: int = 1
    not_labeled: int = 0


@dataclass
class VisibilityFlags:
    value: VisibilityValues = field(default_factory=VisibilityValues)
    # Which canonical state each named flag means (TAO's "mapping").
    mapping: Dict[str, str] = field(default_factory=lambda: {
        "visible": "visible", "occluded": "occluded", "not_labeled": "not_labeled"})

    def check(self):
        ok = {"visible", "occluded", "not_labeled"}
        for k, v in self.mapping.items():
            if k not in ok:
                return [(f"mapping.{k}", f"unknown flag; use {sorted(ok)}")]
            if v not in ok:
                return [(f"mapping.{k}", f"{v!r} is not one of {sorted(ok)}")]
        return []

    def table(self) -> Dict[int, int]:
        """Dataset visibility value -> canonical code (0, 1, 2)."""
        from .pose import NOT_LABELED, OCCLUDED, VISIBLE
        canon = {"visible": VISIBLE, "occluded": OCCLUDED, "not_labeled": NOT_LABELED}
        return {getattr(self.value, k): canon[self.mapping.get(k, k)] for k in canon}


@dataclass
class DataFilteringParams:
    min_acceptable_height: float = 32.0
    min_acceptable_width: float = 32.0
    min_acceptable_kpts: int = 5
    min_acceptable_interperson_dist_ratio: float = 0.3

    def check(self):
        bad = [(n, f"must be >= 0, got {getattr(self, n)}") for n in
               ("min_acceptable_height", "min_acceptable_width", "min_acceptable_kpts",
                "min_acceptable_interperson_dist_ratio") if getattr(self, n) < 0]
        return bad


@dataclass
class DatasetSpec:
    dataset: str = "coco"
    root_directory_path: str = path_field(".")
    train_data: Optional[DataSplit] = None
    test_data: Optional[DataSplit] = None
    duplicate_data_with_each_person_as_center: bool = True
    categories: List[DatasetCategory] = field(default_factory=list)
    visibility_flags: VisibilityFlags = field(default_factory=VisibilityFlags)
    data_filtering_params: DataFilteringParams = field(default_factory=DataFilteringParams)
    # bpnet extension: the model pose config the records are written for.
    # Default: the 18-joint COCO config shipped with bpnet.
    pose_config_path: Optional[str] = path_field(None)

    def check(self):
        if not self.categories:
            return [("categories", "list one category with its keypoints")]
        if len(self.categories) != 1:
            return [("categories", "exactly one (person) category is supported")]
        return []

    @property
    def category(self) -> DatasetCategory:
        return self.categories[0]

    def split(self, mode: str) -> DataSplit:
        key = {"train": "train_data", "test": "test_data"}[mode]
        s = getattr(self, key)
        if s is None:
            raise SpecError(f"the dataset spec has no {key} section (needed for mode {mode!r})")
        return s

    def split_paths(self, mode: str):
        """(images dir, masks dir, annotation file) of a split, as absolute Paths."""
        s = self.split(mode)
        root = Path(self.root_directory_path)
        return (root / s.images_root_dir_path, root / s.mask_root_dir_path,
                root / s.annotation_root_dir_path)

    def pose_config(self):
        from .pose import load_pose_config
        return load_pose_config(self.pose_config_path or default_pose_config_path())


def default_pose_config_path() -> Path:
    return Path(__file__).resolve().parent / "configs" / "bpnet_18joints.json"


def load_dataset_spec(path) -> DatasetSpec:
    return load_spec(DatasetSpec, path)


# ================================================================ train spec

@dataclass
class PoseConfigRef:
    target_shape: List[int] = field(default_factory=lambda: [32, 32])
    pose_config_path: str = path_field(None)

    def check(self):
        if len(self.target_shape) != 2 or min(self.target_shape) <= 0:
            return [("target_shape", f"must be [height, width] > 0, got {self.target_shape}")]
        return [("target_shape", m) for m in _too_large(
            self.target_shape, MAX_INPUT_SIDE // STRIDE, "label map sides")]

    def load(self):
        from .pose import load_pose_config
        return load_pose_config(self.pose_config_path or default_pose_config_path())


@dataclass
class ImageDims:
    height: int = 256
    width: int = 256
    channels: int = 3

    def check(self):
        out = _positive(self, ["height", "width"])
        out += [("height", m) for m in _too_large([self.height, self.width], MAX_INPUT_SIDE,
                                                   "height and width")]
        if self.channels not in (1, 3):
            out.append(("channels", f"must be 1 or 3, got {self.channels}"))
        return out


@dataclass
class ImageConfig:
    image_dims: ImageDims = field(default_factory=ImageDims)
    image_encoding: str = choice_field("jpg", ["jpg", "jpeg", "png"])


@dataclass
class DatasetConfig:
    root_data_path: str = path_field(".")
    train_records_folder_path: str = path_field(".")
    train_records_path: List[str] = field(default_factory=list)
    val_records_folder_path: Optional[str] = path_field(None)
    val_records_path: List[str] = field(default_factory=list)
    dataset_specs: Dict[str, str] = field(default_factory=dict, metadata={"path": True})


@dataclass
class NormalizationParams:
    image_scale: List[float] = field(
        default_factory=lambda: list(DEFAULT_NORMALIZATION["image_scale"]))
    image_offset: List[float] = field(
        default_factory=lambda: list(DEFAULT_NORMALIZATION["image_offset"]))
    mask_scale: List[float] = field(default_factory=lambda: [255.0])
    mask_offset: List[float] = field(default_factory=lambda: [0.0])

    def check(self):
        out = []
        for n in ("image_scale", "image_offset"):
            if len(getattr(self, n)) != 3:
                out.append((n, "needs 3 values (R, G, B)"))
        if any(s == 0 for s in self.image_scale):
            out.append(("image_scale", "scales must be non-zero"))
        for n in ("mask_scale", "mask_offset"):
            if len(getattr(self, n)) < 1:
                out.append((n, "needs one value"))
        if any(s == 0 for s in self.mask_scale):
            out.append(("mask_scale", "must be non-zero"))
        return out


@dataclass
class SpatialAugParams:
    flip_lr_prob: float = 0.0
    flip_tb_prob: float = 0.0
    rotate_deg_max: float = 0.0
    rotate_deg_min: Optional[float] = None  # None: -rotate_deg_max
    zoom_prob: float = 0.0
    zoom_ratio_min: float = 1.0
    zoom_ratio_max: float = 1.0
    translate_max_x: float = 0.0
    translate_min_x: Optional[float] = None
    translate_max_y: float = 0.0
    translate_min_y: Optional[float] = None
    use_translate_ratio: bool = False
    translate_ratio_max: float = 0.2
    translate_ratio_min: float = -0.2
    target_person_scale: float = 0.6

    def __post_init__(self):
        if self.rotate_deg_min is None:
            self.rotate_deg_min = -self.rotate_deg_max
        if self.translate_min_x is None:
            self.translate_min_x = -self.translate_max_x
        if self.translate_min_y is None:
            self.translate_min_y = -self.translate_max_y

    def check(self):
        out = []
        for n in ("flip_lr_prob", "flip_tb_prob", "zoom_prob"):
            if not 0.0 <= getattr(self, n) <= 1.0:
                out.append((n, f"is a probability: 0..1, got {getattr(self, n)}"))
        for lo, hi in (("rotate_deg_min", "rotate_deg_max"), ("zoom_ratio_min", "zoom_ratio_max"),
                       ("translate_min_x", "translate_max_x"), ("translate_min_y", "translate_max_y"),
                       ("translate_ratio_min", "translate_ratio_max")):
            if getattr(self, lo) > getattr(self, hi):
                out.append((lo, f"{getattr(self, lo)} is larger than {hi} {getattr(self, hi)}"))
        if self.zoom_ratio_min <= 0:
            out.append(("zoom_ratio_min", "must be > 0"))
        if self.target_person_scale <= 0:
            out.append(("target_person_scale", "must be > 0"))
        return out


AUGMENTATION_MODES = ("person_centric", "standard", "standard_with_fixed_aspect_ratio")


@dataclass
class AugmentationConfig:
    CLASS_NAMES = ("AugmentationConfig",)
    class_name: str = "AugmentationConfig"
    spatial_augmentation_mode: str = choice_field("person_centric", AUGMENTATION_MODES)
    spatial_aug_params: SpatialAugParams = field(default_factory=SpatialAugParams)
    identity_spatial_aug_params: Optional[Dict[str, Any]] = None
    # TAO's key; TAO builds no colour augmentation from it either.
    color_aug_params: Optional[Dict[str, Any]] = tao_field(
        None, lambda v: not v, "bpnet has no colour augmentation (TAO's is empty too)")


@dataclass
class LabelProcessorConfig:
    heatmap_gaussian_sigma: float = 7.0
    paf_ortho_dist_thresh: float = 1.0
    # TAO's key, never used there; bpnet uses it for nothing either but
    # accepts it so TAO specs load unchanged.
    paf_gaussian_sigma: float = 0.03

    def check(self):
        return _positive(self, ["heatmap_gaussian_sigma", "paf_ortho_dist_thresh"])


@dataclass
class DataloaderConfig:
    CLASS_NAMES = ("BpNetDataloader",)
    class_name: str = "BpNetDataloader"
    batch_size: int = 10
    shuffle_buffer_size: int = 20000
    num_parallel_calls: int = 0  # 0: one per core
    pose_config: PoseConfigRef = field(default_factory=PoseConfigRef)
    image_config: ImageConfig = field(default_factory=ImageConfig)
    dataset_config: DatasetConfig = field(default_factory=DatasetConfig)
    normalization_params: NormalizationParams = field(default_factory=NormalizationParams)
    augmentation_config: AugmentationConfig = field(default_factory=AugmentationConfig)
    label_processor_config: LabelProcessorConfig = field(default_factory=LabelProcessorConfig)

    def check(self):
        out = _positive(self, ["batch_size"])
        if self.shuffle_buffer_size < 0:
            out.append(("shuffle_buffer_size", "must be >= 0"))
        return out


@dataclass
class BackboneAttributes:
    architecture: str = choice_field("vgg", ["vgg", "mobilenet_v1"])
    nlayers: int = 19
    mtype: str = "default"
    use_bias: bool = False
    # TAO's keys. TAO adds the 128-channel reduction conv whatever this says,
    # and so does bpnet; use_batch_norm is read by TAO's helnet/resnet only.
    add_final_c128_conv: Optional[bool] = tao_field(
        None, lambda v: v is None or v,
        "the 128-channel reduction conv is always added (as TAO does, whatever the value)")
    use_batch_norm: Optional[bool] = tao_field(
        None, lambda v: v is None or v, "bpnet's backbones always use batch normalization")

    def check(self):
        if self.architecture == "vgg" and self.nlayers != 19:
            return [("nlayers", f"vgg supports nlayers 19, got {self.nlayers}")]
        return []


@dataclass
class ModelConfig:
    CLASS_NAMES = MODEL_CLASSES
    class_name: str = "BpNetLiteModel"
    backbone_attributes: BackboneAttributes = field(default_factory=BackboneAttributes)
    stages: int = 6
    heat_channels: int = 19
    paf_channels: int = 38
    use_self_attention: bool = False
    data_format: str = choice_field("channels_last", ["channels_last"])
    use_bias: bool = True
    regularization_type: str = choice_field("l2", ["l1", "l2", "l1_l2"])
    kernel_regularization_factor: float = 5e-4
    bias_regularization_factor: float = 0.0
    kernel_initializer: str = choice_field("random_normal", ["random_normal", "xavier"])
    # TAO's lite-model keys: per-stage kernel sizes (null: TAO's fixed ones, as bpnet builds).
    stage1_kernel_sizes: Optional[List[Any]] = tao_field(
        None, lambda v: v is None, "bpnet builds TAO's default kernel sizes for every stage")
    stageT_kernel_sizes: Optional[List[Any]] = tao_field(
        None, lambda v: v is None, "bpnet builds TAO's default kernel sizes for every stage")
    # bpnet extension: scales every convolution's width (1.0 = TAO's model);
    # small values make the tiny models used by tests and smoke runs.
    width_multiplier: float = 1.0

    def check(self):
        out = []
        if self.stages < 2:
            out.append(("stages", f"must be >= 2 (an initial stage plus refinements), got {self.stages}"))
        out += _positive(self, ["heat_channels", "paf_channels", "width_multiplier"])
        if self.paf_channels % 2:
            out.append(("paf_channels", f"must be even (x and y per limb), got {self.paf_channels}"))
        if min(self.kernel_regularization_factor, self.bias_regularization_factor) < 0:
            out.append(("kernel_regularization_factor", "regularization factors must be >= 0"))
        return out


@dataclass
class FocalLossParams:
    # TAO's switch: true selects the focal variant even under BpNetLoss.
    use_focal_loss: bool = False
    alpha: float = 0.1
    beta: float = 0.02
    bkg_thresh: float = 0.01
    gamma: float = 1.0


LOSS_NORMALIZATIONS = ("sum", "cells")


@dataclass
class LossConfig:
    CLASS_NAMES = ("BpNetLoss", "BpNetFocalLoss")
    class_name: str = "BpNetLoss"
    focal_loss_params: Optional[FocalLossParams] = field(default_factory=FocalLossParams)
    # bpnet extension. "sum" (TAO's): summed over map cells and channels, divided by
    # the batch. "cells": that, further divided by the label maps' cells h x w, so one
    # learning rate suits any input size (bpnet.model.loss).
    normalization: str = choice_field("sum", LOSS_NORMALIZATIONS)

    def __post_init__(self):
        if self.focal_loss_params is None:  # TAO's null: the plain loss
            self.focal_loss_params = FocalLossParams()

    @property
    def use_focal(self) -> bool:
        return self.class_name == "BpNetFocalLoss" or self.focal_loss_params.use_focal_loss


# TAO's class names: BpNetExponentialDecayLRSchedule counts decay in epochs
# (decay_epochs), its parent ExponentialDecayLearningRateSchedule in steps
# (decay_steps; bpnet's older files give decay_epochs there, still honoured).
LR_SCHEDULES = ("SoftstartAnnealingLearningRateSchedule", "ExponentialDecayLearningRateSchedule",
                "BpNetExponentialDecayLRSchedule", "ConstantLearningRateSchedule")


@dataclass
class LearningRateSchedule:
    CLASS_NAMES = LR_SCHEDULES
    class_name: str = "SoftstartAnnealingLearningRateSchedule"
    # soft-start annealing
    base_learning_rate: float = 2e-5
    min_learning_rate: float = 8e-8
    soft_start: float = 0.05
    annealing: float = 0.5
    # exponential decay
    learning_rate: float = 2e-5
    decay_epochs: float = 1.0
    decay_rate: float = 0.95
    staircase: bool = False
    # TAO's decay in steps (ExponentialDecayLearningRateSchedule); for
    # BpNetExponentialDecayLRSchedule TAO recomputes it from decay_epochs.
    decay_steps: Optional[int] = None
    # TAO's key: the last step of the schedule. TAO's trainer overwrites it
    # with num_epoch x steps per epoch; bpnet spans the run the same way.
    last_step: Optional[int] = tao_field(
        None, lambda v: v is None,
        "the schedule spans the run (num_epoch x steps per epoch), as TAO's trainer sets it")

    def check(self):
        out = _positive(self, ["base_learning_rate", "min_learning_rate", "learning_rate",
                               "decay_epochs", "decay_rate"])
        if self.decay_steps is not None and self.decay_steps <= 0:
            out.append(("decay_steps", f"must be > 0, got {self.decay_steps}"))
        if not 0.0 <= self.soft_start < self.annealing <= 1.0:
            out.append(("soft_start", f"need 0 <= soft_start < annealing <= 1, got "
                        f"{self.soft_start} and {self.annealing}"))
        if self.min_learning_rate > self.base_learning_rate:
            out.append(("min_learning_rate", "is larger than base_learning_rate"))
        return out


OPTIMIZER_CLASSES = ("WeightedMomentumOptimizer", "AdamOptimizer", "AdamWOptimizer")
ADAM_CLASSES = ("AdamOptimizer", "AdamWOptimizer")
# The Adam keys' defaults (Keras' Adam; weight_decay is AdamW's decoupled decay).
ADAM_DEFAULTS = {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7, "weight_decay": 1e-4}


@dataclass
class OptimizerConfig:
    CLASS_NAMES = OPTIMIZER_CLASSES
    class_name: str = "WeightedMomentumOptimizer"
    # Momentum SGD's (WeightedMomentumOptimizer); the Adam classes' momentum is beta_1.
    momentum: float = 0.9
    use_nesterov: bool = False
    learning_rate_schedule: LearningRateSchedule = field(default_factory=LearningRateSchedule)
    # TAO's per-variable gradient weights: {variable name: weight}, over the
    # stagewise multipliers (TAO's trainer drops this dict; bpnet honours it),
    # and the weight of every variable that has none (TAO's meaning). For the
    # Adam classes they multiply the variable's learning rate.
    grad_weights_dict: Optional[Dict[str, float]] = None
    weight_default_value: float = 1.0
    # TAO's base learning rate is for one GPU; scale it by the replica count.
    scale_learning_rate_by_replicas: bool = True
    # bpnet extensions. AdamOptimizer / AdamWOptimizer only (null: ADAM_DEFAULTS).
    beta_1: Optional[float] = None
    beta_2: Optional[float] = None
    epsilon: Optional[float] = None
    weight_decay: Optional[float] = None  # AdamWOptimizer only: decoupled, on kernels
    # Every class: clip the global batch's gradient to this global L2 norm (null or 0: off).
    gradient_clip_norm: Optional[float] = None

    def adam_settings(self) -> dict:
        """beta_1, beta_2, epsilon and weight_decay, the defaults filled in."""
        return {k: d if getattr(self, k) is None else getattr(self, k)
                for k, d in ADAM_DEFAULTS.items()}

    @property
    def clip_norm(self) -> Optional[float]:
        """The clipping bound, or None when clipping is off."""
        return self.gradient_clip_norm or None

    def check(self):
        if not 0.0 <= self.momentum < 1.0:
            return [("momentum", f"must be in [0, 1), got {self.momentum}")]
        if self.weight_default_value < 0:
            return [("weight_default_value", f"must be >= 0, got {self.weight_default_value}")]
        if self.gradient_clip_norm is not None and self.gradient_clip_norm < 0:
            return [("gradient_clip_norm", f"must be > 0 (or 0 / null: no clipping), got "
                     f"{self.gradient_clip_norm}")]
        adam = self.class_name in ADAM_CLASSES
        for key in ("beta_1", "beta_2", "epsilon", "weight_decay"):
            if getattr(self, key) is not None and not adam:
                return [(key, f"is a key of AdamOptimizer and AdamWOptimizer, not of "
                         f"{self.class_name}; set __class_name__ or drop the key")]
        if self.weight_decay is not None and self.class_name != "AdamWOptimizer":
            return [("weight_decay", "is AdamWOptimizer's key (decoupled weight decay); "
                     "use __class_name__: AdamWOptimizer, or for an L2 penalty "
                     "model.kernel_regularization_factor")]
        if self.use_nesterov and adam:
            return [("use_nesterov", f"is momentum SGD's key; {self.class_name} has no "
                     "Nesterov variant")]
        a = self.adam_settings()
        for key in ("beta_1", "beta_2"):
            if not 0.0 <= a[key] < 1.0:
                return [(key, f"must be in [0, 1), got {a[key]}")]
        if a["epsilon"] <= 0:
            return [("epsilon", f"must be > 0, got {a['epsilon']}")]
        if a["weight_decay"] < 0:
            return [("weight_decay", f"must be >= 0, got {a['weight_decay']}")]
        return []


@dataclass
class FinetuningConfig:
    is_finetune_exp: bool = False
    checkpoint_path: Optional[str] = path_field(None)
    ckpt_epoch_num: int = 0


@dataclass
class TrainSpec:
    CLASS_NAMES = ("BpNetTrainer",)
    class_name: str = "BpNetTrainer"
    checkpoint_dir: Optional[str] = path_field(None)
    checkpoint_n_epoch: int = 1
    num_epoch: int = 2
    random_seed: int = 42
    pretrained_weights: Optional[str] = path_field(None)
    load_graph: bool = False
    use_stagewise_lr_multipliers: bool = False
    finetuning_config: FinetuningConfig = field(default_factory=FinetuningConfig)
    inference_spec: Optional[str] = path_field(None)
    final_model_name: str = "bpnet_model"
    log_every_n_secs: int = 30
    summary_every_n_steps: int = 20
    # TAO's key (0: off, TAO's shipped value).
    infrequent_summary_every_n_steps: int = tao_field(
        0, lambda v: v == 0, "bpnet writes no infrequent (image) summaries; scalars follow "
        "summary_every_n_steps")
    infer_every_n_epoch: Optional[int] = None
    validation_every_n_epoch: int = 1
    # bpnet extension: COCO keypoint AP at every validation on at most this many images of
    # the val split's ground truth (the first by image id; null: all; 0: AP off).
    validation_ap_max_images: Optional[int] = 500
    max_ckpt_to_keep: int = 5
    steps_per_epoch: Optional[int] = None  # bpnet extension; None: one pass over the records
    dataloader: DataloaderConfig = field(default_factory=DataloaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def check(self):
        out = _positive(self, ["num_epoch", "checkpoint_n_epoch", "validation_every_n_epoch",
                               "max_ckpt_to_keep"])
        if out:
            return out
        if self.num_epoch % self.checkpoint_n_epoch:
            out.append(("checkpoint_n_epoch", f"{self.checkpoint_n_epoch} does not divide "
                        f"num_epoch {self.num_epoch}"))
        dims = self.dataloader.image_config.image_dims
        th, tw = self.dataloader.pose_config.target_shape
        if dims.height % STRIDE or dims.width % STRIDE:
            fit = [max(STRIDE, round(v / STRIDE) * STRIDE) for v in (dims.height, dims.width)]
            out.append(("dataloader.image_config.image_dims",
                        f"{[dims.height, dims.width]} must be multiples of the stride {STRIDE} "
                        f"(e.g. {fit}, with target_shape {[v // STRIDE for v in fit]})"))
        elif (th * STRIDE, tw * STRIDE) != (dims.height, dims.width):
            out.append(("dataloader.pose_config.target_shape",
                        f"{[th, tw]} x stride {STRIDE} = {[th * STRIDE, tw * STRIDE]} "
                        f"does not match image_dims {[dims.height, dims.width]}; use "
                        f"{[dims.height // STRIDE, dims.width // STRIDE]}"))
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            out.append(("steps_per_epoch", "must be > 0"))
        if self.validation_ap_max_images is not None and self.validation_ap_max_images < 0:
            out.append(("validation_ap_max_images", "must be >= 0 (0: no validation AP; "
                        "null: every image)"))
        return out


def load_train_spec(path) -> TrainSpec:
    return load_spec(TrainSpec, path)


# ================================================================ inference spec

REFINE_MODES = ("gaussian", "quadratic", "none")


@dataclass
class DecoderConfig:
    """Every setting of the decoder (``bpnet.infer.decode``), with its defaults.

    The inference spec's ``decoder:`` section; ``decode()`` takes one as it
    is. Lengths are in map cells. ``min_parts`` defaults to 4 as TAO filters;
    3 keeps more of COCO's many small people (what the decoder benchmark uses).
    """

    heatmap_threshold: float = 0.1  # the least peak value
    paf_threshold: float = 0.05  # the least PAF projection for a limb sample to pass
    refine: str = "gaussian"  # sub-cell peak fit: "gaussian", "quadratic" or "none"
    min_pass_fraction: float = 0.8  # of a limb's samples that must pass paf_threshold
    min_samples: int = 4  # samples per limb, at least ...
    max_samples: int = 20  # ... and at most
    max_limb_length: Optional[float] = None  # None: the maps' larger side
    length_weight: float = 1e-6  # ties between limbs go to the shorter one
    min_parts: int = 4  # people with fewer joints need small_person_score
    min_person_score: float = 0.4  # the least mean joint and limb score of a person
    small_person_score: float = 0.8  # the same for people under min_parts joints
    completeness: float = 3.0  # ranking score = mean score * (1 - exp(-joints / completeness))
    merge_max_hops: int = 4  # fragments are merged through joints at most this many limbs apart
    merge_ratio: float = 1.0  # ... within merge_ratio x hops x mean limb length (0: no merging)
    max_peaks: int = 128  # per joint, the strongest kept (0: all)

    def check(self):
        out = []
        if not 0 <= self.heatmap_threshold < 1:
            out.append(("heatmap_threshold", "must be in [0, 1)"))
        if not -1 <= self.paf_threshold < 1:
            out.append(("paf_threshold", "must be in [-1, 1)"))
        if self.refine not in REFINE_MODES:
            choices = ", ".join(map(repr, REFINE_MODES))
            out.append(("refine", f"must be one of {choices}, got {self.refine!r}"))
        if not 0 <= self.min_pass_fraction <= 1:
            out.append(("min_pass_fraction", "must be in [0, 1]"))
        if self.min_samples < 1:
            out.append(("min_samples", "must be >= 1"))
        if self.max_samples < self.min_samples:
            out.append(("max_samples", f"must be >= min_samples {self.min_samples}"))
        if self.max_limb_length is not None and self.max_limb_length <= 0:
            out.append(("max_limb_length", "must be > 0 (or null for the maps' larger side)"))
        if self.min_parts < 1:
            out.append(("min_parts", "must be >= 1"))
        if self.completeness <= 0:
            out.append(("completeness", "must be > 0"))
        if self.merge_max_hops < 1:
            out.append(("merge_max_hops", "must be >= 1"))
        for name in ("length_weight", "merge_ratio", "max_peaks"):
            if getattr(self, name) < 0:
                out.append((name, "must be >= 0"))
        return out


# TAO's inference spec keeps these at the top level; there they set the
# decoder's values, so a TAO spec loads unchanged.
TAO_DECODER_KEYS = ("heatmap_threshold", "paf_threshold")
# bpnet's own older top-level keys, now in the decoder section only.
MOVED_TO_DECODER = ("min_parts", "min_person_score")


@dataclass
class InferenceSpec:
    KEY_ALIASES = TAO_DECODER_KEYS

    model_path: Optional[str] = path_field(None)
    train_spec: Optional[str] = path_field(None)
    input_shape: List[int] = field(default_factory=lambda: [368, 368])
    keep_aspect_ratio_mode: Optional[str] = choice_field(
        "adjust_network_input", ["adjust_network_input", "pad_image_input", None])
    output_stage_to_use: Optional[int] = None
    output_upsampling_factor: List[int] = field(default_factory=lambda: [8, 8])
    multi_scale_inference: bool = False
    scales: List[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    # bpnet extensions
    flip_test: bool = False  # also run the mirrored image and average maps
    # What runs the network (bpnet.infer.runners.RUNTIMES); --runtime overrides it.
    runtime: str = choice_field("auto", ["auto", "keras", "onnxruntime", "openvino", "tensorrt"])
    # OpenVINO only: bf16 computes the float layers in bfloat16 on CPUs that have it
    # (AVX512-BF16, AMX): 1.7-1.9x faster, the maps move a little; --inference_precision
    # overrides it.
    inference_precision: str = choice_field("f32", ["f32", "bf16"])
    # OpenVINO only: network calls in flight at once in video and folder runs (2 on a 2-core
    # CPU: 0-18 % more frames per second, each frame slower); --streams overrides it.
    streams: int = 1
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    @staticmethod
    def _rewrite_mapping(data: dict, where: str, ctx: _Ctx) -> dict:
        """Move TAO's top-level decoder keys into the decoder section."""
        def at(key):
            return f"{where}.{key}" if where else key

        for key in MOVED_TO_DECODER:
            if key in data:
                ctx.fail(at(key), f"has moved into the decoder section; write it as "
                         f"decoder: {{{key}: {data[key]}}}")
        given = [k for k in TAO_DECODER_KEYS if k in data]
        if not given:
            return data
        data = dict(data)
        section = data.get("decoder", {})
        if not isinstance(section, dict):
            ctx.fail(at("decoder"), f"expected a mapping, got {type(section).__name__} {section!r}")
        section = dict(section)
        for key in given:
            value = _convert(float, data.pop(key), at(key), ctx, False)
            # Checked here so that a bad value is reported where it was written.
            for _, msg in DecoderConfig(**{key: value}).check():
                ctx.fail(at(key), msg)
            if key in section:
                inner = _convert(float, section[key], at(f"decoder.{key}"), ctx, False)
                if inner != value:
                    ctx.fail(at(key), f"is {value} but decoder.{key} is {inner}; set it in "
                             "one place")
            section[key] = value
        data["decoder"] = section
        return data

    def check(self):
        out = []
        if len(self.input_shape) != 2 or min(self.input_shape) < 8:
            out.append(("input_shape", f"must be [height, width] >= 8, got {self.input_shape}"))
        else:
            out += [("input_shape", m) for m in _too_large(self.input_shape, MAX_INPUT_SIDE)]
            if not out and self.multi_scale_inference and self.scales and \
                    max(self.scales) * max(self.input_shape) > MAX_INPUT_SIDE:
                out.append(("scales", f"{max(self.scales)} x input_shape {self.input_shape} "
                            f"= {max(self.scales) * max(self.input_shape):g} pixels exceeds "
                            f"the bound {MAX_INPUT_SIDE}"))
        if self.output_stage_to_use is not None and self.output_stage_to_use < 1:
            out.append(("output_stage_to_use", "is 1-based (1 = first stage) or null for the last"))
        if not self.scales or min(self.scales) <= 0:
            out.append(("scales", "must be a non-empty list of positive factors"))
        if not 1 <= self.streams <= 16:
            out.append(("streams", f"must be 1 to 16 network calls in flight, got {self.streams}"))
        return out


def load_inference_spec(path) -> InferenceSpec:
    return load_spec(InferenceSpec, path)

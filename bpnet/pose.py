"""Pose configs: the single source of truth for joints, limbs and flips.

A pose config file (JSON or YAML) names the model's joints in order and its
limbs (``skeleton``, 1-based joint ids, in PAF channel order: limb k uses PAF
channels 2k and 2k+1, x then y). Dataset keypoints are mapped onto model
joints by name; a model joint that the dataset lacks must be declared in
``synthetic_joints`` as the midpoint of two dataset joints (COCO's neck is
the midpoint of the shoulders), and is labeled only when both are labeled.

Flip pairs come from ``flip_pairs`` when given, else from names: every
``left_*`` joint pairs with its ``right_*`` twin.

TAO's own format loads too: ``{"pose_config_type": NAME, "categories":
[{"name": "person", "num_joints", "keypoints", "skeleton",
"skeleton_edge_names", ...}]}``. TAO declares no synthetic joint: a model
joint named ``neck`` that a dataset lacks is the midpoint of the
``left_shoulder`` and ``right_shoulder`` (only when both are labeled), and
bpnet reads TAO's file the same way. Both formats of one topology are the
same topology: records and models carry the topology's identity
(``PoseConfig.record_tag``), not the file's spelling of the name.

Plain NumPy: no TensorFlow import here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import BpnetError
from .io import read_mapping

# Canonical visibility codes inside bpnet (COCO's): 0 not labeled,
# 1 labeled but occluded, 2 labeled and visible.
NOT_LABELED, OCCLUDED, VISIBLE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class PoseConfig:
    name: str
    keypoints: Tuple[str, ...]
    skeleton: Tuple[Tuple[int, int], ...]  # 0-based joint index pairs, PAF order
    synthetic_joints: Dict[str, Tuple[str, str]]
    flip_pairs: Tuple[Tuple[int, int], ...]  # 0-based
    # Limbs that may not start a new person during assembly (eye-ear).
    no_start_limbs: Tuple[int, ...] = ()

    @property
    def num_joints(self) -> int:
        return len(self.keypoints)

    @property
    def num_edges(self) -> int:
        return len(self.skeleton)

    @property
    def heat_channels(self) -> int:
        return self.num_joints + 1  # + background

    @property
    def paf_channels(self) -> int:
        return 2 * self.num_edges

    def flip_permutation(self) -> np.ndarray:
        """Joint index permutation applied by a horizontal flip."""
        perm = np.arange(self.num_joints)
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm

    def edge_flip(self) -> Tuple[np.ndarray, np.ndarray]:
        """For a horizontal flip: (edge permutation, per-edge reversal flag).

        After flipping, limb k of the flipped image corresponds to limb
        perm[k] of the original; if that limb runs the other way round
        (joint order swapped), its vector is negated.
        """
        jp = self.flip_permutation()
        index = {e: i for i, e in enumerate(self.skeleton)}
        perm = np.zeros(self.num_edges, dtype=np.int64)
        rev = np.zeros(self.num_edges, dtype=bool)
        for k, (a, b) in enumerate(self.skeleton):
            fa, fb = int(jp[a]), int(jp[b])
            if (fa, fb) in index:
                perm[k] = index[(fa, fb)]
            elif (fb, fa) in index:
                perm[k] = index[(fb, fa)]
                rev[k] = True
            else:
                raise BpnetError(
                    f"pose config {self.name!r}: limb {self.keypoints[a]}-{self.keypoints[b]} "
                    "has no mirror limb; add it to the skeleton or fix flip_pairs")
        return perm, rev

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "keypoints": list(self.keypoints),
            "skeleton": [[a + 1, b + 1] for a, b in self.skeleton],
            "synthetic_joints": {k: list(v) for k, v in self.synthetic_joints.items()},
            "flip_pairs": [[a + 1, b + 1] for a, b in self.flip_pairs],
            "no_start_limbs": [k + 1 for k in self.no_start_limbs],
        }

    @property
    def topology_id(self) -> str:
        """A short hash of the joint names and limbs in order: what labels and outputs depend on."""
        text = json.dumps([list(self.keypoints), [list(e) for e in self.skeleton]])
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]

    @property
    def record_tag(self) -> str:
        """What records name their pose config by: ``name@topology_id``."""
        return f"{self.name}@{self.topology_id}"

    def matches_record(self, tag: str) -> bool:
        """Whether records tagged ``tag`` were written for this topology.

        A ``name@id`` tag compares the topology; an older tag with the name
        alone compares names, where bpnet's and TAO's names of the shipped
        18-joint config count as one.
        """
        if not tag:
            return True
        if "@" in tag:
            return tag.rsplit("@", 1)[1] == self.topology_id
        if tag == self.name:
            return True
        return tag in SHIPPED_18_NAMES and self.topology_id == shipped_18_topology_id()

    def dataset_mapping(self, dataset_keypoints: Sequence[str]) -> "KeypointMapping":
        """How to build this config's joints from a dataset's keypoints."""
        return KeypointMapping.build(self, dataset_keypoints)


def _derive_flip_pairs(names: Sequence[str]) -> List[Tuple[int, int]]:
    index = {n: i for i, n in enumerate(names)}
    pairs = []
    for i, n in enumerate(names):
        if n.startswith("left_"):
            twin = "right_" + n[len("left_"):]
            if twin in index:
                pairs.append((i, index[twin]))
    return pairs


# bpnet's and TAO's names of the 18-joint config bpnet ships (bpnet/configs).
SHIPPED_18_NAMES = ("bpnet_18joints", "bpnet_18_joints")
TAO_CATEGORY_KEYS = {"supercategory", "id", "name", "num_joints", "keypoints", "skeleton",
                     "skeleton_edge_names"}
# bpnet's keys that may sit beside TAO's at the top level of a TAO-format file.
BPNET_EXTRA_KEYS = ("synthetic_joints", "flip_pairs", "no_start_limbs")
# TAO's implicit rule: the neck is the midpoint of the shoulders.
TAO_NECK = ("neck", ("left_shoulder", "right_shoulder"))


def edge_names_mismatch(keypoints, skeleton, edge_names) -> Optional[str]:
    """Why TAO's ``skeleton_edge_names`` disagree with the 1-based ``skeleton``, or None."""
    if len(edge_names) != len(skeleton):
        return f"lists {len(edge_names)} limbs but skeleton has {len(skeleton)}"
    for i, (pair, names) in enumerate(zip(skeleton, edge_names)):
        if not isinstance(names, (list, tuple)) or len(names) != 2 \
                or not isinstance(pair, (list, tuple)) or len(pair) != 2:
            return f"[{i}] must be a pair of joint names, got {names!r}"
        for n in names:
            if n not in keypoints:
                return f"[{i}]: {n!r} is not one of the keypoints"
        ids = [list(keypoints).index(n) + 1 for n in names]
        if ids != list(pair):
            return (f"[{i}] = {list(names)} is limb {ids} but skeleton[{i}] is {list(pair)}; "
                    "the two lists must name the same limbs in the same order")
    return None


@functools.lru_cache(maxsize=1)
def shipped_18_topology_id() -> str:
    path = Path(__file__).resolve().parent / "configs" / "bpnet_18joints.json"
    return load_pose_config(path).topology_id


def is_tao_format(d) -> bool:
    return isinstance(d, dict) and ("pose_config_type" in d or "categories" in d)


def _from_tao_format(d: dict, source: str) -> dict:
    """TAO's pose-config layout -> bpnet's (the same joints, limbs and name)."""
    def fail(msg):
        raise BpnetError(f"{source}: {msg}")

    allowed = {"pose_config_type", "categories", *BPNET_EXTRA_KEYS}
    for k in d:
        if k not in allowed:
            import difflib
            near = difflib.get_close_matches(k, sorted(allowed), n=1)
            fail(f"unknown key {k!r} of TAO's pose-config format"
                 + (f" (did you mean {near[0]!r}?)" if near else ""))
    cats = d.get("categories")
    if not isinstance(cats, list) or not cats or not all(isinstance(c, dict) for c in cats):
        fail("'categories' must list the person category (TAO's format)")
    people = [c for c in cats if c.get("name") == "person"]
    if not people:
        fail("'categories' has no category named 'person' (TAO reads that one)")
    cat = people[0]
    for k in cat:
        if k not in TAO_CATEGORY_KEYS:
            import difflib
            near = difflib.get_close_matches(k, sorted(TAO_CATEGORY_KEYS), n=1)
            fail(f"categories[person]: unknown key {k!r}"
                 + (f" (did you mean {near[0]!r}?)" if near else ""))
    out = {"name": str(d.get("pose_config_type") or Path(source).stem)}
    for k in ("keypoints", "skeleton", "num_joints"):
        if k in cat:
            out[k] = cat[k]
    names = cat.get("keypoints")
    edge_names = cat.get("skeleton_edge_names")
    if edge_names is not None and isinstance(names, list) and isinstance(cat.get("skeleton"), list):
        if not isinstance(edge_names, list):
            fail("categories[person].skeleton_edge_names must be a list of joint-name pairs")
        msg = edge_names_mismatch(names, cat["skeleton"], edge_names)
        if msg:
            fail(f"categories[person].skeleton_edge_names {msg}")
    for k in BPNET_EXTRA_KEYS:
        if k in d:
            out[k] = d[k]
    if "synthetic_joints" not in out and isinstance(names, list) and TAO_NECK[0] in names:
        out["synthetic_joints"] = {TAO_NECK[0]: list(TAO_NECK[1])}
    return out


def pose_config_from_dict(d: dict, source: str = "<dict>") -> PoseConfig:
    def fail(msg):
        raise BpnetError(f"{source}: {msg}")

    if not isinstance(d, dict):
        fail("a pose config must be a mapping")
    if is_tao_format(d):
        d = _from_tao_format(d, source)
    allowed = {"name", "keypoints", "skeleton", "synthetic_joints", "flip_pairs",
               "no_start_limbs", "num_joints"}
    for k in d:
        if k not in allowed:
            import difflib
            near = difflib.get_close_matches(k, sorted(allowed), n=1)
            fail(f"unknown key {k!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    names = d.get("keypoints")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        fail("'keypoints' must be a non-empty list of joint names")
    if len(set(names)) != len(names):
        fail("'keypoints' has duplicate names")
    if "num_joints" in d and d["num_joints"] != len(names):
        fail(f"'num_joints' is {d['num_joints']} but {len(names)} keypoints are listed")
    n = len(names)

    def pairs(key, required):
        raw = d.get(key)
        if raw is None:
            if required:
                fail(f"'{key}' is required")
            return None
        out = []
        for i, p in enumerate(raw):
            if (not isinstance(p, (list, tuple)) or len(p) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in p)):
                fail(f"'{key}[{i}]' must be a pair of 1-based joint ids, got {p!r}")
            if not all(1 <= x <= n for x in p) or p[0] == p[1]:
                fail(f"'{key}[{i}]' = {p!r}: joint ids must be distinct and in 1..{n}")
            out.append((p[0] - 1, p[1] - 1))
        return out

    skeleton = pairs("skeleton", True)
    if not skeleton:
        fail("'skeleton' must list at least one limb")
    if len(set(skeleton)) != len(skeleton):
        fail("'skeleton' has duplicate limbs")
    flips = pairs("flip_pairs", False)
    if flips is None:
        flips = _derive_flip_pairs(names)
    synth_raw = d.get("synthetic_joints") or {}
    if not isinstance(synth_raw, dict):
        fail("'synthetic_joints' must map a joint name to [joint_a, joint_b]")
    synth = {}
    for k, v in synth_raw.items():
        if k not in names:
            fail(f"synthetic_joints.{k}: {k!r} is not one of the keypoints")
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, str) for x in v)):
            fail(f"synthetic_joints.{k} must be a list of two dataset joint names")
        synth[k] = (v[0], v[1])
    nsl = d.get("no_start_limbs")
    if nsl is None:
        # Default: the eye-ear limbs (limbs whose two ends are both face joints).
        def is_face(j):
            return "eye" in names[j] or "ear" in names[j]
        nsl = [k + 1 for k, (a, b) in enumerate(skeleton) if is_face(a) and is_face(b)]
    for x in nsl:
        if not isinstance(x, int) or not 1 <= x <= len(skeleton):
            fail(f"'no_start_limbs' entry {x!r} is not a limb id in 1..{len(skeleton)}")
    cfg = PoseConfig(
        name=str(d.get("name", Path(source).stem)),
        keypoints=tuple(names),
        skeleton=tuple(skeleton),
        synthetic_joints=synth,
        flip_pairs=tuple(flips),
        no_start_limbs=tuple(x - 1 for x in nsl),
    )
    cfg.edge_flip()  # validates that the skeleton is closed under flips
    return cfg


def load_pose_config(path) -> PoseConfig:
    path = Path(path)
    return pose_config_from_dict(read_mapping(path), str(path))


@dataclasses.dataclass(frozen=True)
class KeypointMapping:
    """Maps dataset keypoint arrays [P, K, 3] onto model joints [P, J, 3]."""

    direct: Tuple[Optional[int], ...]  # per model joint: dataset index or None
    synthetic: Tuple[Optional[Tuple[int, int]], ...]  # per model joint: (a, b) or None
    to_dataset: Tuple[Optional[int], ...]  # per dataset keypoint: model joint index or None

    @staticmethod
    def build(cfg: PoseConfig, dataset_keypoints: Sequence[str]) -> "KeypointMapping":
        index = {n: i for i, n in enumerate(dataset_keypoints)}
        direct, synthetic = [], []
        for name in cfg.keypoints:
            if name in index:
                direct.append(index[name])
                synthetic.append(None)
            elif name in cfg.synthetic_joints:
                a, b = cfg.synthetic_joints[name]
                missing = [x for x in (a, b) if x not in index]
                if missing:
                    raise BpnetError(
                        f"pose config {cfg.name!r}: synthetic joint {name!r} needs dataset "
                        f"keypoints {missing} which the dataset does not have")
                direct.append(None)
                synthetic.append((index[a], index[b]))
            else:
                raise BpnetError(
                    f"pose config {cfg.name!r}: joint {name!r} is neither a dataset keypoint "
                    f"({', '.join(dataset_keypoints)}) nor declared in synthetic_joints")
        model_index = {n: i for i, n in enumerate(cfg.keypoints)}
        to_dataset = tuple(model_index.get(n) for n in dataset_keypoints)
        return KeypointMapping(tuple(direct), tuple(synthetic), to_dataset)

    def dataset_to_model(self, kps: np.ndarray) -> np.ndarray:
        """[P, K, 3] dataset keypoints (canonical visibility) -> [P, J, 3] model joints.

        A synthetic joint is the midpoint of its two source joints and is
        labeled only when both are labeled; its visibility is the lower of
        the two (TAO labels it even with a shoulder missing: a bug).
        """
        kps = np.asarray(kps, dtype=np.float32)
        if kps.ndim == 2:
            kps = kps[None]
        out = np.zeros((kps.shape[0], len(self.direct), 3), dtype=np.float32)
        for j, (d, s) in enumerate(zip(self.direct, self.synthetic)):
            if d is not None:
                out[:, j] = kps[:, d]
            else:
                a, b = kps[:, s[0]], kps[:, s[1]]
                both = (a[:, 2] > 0) & (b[:, 2] > 0)
                out[both, j, :2] = (a[both, :2] + b[both, :2]) / 2
                out[both, j, 2] = np.minimum(a[both, 2], b[both, 2])
        out[out[:, :, 2] <= 0] = 0
        return out

    def model_to_dataset(self, joints: np.ndarray, scores: Optional[np.ndarray] = None):
        """[P, J, 2|3] model joints -> [P, K, 3] dataset keypoints (x, y, v/score).

        Dataset keypoints with no model joint (none for COCO) come out as 0.
        """
        joints = np.asarray(joints, dtype=np.float64)
        out = np.zeros((joints.shape[0], len(self.to_dataset), 3))
        for k, j in enumerate(self.to_dataset):
            if j is None:
                continue
            out[:, k, :2] = joints[:, j, :2]
            if scores is not None:
                out[:, k, 2] = scores[:, j]
            elif joints.shape[-1] > 2:
                out[:, k, 2] = joints[:, j, 2]
        return out

"""Pose configs: topology, flips, the dataset-to-model mapping and the neck rule."""

import json

import numpy as np
import pytest

from bpnet.errors import BpnetError
from bpnet.pose import load_pose_config, pose_config_from_dict

from conftest import REPO

COCO17 = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
          "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
          "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]


@pytest.fixture(scope="module")
def pose18():
    return load_pose_config(REPO / "model_pose_config" / "bpnet_18joints.json")


def test_topology_matches_reference(pose18):
    assert pose18.keypoints[:2] == ("nose", "neck")
    edges_1based = [[a + 1, b + 1] for a, b in pose18.skeleton]
    assert edges_1based == [[2, 9], [9, 10], [10, 11], [2, 12], [12, 13], [13, 14], [2, 3], [3, 4],
                            [4, 5], [3, 17], [2, 6], [6, 7], [7, 8], [6, 18], [2, 1], [1, 15],
                            [1, 16], [15, 17], [16, 18]]
    # Eye-ear limbs (15-17, 16-18) never start a person.
    assert sorted(k + 1 for k in pose18.no_start_limbs) == [18, 19]


def test_flip_permutation(pose18):
    perm = pose18.flip_permutation()
    names = pose18.keypoints
    for i, n in enumerate(names):
        want = n.replace("left_", "@").replace("right_", "left_").replace("@", "right_")
        assert names[perm[i]] == want
    assert np.array_equal(perm[perm], np.arange(18))  # an involution
    assert perm[0] == 0 and perm[1] == 1


def test_edge_flip_maps_every_limb_onto_its_mirror(pose18):
    perm, rev = pose18.edge_flip()
    jp = pose18.flip_permutation()
    assert sorted(perm.tolist()) == list(range(pose18.num_edges))
    for k, (a, b) in enumerate(pose18.skeleton):
        fa, fb = pose18.skeleton[perm[k]]
        assert (fa, fb) == ((jp[b], jp[a]) if rev[k] else (jp[a], jp[b]))


def _coco_person(**labeled):
    kp = np.zeros((17, 3), np.float32)
    for name, (x, y, v) in labeled.items():
        kp[COCO17.index(name)] = (x, y, v)
    return kp


def test_neck_only_when_both_shoulders_labeled(pose18):
    m = pose18.dataset_mapping(COCO17)
    both = _coco_person(left_shoulder=(10, 20, 2), right_shoulder=(30, 40, 1), nose=(5, 5, 2))
    one = _coco_person(left_shoulder=(10, 20, 2), nose=(5, 5, 2))
    none = _coco_person(nose=(5, 5, 2))
    out = m.dataset_to_model(np.stack([both, one, none]))
    assert out.shape == (3, 18, 3)
    np.testing.assert_allclose(out[0, 1], [20, 30, 1])  # midpoint, the lower visibility
    # TAO puts the neck halfway to (0, 0) and labels it: here it stays unlabeled.
    assert out[1, 1].tolist() == [0, 0, 0] and out[2, 1].tolist() == [0, 0, 0]
    np.testing.assert_allclose(out[1, 5], [10, 20, 2])  # left_shoulder is model joint 5
    assert out[1, 2].tolist() == [0, 0, 0]  # right_shoulder unlabeled stays all zero


def test_mapping_by_name_and_back(pose18):
    m = pose18.dataset_mapping(COCO17)
    rng = np.random.default_rng(0)
    kp = np.concatenate([rng.uniform(1, 500, (4, 17, 2)), rng.integers(0, 3, (4, 17, 1))], -1)
    kp[kp[..., 2] == 0, :2] = 0
    joints = m.dataset_to_model(kp)
    for j, name in enumerate(pose18.keypoints):
        if name != "neck":
            np.testing.assert_allclose(joints[:, j], kp[:, COCO17.index(name)], rtol=1e-6)
    back = m.model_to_dataset(joints)
    np.testing.assert_allclose(back, kp, rtol=1e-6)  # the neck is dropped on the way back


def test_custom_five_joint_config(tmp_path):
    cfg = {"name": "five", "keypoints": ["head", "left_hand", "right_hand", "left_foot", "right_foot"],
           "skeleton": [[1, 2], [1, 3], [1, 4], [1, 5]]}
    p = tmp_path / "five.yaml"
    p.write_text(json.dumps(cfg))
    pose = load_pose_config(p)
    assert (pose.num_joints, pose.num_edges, pose.heat_channels, pose.paf_channels) == (5, 4, 6, 8)
    assert pose.flip_permutation().tolist() == [0, 2, 1, 4, 3]
    perm, rev = pose.edge_flip()
    assert perm.tolist() == [1, 0, 3, 2] and not rev.any()
    m = pose.dataset_mapping(["right_foot", "left_foot", "head", "right_hand", "left_hand"])
    kp = np.array([[[1, 1, 2], [2, 2, 2], [3, 3, 2], [4, 4, 1], [5, 5, 2]]], np.float32)
    np.testing.assert_allclose(m.dataset_to_model(kp)[0, :, 0], [3, 5, 4, 2, 1])
    again = pose_config_from_dict(pose.to_dict())
    assert again == pose


def test_pose_config_errors(tmp_path):
    base = {"keypoints": ["a", "left_b", "right_b"], "skeleton": [[1, 2], [1, 3]]}
    with pytest.raises(BpnetError, match="did you mean 'skeleton'"):
        pose_config_from_dict(dict(base, skeletn=[[1, 2]]), "cfg.json")
    with pytest.raises(BpnetError, match=r"skeleton\[0\].*1\.\.3"):
        pose_config_from_dict(dict(base, skeleton=[[1, 4]]), "cfg.json")
    with pytest.raises(BpnetError, match="duplicate"):
        pose_config_from_dict(dict(base, keypoints=["a", "a", "b"]), "cfg.json")
    with pytest.raises(BpnetError, match="num_joints"):
        pose_config_from_dict(dict(base, num_joints=4), "cfg.json")
    # A limb whose mirror is missing from the skeleton breaks flipping: rejected up front.
    with pytest.raises(BpnetError, match="no mirror limb"):
        pose_config_from_dict(dict(base, skeleton=[[1, 2]]), "cfg.json")
    pose = pose_config_from_dict(base, "cfg.json")
    with pytest.raises(BpnetError, match="neither a dataset keypoint"):
        pose.dataset_mapping(["a", "left_b"])
    synth = pose_config_from_dict(dict(base, keypoints=["mid", "left_b", "right_b"],
                                       synthetic_joints={"mid": ["left_c", "right_c"]}), "cfg.json")
    with pytest.raises(BpnetError, match="needs dataset keypoints"):
        synth.dataset_mapping(["left_b", "right_b", "left_c"])


# ------------------------------------------------------------------ TAO's pose-config format

def _tao_format(pose):
    """bpnet's config written in TAO's layout (what TAO's bpnet_18joints.json looks like)."""
    names = list(pose.keypoints)
    return {"pose_config_type": "bpnet_18_joints", "categories": [{
        "supercategory": "person", "id": 1, "name": "person", "num_joints": len(names),
        "keypoints": names, "skeleton": [[a + 1, b + 1] for a, b in pose.skeleton],
        "skeleton_edge_names": [[names[a], names[b]] for a, b in pose.skeleton]}]}


def test_tao_format_is_the_same_topology(pose18):
    tao = pose_config_from_dict(_tao_format(pose18), "tao.json")
    assert tao.name == "bpnet_18_joints" and pose18.name == "bpnet_18joints"
    assert (tao.keypoints, tao.skeleton, tao.flip_pairs, tao.no_start_limbs) == \
        (pose18.keypoints, pose18.skeleton, pose18.flip_pairs, pose18.no_start_limbs)
    # TAO declares no synthetic joint: its neck is the shoulders' midpoint, as bpnet's file says.
    assert tao.synthetic_joints == pose18.synthetic_joints
    kps = np.zeros((1, 17, 3), np.float32)
    kps[0, 5] = [10, 20, 2]  # left shoulder
    kps[0, 6] = [30, 40, 1]  # right shoulder
    a = tao.dataset_mapping(COCO17).dataset_to_model(kps)
    b = pose18.dataset_mapping(COCO17).dataset_to_model(kps)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a[0, 1], [20, 30, 1])


def test_records_match_by_topology_not_spelling(pose18):
    tao = pose_config_from_dict(_tao_format(pose18), "tao.json")
    assert tao.topology_id == pose18.topology_id
    assert tao.record_tag != pose18.record_tag
    assert tao.matches_record(pose18.record_tag) and pose18.matches_record(tao.record_tag)
    # Records written before tags carried the topology name the config alone.
    assert tao.matches_record("bpnet_18joints") and pose18.matches_record("bpnet_18_joints")
    five = pose_config_from_dict({"name": "five", "keypoints": ["a", "b", "c", "d", "e"],
                                  "skeleton": [[1, 2], [2, 3], [3, 4], [4, 5]]})
    assert not five.matches_record(pose18.record_tag)
    assert not five.matches_record("bpnet_18joints") and not pose18.matches_record("five")


@pytest.mark.parametrize("change, needle", [
    (lambda c: c["skeleton_edge_names"].__setitem__(0, ["neck", "left_hip"]), "skeleton_edge_names"),
    (lambda c: c["skeleton_edge_names"].pop(), "lists 18 limbs"),
    (lambda c: c.__setitem__("keypoint", c.pop("keypoints")), "did you mean 'keypoints'"),
    (lambda c: c.__setitem__("name", "dog"), "no category named 'person'"),
])
def test_tao_format_errors(pose18, change, needle):
    d = _tao_format(pose18)
    change(d["categories"][0])
    with pytest.raises(BpnetError, match=needle):
        pose_config_from_dict(d, "tao.json")

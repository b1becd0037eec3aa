"""The video tracker: ids persist across frames, through short gaps and crossings."""

import numpy as np

from bpnet.infer.track import Tracker, keypoint_similarity

J = 18


def _person(cx, cy, h=120.0, missing=(), seed=0):
    """Person ``seed``'s stick figure of height h standing at (cx, cy): [J, 3]."""
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(-0.25, 0.25, size=(J, 2)) * [h * 0.5, h]
    kp = np.zeros((J, 3))
    kp[:, 0] = cx + offsets[:, 0]
    kp[:, 1] = cy + offsets[:, 1]
    kp[:, 2] = 0.9
    for j in missing:
        kp[j] = 0
    return kp


def test_similarity_is_one_for_the_same_pose_and_falls_with_distance():
    p = _person(100, 100)
    assert keypoint_similarity(p, p, 60 * 120) == 1.0
    near = keypoint_similarity(p, p + [5, 0, 0], 60 * 120)
    far = keypoint_similarity(p, p + [60, 0, 0], 60 * 120)
    assert 1.0 > near > far >= 0.0
    # Joints missing on either side do not count; too few shared joints: no match.
    q = p.copy()
    q[1:] = 0
    assert keypoint_similarity(p, q, 60 * 120) == 0.0


def test_walkers_keep_their_ids_when_crossing_in_any_detection_order():
    tr = Tracker()
    seen = {}
    rng = np.random.default_rng(1)
    for f in range(20):
        people = {"a": _person(100 + 12 * f, 200, seed=1), "b": _person(400 - 10 * f, 215, seed=2),
                  "c": _person(250, 80 + 3 * f, seed=3)}
        order = list(people)
        rng.shuffle(order)  # the decoder's order changes from frame to frame
        kps = np.stack([people[k] + rng.normal(0, 1.5, (J, 3)) * [1, 1, 0] for k in order])
        ids = tr.update(kps)
        for k, i in zip(order, ids):
            seen.setdefault(k, set()).add(int(i))
    assert all(len(v) == 1 for v in seen.values()), seen
    assert len(set().union(*seen.values())) == 3


def test_id_survives_a_short_gap_but_not_a_long_one():
    tr = Tracker(max_missed=3)
    a0 = tr.update(np.stack([_person(100, 100), _person(300, 100)]))
    # Person 2 is hidden for 3 frames, then comes back a bit further on.
    for f in range(3):
        ids = tr.update(np.stack([_person(100, 100)]))
        assert ids[0] == a0[0]
    back = tr.update(np.stack([_person(100, 100), _person(306, 100)]))
    assert list(back) == list(a0)
    # Hidden longer than max_missed: a new id.
    for f in range(5):
        tr.update(np.stack([_person(100, 100)]))
    again = tr.update(np.stack([_person(100, 100), _person(306, 100)]))
    assert again[0] == a0[0] and again[1] not in a0


def test_new_people_get_new_ids_and_empty_frames_are_fine():
    tr = Tracker()
    assert tr.update(np.zeros((0, J, 3))).shape == (0,)
    first = tr.update(np.stack([_person(100, 100)]))
    assert tr.update(np.zeros((0, J, 3))).shape == (0,)
    two = tr.update(np.stack([_person(100, 100), _person(500, 300)]))
    assert two[0] == first[0] and two[1] != first[0]


def test_partial_people_still_match():
    tr = Tracker()
    full = _person(200, 200)
    i0 = tr.update(full[None])
    # Legs occluded in the next frame.
    i1 = tr.update(_person(203, 200, missing=range(8, 14))[None])
    assert i1[0] == i0[0]

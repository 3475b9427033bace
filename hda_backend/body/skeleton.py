"""The SMPL-X kinematic tree: 55 joints, their names and parents, in SMPL-X's order.

SMPL-X/AMASS poses index joints in exactly this order, so any body that uses this table (the bundled
open body or the licensed SMPL-X model) is driven by those poses unchanged.
"""

_BODY = [
    ("pelvis", -1), ("left_hip", 0), ("right_hip", 0), ("spine1", 0), ("left_knee", 1),
    ("right_knee", 2), ("spine2", 3), ("left_ankle", 4), ("right_ankle", 5), ("spine3", 6),
    ("left_foot", 7), ("right_foot", 8), ("neck", 9), ("left_collar", 9), ("right_collar", 9),
    ("head", 12), ("left_shoulder", 13), ("right_shoulder", 14), ("left_elbow", 16),
    ("right_elbow", 17), ("left_wrist", 18), ("right_wrist", 19),
    ("jaw", 15), ("left_eye_smplhf", 15), ("right_eye_smplhf", 15),
]


def _hand(side: str, wrist: int, first: int):
    joints = []
    for f, finger in enumerate(("index", "middle", "pinky", "ring", "thumb")):
        base = first + 3 * f
        joints += [(f"{side}_{finger}1", wrist), (f"{side}_{finger}2", base), (f"{side}_{finger}3", base + 1)]
    return joints


_TABLE = _BODY + _hand("left", 20, 25) + _hand("right", 21, 40)

JOINT_NAMES: tuple[str, ...] = tuple(name for name, _ in _TABLE)
PARENTS: tuple[int, ...] = tuple(parent for _, parent in _TABLE)
NUM_JOINTS = len(JOINT_NAMES)  # 55: root, 21 body, jaw, 2 eyes, 2 x 15 hand joints
JOINT_INDEX = {name: i for i, name in enumerate(JOINT_NAMES)}

# Slices of the 55-joint pose, in the order SMPL-X's forward() concatenates its named inputs.
POSE_PARTS = {
    "global_orient": slice(0, 1),
    "body_pose": slice(1, 22),
    "jaw_pose": slice(22, 23),
    "leye_pose": slice(23, 24),
    "reye_pose": slice(24, 25),
    "left_hand_pose": slice(25, 40),
    "right_hand_pose": slice(40, 55),
}

assert NUM_JOINTS == 55 and all(p < i for i, p in enumerate(PARENTS))

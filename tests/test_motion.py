"""Motion files (SMPL-X and AMASS layouts) and the built-in clips' joint conventions."""

import numpy as np
import pytest
import torch

from hda_backend.body import JOINT_INDEX as J
from hda_backend.body import load_body, pose_body
from hda_backend.errors import HDAError
from hda_backend.motion import BUILTIN, get_motion, load_motion_npz, procedural


def test_smplh_amass_layout_maps_hands_past_jaw_and_eyes(tmp_path):
    poses = np.arange(4 * 156, dtype=np.float64).reshape(4, 156) / 1000
    np.savez(tmp_path / "amass.npz", poses=poses, trans=np.ones((4, 3)), mocap_framerate=np.array(120.0))
    m = load_motion_npz(tmp_path / "amass.npz")
    assert m.fps == 120 and m.poses.shape == (4, 55, 3)
    assert torch.allclose(m.poses[:, :22].reshape(4, -1), torch.tensor(poses[:, :66], dtype=torch.float32))
    assert torch.equal(m.poses[:, 22:25], torch.zeros(4, 3, 3))
    assert torch.allclose(m.poses[:, 25:].reshape(4, -1), torch.tensor(poses[:, 66:], dtype=torch.float32))


def test_smplx_layouts_agree(tmp_path):
    rng = np.random.default_rng(0)
    full = rng.normal(size=(5, 55, 3))
    np.savez(tmp_path / "a.npz", poses=full.reshape(5, 165), transl=rng.normal(size=(5, 3)))
    np.savez(tmp_path / "b.npz", global_orient=full[:, 0], body_pose=full[:, 1:22].reshape(5, -1),
             jaw_pose=full[:, 22], leye_pose=full[:, 23], reye_pose=full[:, 24],
             left_hand_pose=full[:, 25:40].reshape(5, -1), right_hand_pose=full[:, 40:].reshape(5, -1))
    a, b = load_motion_npz(tmp_path / "a.npz"), load_motion_npz(tmp_path / "b.npz")
    assert torch.equal(a.poses, b.poses) and a.fps == 30


@pytest.mark.parametrize("arrays, message", [
    (dict(poses=np.zeros((3, 100))), "field 'poses' has 100 values per frame, expected 165"),
    (dict(global_orient=np.zeros((3, 3)), body_pose=np.zeros((3, 60))), "field 'body_pose' has 60 values"),
    (dict(poses=np.full((3, 165), np.nan)), "NaN or inf"),
    (dict(poses=np.zeros((3, 165)), trans=np.zeros((2, 3))), "field 'trans' has 2 frames, expected 3"),
    (dict(betas=np.zeros(10)), "no pose field"),
    (dict(poses=np.zeros((3, 165)), mocap_framerate=np.array(-5.0)), "frame rate -5"),
])
def test_bad_motion_files(tmp_path, arrays, message):
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(HDAError, match=message) as err:
        load_motion_npz(tmp_path / "m.npz")
    assert "m.npz" in str(err.value)


def test_unknown_motion_name():
    with pytest.raises(HDAError, match="expected a .npz file or one of walk"):
        get_motion("dance")


@pytest.fixture(scope="module")
def bundled():
    return load_body()


def _joints(body, motion):
    return pose_body(body, motion.poses, transl=motion.transl).joints


def test_builtin_clips_move_as_named(bundled):
    for name in BUILTIN:
        assert procedural(name, 12).poses.shape == (12, 55, 3)
    wave = _joints(bundled, procedural("wave", 8))
    assert (wave[:, J["right_wrist"], 1] > wave[:, J["head"], 1]).all()  # the hand is up
    assert (wave[:, J["left_wrist"], 1] < wave[:, J["left_shoulder"], 1] - 0.3).all()  # the other arm is down
    squat = _joints(bundled, procedural("squat", 8))
    rest = bundled.rest_joints()
    assert squat[4, 0, 1] < rest[0, 1] - 0.25  # pelvis low at mid-cycle
    assert squat[4, J["left_knee"], 2] > squat[4, J["left_ankle"], 2] + 0.1  # knees forward
    walk = _joints(bundled, procedural("walk", 10))
    assert walk[-1, 0, 2] - walk[0, 0, 2] > 0.5  # moves forward, +Z
    turn = _joints(bundled, procedural("turn", 4))
    left = turn[:, J["left_hip"]] - turn[:, J["right_hip"]]
    assert left[0, 0] > 0 and left[2, 0] < 0  # half a turn later the left hip points to -X


# sha256 of every clip's poses and transl bytes (float32) at 1, 7, 30 and 48 frames, taken before the
# clips became a table of functions (motion.CLIPS): the table must reproduce them bit for bit.
CLIP_SHA256 = {
    "walk": "eca4c8231eaa7be31c8159813a65e679cf223eb0f89b2e39ca292b9b92e39ba0",
    "wave": "7c5631574c4c25f63d8d661bc3d63ad315be688afcbd933520a06c3d726707e6",
    "squat": "21e21ae2944289973cd9f70d6ecf5b8db12247a68d6f85d8a121f3761f538e0b",
    "turn": "7998f805f8a354d96920825b28cdcc9cc85a38576463ee307ff07c4129d67d2d",
    "arm_raise": "58e3dbbceb9e53fef1a57fd785f70733d6a3c480ca4c93006e0a12420f9a7e1e",
    "kick": "211ae110a48e10c51de1fc469f0148556e5dccbc086f2ce5a73c8a777fb2663a",
    "jumping_jack": "ebbdb75ab6cad4cfd2c94cbef6d941e566e03d63287bc656a17ca84470e9cfeb",
    "bow": "ca352ef091cb3773a313a52660031cfd395cb4c459806fe58e9c4cbd15bb0d60",
    "lunge": "12546f5a226de49f0e76b08c3669bec0976142921e86b24565d5bda194b0aff8",
}


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_clips_are_bit_identical_to_their_recorded_values(name):
    import hashlib

    digest = hashlib.sha256()
    for frames in (1, 7, 30, 48):
        m = procedural(name, frames)
        assert m.poses.dtype == torch.float32 and m.transl.dtype == torch.float32
        digest.update(m.poses.numpy().tobytes())
        digest.update(m.transl.numpy().tobytes())
    assert digest.hexdigest() == CLIP_SHA256[name]


def test_pose_at_is_the_cycle_frame_nearest_the_phase():
    from hda_backend.motion import pose_at

    walk = procedural("walk", 100)
    for phase, frame in ((0.0, 0), (0.25, 25), (0.333, 33), (0.996, 0), (0.5, 50)):
        pose, transl = pose_at("walk", phase, 100)
        assert torch.equal(pose, walk.poses[frame]) and torch.equal(transl, walk.transl[frame])
    assert torch.equal(pose_at("squat", 0.5, 64)[0], procedural("squat", 64).poses[32])


def test_unpremultiply_divides_colour_by_alpha():
    from hda_backend.images import unpremultiply

    rgb = torch.tensor([[[0.2, 0.4, 0.1], [0.0, 0.0, 0.0]]])
    alpha = torch.tensor([[[0.5], [0.0]]])
    expected = torch.tensor([[[0.4, 0.8, 0.2, 0.5], [0.0, 0.0, 0.0, 0.0]]])
    assert torch.allclose(unpremultiply(rgb, alpha), expected)

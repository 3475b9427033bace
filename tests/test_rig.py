"""hda_backend.rig against independent references: smplx's LBS, Blender's armature formula, a pinhole camera.

Blender's own evaluation of the same rig (bone.matrix_local, pose_bone.matrix, world_to_camera_view)
is checked in tests/test_blender_scene.py.
"""

import math

import numpy as np
import pytest
import torch
from smplx.lbs import batch_rodrigues

from hda_backend import rig
from hda_backend.body import JOINT_NAMES, PARENTS, load_body, pose_body
from hda_backend.errors import HDAError


@pytest.fixture(scope="module")
def body():
    return load_body()


@pytest.fixture(scope="module")
def layout(body):
    return rig.bone_layout(body)


def blender_fk(quats, locations, layout):
    """Armature evaluation as Blender documents it: pose = parent_pose · parent_rest⁻¹ · rest · basis,
    rest = [B | head] (bone.matrix_local), basis = [R(q) | location] (pose_bone.matrix_basis)."""
    frames = quats.shape[0]
    rest = np.tile(np.eye(4), (55, 1, 1))
    rest[:, :3, :3], rest[:, :3, 3] = layout.matrices, layout.heads
    out = np.zeros((frames, 55, 4, 4))
    for f in range(frames):
        for j in range(55):
            w, x, y, z = quats[f, j] / np.linalg.norm(quats[f, j])
            basis = np.eye(4)
            basis[:3, :3] = [[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                             [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                             [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]]
            basis[:3, 3] = locations[f, j]
            p = PARENTS[j]
            out[f, j] = rest[j] @ basis if p < 0 else out[f, p] @ np.linalg.inv(rest[p]) @ rest[j] @ basis
    return out


def random_poses(frames, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    return rng.normal(0, scale, (frames, 165)), rng.normal(0, 0.3, (frames, 3))


def test_axis_mapping_is_plus_90_about_x():
    # smplx's Rodrigues adds 1e-8 to the axis-angle before taking its norm.
    expected = batch_rodrigues(torch.tensor([[math.pi / 2, 0.0, 0.0]], dtype=torch.float64))[0].numpy()
    assert np.allclose(rig.AXIS_YUP_TO_ZUP, expected, rtol=0, atol=1e-7)
    up, front, left = rig.to_blender(np.eye(3)[[1, 2, 0]])
    assert np.allclose(up, [0, 0, 1]) and np.allclose(front, [0, -1, 0]) and np.allclose(left, [1, 0, 0])
    assert np.allclose(rig.to_body(rig.to_blender([0.1, 0.2, 0.3])), [0.1, 0.2, 0.3])


def test_layout_bones_follow_the_skeleton(body, layout):
    assert layout.names == JOINT_NAMES and list(layout.parents) == list(PARENTS)
    joints = body.rest_joints().double().numpy()
    assert np.allclose(layout.heads, joints @ rig.AXIS_YUP_TO_ZUP.T)
    # Orthonormal right-handed frames whose Y is the bone direction.
    m = layout.matrices
    assert np.allclose(m.transpose(0, 2, 1) @ m, np.eye(3), atol=1e-12) and np.allclose(np.linalg.det(m), 1)
    direction = layout.tails - layout.heads
    assert (np.linalg.norm(direction, axis=1) >= rig.MIN_BONE_LENGTH).all()
    assert np.allclose(m[:, :, 1], direction / np.linalg.norm(direction, axis=1, keepdims=True))
    # Tails at the main child: knee -> ankle, elbow -> wrist, pelvis -> spine1, wrist -> middle finger.
    idx = {n: i for i, n in enumerate(JOINT_NAMES)}
    for bone, child in (("left_knee", "left_ankle"), ("right_elbow", "right_wrist"), ("pelvis", "spine1"),
                        ("left_wrist", "left_middle1"), ("spine3", "neck")):
        assert np.allclose(layout.tails[idx[bone]], layout.heads[idx[child]])
    # Trunk bones point up in Blender, legs down, the left arm to +X, feet forward (-Y).
    assert layout.matrices[idx["spine1"]][2, 1] > 0.9 and layout.matrices[idx["left_knee"]][2, 1] < -0.9
    assert layout.matrices[idx["left_elbow"]][0, 1] > 0.9 and layout.matrices[idx["left_foot"]][1, 1] < -0.5
    # Rolls reproduce the frames through Blender's roll convention: Rot(Y_bone, roll) · roll-0 frame.
    for j in range(55):
        y = m[j][:, 1]
        zero = rig._minimal_rotation_from_y(y)
        roll = rig.axis_angle_to_matrix(y * layout.rolls[j])
        assert np.allclose(roll @ zero, m[j], atol=1e-9), JOINT_NAMES[j]


def test_bone_rotations_reproduce_smplx_lbs_joints(body, layout):
    pose, transl = random_poses(6)
    quats, root = rig.bone_rotations_from_pose(pose, transl, layout)
    assert quats.shape == (6, 55, 4) and root.shape == (6, 3)
    locations = np.zeros((6, 55, 3))
    locations[:, 0] = root
    heads = blender_fk(quats, locations, layout)[..., :3, 3]
    posed = pose_body(body, torch.tensor(pose, dtype=torch.float32), transl=torch.tensor(transl, dtype=torch.float32))
    expected = posed.joints.double().numpy() @ rig.AXIS_YUP_TO_ZUP.T
    assert np.abs(heads - expected).max() < 2e-5  # float32 LBS vs float64 FK


def test_pose_round_trip_through_bone_matrices(layout):
    pose, transl = random_poses(5, seed=1, scale=0.6)
    quats, root = rig.bone_rotations_from_pose(pose, transl, layout)
    locations = np.zeros((5, 55, 3))
    locations[:, 0] = root
    matrices = blender_fk(quats, locations, layout)
    # A uniformly scaled armature (bone matrices with scale) reads the same pose.
    scaled = matrices.copy()
    scaled[..., :3, :3] *= 1.7
    for m in (matrices, scaled):
        back, back_transl = rig.pose_from_bone_matrices(m, layout)
        assert np.abs(back - pose).max() < 1e-9 and np.abs(back_transl - transl).max() < 1e-12
    single, single_transl = rig.pose_from_bone_matrices(matrices[2], layout)
    assert single.shape == (165,) and np.allclose(single, pose[2]) and np.allclose(single_transl, transl[2])


def test_quaternions_are_continuous_over_frames(layout):
    # A joint turning through 350 degrees: consecutive keys must stay on one hemisphere.
    pose = np.zeros((36, 165))
    pose[:, 3 * 18 + 1] = np.linspace(0, np.radians(350), 36)
    pose[pose[:, 3 * 18 + 1] > np.pi, 3 * 18 + 1] -= 2 * np.pi  # wrapped like a mocap file would
    quats, _ = rig.bone_rotations_from_pose(pose, np.zeros((36, 3)), layout)
    dots = (quats[1:] * quats[:-1]).sum(-1)
    assert (dots > 0).all()


def test_conversions_match_smplx_rodrigues():
    aa = np.random.default_rng(2).normal(0, 1.0, (200, 3))
    aa[0] = 0
    aa[1] = [1e-9, 0, 0]
    expected = batch_rodrigues(torch.tensor(aa)).numpy()
    assert np.allclose(rig.axis_angle_to_matrix(aa), expected, rtol=0, atol=1e-7)  # smplx's +1e-8
    ours = rig.axis_angle_to_matrix(aa)
    q = rig.matrix_to_quaternion(ours)
    assert np.allclose(rig.quaternion_to_matrix(q), ours, rtol=0, atol=1e-12)
    back = rig.quaternion_to_axis_angle(q)
    assert np.allclose(rig.axis_angle_to_matrix(back), ours, rtol=0, atol=1e-12)
    small = np.linalg.norm(aa, axis=1) < np.pi
    assert np.allclose(back[small], aa[small], atol=1e-9)


def _look(eye, euler_xyz):
    """Blender object matrix from location and XYZ Euler angles."""
    c, s = np.cos(euler_xyz), np.sin(euler_xyz)
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx
    m[:3, 3] = eye
    return m


def _gl_projection(lens, sensor, width, height, shift_x=0.0, shift_y=0.0, near=0.1, far=100.0):
    """Blender's perspective projection for sensor fit AUTO, written from the pinhole model."""
    size = max(width, height)
    half_w, half_h = 0.5 * sensor / lens * width / size, 0.5 * sensor / lens * height / size
    # Shift moves the frustum by shift × its larger side.
    dx, dy = shift_x * sensor / lens, shift_y * sensor / lens
    left, right, bottom, top = -half_w + dx, half_w + dx, -half_h + dy, half_h + dy
    return np.array([[2 / (right - left), 0, (right + left) / (right - left), 0],
                     [0, 2 / (top - bottom), (top + bottom) / (top - bottom), 0],
                     [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)],
                     [0, 0, -1, 0]])


def test_camera_from_blender_matches_a_pinhole_projection():
    width, height, lens, sensor, shift_x = 96, 64, 50.0, 36.0, 0.1
    cam = _look([0.5, -4.0, 1.2], [math.radians(85), 0.0, math.radians(10)])
    cam_scaled = cam.copy()
    cam_scaled[:3, :3] *= 2.0  # a scaled camera object renders the same view
    obj = _look([0.2, 0.3, 1.1], [0.0, 0.0, math.radians(30)])
    obj[:3, :3] *= 1.5
    proj = _gl_projection(lens, sensor, width, height, shift_x)
    viewmat, K = rig.camera_from_blender(cam_scaled, proj, width, height, obj)
    fx = lens / sensor * width
    assert np.allclose(K, [[fx, 0, width / 2 - shift_x * width], [0, fx, height / 2], [0, 0, 1]])
    # Points of the body frame: through the object into the world, then a pinhole camera by hand.
    pts = np.random.default_rng(3).normal(0, 0.5, (50, 3))
    world = (obj @ np.c_[rig.to_blender(pts), np.ones(50)].T).T[:, :3]
    rel = world - cam[:3, 3]
    axes = cam[:3, :3]  # columns: camera x (right), y (up), z (backwards) in the world
    right, up, back = rel @ axes[:, 0], rel @ axes[:, 1], rel @ axes[:, 2]
    u = width / 2 - shift_x * width + fx * right / -back
    v = height / 2 - fx * up / -back
    cam_pts = (viewmat @ np.c_[pts, np.ones(50)].T).T[:, :3]
    assert np.allclose(cam_pts[:, 2], -back)  # OpenCV depth = distance along the view axis
    uv = (K @ cam_pts.T).T
    assert np.allclose(uv[:, 0] / uv[:, 2], u) and np.allclose(uv[:, 1] / uv[:, 2], v)


def test_bad_input_is_one_line(layout):
    with pytest.raises(HDAError, match="pose: shape"):
        rig.bone_rotations_from_pose(np.zeros((2, 64)), np.zeros((2, 3)), layout)
    with pytest.raises(HDAError, match="NaN"):
        rig.bone_rotations_from_pose(np.full((1, 165), np.nan), np.zeros((1, 3)), layout)
    with pytest.raises(HDAError, match="transl: 1 frames, expected 2"):
        rig.bone_rotations_from_pose(np.zeros((2, 165)), np.zeros((1, 3)), layout)
    with pytest.raises(HDAError, match="bone matrices: shape"):
        rig.pose_from_bone_matrices(np.zeros((54, 4, 4)), layout)
    with pytest.raises(HDAError, match="rest joints"):
        rig.bone_layout(np.zeros((55, 2)))
    ortho = np.diag([0.1, 0.1, -0.01, 1.0])
    ortho[2, 3] = -1.0
    with pytest.raises(HDAError, match="perspective"):
        rig.camera_from_blender(np.eye(4), ortho, 64, 64)
    with pytest.raises(HDAError, match="render size"):
        rig.camera_from_blender(np.eye(4), _gl_projection(50, 36, 8, 8), 0, 64)
    with pytest.raises(HDAError, match="NaN"):
        rig.camera_from_blender(np.full((4, 4), np.inf), _gl_projection(50, 36, 8, 8), 8, 8)


# ------------------------------------------------------------------ viewport cameras (from viewport.py)
def _ortho_projection(scale, width, height, near=0.1, far=100.0, shift_x=0.0):
    """An OpenGL orthographic projection written from its definition: the view's extent ``scale`` on
    the larger side, centred (plus a shift)."""
    size = max(width, height)
    half_w, half_h = 0.5 * scale * width / size, 0.5 * scale * height / size
    dx = shift_x * scale
    left, right, bottom, top = -half_w + dx, half_w + dx, -half_h, half_h
    return np.array([[2 / (right - left), 0, 0, -(right + left) / (right - left)],
                     [0, 2 / (top - bottom), 0, -(top + bottom) / (top - bottom)],
                     [0, 0, -2 / (far - near), -(far + near) / (far - near)],
                     [0, 0, 0, 1.0]])


def _project(points_body, obj, view, proj, width, height):
    """Pixels (OpenGL pipeline by hand: clip -> NDC -> pixels, rows down) and view-space z."""
    world = (obj @ np.c_[rig.to_blender(points_body), np.ones(len(points_body))].T)
    eye = view @ world
    clip = proj @ eye
    ndc = clip[:3] / clip[3]
    return np.stack([(ndc[0] + 1) * width / 2, (1 - ndc[1]) * height / 2], 1), eye[2]


def _backend_pixels(points_body, viewmat, K):
    cam = (viewmat @ np.c_[points_body, np.ones(len(points_body))].T)[:3]
    uv = K @ cam
    return (uv[:2] / uv[2]).T, cam[2]


def test_viewport_camera_perspective_is_the_region_as_a_camera():
    width, height = 80, 60
    cam = _look([0.9, -3.5, 1.6], [1.35, 0.0, 0.25])
    obj = _look([0.4, -0.2, 0.9], [0.0, 0.0, 0.5])
    proj = _gl_projection(50.0, 36.0, width, height, shift_x=0.05)
    view = np.linalg.inv(cam)
    viewmat, K, shift = rig.viewport_camera(view, proj, width, height, obj)
    assert shift == 0.0
    pts = np.random.default_rng(4).normal(0, 0.4, (40, 3))
    px_ref, z_ref = _project(pts, obj, view, proj, width, height)
    px, depth = _backend_pixels(pts, viewmat, K)
    assert np.abs(px - px_ref).max() < 1e-9 and np.abs(depth + z_ref).max() < 1e-12  # OpenCV depth = -view z


def test_viewport_camera_orthographic_through_a_far_pinhole():
    width, height = 64, 48
    cam = _look([0.9, -3.5, 1.6], [1.35, 0.0, 0.25])
    obj = _look([0.4, -0.2, 0.9], [0.0, 0.0, 0.5])
    proj = _ortho_projection(2.5, width, height, shift_x=0.03)
    view = np.linalg.inv(cam)
    viewmat, K, shift = rig.viewport_camera(view, proj, width, height, obj)
    pts = np.random.default_rng(0).normal(0, 0.4, (50, 3)) + np.array([0.0, -0.3, 0.0])
    px_ref, z_ref = _project(pts, obj, view, proj, width, height)
    px, depth = _backend_pixels(pts, viewmat, K)
    # Exact on the plane through the avatar's origin, off by (z - z0)/D elsewhere: well under a pixel here.
    assert np.abs(px - px_ref).max() < 0.05
    assert np.abs((shift - depth) - z_ref).max() < 1e-9  # the region's view z from the backend's depth
    assert np.abs(rig.ndc_depth(shift - depth, proj) - rig.ndc_depth(z_ref, proj)).max() < 1e-9
    # The avatar's origin itself lands exactly where the orthographic view puts it.
    origin_px, _ = _project(np.zeros((1, 3)), obj, view, proj, width, height)
    ours, _ = _backend_pixels(np.zeros((1, 3)), viewmat, K)
    assert np.abs(ours - origin_px).max() < 1e-9


def test_ndc_depth_is_the_projection_applied_in_full():
    z = -np.linspace(0.2, 90.0, 50)
    for proj in (_gl_projection(35.0, 36.0, 64, 48), _ortho_projection(3.0, 64, 48)):
        clip = proj @ np.stack([np.zeros_like(z), np.zeros_like(z), z, np.ones_like(z)])
        expected = 0.5 * clip[2] / clip[3] + 0.5
        assert np.allclose(rig.ndc_depth(z, proj), expected, rtol=0, atol=1e-12)
        assert rig.depth_terms(proj) == (proj[2, 2], proj[2, 3], proj[3, 2], proj[3, 3])


def test_body_to_world_places_body_points_through_the_object():
    obj = _look([0.2, 0.3, 1.1], [0.1, 0.0, math.radians(30)])
    obj[:3, :3] *= 1.5
    pts = np.random.default_rng(5).normal(0, 0.5, (20, 3))
    expected = (obj @ np.c_[rig.to_blender(pts), np.ones(20)].T).T[:, :3]
    got = (rig.body_to_world(obj) @ np.c_[pts, np.ones(20)].T).T[:, :3]
    assert np.allclose(got, expected, rtol=0, atol=1e-12)


# -------------------------------------------------------- forward kinematics (from operators/motion.py)
def _armature(layout, names=None):
    names = list(layout.names) if names is None else names
    parents = {n: (layout.names[layout.parents[j]] if layout.parents[j] >= 0 else None)
               for n, j in ((n, layout.names.index(n)) for n in names)}
    rest = {}
    for n in names:
        j = layout.names.index(n)
        rest[n] = np.eye(4)
        rest[n][:3, :3], rest[n][:3, 3] = layout.matrices[j], layout.heads[j]
    return parents, rest


def test_armature_pose_is_blenders_armature_formula(layout):
    rng = np.random.default_rng(6)
    quats = rng.normal(0, 1, (4, 55, 4))
    locations = rng.normal(0, 0.1, (4, 55, 3))
    expected = blender_fk(quats, locations, layout)
    order = list(layout.names)[::-1]  # children before parents: the evaluation must reorder
    parents, rest = _armature(layout, order)
    posed = rig.armature_pose(parents, rest, {n: quats[:, layout.names.index(n)] for n in order},
                              {n: locations[:, layout.names.index(n)] for n in order})
    got = np.stack([posed[n] for n in layout.names], 1)
    assert np.abs(got - expected).max() < 1e-12
    assert rig.parents_first(parents).index("pelvis") == 0


def test_pose_from_armature_recovers_the_smplx_pose(body, layout):
    from hda_backend import motion_keys

    pose, transl = random_poses(5, seed=7, scale=0.5)
    quats, root = rig.bone_rotations_from_pose(pose, transl, layout)
    parents, rest = _armature(layout)
    q = {n: quats[:, j] for j, n in enumerate(layout.names)}
    loc = {n: np.zeros((5, 3)) for n in layout.names}
    loc["pelvis"] = root
    # The armature's posed heads are smplx's LBS joints (an independent evaluation of the same pose).
    posed = rig.armature_pose(parents, rest, q, loc)
    lbs = pose_body(body, torch.tensor(pose, dtype=torch.float32), transl=torch.tensor(transl, dtype=torch.float32))
    heads = np.stack([posed[n][:, :3, 3] for n in layout.names], 1)
    assert np.abs(heads - lbs.joints.double().numpy() @ rig.AXIS_YUP_TO_ZUP.T).max() < 2e-5
    got, got_transl = motion_keys.pose_from_armature(parents, rest, q, loc)
    assert got.shape == (5, 55, 3) and got_transl.shape == (5, 3)
    ref = rig.axis_angle_to_matrix(pose.reshape(5, 55, 3))
    assert np.abs(rig.axis_angle_to_matrix(got) - ref).max() < 1e-9
    assert np.abs(got_transl - transl).max() < 1e-12
    # Joints the armature lacks (the hands) follow their parents rigidly: no rotation of their own.
    keep = [n for n in layout.names if "index" not in n]
    parents, rest = _armature(layout, keep)
    part, _ = motion_keys.pose_from_armature(parents, rest, {n: q[n] for n in keep}, {n: loc[n] for n in keep})
    missing = [j for j, n in enumerate(layout.names) if "index" in n]
    assert np.abs(part[:, missing]).max() < 1e-12
    kept = [j for j, n in enumerate(layout.names) if n in keep]
    assert np.abs(rig.axis_angle_to_matrix(part[:, kept]) - ref[:, kept]).max() < 1e-9


def test_navigation_size_shrinks_while_moving_but_not_below_the_floor():
    from hda_backend.rig import navigation_size

    assert navigation_size(1280, 720, False, 0.35, 96) == (1280, 720)
    assert navigation_size(1280, 720, True, 0.35, 96) == (448, 252)  # 0.35 x both sides
    assert navigation_size(400, 200, True, 0.35, 96) == (192, 96)    # the short side held at 96
    assert navigation_size(120, 80, True, 0.35, 96) == (120, 80)     # never above the region


def test_uniform_scale_accepts_only_equal_positive_axes():
    from hda_backend.rig import is_uniform_scale

    assert is_uniform_scale((2.0, 2.0, 2.0)) and is_uniform_scale((1.0, 1.00005, 1.0))
    assert not is_uniform_scale((1.0, 1.01, 1.0)) and not is_uniform_scale((-1.0, -1.0, -1.0))
    assert not is_uniform_scale((0.0, 0.0, 0.0))


def test_a_zup_clip_stands_on_the_avatars_ground(body, layout):
    """An AMASS-style +Z-up clip whose soles touch its ground (z = 0), turned into the body frame with the
    avatar's floor (rig.rest_floor) and placed as Add Avatar places the armature (origin -floor above the
    cursor): its lowest vertex is on the cursor's plane, and every vertex is the clip's own, by real LBS."""
    from hda_backend import motion_keys

    v_rest = body.v_template.double().numpy()
    floor = rig.rest_floor(v_rest)
    assert floor == v_rest[:, 1].min() and floor < -1.0  # the rest soles, well below the origin
    rng = np.random.default_rng(5)
    pose = rng.normal(0, 0.15, (2, 55, 3))
    up = rig.axis_angle_to_matrix(np.array([np.pi / 2, 0.0, 0.0]))
    pose[:, 0] = rig.quaternion_to_axis_angle(rig.matrix_to_quaternion(up @ rig.axis_angle_to_matrix(pose[:, 0])))
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)
    lowest = pose_body(body, as_t(pose)).vertices[..., 2].double().numpy().min(1)
    transl = np.array([[0.4, -0.3, 0.0], [0.5, -0.3, 0.25]])
    transl[:, 2] += -lowest                      # soles on z = 0, then 0.25 m up (a jump)
    clip = pose_body(body, as_t(pose), transl=as_t(transl)).vertices.double().numpy()
    new_pose, new_transl = motion_keys.zup_to_yup(pose, transl, layout.rest_joints[0], floor)
    posed = pose_body(body, as_t(new_pose), transl=as_t(new_transl)).vertices.double().numpy()
    world = rig.to_blender(posed) + np.array([0.0, 0.0, -floor])  # the armature at z = -floor
    assert np.abs(world - clip).max() < 1e-4
    assert np.allclose(world[..., 2].min(1), [0.0, 0.25], atol=1e-4)
    with pytest.raises(HDAError, match="rest vertices"):
        rig.rest_floor(np.zeros((0, 3)))

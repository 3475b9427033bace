"""The Blender rig of an avatar as pure math (numpy, no bpy): bone layout, pose <-> bone rotations, cameras.

Frames
------
The body frame is SMPL-X's: metres, +Y up, the body faces +Z, its left at +X. Blender is +Z up and
a character faces -Y. As in the SMPL-X Blender add-on, the body frame maps into the armature's
space by a +90° rotation about X::

    p_blender = AXIS_YUP_TO_ZUP @ p_body        (x, y, z) -> (x, -z, y)

so the body's up (+Y) becomes +Z and its front (+Z) becomes -Y. Units stay metres.

Bones
-----
One bone per SMPL-X joint, named as in :data:`hda_backend.body.skeleton.JOINT_NAMES` (SMPL-X's
names, ``left_eye_smplhf`` included) with SMPL-X's parents. A bone's head is its rest joint; its
tail points at its main child (pelvis -> spine1, spine3 -> neck, wrist -> middle1, else the only
child), and a leaf continues its parent's direction at half that length. Bones that point along
the limb keep IK chains and the viewport's bone display meaningful, which bones all pointing one
way (the SMPL-X add-on's rig, whose local axes equal the body's so quaternions are SMPL-X's
axis-angles verbatim) would not.

Rolls: a bone's local Y is its direction; its local Z is the body's forward axis (+Z) made
perpendicular to the bone, or the body's up axis (+Y) for bones within 45° of forward or back
(feet, jaw, eyes); X completes a right-handed frame. The near-vertical trunk bones (spine, neck,
head) therefore have nearly the body's axes, so their bone-local rotations read almost as SMPL-X's
axis-angles (flexion about X), as in the SMPL-X add-on; in general each bone's rest frame ``B_j``
is a constant rotation, and

    q_bone_j = B_j^T · A · R_j · A^T · B_j          (A = AXIS_YUP_TO_ZUP, R_j = Rodrigues(pose_j))

is the ``pose_bone.rotation_quaternion`` that reproduces SMPL-X's relative rotation R_j. The pelvis
bone's location carries SMPL-X's ``transl``: SMPL-X rotates the body about the rest pelvis joint
and then translates, which is exactly a root bone rotating about its head and moving by
``B_0^T A transl`` in its own rest frame.

Reading a pose back uses the armature-space ``pose_bone.matrix`` of the evaluated armature (it
includes constraints, drivers and IK, which ``matrix_basis`` does not): with M_j that matrix's
rotation, the posed bone frame is ``M_j = A G_j A^T B_j`` for SMPL-X's global joint rotation G_j,
so ``R_j = A^T M_p B_p^T`` ⁻¹ ``M_j B_j^T A`` and ``transl = A^T head_0 - J_0``.

Cameras
-------
A Blender camera looks down its local -Z with +Y up (OpenGL); the backend's cameras are OpenCV (x
right, y down, z forward), world-to-camera, with pixel centres at +0.5. :func:`camera_from_blender`
converts ``camera.matrix_world`` and the projection matrix Blender computes for the render
(``Object.calc_matrix_camera``: lens, sensor fit, shift, pixel aspect) and folds in the avatar
object's own transform, giving a view matrix that takes the avatar's *body frame* straight to the
camera. :func:`viewport_camera` does the same for a 3D view region (its view and window matrices),
including orthographic views, which it draws through a distant pinhole; :func:`depth_terms` and
:func:`ndc_depth` give the region's window depth of a view-space z, as the viewport's shader writes it.

Forward kinematics
------------------
:func:`armature_pose` evaluates an armature as Blender does (``pose_bone.matrix`` from the rest
``bone.matrix_local`` and the channels of ``pose_bone.matrix_basis``), for any armature: the BVH
import reads its temporary armature's keys through it (motion_keys.pose_from_armature).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .body.skeleton import JOINT_INDEX, JOINT_NAMES, NUM_JOINTS, PARENTS
from .errors import HDAError

AXIS_YUP_TO_ZUP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
AXIS_ZUP_TO_YUP = AXIS_YUP_TO_ZUP.T
# OpenGL camera axes (x right, y up, looking down -z) to OpenCV's (x right, y down, z forward).
GL_TO_CV = np.diag([1.0, -1.0, -1.0])

# Children a bone points at when a joint has several (the rest take the joint's default).
MAIN_CHILD = {"pelvis": "spine1", "spine3": "neck", "left_wrist": "left_middle1",
              "right_wrist": "right_middle1", "head": None}
LEAF_LENGTH = 0.5     # a leaf bone's length relative to the segment from its parent joint
MIN_BONE_LENGTH = 0.005  # metres: Blender deletes zero-length bones
ORTHO_DISTANCE = 1000.0  # viewport_camera: pinhole distance for orthographic views, in view extents


class BoneLayout(NamedTuple):
    """The armature of one body, in Blender's frame (metres, +Z up).

    names: 55 bone names (SMPL-X joint order); parents: [55] parent index, -1 for the pelvis;
    heads, tails: [55,3] rest head/tail positions; rolls: [55] edit-bone roll in radians;
    matrices: [55,3,3] rest bone frames B_j (columns: the bone's local X, Y, Z axes in armature
    space), what Blender's ``bone.matrix_local`` holds for these head/tail/roll;
    rest_joints: [55,3] rest joints in the *body* frame (Y up), J of the body's mean shape.
    """

    names: tuple
    parents: np.ndarray
    heads: np.ndarray
    tails: np.ndarray
    rolls: np.ndarray
    matrices: np.ndarray
    rest_joints: np.ndarray


# ------------------------------------------------------------------------------------ conversions
def to_blender(points_body: np.ndarray) -> np.ndarray:
    """Points or directions [...,3] from the body frame (Y up) to Blender's (Z up)."""
    return np.asarray(points_body, dtype=np.float64) @ AXIS_YUP_TO_ZUP.T


def to_body(points_blender: np.ndarray) -> np.ndarray:
    """Points or directions [...,3] from Blender's frame (Z up) to the body frame (Y up)."""
    return np.asarray(points_blender, dtype=np.float64) @ AXIS_YUP_TO_ZUP


def rotation_to_blender(rot_body: np.ndarray) -> np.ndarray:
    """Rotation matrices [...,3,3] acting in the body frame -> the same rotations in Blender's frame."""
    return AXIS_YUP_TO_ZUP @ np.asarray(rot_body, dtype=np.float64) @ AXIS_ZUP_TO_YUP


def rotation_to_body(rot_blender: np.ndarray) -> np.ndarray:
    """Rotation matrices [...,3,3] acting in Blender's frame -> the same rotations in the body frame."""
    return AXIS_ZUP_TO_YUP @ np.asarray(rot_blender, dtype=np.float64) @ AXIS_YUP_TO_ZUP


def axis_angle_to_matrix(aa: np.ndarray) -> np.ndarray:
    """Rodrigues: axis-angle [...,3] -> rotation matrices [...,3,3] (float64)."""
    aa = np.asarray(aa, dtype=np.float64)
    angle = np.linalg.norm(aa, axis=-1, keepdims=True)
    axis = aa / np.maximum(angle, 1e-300)
    x, y, z = np.moveaxis(axis, -1, 0)
    zero = np.zeros_like(x)
    skew = np.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(aa.shape[:-1] + (3, 3))
    s, c = np.sin(angle)[..., None], np.cos(angle)[..., None]
    return np.eye(3) + s * skew + (1 - c) * (skew @ skew)


def matrix_to_quaternion(m: np.ndarray) -> np.ndarray:
    """Rotation matrices [...,3,3] -> unit quaternions [...,4] (w, x, y, z), w >= 0 (Shepperd)."""
    m = np.asarray(m, dtype=np.float64)
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    candidates = np.stack([
        np.stack([1 + m00 + m11 + m22, m21 - m12, m02 - m20, m10 - m01], -1),
        np.stack([m21 - m12, 1 + m00 - m11 - m22, m01 + m10, m02 + m20], -1),
        np.stack([m02 - m20, m01 + m10, 1 - m00 + m11 - m22, m12 + m21], -1),
        np.stack([m10 - m01, m02 + m20, m12 + m21, 1 - m00 - m11 + m22], -1),
    ], -2)  # row k is 4 q_k q: best conditioned where q_k is largest
    diag = np.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    best = np.take_along_axis(candidates, diag.argmax(-1)[..., None, None].repeat(4, -1), -2)[..., 0, :]
    q = best / np.linalg.norm(best, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q)


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """Quaternions [...,4] (w, x, y, z; normalised here) -> rotation matrices [...,3,3]."""
    q = np.asarray(q, dtype=np.float64)
    w, x, y, z = np.moveaxis(q / np.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    return np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(q.shape[:-1] + (3, 3))


def quaternion_to_axis_angle(q: np.ndarray) -> np.ndarray:
    """Quaternions [...,4] (w, x, y, z) -> axis-angle [...,3] with angle in [0, π]."""
    q = np.asarray(q, dtype=np.float64)
    q = np.where(q[..., :1] < 0, -q, q)
    v = q[..., 1:]
    s = np.linalg.norm(v, axis=-1, keepdims=True)
    angle = 2 * np.arctan2(s, q[..., :1])
    # angle/s -> 2/w as s -> 0 (small rotations): keep full precision there.
    factor = np.where(s > 1e-8, angle / np.maximum(s, 1e-300), 2.0 / np.maximum(q[..., :1], 1e-300))
    return v * factor


def orthonormalize(m: np.ndarray) -> np.ndarray:
    """The nearest rotation to each matrix [...,3,3] (polar decomposition): strips bone/object scale."""
    u, _, vt = np.linalg.svd(np.asarray(m, dtype=np.float64))
    r = u @ vt
    flip = np.linalg.det(r) < 0
    if np.any(flip):
        u = u.copy()
        u[flip, :, -1] *= -1
        r = u @ vt
    return r


# ------------------------------------------------------------------------------------------ bones
def _minimal_rotation_from_y(direction: np.ndarray) -> np.ndarray:
    """The rotation taking +Y to the unit vector ``direction`` [3] by the shortest arc: Blender's
    roll-0 frame of a bone (vec_roll_to_mat3), valid away from -Y."""
    x, y, z = direction
    theta = 1.0 + y
    return np.array([[1 - x * x / theta, x, -x * z / theta],
                     [-x, y, -z],
                     [-x * z / theta, z, 1 - z * z / theta]])


def bone_frame(direction: np.ndarray) -> np.ndarray:
    """The rest frame B [3,3] (columns X, Y, Z in Blender's frame) of a bone pointing at ``direction``
    [3]: Y along the bone, Z the body's forward axis (or up, for bones near forward/back) made
    perpendicular to it."""
    y_axis = direction / np.linalg.norm(direction)
    forward, up = to_blender(np.array([0.0, 0.0, 1.0])), to_blender(np.array([0.0, 1.0, 0.0]))
    ref = up if abs(y_axis @ forward) > np.cos(np.pi / 4) else forward
    z_axis = ref - (ref @ y_axis) * y_axis
    z_axis /= np.linalg.norm(z_axis)
    x_axis = np.cross(y_axis, z_axis)
    return np.stack([x_axis, y_axis, z_axis], axis=1)


def bone_roll(frame: np.ndarray) -> float:
    """The edit-bone roll (radians) that gives the bone frame [3,3] for its direction (its Y column):
    the angle about Y from Blender's roll-0 frame to ``frame``."""
    y_axis = frame[:, 1]
    if 1.0 + y_axis[1] < 1e-6:
        raise HDAError("bone direction: points along -Y (straight back), expected any other direction")
    x0 = _minimal_rotation_from_y(y_axis)[:, 0]
    x1 = frame[:, 0]
    return float(np.arctan2(np.cross(x0, x1) @ y_axis, x0 @ x1))


def bone_layout(body) -> BoneLayout:
    """The armature of ``body`` (a BodyModel or [55,3] rest joints in the body frame) in Blender's frame.

    Joint positions are those of the body's mean shape (the avatar poses the mean template).
    """
    if hasattr(body, "rest_joints"):
        joints_body = body.rest_joints().detach().cpu().double().numpy()
    else:
        joints_body = np.asarray(body, dtype=np.float64)
    if joints_body.shape != (NUM_JOINTS, 3) or not np.isfinite(joints_body).all():
        raise HDAError(f"rest joints: shape {joints_body.shape}, expected ({NUM_JOINTS}, 3) finite values")
    heads = to_blender(joints_body)
    children = {j: [c for c in range(NUM_JOINTS) if PARENTS[c] == j] for j in range(NUM_JOINTS)}
    tails = np.zeros_like(heads)
    for j, name in enumerate(JOINT_NAMES):
        if name in MAIN_CHILD:
            child = MAIN_CHILD[name]
            target = None if child is None else JOINT_INDEX[child]
        else:
            target = children[j][0] if len(children[j]) == 1 else None
        vec = heads[target] - heads[j] if target is not None else None
        if vec is None or np.linalg.norm(vec) < MIN_BONE_LENGTH:
            parent = PARENTS[j]
            vec = heads[j] - heads[parent] if parent >= 0 else np.zeros(3)
            length = np.linalg.norm(vec)
            vec = vec * LEAF_LENGTH if length >= MIN_BONE_LENGTH else np.array([0.0, 0.0, 0.1])
        if np.linalg.norm(vec) < MIN_BONE_LENGTH:
            vec = vec / np.linalg.norm(vec) * MIN_BONE_LENGTH
        if 1.0 + vec[1] / np.linalg.norm(vec) < 1e-3:  # straight back: Blender's roll is degenerate
            vec = vec + np.array([0.0, 0.0, 1e-2]) * np.linalg.norm(vec)
        tails[j] = heads[j] + vec
    matrices = np.stack([bone_frame(tails[j] - heads[j]) for j in range(NUM_JOINTS)])
    rolls = np.array([bone_roll(m) for m in matrices])
    return BoneLayout(JOINT_NAMES, np.array(PARENTS), heads, tails, rolls, matrices, joints_body)


def rest_floor(vertices_body) -> float:
    """The avatar's ground in the body frame: the height (y) of its rest soles, the lowest of the rest
    vertices [V,3] (body frame). Add Avatar puts the armature's origin -rest_floor above the 3D cursor,
    so the rest body stands on it; a +Z-up clip's ground is put there too (motion_keys.zup_to_yup)."""
    v = np.asarray(vertices_body, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or not len(v) or not np.isfinite(v).all():
        raise HDAError(f"rest vertices: shape {v.shape}, expected (V, 3) finite values")
    return float(v[:, 1].min())


# ----------------------------------------------------------------------------- pose <-> bone rotations
def _check_array(value, shape_tail: tuple, name: str) -> np.ndarray:
    a = np.asarray(value, dtype=np.float64)
    if a.shape[-len(shape_tail):] != shape_tail:
        raise HDAError(f"{name}: shape {a.shape}, expected (..., {', '.join(map(str, shape_tail))})")
    if not np.isfinite(a).all():
        raise HDAError(f"{name}: contains NaN or inf, expected finite values")
    return a


def bone_rotations_from_pose(pose, transl, layout: BoneLayout) -> tuple[np.ndarray, np.ndarray]:
    """SMPL-X poses -> pose-bone channels of the armature built from ``layout``.

    pose: [F,165] (or [F,55,3]) axis-angle in SMPL-X joint order, body frame; transl: [F,3] metres,
    body frame. Returns (quaternions [F,55,4] wxyz for ``pose_bone.rotation_quaternion``, in
    bone-local space, sign-continuous over frames so keyframe interpolation takes the short way;
    locations [F,3] for the pelvis bone's ``location``).
    """
    pose = _check_array(pose, (3 * NUM_JOINTS,), "pose") if np.shape(pose)[-1] != 3 else \
        _check_array(pose, (NUM_JOINTS, 3), "pose")
    pose = pose.reshape(-1, NUM_JOINTS, 3)
    transl = _check_array(transl, (3,), "transl").reshape(-1, 3)
    if transl.shape[0] != pose.shape[0]:
        raise HDAError(f"transl: {transl.shape[0]} frames, expected {pose.shape[0]} (one per pose)")
    b = layout.matrices
    rot_blender = rotation_to_blender(axis_angle_to_matrix(pose))        # [F,55,3,3]
    local = np.swapaxes(b, -1, -2)[None] @ rot_blender @ b[None]         # B^T (A R A^T) B
    quats = matrix_to_quaternion(local)
    # Neighbouring frames on the same hemisphere: keyframes interpolate q and -q very differently.
    for f in range(1, quats.shape[0]):
        flip = (quats[f] * quats[f - 1]).sum(-1) < 0
        quats[f, flip] *= -1
    locations = to_blender(transl) @ b[0]                                # B_0^T A transl
    return quats, locations


def pose_from_bone_matrices(matrices, layout: BoneLayout) -> tuple[np.ndarray, np.ndarray]:
    """Armature-space pose-bone matrices -> SMPL-X pose and translation.

    matrices: [55,4,4] or [F,55,4,4], ``pose_bone.matrix`` of the evaluated armature, bones in
    SMPL-X joint order (scale is ignored: rotations are orthonormalised). Returns (pose [165] or
    [F,165] axis-angle relative to the rest pose, body frame; transl [3] or [F,3] metres).
    """
    m = _check_array(matrices, (NUM_JOINTS, 4, 4), "bone matrices")
    single = m.ndim == 3
    m = m.reshape(-1, NUM_JOINTS, 4, 4)
    b = layout.matrices
    # World rotation of each joint in the body frame: G_j = A^T M_j B_j^T A.
    world = rotation_to_body(orthonormalize(m[..., :3, :3]) @ np.swapaxes(b, -1, -2)[None])
    parents = layout.parents
    parent_world = np.concatenate([np.broadcast_to(np.eye(3), world[:, :1].shape), world[:, parents[1:]]], 1)
    relative = np.swapaxes(parent_world, -1, -2) @ world
    pose = quaternion_to_axis_angle(matrix_to_quaternion(relative)).reshape(-1, 3 * NUM_JOINTS)
    transl = to_body(m[:, 0, :3, 3]) - layout.rest_joints[0]
    return (pose[0], transl[0]) if single else (pose, transl)


# ------------------------------------------------------------------------------------------ camera
def camera_from_blender(matrix_world, projection, width: int, height: int,
                        object_matrix=None) -> tuple[np.ndarray, np.ndarray]:
    """A Blender perspective camera as the backend's (viewmat, K) for one avatar.

    matrix_world: [4,4] the camera object's world matrix (scale is ignored, as Blender's renderers
    do); projection: [4,4] OpenGL projection from ``camera.calc_matrix_camera(depsgraph, x=width,
    y=height, scale_x=pixel_aspect_x, scale_y=pixel_aspect_y)`` (lens, sensor fit, shift, clipping);
    width, height: the render's pixel size (resolution × percentage); object_matrix: [4,4] the
    avatar armature's world matrix (None: identity).

    Returns viewmat [4,4] (OpenCV world-to-camera taking the avatar's *body frame* (Y up, metres
    before the object's scale) to camera coordinates) and K [3,3] (pixel centres at +0.5).
    """
    cam = _check_array(matrix_world, (4, 4), "camera matrix_world")
    proj = _check_array(projection, (4, 4), "camera projection")
    obj = np.eye(4) if object_matrix is None else _check_array(object_matrix, (4, 4), "object matrix_world")
    if cam.ndim != 2 or proj.ndim != 2 or obj.ndim != 2:
        raise HDAError("camera_from_blender: expected single 4x4 matrices")
    if not (1 <= int(width) <= 65536 and 1 <= int(height) <= 65536):
        raise HDAError(f"render size {width}x{height}: expected 1..65536 pixels per side")
    if abs(proj[3, 2] + 1.0) > 1e-6 or abs(proj[3, 3]) > 1e-6:
        raise HDAError("camera projection: not a perspective projection (orthographic or panoramic "
                       "cameras are not supported), expected a perspective camera")
    cam_rigid = np.eye(4)
    cam_rigid[:3, :3] = orthonormalize(cam[:3, :3])
    cam_rigid[:3, 3] = cam[:3, 3]
    gl_to_cv = np.eye(4)
    gl_to_cv[:3, :3] = GL_TO_CV
    viewmat = gl_to_cv @ np.linalg.inv(cam_rigid) @ body_to_world(obj)
    # NDC x = P00 x/(-z) + P02 z/(-z) = P00 X/Z - P02 in OpenCV's (X, Y, Z); pixels span [0, W].
    w, h = float(width), float(height)
    K = np.array([[0.5 * w * proj[0, 0], 0.0, 0.5 * w * (1.0 - proj[0, 2])],
                  [0.0, 0.5 * h * proj[1, 1], 0.5 * h * (1.0 + proj[1, 2])],
                  [0.0, 0.0, 1.0]])
    return viewmat, K


def body_to_world(object_matrix) -> np.ndarray:
    """[4,4] the avatar's body frame (Y up) -> Blender world: the armature object's world matrix
    ``object_matrix`` [4,4] after the rig's +Y-up to +Z-up turn."""
    body_to_object = np.eye(4)
    body_to_object[:3, :3] = AXIS_YUP_TO_ZUP
    return np.asarray(object_matrix, dtype=np.float64) @ body_to_object


def viewport_camera(view_matrix, window_matrix, width: int, height: int, object_matrix=None,
                    ortho_distance: float = ORTHO_DISTANCE):
    """The backend camera for a 3D view region.

    view_matrix: [4,4] world -> view (RegionView3D.view_matrix, OpenGL); window_matrix: [4,4] the
    region's projection (RegionView3D.window_matrix); width, height: the image size to render;
    object_matrix: [4,4] the avatar armature's world matrix.

    Returns (viewmat [4,4] OpenCV body frame -> camera, K [3,3], depth_shift): a camera-space depth d
    of the backend is the view-space z = depth_shift - d of the region (0 for perspective views).
    Orthographic views are seen through a pinhole ``ortho_distance`` view extents behind the plane
    through the avatar's origin (the rasterizer is perspective only).
    """
    view = np.asarray(view_matrix, dtype=np.float64)
    proj = np.asarray(window_matrix, dtype=np.float64)
    if abs(proj[3, 3]) < 1e-9:  # perspective: exactly a Blender camera at the view's origin
        viewmat, K = camera_from_blender(np.linalg.inv(view), proj, width, height, object_matrix)
        return viewmat, K, 0.0
    # Orthographic: x_ndc = P00 x + P03. A pinhole D behind the plane z = z0 (through the avatar's
    # origin) with focal P00·D sees x_ndc = P00·D·x / (D + z0 - z) + P03: exact on that plane, off
    # by a factor (z - z0)/D elsewhere (1/1000 of the view's size per metre of depth).
    extent = 2.0 / abs(proj[0, 0]) + 2.0 / abs(proj[1, 1])
    distance = ortho_distance * extent
    origin = np.zeros(4) if object_matrix is None else np.asarray(object_matrix, dtype=np.float64)[:, 3]
    if object_matrix is None:
        origin[3] = 1.0
    z0 = float((view @ origin)[2])
    pinhole = np.zeros((4, 4))
    pinhole[0, 0], pinhole[0, 2] = proj[0, 0] * distance, -proj[0, 3]
    pinhole[1, 1], pinhole[1, 2] = proj[1, 1] * distance, -proj[1, 3]
    pinhole[2, 2], pinhole[2, 3] = -1.0, -2.0 * distance * 1e-3
    pinhole[3, 2] = -1.0
    pulled = np.linalg.inv(view)
    pulled[:3, 3] += pulled[:3, 2] * (z0 + distance)  # back along the view's +Z (it looks down -Z)
    viewmat, K = camera_from_blender(pulled, pinhole, width, height, object_matrix)
    return viewmat, K, z0 + distance


def depth_terms(window_matrix) -> tuple[float, float, float, float]:
    """(P22, P23, P32, P33) of the projection: NDC depth = (P22 z + P23) / (P32 z + P33) for view z."""
    p = np.asarray(window_matrix, dtype=np.float64)
    return float(p[2, 2]), float(p[2, 3]), float(p[3, 2]), float(p[3, 3])


def ndc_depth(view_z: np.ndarray, window_matrix) -> np.ndarray:
    """Window depth in [0, 1] (OpenGL's default range) of view-space z, as the viewport's shader computes it."""
    a, b, c, d = depth_terms(window_matrix)
    return 0.5 * (a * view_z + b) / (c * view_z + d) + 0.5


# ----------------------------------------------------------------------------- forward kinematics
def parents_first(parents: dict) -> list:
    """The bones of ``parents`` ({bone: parent bone or None}, in the armature's order) with every
    parent before its children, otherwise in the given order."""
    order, seen = [], set()

    def visit(name):
        if name in seen:
            return
        if parents[name] is not None:
            visit(parents[name])
        seen.add(name)
        order.append(name)

    for name in parents:
        visit(name)
    return order


def armature_pose(parents: dict, rest: dict, quats: dict, locations: dict) -> dict:
    """Blender's armature evaluation: armature-space pose-bone matrices of every bone and frame.

    parents: {bone: parent bone or None}; rest: {bone: [4,4] ``bone.matrix_local``}; quats: {bone:
    [F,4] wxyz ``rotation_quaternion``}; locations: {bone: [F,3] ``location``}. A bone's channels
    make ``matrix_basis`` = [R(q) | location], and down the chain
    ``M_j = M_parent · rest_parent⁻¹ · rest_j · basis_j`` (``M_root = rest_root · basis_root``).
    Returns {bone: [F,4,4] ``pose_bone.matrix``}.
    """
    names = parents_first(parents)
    q = np.stack([np.asarray(quats[n], dtype=np.float64) for n in names], 1)          # [F,B,4]
    basis = np.tile(np.eye(4), q.shape[:2] + (1, 1))
    basis[..., :3, :3] = quaternion_to_matrix(q)
    basis[..., :3, 3] = np.stack([np.asarray(locations[n], dtype=np.float64) for n in names], 1)
    # rest_parent⁻¹ · rest_j for every bone at once (the identity stands for a root's parent): the
    # per-frame path (blender_addon.playback) calls this on every playback frame.
    parent_rest = np.stack([rest[parents[n]] if parents[n] is not None else np.eye(4) for n in names])
    local = np.linalg.inv(parent_rest) @ np.stack([np.asarray(rest[n], dtype=np.float64) for n in names])
    chain = local[None] @ basis                                                        # [F,B,4,4]
    posed: dict = {}
    for i, name in enumerate(names):
        parent = parents[name]
        posed[name] = chain[:, i] if parent is None else posed[parent] @ chain[:, i]
    return posed


def navigation_size(width: int, height: int, moving: bool, scale: float, min_pixels: int) -> tuple[int, int]:
    """A viewport region's image size: the region's own, or ``scale`` of it (never below ``min_pixels`` on
    the short side, never above the region) while the view or pose moves."""
    if not moving:
        return int(width), int(height)
    factor = max(scale, min_pixels / max(1, min(width, height)))
    if factor >= 1.0:
        return int(width), int(height)
    return max(1, round(width * factor)), max(1, round(height * factor))


def is_uniform_scale(scale) -> bool:
    """Whether a matrix's per-axis scale [3] is positive and the same on every axis (to 1e-4, relative):
    the only world transforms a Gaussian survives without shearing."""
    scale = np.asarray(scale, dtype=np.float64)
    return bool((scale > 0).all() and np.abs(scale - scale.mean()).max() <= 1e-4 * np.abs(scale).max())

"""SMPL-X-format body models: the bundled open body or the licensed SMPL-X model, and LBS posing."""

from .lbs import PosedBody, blend_transforms, check_pose, pose_body, pose_transforms, skin_points, vertex_normals
from .model import BUNDLED_BODY, ENV_VAR, BodyModel, load_body, resolve_body_path
from .skeleton import JOINT_INDEX, JOINT_NAMES, NUM_JOINTS, PARENTS, POSE_PARTS

__all__ = [
    "BUNDLED_BODY", "ENV_VAR", "BodyModel", "JOINT_INDEX", "JOINT_NAMES", "NUM_JOINTS", "PARENTS",
    "POSE_PARTS", "PosedBody", "blend_transforms", "check_pose", "load_body", "pose_body", "pose_transforms",
    "resolve_body_path", "skin_points", "vertex_normals",
]

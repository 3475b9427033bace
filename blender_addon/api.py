"""blender_addon's public surface: everything the operators (the top-level ``operators`` package)
use of the add-on, and the only module of blender_addon they import.

The operators reach the add-on's modules through the names below; what is not listed here is private
to blender_addon. The add-on's own modules import each other directly, never through this module,
and nothing in blender_addon imports the operators except ``register()`` (tests/test_addon_structure.py
checks both, and that no module imports in a loop).
"""

from . import (compositor, deps, farm, fitjob, identity, layers, native, playback, preferences, probe, proxy, runtime,
               session)
from .diffusion_model import ENV_MODEL, load_model, missing_model_text, model_path
from .messages import error_text
from .objects import avatar_of, new_uid, object_key, poll_active_avatar, scene_avatars
from .paths import EXT_ROOT, avatar_output_dir, relative_path, user_dir

__all__ = [
    # modules
    "compositor", "deps", "farm", "fitjob", "identity", "layers", "native", "playback", "preferences", "probe",
    "proxy", "runtime", "session",
    # the diffusion model of Sample Identity
    "ENV_MODEL", "load_model", "missing_model_text", "model_path",
    # error text, avatars among objects, paths
    "error_text", "avatar_of", "new_uid", "object_key", "poll_active_avatar", "scene_avatars",
    "EXT_ROOT", "avatar_output_dir", "relative_path", "user_dir",
]

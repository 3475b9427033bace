"""HDA Avatars bpy operators. Thin: logic lives in bpy-free modules (blender_addon.deps/probe,
hda_backend); these only start jobs, poll them and report.

Registered by blender_addon.register(); import only inside Blender (imports bpy).
"""

from . import avatar, bake, export, farm, fit, identity, motion
from .backend import HDA_OT_cancel_install, HDA_OT_check_backend, HDA_OT_install_backend, stop_jobs

CLASSES = (HDA_OT_check_backend, HDA_OT_install_backend, HDA_OT_cancel_install, *avatar.CLASSES, *bake.CLASSES,
           *farm.CLASSES, *motion.CLASSES, *export.CLASSES, *fit.CLASSES, *identity.CLASSES)

__all__ = ["CLASSES", "stop_jobs"]

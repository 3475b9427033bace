"""Where the add-on's files are and how paths are stored: the extension root, the add-on's id, the
folder new avatar files go to, '//'-relative paths. ``relative_path`` is pure; the others import bpy
only when called.
"""

from __future__ import annotations

import os

# The extension's root folder (holds hda_backend/, blender_addon/, operators/).
EXT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVATAR_DIR = "hda_avatars"   # new avatar files, beside the saved .blend


def addon_id() -> str:
    """The add-on's module name (``bl_ext.<repo>.hda_avatars``): the AddonPreferences bl_idname."""
    return __package__.rpartition(".")[0] or __package__


def relative_path(path: str, blend: str) -> str:
    """``path`` as Blender stores a portable path: '//'-relative to the folder of the .blend ``blend``
    (pass ``bpy.data.filepath``, or where the file is being saved), '/'-separated. Unchanged when
    empty, already '//'-relative, while the .blend is unsaved (``blend`` empty) or on another drive."""
    if not path or not blend or path.startswith("//"):
        return path
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(blend)))
    except ValueError:  # another drive (Windows): keep it absolute
        return path
    return "//" + rel.replace(os.sep, "/")


def avatar_output_dir() -> str:
    """Where new avatar files go: ``hda_avatars/`` beside the saved .blend, else the extension's user
    folder (a temporary folder would vanish and leave the saved .blend pointing at nothing)."""
    import bpy

    if bpy.data.filepath:
        return os.path.join(os.path.dirname(os.path.abspath(bpy.data.filepath)), AVATAR_DIR)
    return user_dir("avatars")


def user_dir(name: str) -> str:
    """A folder of the extension's user directory (kept across upgrades), created when missing."""
    import bpy

    return bpy.utils.extension_path_user(addon_id(), path=name, create=True)

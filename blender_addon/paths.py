"""Where the add-on's files are and how paths are stored: the extension root, the add-on's id, the
folder new avatar files go to, '//'-relative paths, avatar files gathered into the project on save.
``relative_path`` and ``keep_with_blend`` need no bpy; the others import it only when called.
"""

from __future__ import annotations

import filecmp
import hashlib
import os
import shutil

from ..hda_backend.constants import AVATAR_SUFFIX
from ..hda_backend.errors import HDAError
from . import session

# The extension's root folder (holds hda_backend/, blender_addon/, operators/).
EXT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVATAR_DIR = "hda_avatars"   # new avatar files, beside the saved .blend
DIGEST_CHARS = 12            # hex digits of a copy's sha256 that tell two same-named avatar files apart


def file_sha256(path: str, what: str) -> str:
    """Hex SHA-256 of a file, remembered per (path, modification time, size) for the session
    (session.caches.file_hashes): avatar files for bake keys, diffusion models for sampled identities'
    file names. ``what`` names the file in the error when it is missing ("avatar file", ...)."""
    try:
        st = os.stat(path)
    except OSError:
        raise HDAError(f"{what} not found: {path}") from None
    stamp = (st.st_mtime_ns, st.st_size)
    known = session.caches.file_hashes.get(path)
    if known is None or known[0] != stamp:
        with open(path, "rb") as fh:
            known = (stamp, hashlib.file_digest(fh, "sha256").hexdigest())
        session.caches.file_hashes[path] = known
    return known[1]


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


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # another drive (Windows)
        return False


def keep_with_blend(path: str, blend: str) -> str:
    """Where the avatar file ``path`` is once the .blend is saved as ``blend`` (both absolute), so that
    the .blend's folder holds every avatar it renders and can be moved or sent to a farm as it is.

    A file inside the .blend's folder travels with it and stays; a missing one stays (its error shows
    where it is used); any other (the extension's user folder, where identities sampled before the
    first save live, another project's ``hda_avatars/``, a fit elsewhere) is copied into
    ``<folder>/hda_avatars/`` under its own name, reusing an identical file there; a different file of
    that name makes the copy ``<stem>-<sha256 start>.hda.safetensors``. Returns the path to store."""
    from ..hda_backend.atomic import replacing

    path = os.path.abspath(path)
    folder = os.path.dirname(os.path.abspath(blend))
    if not os.path.isfile(path) or _inside(path, folder):
        return path
    name = os.path.basename(path)
    target = os.path.join(folder, AVATAR_DIR, name)
    if os.path.exists(target) and not filecmp.cmp(path, target, shallow=False):
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()[:DIGEST_CHARS]
        stem, suffix = (name[:-len(AVATAR_SUFFIX)], AVATAR_SUFFIX) if name.endswith(AVATAR_SUFFIX) \
            else os.path.splitext(name)
        target = os.path.join(folder, AVATAR_DIR, f"{stem}-{digest}{suffix}")
    if not (os.path.exists(target) and filecmp.cmp(path, target, shallow=False)):
        with replacing(target) as tmp:
            shutil.copyfile(path, tmp)
    return target

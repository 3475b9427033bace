"""Finding avatars among Blender objects (no bpy import: these only read attributes, and give
duplicates their own uid).

An avatar is an armature object whose ``Object.hda`` (props.HDAAvatarProps) says ``is_avatar``; its
proxy mesh is parented to it. The session caches key an avatar by :func:`object_key`; its layer
files are keyed by its uid, which must therefore be unique (:func:`ensure_unique_uids`).
"""

import uuid


def new_uid() -> str:
    """A fresh avatar uid (12 hex digits)."""
    return uuid.uuid4().hex[:12]


def object_key(obj) -> str:
    """The session-cache key of an avatar object: its name and its saved uid (a duplicate gets the
    same uid but another name)."""
    return f"{obj.name}:{obj.hda.uid}"


def avatar_of(obj):
    """The avatar armature for ``obj`` (the armature itself or its proxy mesh), or None."""
    while obj is not None:
        if obj.type == 'ARMATURE' and obj.hda.is_avatar:
            return obj
        obj = obj.parent
    return None


def poll_active_avatar(cls, context) -> bool:
    """Operator poll: true when an avatar (armature or proxy) is active, else says what to select."""
    if avatar_of(context.active_object) is None:
        cls.poll_message_set("Select an HDA avatar (its armature or proxy) first")
        return False
    return True


def scene_avatars(scene) -> list:
    """Enabled avatar armatures of ``scene`` that the compositing layer renders, by name (a stable
    order for compositing). Avatars on the native path (``hda.native``) are Blender's to render."""
    return sorted((o for o in scene.objects if o.type == 'ARMATURE' and o.hda.is_avatar and o.hda.enabled
                   and not o.hda.native), key=lambda o: o.name)


def native_avatars(scene) -> list:
    """Avatar armatures of ``scene`` on the native path (enabled or not), by name."""
    return sorted((o for o in scene.objects if o.type == 'ARMATURE' and o.hda.is_avatar and o.hda.native),
                  key=lambda o: o.name)


def all_avatars(scene) -> list:
    """Every avatar armature of ``scene``, enabled or not, by name (the sidebar's list)."""
    return sorted((o for o in scene.objects if o.type == 'ARMATURE' and o.hda.is_avatar), key=lambda o: o.name)


def duplicate_uids(objects) -> list[tuple]:
    """(avatar, avatar it copied its uid from) for every avatar among ``objects`` whose uid an avatar
    earlier in name order already has: Shift+D copies ``hda.uid``, and the copy would write and
    read the original's layer files. The first in name order (the original, "X" before "X.001") keeps it."""
    owners, found = {}, []
    for obj in sorted((o for o in objects if o.type == 'ARMATURE' and o.hda.is_avatar), key=lambda o: o.name):
        uid = obj.hda.uid
        if uid in owners:
            found.append((obj, owners[uid]))
        else:
            owners[uid] = obj
    return found


def ensure_unique_uids(objects) -> list:
    """Give every duplicate found by :func:`duplicate_uids` (and any avatar without a uid) a new
    uid; returns the avatars changed."""
    changed = [obj for obj, _ in duplicate_uids(objects)]
    changed += [o for o in objects if o.type == 'ARMATURE' and o.hda.is_avatar and not o.hda.uid and o not in changed]
    for obj in changed:
        obj.hda.uid = new_uid()
    return changed

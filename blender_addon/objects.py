"""Finding avatars among Blender objects (no bpy import: these only read attributes).

An avatar is an armature object whose ``Object.hda`` (props.HDAAvatarProps) says ``is_avatar``; its
proxy mesh is parented to it. The session caches key an avatar by :func:`object_key`.
"""


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

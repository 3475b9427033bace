"""Per-avatar state, saved in the .blend: ``HDAAvatarProps`` on every object as ``Object.hda``.

Everything an avatar needs to be rebuilt after undo, save/reload or on a render farm lives here, on
the armature object; the non-saved caches (loaded UNets, rendered frames) live in runtime.py, keyed
by :func:`object_key`, never by a Python reference to the object.
"""

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

UV_PRESETS = (("tiny", "Tiny", "UV 32, width-16 UNet: tests and quick previews"),
              ("cpu", "CPU", "UV 128, width-64 UNet: the default without CUDA"),
              ("paper", "Paper", "UV 256, width-64 UNet: the paper's sizes, for CUDA"))
DEVICES = (("cpu", "CPU", "Run the avatar and the rasterizer on the CPU"),
           ("cuda", "CUDA", "Run the avatar and gsplat's rasterizer on the NVIDIA GPU"))
SHADINGS = (("AUTO", "Auto", "Clay for untrained (seed-initialised) avatars, colour for avatar files"),
            ("FLAT", "Colour", "The avatar's own colours (spherical harmonics)"),
            ("CLAY", "Clay", "Grey clay shaded by the Gaussians' normals, to read the shape"))


def _enabled_changed(self, context):
    from . import compositor

    if context.scene is not None:
        compositor.sync(context.scene)  # the saved compositor follows at once (a farm renders it as is)


class HDAAvatarProps(bpy.types.PropertyGroup):
    is_avatar: BoolProperty(name="Is HDA Avatar", default=False,
                            description="This armature drives an HDA avatar")
    uid: StringProperty(name="Avatar ID", default="", options={'HIDDEN'},
                        description="Stable identity of this avatar for the session caches")
    enabled: BoolProperty(name="Enabled", default=True, update=_enabled_changed,
                          description="Render this avatar in final renders and the compositing layer")
    avatar_path: StringProperty(name="Avatar File", subtype='FILE_PATH', default="",
                                description="An avatar file (*.hda.safetensors); empty: the identity from the seed")
    seed: IntProperty(name="Seed", default=0, min=0, description="Identity seed")
    seed_b: IntProperty(name="Second Seed", default=1, min=0,
                        description="Identity the slider blends towards")
    identity_mix: FloatProperty(name="Identity Mix", default=0.0, min=0.0, max=1.0, subtype='FACTOR',
                                description="0: the seed's identity, 1: the second seed's")
    body_path: StringProperty(name="Body Model", subtype='FILE_PATH', default="",
                              description="SMPL-X-format body file; empty: the add-on preferences' body, "
                                          "else the bundled open body")
    uv_preset: EnumProperty(name="Preset", items=UV_PRESETS, default="cpu",
                            description="Size of a seed-initialised avatar (an avatar file brings its own)")
    device: EnumProperty(name="Device", items=DEVICES, default="cpu")
    shading: EnumProperty(name="Shading", items=SHADINGS, default="AUTO")
    proxy: PointerProperty(name="Proxy Mesh", type=bpy.types.Object,
                           description="Low-poly body skinned to this armature, for selection and silhouettes")


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
    """Enabled avatar armatures of ``scene``, by name (a stable order for compositing)."""
    return sorted((o for o in scene.objects if o.type == 'ARMATURE' and o.hda.is_avatar and o.hda.enabled),
                  key=lambda o: o.name)


CLASSES = (HDAAvatarProps,)


def register_properties():
    bpy.types.Object.hda = PointerProperty(type=HDAAvatarProps)


def unregister_properties():
    if hasattr(bpy.types.Object, "hda"):
        del bpy.types.Object.hda

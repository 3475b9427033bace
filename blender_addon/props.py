"""Per-avatar state, saved in the .blend: ``HDAAvatarProps`` on every object as ``Object.hda``.

Everything an avatar needs to be rebuilt after undo, save/reload or on a render farm lives here, on
the armature object; the non-saved caches (loaded UNets, rendered frames) live in session.py, keyed
by objects.object_key, never by a Python reference to the object.
"""

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from ..hda_backend.constants import NATIVE_BLENDER_MIN, PRESET_AVATAR_TEXT, PRESET_LABELS, PRESETS

UV_PRESETS = tuple((name, PRESET_LABELS[name], PRESET_AVATAR_TEXT[name]) for name in PRESETS)
DEVICES = (("cpu", "CPU", "Run the avatar and the rasterizer on the CPU"),
           ("cuda", "CUDA", "Run the avatar and gsplat's rasterizer on the NVIDIA GPU"))
SHADINGS = (("AUTO", "Auto", "Clay for untrained (seed-initialised) avatars, colour for avatar files"),
            ("FLAT", "Colour", "The avatar's own colours (spherical harmonics)"),
            ("CLAY", "Clay", "Grey clay shaded by the Gaussians' normals, to read the shape"))
RENDER_PATHS = (("LAYER", "Compositing Layer", "The backend renders the avatar; the compositor lays it over the scene"),
                ("NATIVE", "Native Splats", "Blender renders the avatar itself as a Gaussian-splat object "
                                            "(Blender 5.3 and later)"))


def _enabled_changed(self, context):
    from . import compositor

    if context.scene is not None:
        compositor.sync(context.scene)  # the saved compositor follows at once (a farm renders it as is)
        if bpy.app.version >= NATIVE_BLENDER_MIN:
            from . import native

            native.sync(context.scene)


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
    render_path: EnumProperty(name="Render Path", items=RENDER_PATHS, default="LAYER", update=_enabled_changed,
                              description="Who renders this avatar; before Blender 5.3 always the compositing layer")
    splats: PointerProperty(name="Splat Object", type=bpy.types.Object,
                            description="The native Gaussian-splat object of this avatar (render path Native)")

    @property
    def native(self) -> bool:
        """Blender renders this avatar itself: the native path is chosen and this Blender has it."""
        return self.render_path == "NATIVE" and bpy.app.version >= NATIVE_BLENDER_MIN


CLASSES = (HDAAvatarProps,)


def register_properties():
    bpy.types.Object.hda = PointerProperty(type=HDAAvatarProps)


def unregister_properties():
    if hasattr(bpy.types.Object, "hda"):
        del bpy.types.Object.hda

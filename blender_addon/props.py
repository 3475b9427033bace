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
# Paths stored '//'-relative to the .blend (handlers.on_save_pre). Blender 4.5+ warns on every save about
# a FILE_PATH property holding a '//' path unless it declares that it supports one; 4.2 has no such flag.
# ('ANIMATABLE' is StringProperty's default option, kept.)
RELATIVE_PATH = {'ANIMATABLE'} | ({'PATH_SUPPORTS_BLEND_RELATIVE'} if bpy.app.version >= (4, 5, 0) else set())
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


def _identity_changed(self, context):
    from . import identity

    identity.controls_changed(self.id_data)  # a sampled identity follows its controls


class HDAAvatarProps(bpy.types.PropertyGroup):
    is_avatar: BoolProperty(name="Is HDA Avatar", default=False,
                            description="This armature drives an HDA avatar")
    uid: StringProperty(name="Avatar ID", default="", options={'HIDDEN'},
                        description="Stable identity of this avatar for the session caches")
    enabled: BoolProperty(name="Enabled", default=True, update=_enabled_changed,
                          description="Render this avatar in final renders and the compositing layer")
    avatar_path: StringProperty(name="Avatar File", subtype='FILE_PATH', default="", options=RELATIVE_PATH,
                                description="An avatar file (*.hda.safetensors); empty: the identity from the seed")
    seed: IntProperty(name="Seed", default=0, min=0, description="Identity seed", update=_identity_changed)
    seed_b: IntProperty(name="Second Seed", default=1, min=0, update=_identity_changed,
                        description="Identity the slider blends towards")
    identity_mix: FloatProperty(name="Identity Mix", default=0.0, min=0.0, max=1.0, subtype='FACTOR',
                                update=_identity_changed, description="0: the seed's identity, 1: the second seed's")
    sampled: BoolProperty(name="Sampled Identity", default=False,
                          description="The avatar file is the diffusion model's person for the seeds: changing "
                                      "Seed, Second Seed or Identity Mix samples again")
    identity_model: StringProperty(name="Identity Model", subtype='FILE_PATH', default="", options=RELATIVE_PATH,
                                   description="Diffusion model of the sampled identity; empty: "
                                               "$HDA_DIFFUSION_MODEL, else the extension's default model")
    identity_steps: IntProperty(name="Identity Steps", default=0, min=0,
                                description="DDIM steps of the sampled identity; 0: the model's")
    body_path: StringProperty(name="Body Model", subtype='FILE_PATH', default="", options=RELATIVE_PATH,
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

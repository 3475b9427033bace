"""hda.sample_identity: a new person for the active avatar from the weight-space diffusion model.

The seed picks the identity (the same seed always gives the same person, hda_backend.diffusion.sample);
*Random* draws a new seed first. The identity slider blends towards a second seed: with ``identity_mix``
> 0 the two seeds' noises are slerped and denoised (sample.interpolate_noise), so every point on the
slider is a person of its own rather than a cross-fade. The sampled avatar is written beside the saved
.blend (``hda_avatars/identity_<seed>[_<seed_b>_<mix>].hda.safetensors``, the extension's user folder
while the file is unsaved) and becomes the avatar's file.

The diffusion model: the operator's ``model`` path, else ``$HDA_DIFFUSION_MODEL``, else the model the
extension bundles (``assets/default/diffusion.safetensors`` in the extension; blender_addon/diffusion_model.py,
which also keeps loaded models in the session). Without any, the operator says so and changes nothing;
the avatar keeps showing its seed's consistent-initialisation identity, which the slider blends live in weight space (runtime.get_avatar).
"""

import os
import secrets

import bpy
from bpy.props import BoolProperty, IntProperty, StringProperty

from ..blender_addon.api import (ENV_MODEL, avatar_of, avatar_output_dir, error_text, load_model, missing_model_text,
                                 model_path, poll_active_avatar, relative_path, runtime)

MAX_SEED = 2 ** 31 - 1  # IntProperty's range


def identity_file(seed: int, seed_b: int, mix: float) -> str:
    name = f"identity_{seed}" + (f"_{seed_b}_{mix:.2f}" if mix > 0 and seed_b != seed else "")
    return os.path.join(avatar_output_dir(), name + ".hda.safetensors")


def sample_identity(obj, model, *, steps: int | None = None) -> str:
    """Sample the identity of ``obj``'s seeds (and slider) with ``model``; returns the avatar file written."""
    from ..hda_backend.diffusion.sample import interpolate_noise, sample_vectors
    from ..hda_backend.diffusion.weights import write_avatar

    h = obj.hda
    mix = float(h.identity_mix) if h.seed_b != h.seed else 0.0
    if mix > 0:
        vec = interpolate_noise(model, h.seed, h.seed_b, mix, steps)
        origin = f"sample:{h.seed}~{h.seed_b}@{mix:.2f} model:{model.path.name}"
    else:
        vec = sample_vectors(model, [h.seed], steps)[0]
        origin = f"sample:{h.seed} model:{model.path.name}"
    return str(write_avatar(vec, model.spec, model.meta, identity_file(h.seed, h.seed_b, mix), origin=origin))


class HDA_OT_sample_identity(bpy.types.Operator):
    """Sample a new identity for the active avatar from the diffusion model (its seed, or blended towards
    the second seed by the identity slider)"""

    bl_idname = "hda.sample_identity"
    bl_label = "Sample Identity"
    bl_options = {'REGISTER', 'UNDO'}

    random: BoolProperty(name="Random Seed", default=False, options={'SKIP_SAVE'},
                         description="Draw a new seed first")
    model: StringProperty(name="Model", subtype='FILE_PATH', default="", options={'SKIP_SAVE'},
                          description=f"Diffusion model file; empty: ${ENV_MODEL}, else the bundled default")
    steps: IntProperty(name="Steps", default=0, min=0, options={'SKIP_SAVE'},
                       description="DDIM steps; 0: the model's")

    @classmethod
    def poll(cls, context):
        return poll_active_avatar(cls, context)

    def execute(self, context):
        obj = avatar_of(context.active_object)
        path = model_path(self.model)
        if path is None:
            self.report({'ERROR'}, missing_model_text())
            return {'CANCELLED'}
        h = obj.hda
        previous = (h.seed, h.avatar_path)
        if self.random:
            h.seed = secrets.randbelow(MAX_SEED + 1)
        try:
            written = sample_identity(obj, load_model(path, obj.hda.device), steps=self.steps or None)
            h.avatar_path = relative_path(written, bpy.data.filepath)
            runtime.invalidate(obj)
            runtime.get_avatar(obj)  # refuse a sample made for another body now, not at render time
        except Exception as exc:  # noqa: BLE001 - bad models, wrong bodies, a missing backend become a report
            h.seed, h.avatar_path = previous
            runtime.invalidate(obj)
            self.report({'ERROR'}, error_text(exc, unexpected="raise"))
            return {'CANCELLED'}
        self.report({'INFO'}, f"{obj.name}: identity {os.path.basename(written)}")
        return {'FINISHED'}


CLASSES = (HDA_OT_sample_identity,)

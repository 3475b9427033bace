"""hda.sample_identity: a new person for the active avatar from the weight-space diffusion model.

The seed picks the identity (the same seed always gives the same person, hda_backend.diffusion.sample);
*Random* draws a new seed first. The identity slider blends towards a second seed: with ``identity_mix``
> 0 the two seeds' noises are slerped and denoised (sample.interpolate_noise), so every point on the
slider is a person of its own rather than a cross-fade. The sampled avatar is the content-addressed
file of blender_addon/identity.py (the same model, seeds and mix reuse one file) beside the saved
.blend (``hda_avatars/``, the extension's user folder while the file is unsaved) and becomes the
avatar's file. The avatar is then marked ``sampled`` with its model and steps: from then on its
controls resample live (identity.controls_changed).

The diffusion model: the operator's ``model`` path, else ``$HDA_DIFFUSION_MODEL``, else the model the
extension bundles (``assets/default/diffusion.safetensors`` in the extension; blender_addon/diffusion_model.py,
which also keeps loaded models in the session). Without any, the operator says so and changes nothing;
the avatar keeps showing its seed's consistent-initialisation identity, which the slider blends live in weight space (runtime.get_avatar).
"""

import os
import secrets

import bpy
from bpy.props import BoolProperty, IntProperty, StringProperty

from ..blender_addon.api import (ENV_MODEL, avatar_of, error_text, identity, missing_model_text, poll_active_avatar,
                                 relative_path, runtime)

MAX_SEED = 2 ** 31 - 1  # IntProperty's range


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
        h = obj.hda
        names = ("seed", "avatar_path", "sampled", "identity_model", "identity_steps")
        previous = {name: getattr(h, name) for name in names}
        with identity.quiet():  # this operator samples itself: no live sample of the new seed
            if self.random:
                h.seed = secrets.randbelow(MAX_SEED + 1)
            request = identity.request_for(obj, self.model, self.steps)
            if request is None:
                h.seed = previous["seed"]
                self.report({'ERROR'}, missing_model_text())
                return {'CANCELLED'}
            try:
                written = identity.sample_file(request)
                h.avatar_path = relative_path(written, bpy.data.filepath)
                # Recorded for the live controls; no model named stays empty (the default, on any machine).
                h.sampled, h.identity_steps = True, self.steps
                h.identity_model = request.model if self.model.strip() else ""
                runtime.invalidate(obj)
                runtime.get_avatar(obj)  # refuse a sample made for another body now, not at render time
            except Exception as exc:  # noqa: BLE001 - bad models, wrong bodies, a missing backend become a report
                for name, value in previous.items():
                    setattr(h, name, value)
                runtime.invalidate(obj)
                self.report({'ERROR'}, error_text(exc, unexpected="raise"))
                return {'CANCELLED'}
        self.report({'INFO'}, f"{obj.name}: identity {os.path.basename(written)}")
        return {'FINISHED'}


CLASSES = (HDA_OT_sample_identity,)

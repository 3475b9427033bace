"""hda.add_avatar and hda.load_avatar: the avatar armature, its proxy mesh and its avatar file.

The armature has one bone per SMPL-X joint (names, hierarchy, rest T-pose from the body model,
Blender Z-up metres; bone frames as documented in hda_backend/rig.py) with quaternion rotations.
The proxy is the body mesh, decimated, skinned to the armature by vertex groups and an Armature
modifier: it selects the avatar in the viewport and shows its silhouette. In renders it is a
shadow-only caster (blender_addon/proxy.py): the person's shadow in Cycles and EEVEE, never seen
itself (the avatar is rendered by the backend and composited).
"""

import os

import bpy
import numpy as np
from bpy.props import IntProperty, StringProperty
from bpy_extras.io_utils import ImportHelper

from ..blender_addon.api import avatar_of, compositor, error_text, new_uid, preferences, relative_path, runtime
from ..blender_addon.api import proxy as proxy_render
from ..hda_backend.errors import HDAError

PROXY_FACES = 3000     # triangles of the proxy mesh
PROXY_WEIGHTS = 4      # strongest skinning weights kept per proxy vertex


def build_armature(context, name: str, layout) -> bpy.types.Object:
    """An armature object with the layout's bones (rig.BoneLayout), linked to the active collection."""
    arm = bpy.data.armatures.new(name)
    arm.display_type = 'OCTAHEDRAL'
    obj = bpy.data.objects.new(name, arm)
    context.collection.objects.link(obj)
    for other in context.view_layer.objects.selected:
        other.select_set(False)
    context.view_layer.objects.active = obj
    obj.select_set(True)
    with context.temp_override(active_object=obj, object=obj, selected_objects=[obj],
                               selected_editable_objects=[obj]):
        bpy.ops.object.mode_set(mode='EDIT')
        try:
            bones = []
            for j, bone_name in enumerate(layout.names):
                eb = arm.edit_bones.new(bone_name)
                eb.head = layout.heads[j].tolist()
                eb.tail = layout.tails[j].tolist()
                eb.roll = float(layout.rolls[j])
                bones.append(eb)
            for j, parent in enumerate(layout.parents):
                if parent >= 0:
                    bones[j].parent = bones[parent]
        finally:
            bpy.ops.object.mode_set(mode='OBJECT')
    for pb in obj.pose.bones:
        pb.rotation_mode = 'QUATERNION'
    return obj


def build_proxy(context, armature: bpy.types.Object, body) -> bpy.types.Object:
    """The body's rest mesh, decimated to about PROXY_FACES triangles, skinned to ``armature``."""
    from ..hda_backend import rig

    verts = rig.to_blender(body.v_template.double().numpy())
    faces = body.faces.numpy()
    weights = body.weights.numpy()
    mesh = bpy.data.meshes.new(armature.name + "_proxy")
    mesh.from_pydata(verts.tolist(), [], faces.tolist())
    mesh.validate()
    proxy = bpy.data.objects.new(armature.name + "_proxy", mesh)
    context.collection.objects.link(proxy)
    # Strongest weights per vertex, renormalised, written per (joint, weight) group: vertex_groups.add
    # takes one weight for a list of vertices, so equal (quantised) weights go in one call.
    top = np.argsort(-weights, axis=1)[:, :PROXY_WEIGHTS]
    w = np.take_along_axis(weights, top, 1)
    w = np.round(w / w.sum(1, keepdims=True) * 255) / 255
    for j, joint in enumerate(rig.JOINT_NAMES):
        group = proxy.vertex_groups.new(name=joint)
        rows, cols = np.nonzero((top == j) & (w > 0))
        for value in np.unique(w[rows, cols]):
            pick = rows[w[rows, cols] == value]
            group.add(pick.tolist(), float(value), 'REPLACE')
    if len(faces) > PROXY_FACES:
        decimate = proxy.modifiers.new("decimate", 'DECIMATE')
        decimate.ratio = PROXY_FACES / len(faces)
        depsgraph = context.evaluated_depsgraph_get()
        low = bpy.data.meshes.new_from_object(proxy.evaluated_get(depsgraph), preserve_all_data_layers=True,
                                              depsgraph=depsgraph)
        proxy.modifiers.remove(decimate)
        full, proxy.data = proxy.data, low
        low.name = full.name
        bpy.data.meshes.remove(full)
    skin = proxy.modifiers.new("armature", 'ARMATURE')
    skin.object = armature
    proxy.parent = armature
    proxy.display_type = 'WIRE'
    proxy_render.make_shadow_only(proxy)
    return proxy


class HDA_OT_add_avatar(bpy.types.Operator):
    """Add an HDA avatar: an SMPL-X armature in rest pose with a proxy mesh, rendered by the backend"""

    bl_idname = "hda.add_avatar"
    bl_label = "Add HDA Avatar"
    bl_options = {'REGISTER', 'UNDO'}

    filepath: StringProperty(name="Avatar File", subtype='FILE_PATH', default="",
                             description="An avatar file (*.hda.safetensors); empty: the identity from the seed")
    seed: IntProperty(name="Seed", default=0, min=0, description="Identity seed when no file is given")

    @classmethod
    def poll(cls, context):
        return context.mode == 'OBJECT' and context.scene is not None

    def execute(self, context):
        try:
            from ..hda_backend import rig

            body = runtime.get_body(preferences.body_path(context))
            layout = runtime.get_layout(body)
            path = self.filepath.strip()
            if path:
                from ..hda_backend.avatar.io import load_avatar

                load_avatar(os.path.abspath(bpy.path.abspath(path)), body)  # refuse a bad file up front
        except (HDAError, ImportError) as exc:  # bad input or no backend: a report, never a traceback
            self.report({'ERROR'}, error_text(exc))
            return {'CANCELLED'}
        armature = build_armature(context, "HDA_Avatar", layout)
        # The rest body stands on the 3D cursor: its lowest vertex at the cursor's height.
        lift = -rig.rest_floor(body.v_template.double().numpy())
        armature.location = context.scene.cursor.location + type(context.scene.cursor.location)((0, 0, lift))
        h = armature.hda
        h.is_avatar = True
        h.uid = new_uid()
        h.seed = self.seed
        h.avatar_path = relative_path(self.filepath.strip(), bpy.data.filepath)
        h.proxy = build_proxy(context, armature, body)
        context.view_layer.objects.active = armature
        compositor.sync(context.scene)
        self.report({'INFO'}, f"Added {armature.name}")
        return {'FINISHED'}


class HDA_OT_load_avatar(ImportHelper, bpy.types.Operator):
    """Load an avatar file (*.hda.safetensors) onto the active HDA avatar"""

    bl_idname = "hda.load_avatar"
    bl_label = "Load Avatar"
    bl_options = {'REGISTER', 'UNDO'}

    filename_ext = ".safetensors"
    filter_glob: StringProperty(default="*.safetensors", options={'HIDDEN'})

    @classmethod
    def poll(cls, context):
        return avatar_of(context.active_object) is not None

    def execute(self, context):
        obj = avatar_of(context.active_object)
        h = obj.hda
        previous = h.avatar_path, h.sampled
        h.avatar_path = relative_path(self.filepath, bpy.data.filepath)
        h.sampled = False  # a loaded person: the identity controls no longer resample it
        try:
            runtime.invalidate(obj)
            runtime.get_avatar(obj)
        except (HDAError, ImportError) as exc:
            h.avatar_path, h.sampled = previous
            runtime.invalidate(obj)
            self.report({'ERROR'}, error_text(exc))
            return {'CANCELLED'}
        self.report({'INFO'}, f"Loaded {os.path.basename(self.filepath)} onto {obj.name}")
        return {'FINISHED'}


CLASSES = (HDA_OT_add_avatar, HDA_OT_load_avatar)

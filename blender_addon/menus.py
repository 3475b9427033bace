"""The avatars' operators where animators look for them, besides the sidebar: Shift+A › HDA Avatar,
File › Import › SMPL-X / AMASS Motion (.npz) and SMPL-X Motion (.bvh), File › Export › HDA Gaussians
(3DGS .ply).

Each entry is a draw function appended to one of Blender's menus by :func:`register` and removed
again by :func:`unregister` (the same functions, so nothing is left behind). The entries call the
same operators as the sidebar; the import entries only preset the file browser's filter.
"""

import bpy


def add_menu(self, context):
    self.layout.operator("hda.add_avatar", text="HDA Avatar", icon='ARMATURE_DATA')


def import_menu(self, context):
    op = self.layout.operator("hda.import_motion", text="SMPL-X / AMASS Motion (.npz)")
    op.filter_glob = "*.npz"
    op = self.layout.operator("hda.import_motion", text="SMPL-X Motion onto HDA Avatar (.bvh)")
    op.filter_glob = "*.bvh"


def export_menu(self, context):
    self.layout.operator("hda.export_ply", text="HDA Avatar Gaussians (3DGS .ply)")


# (Blender menu class, draw function appended to it)
MENUS = (("VIEW3D_MT_add", add_menu),
         ("TOPBAR_MT_file_import", import_menu),
         ("TOPBAR_MT_file_export", export_menu))


def register() -> None:
    for menu, func in MENUS:
        getattr(bpy.types, menu).append(func)


def unregister() -> None:
    for menu, func in MENUS:
        getattr(bpy.types, menu).remove(func)

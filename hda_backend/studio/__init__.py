"""The synthetic capture studio: varied clothed people on the bundled body, filmed by a calibrated ring
of cameras through real Blender (Cycles), written in the dataset format of :mod:`hda_backend.dataset`.

Nothing here imports bpy at module level. The Blender side lives in
:mod:`hda_backend.studio.blender_render`, which runs as its own process (``python -m ...``) and imports
only bpy, numpy, Pillow and numpy-only helpers (layer, atomic), so Blender's global state and libraries
never share a process with torch.
"""

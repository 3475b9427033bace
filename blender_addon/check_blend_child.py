"""The Blender side of ``hda check-blend`` (hda_backend/check_blend.py): run as a script by a Blender
Python, never imported by the add-on.

    python check_blend_child.py ROOT FILE.blend REPORT.json                  (a Python with bpy)
    blender -b --factory-startup --python check_blend_child.py -- ROOT FILE.blend REPORT.json

ROOT holds hda_backend/ and blender_addon/; they are imported as one package under a private name
(their imports are relative), only ``Object.hda`` is registered (no handlers, no preferences), the
file is opened and blender_addon/farm.py checks its active scene. The report is JSON: scene, frames,
avatars, lines (problems), notes, or error (one line: the file could not be opened).
"""

import importlib
import importlib.util
import json
import sys
import types

PACKAGE = "hda_check_blend"


def main(argv) -> None:
    root, blend, out = argv
    import bpy

    package = types.ModuleType(PACKAGE)
    package.__path__ = [root]
    sys.modules[PACKAGE] = package
    props = importlib.import_module(PACKAGE + ".blender_addon.props")
    for cls in props.CLASSES:
        bpy.utils.register_class(cls)
    props.register_properties()
    farm = importlib.import_module(PACKAGE + ".blender_addon.farm")
    try:
        bpy.ops.wm.open_mainfile(filepath=blend, load_ui=False)
    except RuntimeError as exc:
        report = {"error": f"not a readable .blend file ({' '.join(str(exc).split())})"}
    else:
        scene = bpy.context.scene
        notes = []
        load = importlib.util.find_spec("torch") is not None
        if not load:
            notes.append("torch is not importable here: avatar files were hashed, not loaded")
        lines = farm.check_scene(scene, load_avatars=load, saved=True)
        report = {"scene": scene.name, "frames": [scene.frame_start, scene.frame_end],
                  "avatars": len(farm.farm_avatars(scene)), "lines": lines, "notes": notes}
    with open(out, "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main(sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:])

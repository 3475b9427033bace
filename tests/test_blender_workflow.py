"""The animator's workflow in real Blender: the menus, AMASS clips on the ground, live identity controls,
avatar files that stay with the project, saves without warnings.

One child process per Blender version runs the driver below on the zip built and installed with
Blender's own tools (as in test_blender_extension.py); 4.2 LTS when ``.venv-bpy42`` exists, with the
backend from this project's environment. References are computed here, independently of Blender: the
body posed by the backend's LBS with the clip's own pose and translation, the diffusion sampler run
directly, the sampled files' bytes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_blender_extension import ADDON, BPY42_PYTHON, BPY50_PYTHON, _hermetic_env
from tests.test_blender_extension import built_zip  # noqa: F401 - the zip fixture, built once per module
from tests.test_blender_periphery import diffusion_model, write_bvh  # noqa: F401 - the tiny model fixture

RELATIVE_WARNING = 'does not support blend relative "//" prefix'

_DRIVER = r'''
import json, os, shutil, sys, time, types
args = json.loads(sys.argv[1])
import bpy
import numpy as np

ADDON = args["addon"]
report = {"version": list(bpy.app.version)}


def mod(name):
    import importlib
    return importlib.import_module(f"{ADDON}.{name}")


def call(op, **kw):
    try:
        return sorted(op(**kw)), None
    except RuntimeError as exc:  # an operator's ERROR report
        return None, str(exc).strip()


def addon_entries(menu):
    """The add-on's draw functions appended to a Blender menu."""
    return [f.__name__ for f in getattr(bpy.types, menu)._dyn_ui_initialize()
            if getattr(f, "__module__", "").startswith(ADDON)]


class Layout:
    """Records what a menu draw function puts in the menu (no UI in background mode)."""

    def __init__(self):
        self.entries = []

    def operator(self, idname, text="", icon='NONE'):
        props = types.SimpleNamespace()
        self.entries.append((idname, text, props))
        return props


class PanelLayout(Layout):
    """Records what a panel draw puts in its boxes and rows (labels, properties, operators)."""

    def box(self):
        return self

    def row(self, **_):
        return self

    def column(self, **_):
        return self

    def label(self, text="", icon='NONE'):
        self.entries.append(("label", text, None))

    def prop(self, data, name, **_):
        self.entries.append(("prop", name, data))


def menu_entries(menu):
    layout = Layout()
    for func in getattr(bpy.types, menu)._dyn_ui_initialize():
        if getattr(func, "__module__", "").startswith(ADDON):
            func(types.SimpleNamespace(layout=layout), bpy.context)
    return [(idname, text, vars(props)) for idname, text, props in layout.entries]


def run_entry(entry, **kw):
    """Run a menu entry's operator with the properties the menu set, as clicking it does."""
    idname, _, props = entry
    group, name = idname.split(".")
    return call(getattr(getattr(bpy.ops, group), name), **props, **kw)


MENUS = ("VIEW3D_MT_add", "TOPBAR_MT_file_import", "TOPBAR_MT_file_export")
bpy.ops.extensions.package_install_files(filepath=args["zip"], repo="user_default", enable_on_install=True)
if args.get("env_site"):
    bpy.context.preferences.addons[ADDON].preferences.python_path = args["env_site"]
runtime, identity, session = mod("blender_addon.runtime"), mod("blender_addon.identity"), mod("blender_addon.session")
rig = mod("hda_backend.rig")

# --- menus --------------------------------------------------------------------------------------
report["menu_funcs"] = {m: addon_entries(m) for m in MENUS}
entries = {m: menu_entries(m) for m in MENUS}
report["menu_entries"] = {m: [[e[0], e[1], e[2]] for e in es] for m, es in entries.items()}
scene = bpy.context.scene
scene.cursor.location = (0.0, 0.0, 0.0)
scene.render.fps, scene.render.fps_base = 30, 1.0
report["add_from_menu"] = run_entry(entries["VIEW3D_MT_add"][0])
arm = bpy.context.active_object
arm.hda.uv_preset = "tiny"
# The sidebar's Backend box (no UI in background mode: drawn into a recording layout).
panel = PanelLayout()
mod("blender_addon.ui").HDA_PT_main._backend(None, panel, bpy.context, arm)
prefs = bpy.context.preferences.addons[ADDON].preferences
report["backend_box_props"] = [[name, data == prefs] for kind, name, data in panel.entries if kind == "prop"]
ui = mod("blender_addon.ui")
report["ahead_lines"] = []
for flag in (True, False, None):  # playing with look-ahead, playing without, stopped
    if flag is None:
        session.viewport.ahead.clear()
    else:
        session.viewport.ahead[mod("blender_addon.objects").object_key(arm)] = flag
    panel = PanelLayout()
    ui.HDA_PT_main._backend(None, panel, bpy.context, arm)
    report["ahead_lines"].append([text for kind, text, _ in panel.entries
                                  if kind == "label" and text in (ui.AHEAD_ON, ui.AHEAD_OFF)])
report["ahead_texts"] = [ui.AHEAD_ON, ui.AHEAD_OFF]
layout = runtime.get_layout(runtime.get_body(None))
npz_entry, bvh_entry = entries["TOPBAR_MT_file_import"]


def world_state(frame):
    scene.frame_set(frame)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    heads = [list(arm.matrix_world @ arm.pose.bones[n].head) for n in layout.names]
    pose, transl = runtime.read_pose(arm, depsgraph, layout)
    proxy = arm.hda.proxy.evaluated_get(depsgraph)
    mesh = proxy.to_mesh()
    co = np.empty(len(mesh.vertices) * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    proxy.to_mesh_clear()
    m = np.array(arm.hda.proxy.matrix_world)
    proxy_z = float((co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3])[:, 2].min())
    return {"heads": heads, "pose": pose.tolist(), "transl": transl.tolist(),
            "matrix_world": [list(r) for r in arm.matrix_world], "proxy_min_z": proxy_z}


# --- AMASS clip onto the added avatar, from the import menu ---------------------------------------
report["amass"] = run_entry(npz_entry, filepath=args["amass"], fps_mode="SCENE_FPS", frame_start=1)
report["amass_frames"] = [world_state(1 + f) for f in range(3)]
# --- BVH (unchanged): the pelvis moves by the file's own root displacement ------------------------
report["bvh"] = run_entry(bvh_entry, filepath=args["bvh"], frame_start=1)
report["bvh_frames"] = [world_state(1 + f) for f in range(2)]

# --- export from the File > Export entry ----------------------------------------------------------
report["export"] = run_entry(entries["TOPBAR_MT_file_export"][0], filepath=os.path.join(args["tmp"], "menu.ply"))

# --- live identity controls -------------------------------------------------------------------------
folder = identity.avatar_output_dir()
listing = lambda: sorted(os.listdir(folder)) if os.path.isdir(folder) else []
h = arm.hda
h.seed, h.seed_b = 5, 8  # not sampled yet: the controls write nothing
report["unsampled_files"] = listing()
report["sample"] = call(bpy.ops.hda.sample_identity, model=args["model"], steps=3)
first = bpy.path.abspath(h.avatar_path)
stamp = os.stat(first).st_mtime_ns
report["sample_again"] = call(bpy.ops.hda.sample_identity, model=args["model"], steps=3)
report["sample_files"] = [os.path.basename(first), bpy.path.abspath(h.avatar_path) == first,
                          os.stat(first).st_mtime_ns == stamp, listing()]
live = {}
h.seed = 6
live["seed"] = os.path.basename(bpy.path.abspath(h.avatar_path))
h.identity_mix = 0.5
live["mix"] = os.path.basename(bpy.path.abspath(h.avatar_path))
h.identity_mix = 0.0
live["back"] = os.path.basename(bpy.path.abspath(h.avatar_path))
live["files"] = listing()
live["loaded"] = runtime.get_avatar(arm).uv_res
# With a UI: the sample runs on a worker thread and the timer hands it over; changes coalesce.
identity._background = lambda: False
before = h.avatar_path
h.seed = 9
live["thread_immediate"] = [h.avatar_path == before, identity.busy(arm),
                            bpy.app.timers.is_registered(identity.tick)]
h.seed = 10
end, ticks = time.monotonic() + 120, 0
while time.monotonic() < end:
    ticks += 1
    if identity.tick() is None:
        break
    time.sleep(0.05)
live["thread_final"] = [os.path.basename(bpy.path.abspath(h.avatar_path)), identity.busy(arm), ticks]
identity._background = lambda: bpy.app.background
live["thread_loaded"] = runtime.get_avatar(arm).uv_res
report["live"] = live
sampled_file = bpy.path.abspath(h.avatar_path)
report["sampled_file"] = sampled_file
# A loaded file is not a sampled identity: its controls leave it alone.
report["add_second"] = call(bpy.ops.hda.add_avatar)
second = bpy.context.active_object
report["load_second"] = call(bpy.ops.hda.load_avatar, filepath=sampled_file)
second.hda.seed = 3
report["loaded_kept"] = [bpy.path.abspath(second.hda.avatar_path) == sampled_file, second.hda.sampled]
bpy.context.view_layer.objects.active = arm

# --- save (the file is in the user folder), move the folder, reopen ----------------------------------
report["before_save"] = h.avatar_path
project = os.path.join(args["tmp"], "project_a")
os.makedirs(project)
bpy.ops.wm.save_as_mainfile(filepath=os.path.join(project, "scene.blend"))
report["saved"] = [h.avatar_path, second.hda.avatar_path, h.identity_model]
bpy.ops.wm.save_mainfile()  # a second save: nothing new, no warning
report["saved_again"] = h.avatar_path
arm_name = arm.name
moved = os.path.join(args["tmp"], "moved", "project_b")
shutil.move(project, moved)
bpy.ops.wm.open_mainfile(filepath=os.path.join(moved, "scene.blend"))
arm = bpy.data.objects[arm_name]
report["reopened"] = [arm.hda.avatar_path, bpy.path.abspath(arm.hda.avatar_path), arm.hda.sampled]
report["reopened_loaded"] = runtime.get_avatar(arm).uv_res
report["reopened_error"] = session.caches.errors.get(mod("blender_addon.objects").object_key(arm))

# --- disable: every menu entry and the timer are gone ------------------------------------------------
bpy.ops.preferences.addon_disable(module=ADDON)
report["menus_left"] = {m: addon_entries(m) for m in MENUS}
report["timer_left"] = bpy.app.timers.is_registered(identity.tick)
with open(args["out"], "w") as f:
    json.dump(report, f)
'''


# ------------------------------------------------------------------------------------ inputs
def _amass_clip(folder: Path):
    """A +Z-up clip in AMASS's SMPL-H layout whose feet are on the ground (z = 0) at frames 0 and 2 and
    0.2 m above it at frame 1 (a hop), found by posing the body with the backend's LBS; also the
    reference joints and lowest vertices in the clip's world."""
    from hda_backend import rig
    from hda_backend.body import load_body, pose_body

    body = load_body()
    rng = np.random.default_rng(7)
    frames = 3
    pose = rng.normal(0, 0.12, (frames, 55, 3))
    pose[:, 22:25] = 0.0  # SMPL-H has no jaw and eyes
    up = rig.axis_angle_to_matrix(np.array([np.pi / 2, 0.0, 0.0]))
    yaw = rig.axis_angle_to_matrix(np.array([0.0, 0.0, 0.6]))
    pose[:, 0] = rig.quaternion_to_axis_angle(rig.matrix_to_quaternion(yaw @ up @ rig.axis_angle_to_matrix(pose[:, 0])))
    heights = np.array([0.0, 0.2, 0.0])
    placed = pose_body(body, torch.tensor(pose, dtype=torch.float32))
    transl = np.stack([np.array([0.3 + 0.1 * f, -0.5, 0.0]) for f in range(frames)])
    transl[:, 2] = heights - placed.vertices[..., 2].double().numpy().min(1)
    ref = pose_body(body, torch.tensor(pose, dtype=torch.float32), transl=torch.tensor(transl, dtype=torch.float32))
    np.savez(folder / "amass_ground.npz", poses=np.concatenate([pose[:, :22], pose[:, 25:]], 1).reshape(frames, -1),
             trans=transl, mocap_framerate=np.array(30.0))
    return folder / "amass_ground.npz", ref.joints.double().numpy(), ref.vertices[..., 2].double().numpy().min(1), heights


def _run(python: Path, tmp_path: Path, built_zip: Path, model: Path, env_site: str | None = None) -> tuple[dict, str]:
    from hda_backend.body import load_body

    amass, joints, lowest, heights = _amass_clip(tmp_path)
    rng = np.random.default_rng(3)
    bvh_pose, bvh_transl = rng.normal(0, 0.2, (2, 55, 3)), rng.normal(0, 0.1, (2, 3))
    write_bvh(tmp_path / "clip.bvh", load_body().rest_joints().double().numpy(), bvh_pose, bvh_transl, 30.0)
    args = {"addon": ADDON, "zip": str(built_zip), "tmp": str(tmp_path), "out": str(tmp_path / "report.json"),
            "amass": str(amass), "bvh": str(tmp_path / "clip.bvh"), "model": str(model), "env_site": env_site}
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = _hermetic_env(BLENDER_USER_RESOURCES=str(tmp_path / "blender_user"), HOME=str(tmp_path / "home"))
    env.pop("HDA_SMPLX_PATH", None)
    env.pop("HDA_DIFFUSION_MODEL", None)
    proc = subprocess.run([str(python), str(driver), json.dumps(args)], env=env, capture_output=True, text=True,
                          timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    report["ref"] = {"joints": joints, "lowest": lowest, "heights": heights, "bvh_transl": bvh_transl}
    return report, proc.stdout + proc.stderr


def _check(r: dict, output: str, tmp_path: Path, model_path: Path) -> None:
    from hda_backend import rig
    from hda_backend.body import load_body, pose_body
    from hda_backend.diffusion.sample import interpolate_noise, load_diffusion, sample_vectors
    from hda_backend.diffusion.weights import state_dict_to_vector
    from safetensors.torch import load_file

    # Menus: Shift+A, File > Import (npz, bvh), File > Export, each running its operator.
    assert r["menu_funcs"] == {"VIEW3D_MT_add": ["add_menu"], "TOPBAR_MT_file_import": ["import_menu"],
                               "TOPBAR_MT_file_export": ["export_menu"]}
    entries = r["menu_entries"]
    assert entries["VIEW3D_MT_add"] == [["hda.add_avatar", "HDA Avatar", {}]]
    assert [(e[0], e[2]) for e in entries["TOPBAR_MT_file_import"]] == [
        ("hda.import_motion", {"filter_glob": "*.npz"}), ("hda.import_motion", {"filter_glob": "*.bvh"})]
    assert entries["TOPBAR_MT_file_import"][0][1] == "SMPL-X / AMASS Motion (.npz)"
    assert entries["TOPBAR_MT_file_export"] == [["hda.export_ply", "HDA Avatar Gaussians (3DGS .ply)", {}]]
    assert r["add_from_menu"] == [["FINISHED"], None] and r["amass"] == [["FINISHED"], None]
    assert r["bvh"] == [["FINISHED"], None] and r["export"] == [["FINISHED"], None]
    assert (tmp_path / "menu.ply").is_file()
    assert r["menus_left"] == {m: [] for m in r["menus_left"]} and r["timer_left"] is False
    # The sidebar's Backend box: the avatar's device (and render path on 5.3+) and the preference Fast
    # Playback Preview, where animators look while playing.
    assert ["playback_lod", True] in r["backend_box_props"] and ["device", False] in r["backend_box_props"]
    on, off = r["ahead_texts"]
    assert r["ahead_lines"] == [[on], [off], []], r["ahead_lines"]

    # AMASS: Blender's own bone heads are the clip's joints in the clip's world (cursor at the origin),
    # and the body posed as Blender holds it stands on the ground (hops 0.2 m at frame 1).
    body = load_body()
    ref = r["ref"]
    assert np.abs(ref["lowest"] - ref["heights"]).max() < 1e-5  # the clip is what it claims
    for f, state in enumerate(r["amass_frames"]):
        assert np.abs(np.array(state["heads"]) - ref["joints"][f]).max() < 2e-4, f
        posed = pose_body(body, torch.tensor(state["pose"], dtype=torch.float32).reshape(1, 55, 3),
                          transl=torch.tensor(state["transl"], dtype=torch.float32).reshape(1, 3))
        world = rig.body_to_world(np.array(state["matrix_world"]))
        v = posed.vertices[0].double().numpy() @ world[:3, :3].T + world[:3, 3]
        assert abs(v[:, 2].min() - ref["heights"][f]) < 2e-4, (f, v[:, 2].min())
        assert abs(state["proxy_min_z"] - ref["heights"][f]) < 0.03  # Blender's skinned proxy too
    # BVH: the pelvis is the rest pelvis moved by the file's root displacement, as before.
    j0 = rig.to_blender(body.rest_joints()[0].double().numpy())
    for f, state in enumerate(r["bvh_frames"]):
        m = np.array(state["matrix_world"])
        want = m[:3, :3] @ (j0 + rig.to_blender(ref["bvh_transl"][f])) + m[:3, 3]
        assert np.abs(np.array(state["heads"][0]) - want).max() < 1e-4
        assert np.abs(np.array(state["transl"]) - ref["bvh_transl"][f]).max() < 1e-5

    # Live identity: content-addressed files, one per model + seeds + mix, reused; the controls resample.
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()[:12]
    name = lambda s: f"identity_{s}-{digest}-s3.hda.safetensors"
    assert r["unsampled_files"] == []
    assert r["sample"] == [["FINISHED"], None] and r["sample_again"] == [["FINISHED"], None]
    assert r["sample_files"] == [name(5), True, True, [name(5)]]  # the second press wrote nothing
    live = r["live"]
    assert live["seed"] == name(6) and live["mix"] == name("6_8_0.50") and live["back"] == name(6)
    assert live["files"] == sorted([name(5), name(6), name("6_8_0.50")]) and live["loaded"] == 32
    unchanged, busy, timer = live["thread_immediate"]
    assert unchanged and busy and timer      # the main thread did not wait for the sample
    assert live["thread_final"][:2] == [name(10), False]
    assert live["thread_loaded"] == 32
    assert r["loaded_kept"] == [True, False]
    model = load_diffusion(model_path)
    user = tmp_path / "blender_user"
    for label, vec in ((6, sample_vectors(model, [6], 3)[0]), ("6_8_0.50", interpolate_noise(model, 6, 8, 0.5, 3)),
                       (10, sample_vectors(model, [10], 3)[0])):
        [path] = list(user.rglob(name(label)))
        assert np.allclose(state_dict_to_vector(load_file(str(path)), model.spec).numpy(), vec.numpy(), atol=1e-6)

    # Save: the identity sampled before the first save moves into the project, paths become relative,
    # and no '//' warning is printed; the moved folder reopens with the avatar loading.
    assert Path(r["before_save"]).is_relative_to(user)
    saved, loaded_saved, model_saved = r["saved"]
    assert saved == f"//hda_avatars/{name(10)}" and loaded_saved == saved  # both avatars share the copy
    assert model_saved.startswith("//") and r["saved_again"] == saved
    assert RELATIVE_WARNING not in output
    stored, resolved, sampled = r["reopened"]
    project = tmp_path / "moved" / "project_b"
    assert stored == saved and Path(resolved) == project / "hda_avatars" / name(10) and sampled
    assert Path(resolved).read_bytes() == Path(r["sampled_file"]).read_bytes()
    assert r["reopened_loaded"] == 32 and r["reopened_error"] is None
    assert not (tmp_path / "project_a").exists()


def test_workflow_in_blender_5_0(tmp_path, built_zip, diffusion_model):
    r, output = _run(BPY50_PYTHON, tmp_path, built_zip, diffusion_model)
    assert r["version"][:2] == [5, 0]
    _check(r, output, tmp_path, diffusion_model)


@pytest.mark.skipif(not BPY42_PYTHON.exists(), reason="no .venv-bpy42 (bpy==4.2.* for Blender 4.2 LTS)")
def test_workflow_in_blender_4_2(tmp_path, built_zip, diffusion_model):
    import site

    r, output = _run(BPY42_PYTHON, tmp_path, built_zip, diffusion_model, env_site=site.getsitepackages()[0])
    assert r["version"][:2] == [4, 2]
    _check(r, output, tmp_path, diffusion_model)

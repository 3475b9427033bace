"""The Blender extension: zip build, install/register/unregister in real Blender, the dependency installer.

bpy runs only in child processes (one fresh interpreter per Blender version), so Blender's global state
never leaks into pytest and a Blender crash fails a test instead of killing the run. Blender's user
folders point into tmp_path (BLENDER_USER_RESOURCES), never into the real home. No network: pip runs
with --no-index against wheels and an sdist written by the tests, with the machine's pip config off.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import time
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from blender_addon import deps, probe
from tests.conftest import write_smplx_like

REPO = Path(__file__).resolve().parent.parent
BPY50_PYTHON = REPO / ".venv" / "bin" / "python"
BPY42_PYTHON = REPO / ".venv-bpy42" / "bin" / "python"
ADDON = "bl_ext.user_default.hda_avatars"


def _hermetic_env(**extra) -> dict:
    """os.environ without the machine's pip index/find-links settings (tests must not use them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.update(extra)
    return env


# ------------------------------------------------------------------------------- local package index
def _write_wheel(folder: Path, name: str, version: str, files: dict[str, str], requires=()) -> Path:
    """A pure-Python wheel written by hand (the format is a zip with dist-info and a RECORD)."""
    dist = f"{name}-{version}.dist-info"
    entries = dict(files)
    entries[f"{dist}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    entries[f"{dist}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: hda-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, text in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    entries[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    out = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, text in entries.items():
            zf.writestr(path, text)
    return out


_SLOW_BACKEND = '''
import os, time
def _hang():
    with open(os.environ["HDA_SLOW_PIDFILE"], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(300)
def get_requires_for_build_wheel(config_settings=None):
    _hang()
    return []
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _hang()
'''


def _write_slow_sdist(folder: Path) -> Path:
    """An sdist whose in-tree PEP 517 backend hangs (and writes its pid to $HDA_SLOW_PIDFILE): pip
    stays busy in a grandchild process until cancelled."""
    files = {
        "hdaslow-1.0/pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "slow_backend"\n'
                                      'backend-path = ["."]\n\n[project]\nname = "hdaslow"\nversion = "1.0"\n',
        "hdaslow-1.0/slow_backend.py": _SLOW_BACKEND,
        "hdaslow-1.0/PKG-INFO": "Metadata-Version: 2.1\nName: hdaslow\nVersion: 1.0\n",
    }
    out = folder / "hdaslow-1.0.tar.gz"
    with tarfile.open(out, "w:gz") as tf:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out


def _numpy_version(python: Path) -> str | None:
    """The numpy version installed in the environment of ``python`` (read from its dist-info)."""
    found = sorted(python.parent.parent.glob("lib/python3.*/site-packages/numpy-*.dist-info"))
    return found[0].name[len("numpy-"):-len(".dist-info")] if found else None


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    """hdaprobe (requires numpy) and a *fake* numpy of each tested Blender's numpy version (5.0's is
    this environment's, 4.2's that of .venv-bpy42): the installer pins numpy to the running Blender's,
    so pip must find that version, and if the installer ever let pip's numpy shadow Blender's,
    `numpy.FAKE` would exist."""
    folder = tmp_path_factory.mktemp("wheels")
    _write_wheel(folder, "hdaprobe", "1.0", {"hdaprobe/__init__.py": "VALUE = 42\n"}, requires=["numpy"])
    for version in {metadata.version("numpy"), _numpy_version(BPY42_PYTHON)} - {None}:
        _write_wheel(folder, "numpy", version, {"numpy/__init__.py": "FAKE = True\n"})
    return folder


@pytest.fixture(scope="module")
def slow_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slow")
    _write_slow_sdist(folder)
    return folder


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(predicate, limit=60.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --------------------------------------------------------------------------- installer, without bpy
def test_pins_match_the_backend_requirements():
    reqs = {line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    host = {r for r in reqs if r.split(">")[0].split("=")[0].split("<")[0] in deps.HOST_PACKAGES}
    assert host == {"numpy>=1.26,<2"}
    assert set(deps.PINNED) == reqs - host


def test_pip_command_targets_the_folder_and_picks_the_torch_index(tmp_path):
    cpu = deps.pip_command(tmp_path / "t", variant="CPU", platform="linux", constraints=tmp_path / "c.txt",
                           launcher=["py", "-m", "pip"])
    assert cpu[:4] == ["py", "-m", "pip", "install"]
    assert cpu[cpu.index("--target") + 1] == str(tmp_path / "t")
    assert cpu[cpu.index("-c") + 1] == str(tmp_path / "c.txt")
    assert cpu[cpu.index("--index-url") + 1] == deps.TORCH_CPU_INDEX
    assert cpu[cpu.index("--extra-index-url") + 1] == deps.PYPI_INDEX
    assert cpu[-len(deps.PINNED):] == list(deps.PINNED) and not any(p.startswith("numpy") for p in cpu)
    linux_cuda = deps.pip_command("t", variant="CUDA", platform="linux", launcher=["py"])
    assert linux_cuda[linux_cuda.index("--index-url") + 1] == deps.PYPI_INDEX
    win_cuda = deps.pip_command("t", variant="CUDA", platform="win32", launcher=["py"])
    assert win_cuda[win_cuda.index("--index-url") + 1] == deps.TORCH_CUDA_INDEX
    offline = deps.pip_command("t", ["x"], wheel_dir="/w", launcher=["py"])
    assert offline[-4:] == ["--no-index", "--find-links", "/w", "x"] and "--index-url" not in offline
    with pytest.raises(ValueError):
        deps.pip_command("t", variant="ROCM", launcher=["py"])


def test_install_from_local_wheels_keeps_blender_numpy_and_is_atomic(tmp_path, wheel_dir):
    target = tmp_path / "deps"
    job = deps.start_install(target, ["hdaprobe"], wheel_dir=wheel_dir, env=_hermetic_env())
    assert job.wait(timeout=120) == deps.DONE, job.lines
    assert "hdaprobe-1.0" in job.message
    # pip did fetch the (fake) numpy wheel as a dependency; the installer pruned it.
    assert any("numpy" in line for line in job.lines)
    names = sorted(p.name for p in target.iterdir())
    assert "hdaprobe" in names and not [n for n in names if n.lower().startswith("numpy")]
    assert not (tmp_path / "deps.partial").exists()
    code = ("import sys; sys.path.append(sys.argv[1]); import hdaprobe, numpy; "
            "print(hdaprobe.__file__); print(numpy.__file__); print(hasattr(numpy, 'FAKE'))")
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, check=True)
    probe_file, numpy_file, fake = out.stdout.split()
    assert Path(probe_file).is_relative_to(target)
    assert not Path(numpy_file).is_relative_to(target) and fake == "False"

    # A failed install reports pip's error and leaves the previous install as it was.
    job = deps.start_install(target, ["hda-no-such-package"], wheel_dir=wheel_dir, env=_hermetic_env())
    assert job.wait(timeout=120) == deps.FAILED
    assert "Could not find a version that satisfies the requirement hda-no-such-package" in job.message
    assert (target / "hdaprobe" / "__init__.py").is_file() and not (tmp_path / "deps.partial").exists()


def test_cancel_stops_pip_and_its_build_process(tmp_path, slow_dir):
    pidfile = tmp_path / "pid"
    target = tmp_path / "deps"
    job = deps.start_install(target, ["hdaslow"], wheel_dir=slow_dir,
                             env=_hermetic_env(HDA_SLOW_PIDFILE=str(pidfile)))
    assert _wait_for(lambda: pidfile.exists() and pidfile.read_text()), job.poll() or job.lines
    hook_pid = int(pidfile.read_text())
    assert job.poll() == deps.RUNNING and any("hdaslow" in line for line in job.lines)
    job.cancel()
    assert job.wait(timeout=30) == deps.CANCELLED and job.message == "cancelled"
    assert _wait_for(lambda: not _pid_alive(hook_pid), 10), "pip's build-backend process survived cancel"
    assert not target.exists() and not (tmp_path / "deps.partial").exists()


def test_probe_reports_a_missing_torch(tmp_path):
    stdlib_only = [sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib"),
                   os.path.join(sysconfig.get_path("platstdlib"), "lib-dynload")]
    argv, env = probe.command(stdlib_only, str(REPO), None)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    result = probe.parse(out.stdout.splitlines())
    assert result["torch"] is None and "No module named" in result["torch_error"]
    assert result["body"] == probe.NO_TORCH_BODY and not result["body_ok"]
    ok, line = probe.describe(result)
    assert not ok and line.startswith("torch does not import")
    assert probe.describe(None, ["Segmentation fault"]) == (False, "backend check crashed: Segmentation fault")


def test_existing_environment_accepts_site_packages_or_an_env_root(tmp_path):
    v = sys.version_info
    site = tmp_path / "venv" / "lib" / f"python{v[0]}.{v[1]}" / "site-packages"
    site.mkdir(parents=True)
    assert deps.resolve_site_packages(tmp_path / "venv") == site
    assert deps.resolve_site_packages(site) == site
    assert deps.resolve_site_packages(tmp_path / "missing") is None


# ------------------------------------------------------------------------------------------ the zip
@pytest.fixture(scope="module")
def built_zip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([str(BPY50_PYTHON), str(REPO / "scripts" / "build_extension.py"), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = tomllib.loads((REPO / "blender_manifest.toml").read_text())
    path = out / f"{manifest['id']}-{manifest['version']}.zip"
    assert path.is_file() and str(path) in proc.stdout and "validated" in proc.stdout
    return path


def test_zip_holds_the_root_module_packages_and_data_and_nothing_else(built_zip):
    names = set(zipfile.ZipFile(built_zip).namelist())
    manifest = tomllib.loads(zipfile.ZipFile(built_zip).read("blender_manifest.toml").decode())
    assert (manifest["id"], manifest["blender_version_min"], manifest["license"]) == (
        "hda_avatars", "4.2.0", ["SPDX:GPL-3.0-or-later"])
    root = zipfile.ZipFile(built_zip).read("__init__.py").decode()
    assert "from .blender_addon import register, unregister" in root
    assert not (REPO / "__init__.py").exists()  # the root module exists only in the zip
    for pkg in ("hda_backend", "blender_addon", "operators", "assets/default"):
        src = {p.relative_to(REPO).as_posix() for p in (REPO / pkg).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")}
        assert src and src <= names, sorted(src - names)
    assert {"hda_backend/presets/cpu.yaml", "hda_backend/presets/tiny.yaml",
            "assets/default/diffusion.safetensors"} <= names
    for bad in ("tests/", "scripts/", ".venv", "__pycache__", ".pyc", "dist/", ".git", "Makefile"):
        assert not [n for n in names if bad in n], bad


# ------------------------------------------------------------------------------------ real Blender
_DRIVER = r'''
import json, os, sys, time
args = json.loads(sys.argv[1])
report = {}
import bpy
import numpy

ADDON = args["addon"]


def snapshot():
    kc = bpy.context.window_manager.keyconfigs.addon
    handlers = {n: len(getattr(bpy.app.handlers, n)) for n in dir(bpy.app.handlers)
                if not n.startswith("_") and isinstance(getattr(bpy.app.handlers, n), list)}
    rna = {t: sorted(p.identifier for p in getattr(bpy.types, t).bl_rna.properties)
           for t in ("Scene", "Object", "WindowManager", "Armature", "PreferencesFilePaths")}
    return {"types": sorted(dir(bpy.types)), "hda_ops": sorted(dir(bpy.ops.hda)), "handlers": handlers,
            "keymap_items": sum(len(km.keymap_items) for km in kc.keymaps) if kc else 0,
            "sys_path": list(sys.path), "rna": rna, "addons": sorted(bpy.context.preferences.addons.keys())}


def call(op, **kw):
    try:
        return sorted(op(**kw)), None
    except RuntimeError as exc:  # bpy.ops turns an operator's ERROR report into RuntimeError
        return None, str(exc)


before = snapshot()
report["version"] = list(bpy.app.version)
report["install"] = sorted(bpy.ops.extensions.package_install_files(
    filepath=args["zip"], repo="user_default", enable_on_install=True))
reg = snapshot()
report["registered"] = ADDON in reg["addons"]
report["hda_ops"] = reg["hda_ops"]
report["new_types"] = sorted(set(reg["types"]) - set(before["types"]))
report["torch_imported_at_register"] = "torch" in sys.modules
prefs = bpy.context.preferences.addons[ADDON].preferences
report["pref_props"] = sorted(p.identifier for p in prefs.bl_rna.properties if p.identifier != "rna_type")
deps_dir = bpy.utils.extension_path_user(ADDON, path="deps")
report["deps_dir"] = deps_dir
report["deps_on_path_after_numpy"] = (deps_dir in sys.path and sys.path.index(deps_dir) > max(
    i for i, p in enumerate(sys.path) if os.path.dirname(numpy.__file__).startswith(p)))
backend = sys.modules[ADDON + ".operators.backend"]
session = sys.modules[ADDON + ".blender_addon.session"]
state = session.backend

# "Use an existing Python environment": appended while set, removed when cleared.
prefs.python_path = args["env_dir"]
import importlib
report["env_import"] = importlib.import_module("hda_envprobe").WHERE
prefs.python_path = ""
report["env_removed"] = args["env_dir"] not in sys.path

# Check backend (synchronous in background mode), with a valid and a missing body file.
checks = []
for body in (args["good_body"], args["missing_body"]):
    prefs.body_path = body
    res, err = call(bpy.ops.hda.check_backend)
    checks.append({"result": res, "error": err, "check": state.last_check, "line": state.check_line})
report["checks"] = checks

# Install from a local wheel folder through the operator (background mode: it waits for pip).
prefs.wheel_dir = args["wheel_dir"]
report["install_ok"] = call(bpy.ops.hda.install_backend, packages="hdaprobe")
import hdaprobe
report["hdaprobe_file"] = hdaprobe.__file__
report["numpy_still_blender"] = [numpy.__file__, hasattr(numpy, "FAKE")]
report["deps_listing"] = sorted(os.listdir(deps_dir))
report["install_fail"] = call(bpy.ops.hda.install_backend, packages="hda-no-such-package")
report["deps_listing_after_fail"] = sorted(os.listdir(deps_dir))
prefs.wheel_dir = ""
report["install_offline"] = call(bpy.ops.hda.install_backend) if not bpy.app.online_access else "online"

# The interactive path (timer-polled job) with cancel, then disable while an install runs.
backend._must_block = lambda: False
prefs.wheel_dir = args["slow_dir"]
report["cancel_poll_idle"] = bpy.ops.hda.cancel_install.poll()
pids = []
for run in range(2):
    pidfile = os.path.join(args["tmp"], f"pid{run}")
    os.environ["HDA_SLOW_PIDFILE"] = pidfile
    started = call(bpy.ops.hda.install_backend, packages="hdaslow")
    end = time.monotonic() + 60
    while not (os.path.exists(pidfile) and open(pidfile).read()) and time.monotonic() < end:
        time.sleep(0.05)
    pids.append(int(open(pidfile).read()))
    if run == 0:
        report["running"] = [started, state.install_job.running, bpy.app.timers.is_registered(backend._install_tick),
                             bpy.ops.hda.install_backend.poll(), bpy.ops.hda.cancel_install.poll()]
        report["cancel"] = call(bpy.ops.hda.cancel_install)
        for _ in range(400):  # what the timer does in the UI
            if backend._install_tick() is None:
                break
            time.sleep(0.05)
        report["after_cancel"] = [state.install_line, sorted(os.listdir(deps_dir))]
report["pids"] = pids
tick = backend._install_tick
classes = list(session.registration.classes)
report["classes"] = sorted(c.__name__ for c in classes)
report["disable"] = sorted(bpy.ops.preferences.addon_disable(module=ADDON))
after = snapshot()
report["timer_after_disable"] = bpy.app.timers.is_registered(tick)
report["still_registered"] = [c.__name__ for c in classes if c.is_registered]
report["leftover"] = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
with open(args["out"], "w") as f:
    json.dump(report, f)
'''


def _run_blender(python: Path, tmp_path: Path, built_zip: Path, wheel_dir: Path, slow_dir: Path) -> dict:
    env_dir = tmp_path / "env" / "site-packages"
    env_dir.mkdir(parents=True)
    (env_dir / "hda_envprobe.py").write_text("import os\nWHERE = os.path.dirname(__file__)\n")
    args = {
        "addon": ADDON, "zip": str(built_zip), "env_dir": str(env_dir), "wheel_dir": str(wheel_dir),
        "slow_dir": str(slow_dir), "tmp": str(tmp_path), "out": str(tmp_path / "report.json"),
        "good_body": str(write_smplx_like(tmp_path / "SMPLX_NEUTRAL.npz")),
        "missing_body": str(tmp_path / "nowhere" / "SMPLX_NEUTRAL.npz"),
    }
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = _hermetic_env(BLENDER_USER_RESOURCES=str(tmp_path / "blender_user"), HOME=str(tmp_path / "home"))
    env.pop("HDA_SMPLX_PATH", None)
    proc = subprocess.run([str(python), str(driver), json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((tmp_path / "report.json").read_text())


def _check_report(r: dict, tmp_path: Path, has_torch: bool, torch_version: str = "2.13.0"):
    user = tmp_path / "blender_user"
    assert r["install"] == ["FINISHED"] and r["registered"]
    ops = ["add_avatar", "bake_layer", "cancel_fit", "cancel_install", "check_backend", "check_farm", "export_ply",
           "fit_subject", "import_motion", "install_backend", "load_avatar", "sample_identity", "select_avatar"]
    assert r["hda_ops"] == ops
    assert r["new_types"] == sorted([f"HDA_OT_{op}" for op in ops] + ["HDA_PT_main"])
    assert r["pref_props"] == ["bl_idname", "body_path", "frame_cache_mb", "playback_lod", "python_path", "torch_variant",
                               "wheel_dir"]
    assert not r["torch_imported_at_register"]
    assert Path(r["deps_dir"]).is_relative_to(user) and r["deps_on_path_after_numpy"]
    assert Path(r["env_import"]) == tmp_path / "env" / "site-packages" and r["env_removed"]

    good, missing = r["checks"]
    if has_torch:
        assert good["result"] == ["FINISHED"] and good["check"]["torch"].startswith(torch_version)
        assert good["check"]["device"] == "cpu" and good["check"]["body_ok"]
        assert good["check"]["body"] == f"SMPL-X at {tmp_path / 'SMPLX_NEUTRAL.npz'}"
        assert good["line"].startswith(f"torch {torch_version}") and "SMPL-X at" in good["line"]
        assert not missing["check"]["body_ok"]
        assert missing["check"]["body"].startswith(f"body model file not found: {tmp_path / 'nowhere'}")
    else:
        for c in (good, missing):
            assert c["result"] == ["FINISHED"] and c["check"]["torch"] is None
            assert "torch" in c["check"]["torch_error"] and c["check"]["body"] == probe.NO_TORCH_BODY
            assert c["line"].startswith("torch does not import")

    assert r["install_ok"] == [["FINISHED"], None]
    assert Path(r["hdaprobe_file"]).is_relative_to(Path(r["deps_dir"]))
    numpy_file, fake = r["numpy_still_blender"]
    assert not fake and not Path(numpy_file).is_relative_to(user)
    assert "hdaprobe" in r["deps_listing"] and not [n for n in r["deps_listing"] if n.startswith("numpy")]
    res, err = r["install_fail"]
    assert res is None and "Could not find a version that satisfies the requirement hda-no-such-package" in err
    assert r["deps_listing_after_fail"] == r["deps_listing"]
    if r["install_offline"] != "online":
        assert r["install_offline"][0] is None and "Online access is disabled" in r["install_offline"][1]

    assert r["cancel_poll_idle"] is False
    assert r["running"] == [[["FINISHED"], None], True, True, False, True]
    assert r["cancel"] == [["FINISHED"], None]
    assert r["after_cancel"] == ["cancelled", r["deps_listing"]]
    for pid in r["pids"]:  # the cancelled install and the one running when the add-on was disabled
        assert _wait_for(lambda: not _pid_alive(pid), 10), f"pip build process {pid} survived"

    assert r["classes"] == sorted(["HDAAvatarProps", "HDA_AddonPreferences", "HDA_FitSettings", "HDA_PT_main"]
                                  + [f"HDA_OT_{op}" for op in ops])
    assert r["disable"] == ["FINISHED"] and not r["timer_after_disable"] and r["still_registered"] == []
    assert r["leftover"] == {}, r["leftover"]


def test_install_register_unregister_blender_5_0(tmp_path, built_zip, wheel_dir, slow_dir):
    report = _run_blender(BPY50_PYTHON, tmp_path, built_zip, wheel_dir, slow_dir)
    assert report["version"][:2] == [5, 0]
    _check_report(report, tmp_path, has_torch=True)


@pytest.mark.skipif(not BPY42_PYTHON.exists(), reason="no .venv-bpy42 (bpy==4.2.* for Blender 4.2 LTS)")
def test_install_register_unregister_blender_4_2(tmp_path, built_zip, wheel_dir, slow_dir):
    report = _run_blender(BPY42_PYTHON, tmp_path, built_zip, wheel_dir, slow_dir)
    assert report["version"][:2] == [4, 2]
    _check_report(report, tmp_path, has_torch=False)

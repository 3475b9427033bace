"""How the add-on holds together, read from its source with ``ast`` (no Blender needed), and its
bpy-free helpers (session, error text, '//' paths, avatars among objects).

- No import loop among the add-on's modules (blender_addon/*, operators/*), counting the imports
  inside functions too.
- The operators import blender_addon's public surface (blender_addon/api.py) only; nothing in
  blender_addon imports the operators except ``register()``/``unregister()``; the sidebar never
  reaches into the operators.
- The session's state has one home: no other module keeps module-level containers or rebinds
  globals.
"""

from __future__ import annotations

import ast
import importlib
import os
import posixpath
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("blender_addon", "operators")


# ------------------------------------------------------------------------------ the import graph
def addon_modules() -> dict[str, Path]:
    """{dotted module name: file} of the add-on (relative to the extension root)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            name = package if path.name == "__init__.py" else f"{package}.{path.stem}"
            found[name] = path
    return found


def imports_of(name: str, path: Path, modules) -> list[tuple[str, int, bool]]:
    """(imported add-on module, line, inside a function) for every import statement of a module,
    module-level and function-level alike. ``from P import x`` counts as importing ``P.x`` where that
    is a module, else ``P`` itself."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    inside = nested | {id(f) for f in functions}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                if node.level - 1 > len(parts):
                    raise AssertionError(f"{path}:{node.lineno}: relative import beyond the extension root")
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            targets = []
            for alias in node.names:
                sub = f"{prefix}.{alias.name}" if prefix else alias.name
                targets.append(sub if sub in modules else prefix)
        else:
            continue
        for target in targets:
            if target in modules:
                found.append((target, node.lineno, id(node) in inside))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = addon_modules()
    return {name: {t for t, _, _ in imports_of(name, path, modules)} - {name} for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_the_loop_this_tree_used_to_have():
    # props -> compositor -> layers -> runtime -> props, through a function-level import in props.
    old = {"blender_addon.props": {"blender_addon.compositor"}, "blender_addon.compositor": {"blender_addon.layers"},
           "blender_addon.layers": {"blender_addon.runtime"}, "blender_addon.runtime": {"blender_addon.props"},
           "blender_addon.ui": {"blender_addon.runtime"}}
    assert find_cycles(old) == [["blender_addon.compositor", "blender_addon.layers", "blender_addon.props",
                                 "blender_addon.runtime"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_are_seen(tmp_path):
    source = tmp_path / "props.py"
    source.write_text("import bpy\n\ndef f():\n    from . import compositor\n    from .. import operators\n")
    modules = {"blender_addon.props": source, "blender_addon.compositor": source, "operators": source}
    assert sorted(imports_of("blender_addon.props", source, modules)) == [
        ("blender_addon.compositor", 4, True), ("operators", 5, True)]


def test_no_import_loop_among_the_addon_modules():
    graph = import_graph()
    assert {"blender_addon.session", "blender_addon.api", "operators.fit", "blender_addon.ui"} <= set(graph)
    assert find_cycles(graph) == []


def test_operators_use_the_public_surface_only():
    modules = addon_modules()
    for name, path in modules.items():
        if not name.startswith("operators"):
            continue
        used = {t for t, _, _ in imports_of(name, path, modules) if t.startswith("blender_addon")}
        assert used <= {"blender_addon.api"}, (name, sorted(used))
    api = importlib.import_module("ast").parse((REPO / "blender_addon" / "api.py").read_text())
    exported = next(n.value for n in api.body if isinstance(n, ast.Assign) and n.targets[0].id == "__all__")
    assert {"session", "runtime", "error_text", "relative_path", "avatar_of"} <= {e.value for e in exported.elts}


def test_only_register_imports_the_operators_and_the_sidebar_reads_the_session():
    modules = addon_modules()
    for name, path in modules.items():
        if name.startswith("blender_addon"):
            used = {t for t, _, _ in imports_of(name, path, modules) if t.startswith("operators")}
            assert not used or name == "blender_addon", (name, sorted(used))
    ui = {t for t, _, _ in imports_of("blender_addon.ui", modules["blender_addon.ui"], modules)}
    assert "blender_addon.session" in ui and not any(t.startswith("operators") for t in ui)


def _module_state(path: Path) -> list[str]:
    """Module-level containers (dict/list/set displays and calls) and ``global`` statements."""
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            continue  # the list of public names
        mutable = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
            isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            and value.func.id in {"dict", "list", "set", "OrderedDict", "defaultdict"})
        if mutable:
            found.append(f"{path.name}:{node.lineno}")
    found += [f"{path.name}:{n.lineno} global" for n in ast.walk(tree) if isinstance(n, ast.Global)]
    return found


def test_the_session_state_lives_in_session_py_only():
    leftovers = [hit for name, path in addon_modules().items() if name != "blender_addon.session"
                 for hit in _module_state(path)]
    assert leftovers == []


# ------------------------------------------------------------------------- the bpy-free helpers
@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    """The extension's layout (``hda_avatars/{blender_addon,hda_backend}``) so that the add-on's
    relative imports of the backend resolve, as inside Blender; yields an importer."""
    root = tmp_path_factory.mktemp("ext")
    pkg = root / "hda_avatars_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("blender_addon", "hda_backend"):
        os.symlink(REPO / name, pkg / name)
    sys.path.insert(0, str(root))
    try:
        yield lambda name: importlib.import_module(f"hda_avatars_test.{name}")
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == "hda_avatars_test" or m.startswith("hda_avatars_test.")]:
            del sys.modules[name]


def test_error_text_is_one_line_for_bad_input_and_a_missing_backend(ext):
    messages = ext("blender_addon.messages")
    HDAError = ext("hda_backend.errors").HDAError
    assert messages.error_text(HDAError("avatar x.safetensors: truncated,\n expected ...")) == \
        "avatar x.safetensors: truncated, expected ..."
    assert messages.error_text(ImportError("No module named 'torch'")) == (
        "the backend does not import (No module named 'torch'); see Preferences > Add-ons > HDA Avatars > "
        "Install Backend")
    assert messages.error_text(ValueError("bad\n  thing")) == "ValueError: bad thing"
    with pytest.raises(ValueError, match="a bug"):
        messages.error_text(ValueError("a bug"), unexpected="raise")
    assert messages.error_text(ModuleNotFoundError("numba"), unexpected="raise").startswith("the backend does not")


@pytest.mark.parametrize("path, blend, expected", [
    ("/data/shots/avatars/a.hda.safetensors", "/data/shots/scene.blend", "//avatars/a.hda.safetensors"),
    ("/data/avatars/a.hda.safetensors", "/data/shots/scene.blend", "//../avatars/a.hda.safetensors"),
    ("/data/shots/x/../a.npz", "/data/shots/scene.blend", "//a.npz"),
    ("//already/relative.npz", "/data/shots/scene.blend", "//already/relative.npz"),
    ("/data/a.npz", "", "/data/a.npz"),      # unsaved .blend: stays absolute
    ("", "/data/shots/scene.blend", ""),
])
def test_relative_path_is_blenders_double_slash_convention(ext, path, expected, blend):
    paths = ext("blender_addon.paths")
    assert paths.relative_path(path, blend) == expected
    if path and blend and not path.startswith("//"):  # an independent reading: resolve it back
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(blend), expected[2:]))
        assert resolved == posixpath.normpath(path)


def test_session_reset_forgets_every_part(ext):
    session = ext("blender_addon.session")
    fresh = {type(p).__name__: repr(type(p)()) for p in session.PARTS}
    session.backend.check_line, session.backend.install_job = "torch 2.13", object()
    session.caches.errors["a:1"] = "missing file"
    session.caches.stats["misses"] += 3
    session.viewport.handle, session.viewport.stats["a:1"] = "handle", {"ms": 3.0}
    session.render.rendering = True
    session.native.written["a:1"] = ((), "digest")
    session.fit.line, session.fit.avatar = "fitted", "HDA_Avatar"
    session.models.loaded["m"] = ((1, 2), None)
    session.identity.pending["a:1"], session.identity.quiet = "request", 1
    session.farm.checked, session.farm.lines = True, ["HDA_Avatar: frame 1: no layer file: bake it"]
    session.registration.sys_paths.append("/deps")
    assert all(repr(p) != fresh[type(p).__name__] for p in session.PARTS)
    session.reset()
    assert {type(p).__name__: repr(p) for p in session.PARTS} == fresh
    assert not session.fit.running


def test_frame_cache_keeps_its_byte_budget(ext):
    import numpy as np

    caches = ext("blender_addon.session").Caches()
    frame = np.zeros((4, 4, 4), np.float32), np.zeros((4, 4), np.float32)   # 256 + 64 bytes
    for i in range(5):
        caches.add_frame(("a:1" if i % 2 else "b:2", i), *frame, budget=3 * 320)
    assert list(caches.frames) == [("b:2", 2), ("a:1", 3), ("b:2", 4)] and caches.frame_bytes == 3 * 320
    caches.drop("b:2")
    assert list(caches.frames) == [("a:1", 3)] and caches.frame_bytes == 320
    caches.add_frame(("a:1", 5), *frame, budget=319)   # larger than the whole budget: not kept
    assert list(caches.frames) == [("a:1", 3)] and caches.frame_bytes == 320
    caches.trim(0)                                     # the preference set to 0: the cache empties
    assert not caches.frames and caches.frame_bytes == 0
    caches.add_frame(("a:1", 6), *frame, budget=0)     # and stays empty
    assert not caches.frames and caches.frame_bytes == 0


def test_avatars_are_found_from_their_proxy_and_listed_by_name(ext):
    objects = ext("blender_addon.objects")

    def obj(name, kind="ARMATURE", avatar=True, enabled=True, parent=None, native=False):
        return SimpleNamespace(name=name, type=kind, parent=parent,
                               hda=SimpleNamespace(is_avatar=avatar, enabled=enabled, uid="u" + name, native=native))

    b, a, off, nat = obj("B"), obj("A"), obj("C", enabled=False), obj("D", native=True)
    proxy, rig = obj("B_proxy", "MESH", avatar=False, parent=b), obj("Rig", avatar=False)
    scene = SimpleNamespace(objects=[b, proxy, nat, off, rig, a])
    assert objects.avatar_of(proxy) is b and objects.avatar_of(rig) is None and objects.avatar_of(None) is None
    assert [o.name for o in objects.scene_avatars(scene)] == ["A", "B"]
    assert [o.name for o in objects.native_avatars(scene)] == ["D"]
    assert [o.name for o in objects.all_avatars(scene)] == ["A", "B", "C", "D"]
    assert objects.object_key(b) == "B:uB"


def test_avatar_files_from_outside_the_project_are_copied_into_it_on_save(ext, tmp_path):
    paths = ext("blender_addon.paths")
    blend = tmp_path / "shot" / "scene.blend"
    (tmp_path / "shot" / "sub").mkdir(parents=True)
    inside = tmp_path / "shot" / "sub" / "fit.hda.safetensors"
    inside.write_bytes(b"inside")
    assert paths.keep_with_blend(str(inside), str(blend)) == str(inside)          # travels with the folder
    missing = tmp_path / "user" / "gone.hda.safetensors"
    assert paths.keep_with_blend(str(missing), str(blend)) == str(missing)        # left for its error to show
    outside = tmp_path / "user" / "identity_3-abc.hda.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(b"person three")
    copy = paths.keep_with_blend(str(outside), str(blend))
    assert copy == str(tmp_path / "shot" / "hda_avatars" / outside.name)
    assert Path(copy).read_bytes() == b"person three"
    stamp = os.stat(copy).st_mtime_ns
    assert paths.keep_with_blend(str(outside), str(blend)) == copy and os.stat(copy).st_mtime_ns == stamp  # reused
    # Another file of the same name (another project's) keeps both: the copy is named by its content.
    other = tmp_path / "elsewhere" / outside.name
    other.parent.mkdir()
    other.write_bytes(b"another person")
    second = paths.keep_with_blend(str(other), str(blend))
    import hashlib

    digest = hashlib.sha256(b"another person").hexdigest()[:12]
    assert second == str(tmp_path / "shot" / "hda_avatars" / f"identity_3-abc-{digest}.hda.safetensors")
    assert Path(second).read_bytes() == b"another person" and Path(copy).read_bytes() == b"person three"
    assert sorted(p.name for p in (tmp_path / "shot" / "hda_avatars").iterdir()) == sorted(
        [outside.name, Path(second).name])  # no temporaries left


def test_sampled_identity_files_are_named_by_model_seeds_and_mix(ext):
    identity = ext("blender_addon.identity")
    assert identity.normalized(4, 4, 0.7) == (4, 4, 0.0)          # one seed: the mix means nothing
    assert identity.normalized(4, 9, 0.0) == (4, 4, 0.0)
    assert identity.normalized(4, 9, 0.50499) == (4, 9, 0.5)      # the slider's step
    assert identity.normalized(4, 9, 0.996) == (4, 9, 1.0)
    digest = "0123456789abcdef" * 4
    assert identity.file_name(digest, 4, 4, 0.0, None) == "identity_4-0123456789ab.hda.safetensors"
    assert identity.file_name(digest, 4, 9, 0.5, 3) == "identity_4_9_0.50-0123456789ab-s3.hda.safetensors"
def test_duplicated_avatars_get_their_own_uid_and_the_original_keeps_its(ext):
    objects = ext("blender_addon.objects")

    def obj(name, uid, kind="ARMATURE", avatar=True):
        return SimpleNamespace(name=name, type=kind, hda=SimpleNamespace(is_avatar=avatar, uid=uid))

    original, copy, copy2 = obj("HDA_Avatar", "u1"), obj("HDA_Avatar.001", "u1"), obj("HDA_Avatar.002", "u1")
    other = obj("Other", "u2")
    blank, rig = obj("Blank", ""), obj("Rig", "u1", avatar=False)
    found = objects.duplicate_uids([copy2, other, copy, original, rig, blank])
    assert [(c.name, o.name) for c, o in found] == [("HDA_Avatar.001", "HDA_Avatar"), ("HDA_Avatar.002", "HDA_Avatar")]
    changed = objects.ensure_unique_uids([copy2, other, copy, original, rig, blank])
    assert sorted(o.name for o in changed) == ["Blank", "HDA_Avatar.001", "HDA_Avatar.002"]
    uids = [o.hda.uid for o in (original, copy, copy2, other, blank)]
    assert uids[0] == "u1" and uids[3] == "u2" and rig.hda.uid == "u1" and len(set(uids)) == 5
    assert all(len(u) == 12 and int(u, 16) >= 0 for u in uids[1:3] + uids[4:])
    assert objects.ensure_unique_uids([copy2, other, copy, original, rig, blank]) == []


def test_file_digests_are_hashlibs_and_follow_the_file(ext, tmp_path):
    import hashlib

    paths, session = ext("blender_addon.paths"), ext("blender_addon.session")
    errors = ext("hda_backend.errors")
    session.reset()
    f = tmp_path / "a.hda.safetensors"
    f.write_bytes(b"person one")
    assert paths.file_sha256(str(f), "avatar file") == hashlib.sha256(b"person one").hexdigest()
    f.write_bytes(b"person number two")  # a new size: the remembered digest must not be reused
    assert paths.file_sha256(str(f), "avatar file") == hashlib.sha256(b"person number two").hexdigest()
    with pytest.raises(errors.HDAError, match="diffusion model file not found: .*gone"):
        paths.file_sha256(str(tmp_path / "gone"), "diffusion model file")
    session.reset()

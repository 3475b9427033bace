"""Backend probe: does torch import with Blender's interpreter and module path, and does the body load?

Run as a script in a child process of Blender's own interpreter (``sys.executable``) with Blender's
``sys.path`` (including the appended deps and environment folders), so a broken torch install cannot
crash or half-import into Blender itself. No bpy. The parent passes its arguments as JSON in
``HDA_PROBE_ARGS`` and reads one line ``HDA_PROBE_RESULT {json}`` back.
"""

from __future__ import annotations

import json
import os
import sys

MARKER = "HDA_PROBE_RESULT "
ENV_ARGS = "HDA_PROBE_ARGS"
NO_TORCH_BODY = "not checked: the backend (torch) does not import"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run(sys_path: list[str], ext_root: str, body_path: str | None) -> dict:
    """The probe itself (runs in the child)."""
    sys.path[:] = list(sys_path)
    result = {"python": sys.version.split()[0], "executable": sys.executable, "numpy": None,
              "numpy_file": None, "torch": None, "torch_file": None, "torch_error": None, "device": None,
              "cuda_name": None, "body": None, "body_ok": False, "body_path": None}
    try:
        import numpy

        result["numpy"], result["numpy_file"] = numpy.__version__, numpy.__file__
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none is raised
        result["numpy"] = None
        result["torch_error"] = f"numpy does not import ({_one_line(exc)})"
    try:
        import torch

        result["torch"], result["torch_file"] = torch.__version__, torch.__file__
        cuda = bool(torch.cuda.is_available())
        result["device"] = "cuda" if cuda else "cpu"
        if cuda:
            result["cuda_name"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001
        result["torch_error"] = _one_line(exc)
        result["body"] = NO_TORCH_BODY
        return result

    # hda_backend only imports itself relatively, so the extension folder can hold it as a top-level
    # package here (inside Blender it is bl_ext.<repo>.hda_avatars.hda_backend).
    sys.path.append(ext_root)
    try:
        from hda_backend.body import BUNDLED_BODY, load_body, resolve_body_path
        from hda_backend.errors import HDAError
    except Exception as exc:  # noqa: BLE001
        result["body"] = f"the backend does not import ({_one_line(exc)})"
        return result
    try:
        path = resolve_body_path(body_path or None)
        result["body_path"] = str(path)
        load_body(path)
        same = os.path.abspath(path) == os.path.abspath(BUNDLED_BODY)
        result["body"] = "bundled open body" if same else f"SMPL-X at {path}"
        result["body_ok"] = True
    except HDAError as exc:
        result["body"] = str(exc)
    except Exception as exc:  # noqa: BLE001
        result["body"] = _one_line(exc)
    return result


def command(sys_path: list[str], ext_root: str, body_path: str | None, python: str | None = None,
            base_env: dict | None = None) -> tuple[list[str], dict]:
    """(argv, env) that run this probe in a child process of ``python`` (default: this interpreter)."""
    env = dict(os.environ if base_env is None else base_env)
    env.pop("PYTHONPATH", None)
    env["PYTHONNOUSERSITE"] = "1"
    env[ENV_ARGS] = json.dumps({"sys_path": list(sys_path), "ext_root": str(ext_root),
                                "body_path": body_path or None})
    return [python or sys.executable, os.path.abspath(__file__)], env


def parse(lines: list[str]) -> dict | None:
    """The probe's result from its output lines; None when it printed none (it crashed)."""
    for line in reversed(lines):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    return None


def describe(result: dict | None, lines: list[str] = ()) -> tuple[bool, str]:
    """(torch usable, one status line) for the info bar and the preferences."""
    if result is None:
        tail = [line.strip() for line in lines if line.strip()]
        return False, "backend check crashed: " + (tail[-1] if tail else "no output")
    if result["torch"] is None:
        return False, f"torch does not import: {result['torch_error']}"
    gpu = f" ({result['cuda_name']})" if result.get("cuda_name") else ""
    return True, f"torch {result['torch']} on {result['device']}{gpu}; body: {result['body']}"


if __name__ == "__main__":
    args = json.loads(os.environ[ENV_ARGS])
    out = run(args["sys_path"], args["ext_root"], args.get("body_path"))
    sys.stdout.write(MARKER + json.dumps(out) + "\n")
    sys.stdout.flush()

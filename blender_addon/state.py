"""Runtime state shown in the preferences and the sidebar; not saved anywhere, no bpy.

Lives for one Blender session (results of "Check backend", the running or last install job). Kept out
of AddonPreferences properties so that a stale status is never saved into userpref.blend.
"""

from __future__ import annotations

last_check: dict | None = None   # probe result (see probe.run) of the last "Check backend"
check_ok: bool = False
check_line: str = ""             # one-line summary of the last check
check_job = None                 # deps.Job of a running check
install_job = None               # deps.Job of the running or last install
install_line: str = ""           # last install outcome ("installed ..." / pip's error / "cancelled")


def reset() -> None:
    """Forget everything (unregister); running jobs must have been cancelled by the caller."""
    global last_check, check_ok, check_line, check_job, install_job, install_line
    last_check, check_ok, check_line, check_job, install_job, install_line = None, False, "", None, None, ""

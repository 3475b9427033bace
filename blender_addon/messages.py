"""The one-line error text the add-on shows (sidebar, operator reports, handler output)."""

from __future__ import annotations

from ..hda_backend.errors import HDAError

BACKEND_FIX = "see Preferences > Add-ons > HDA Avatars > Install Backend"


def error_text(exc: BaseException, *, unexpected: str = "describe") -> str:
    """One line for the UI: bad input as the backend words it (HDAError), a backend that does not
    import with its fix. Anything else is a bug: described as ``Type: message`` on one line
    (``unexpected="describe"``, where one failure must not stop the rest), or raised again
    (``unexpected="raise"``, so that it shows its traceback)."""
    if isinstance(exc, HDAError):
        return str(exc)
    if isinstance(exc, ImportError):
        return f"the backend does not import ({exc}); {BACKEND_FIX}"
    if unexpected == "raise":
        raise exc
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"

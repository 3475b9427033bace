"""The one exception type users see.

Every check of user input raises :class:`HDAError` with a single line that names the file (or argument),
the field and what was expected. The CLI prints it without a traceback; the Blender add-on shows it in
the UI. Anything else escaping is a bug in this project, not bad input.
"""


class HDAError(Exception):
    """Bad input: a one-line message naming the source, the field and the expected value."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

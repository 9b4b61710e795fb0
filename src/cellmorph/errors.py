"""The one exception type for errors a user can cause.

Every message names the file or field at fault and says how to fix it. The CLI prints
the message without a traceback and exits with status 2.
"""


class CellmorphError(Exception):
    """A problem with the user's input (path, config, image, metadata, model name)."""

"""The project's own error: a problem with what the user gave us."""


class FgqError(Exception):
    """Bad input or an impossible request; the CLI prints it as one line and exits non-zero."""

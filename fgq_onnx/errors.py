"""The project's own error: a problem with what the user gave us."""


class FgqError(Exception):
    """Bad input or an impossible request; the CLI prints it as one line and exits non-zero."""


def fgq_error_in(error: BaseException) -> FgqError | None:
    """The FgqError behind `error` (onnx-ir wraps what a pass raises), if any."""
    seen = error
    while seen is not None:
        if isinstance(seen, FgqError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None

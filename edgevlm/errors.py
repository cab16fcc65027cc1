"""Errors a user can cause. Each carries a one-line message saying what was wrong and what to do."""


def first_line(e: BaseException) -> str:
    """A foreign exception's message, reduced to its first line (or its type, when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class EdgeVLMError(Exception):
    """A failure the user can act on. The CLI prints the message on one line and exits with `exit_code`."""

    exit_code = 1


class UsageError(EdgeVLMError):
    """The command or call was malformed (empty question, unknown preset, conflicting options)."""

    exit_code = 2


class ImageError(EdgeVLMError):
    """The image could not be read or is not usable."""


class ModelError(EdgeVLMError):
    """A model could not be found, downloaded, converted or loaded."""


class InputTooLongError(EdgeVLMError):
    """A prompt does not fit the model's context window."""


class DeviceError(EdgeVLMError):
    """The requested device is not available."""

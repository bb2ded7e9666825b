"""User-facing errors: each carries a one-line message that front ends show as is.

The CLI prints ``str(error)`` without a traceback; the Discord bot shows it as a
warning line. Anything that is *not* an ``IrisError`` is a bug.
"""


class IrisError(Exception):
    """Base of every error a user can cause; ``str()`` is the one-line message."""


class BadImage(IrisError):
    """A file or attachment that is not a usable image (missing, corrupt, too big, ...)."""


class ImagesNotSupported(IrisError):
    """An image was given to a model that only reads text."""


class ContextTooLong(IrisError):
    """Even after dropping history, the newest message does not fit the context window."""


class ModelNotFound(IrisError):
    """A ``--model`` path or id that cannot be loaded."""


class BadAdapter(IrisError):
    """An adapter directory that is missing, corrupt or unsafe to load."""


class AdapterMismatch(BadAdapter):
    """An adapter trained for a different base model than the one loaded."""


class BadSetting(IrisError):
    """An unknown option name or a value out of range (``/set``, config file, env)."""


class BadCommand(IrisError):
    """An unknown slash command or one used with wrong arguments."""


class ConversationNotFound(IrisError):
    """A conversation id that is not in the store."""


class BadDataset(IrisError):
    """A training dataset that cannot be read (the message names file and line)."""


class BackendError(IrisError):
    """A model server that cannot be reached or answers with an error."""


def one_line(exc: BaseException) -> str:
    """An exception's whole message on one line: library errors can span screens, and none is cut short."""
    return " ".join(str(exc).split()) or type(exc).__name__

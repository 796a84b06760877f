"""The one runtime failure every side may raise: a sentence for the user, no traceback."""


class GuardError(RuntimeError):
    """A runtime failure, stated as one sentence for the user."""

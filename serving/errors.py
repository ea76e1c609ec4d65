"""What the Engine raises for a caller's mistake or a store's failure, with no torch.

Each error says what went wrong and, where there is one, what to do instead. They
subclass the builtin a caller would expect (``KeyError`` for an unknown session,
``ValueError`` for a bad request), so an HTTP layer maps them to status codes by class.
"""

from __future__ import annotations


class UnknownSessionError(KeyError):
    """No such session: never created, closed, or not in the checkpoint store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class SessionBusyError(RuntimeError):
    """Another call is using this session; sessions take one request at a time."""


class StepConflictError(ValueError):
    """A re-sent step whose content differs from what was applied under that number."""


class StepGapError(ValueError):
    """A step number that skips ahead; the message names the step that comes next."""

    def __init__(self, message: str, next_step: int):
        super().__init__(message)
        self.next_step = next_step


class SessionLogError(ValueError):
    """A checkpoint store or session log that cannot be read: corrupt, foreign, or of
    another model. The message names the session and the step where it can."""


class StoreUnavailableError(RuntimeError):
    """The checkpoint store cannot be written (full, read-only, gone). The session is kept
    in memory unchanged; the call can be retried once the store is writable again."""


class SessionFencedError(RuntimeError):
    """Another engine took this session over; this one stopped serving it."""

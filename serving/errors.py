"""What the Engine raises for a caller's mistake or a store's failure, with no torch.

Each error says what went wrong and, where there is one, what to do instead. They
subclass the builtin a caller would expect (``KeyError`` for an unknown session,
``ValueError`` for a bad request). ``HTTP_ERRORS`` gives each its HTTP status and the
stable type word the app answers with, which a remote client maps back to the class.
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

    def __reduce__(self):  # crosses processes (a Serve replica's error reaches the ingress) whole
        return type(self), (self.args[0], self.next_step)


class LimitExceededError(ValueError):
    """A request over one of the server's limits (an observation's tokens, an image's
    bytes or pixels, text size); the message names the limit and its value."""


class MalformedRequestError(ValueError):
    """A request body, msgpack document, form or image file that cannot be read."""


class UnsupportedMediaError(ValueError):
    """A body in an encoding the server does not read; the message lists those it does."""


class AuthenticationError(PermissionError):
    """No credentials where some are needed: the API key or a session's token is missing."""


class AccessDeniedError(PermissionError):
    """Credentials that do not grant this: a wrong API key, or another session's token."""


class UnknownModelError(LookupError):
    """A request for a model this server does not serve; the message names the one it does."""


class ReplicaUnavailableError(RuntimeError):
    """The replica serving a request died, and no other took the request over in time
    (or the request had no step number, so re-sending it might apply it twice)."""


class TooManySessionsError(RuntimeError):
    """The replica holds its maximum of open sessions; close some, or try again later."""


class SessionLogError(ValueError):
    """A checkpoint store or session log that cannot be read: corrupt, foreign, or of
    another model. The message names the session and the step where it can."""


class StoreUnavailableError(RuntimeError):
    """The checkpoint store cannot be written (full, read-only, gone). The session is kept
    in memory unchanged; the call can be retried once the store is writable again."""


class SessionFencedError(RuntimeError):
    """Another engine took this session over; this one stopped serving it."""


# The HTTP status and type word of each error a request can meet. Look a class up by its
# MRO, so that a subclass finds its own entry before its base's.
HTTP_ERRORS: dict[type[Exception], tuple[int, str]] = {
    MalformedRequestError: (400, "malformed_request"),
    AuthenticationError: (401, "unauthenticated"),
    AccessDeniedError: (403, "forbidden"),
    UnknownSessionError: (404, "unknown_session"),
    UnknownModelError: (404, "model_not_found"),
    StepGapError: (409, "step_gap"),
    StepConflictError: (409, "step_conflict"),
    SessionBusyError: (409, "session_busy"),
    LimitExceededError: (413, "limit_exceeded"),
    UnsupportedMediaError: (415, "unsupported_media_type"),
    ValueError: (422, "invalid_request"),
    TooManySessionsError: (429, "too_many_sessions"),
    SessionLogError: (500, "session_log_unreadable"),
    StoreUnavailableError: (503, "store_unavailable"),
    SessionFencedError: (503, "session_moved"),
    ReplicaUnavailableError: (503, "replica_unavailable"),
}

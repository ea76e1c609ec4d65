"""Durable sessions: each session's state as a streamed, chained, compacted log in a store.

``store`` says where logs live and what a store must guarantee; ``records`` the bytes of
an item; ``log`` what one session captures and writes; ``writer`` the thread that
writes; ``restore`` how a session is read back and taken over.
"""

from .log import CheckpointPolicy, SessionLog, read_point
from .records import model_fingerprint
from .reader import Restored, claim, restore
from .store import DirectoryStore, check_session_id
from .writer import CheckpointWriter

__all__ = [
    "CheckpointPolicy",
    "CheckpointWriter",
    "DirectoryStore",
    "Restored",
    "SessionLog",
    "check_session_id",
    "claim",
    "model_fingerprint",
    "read_point",
    "restore",
]

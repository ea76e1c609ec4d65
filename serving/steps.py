"""A session's step table: where each step's observation and reply end, what the
observation was, and how the reply ended.

Step numbers are what make a retried request safe. The table keeps, per step, the
digest of its observation (so a re-sent step is told apart from a different one under the
same number) and the end of its reply (so a re-sent generation returns the reply already
in the history instead of adding a second one). Step 0 is the empty history.

The rules for a step number ``n`` on a session whose last step is ``s``:

- ``n == s + 1`` applies the observation as a new step;
- ``n <= s`` with the same content is acknowledged, and changes nothing;
- ``n <= s`` with other content is refused (``StepConflictError``);
- ``n > s + 1`` is refused (``StepGapError``, naming ``s + 1``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .errors import StepConflictError, StepGapError
from .types import FinishReason

DIGEST_BYTES = 16
FINISH_CODES: dict[FinishReason | None, int] = {None: 0, "eos": 1, "stop": 2, "length": 3}
_FINISH_OF = {v: k for k, v in FINISH_CODES.items()}


def content_digest(text: str, images: list) -> bytes:
    """What an observation was: its rendered text and every image's pixels."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    h.update(text.encode("utf-8", "surrogatepass"))
    for image in images:
        h.update(f"|{image.mode}:{image.size}|".encode())
        h.update(image.tobytes())
    return h.digest()


@dataclass
class StepTable:
    observed: list[int] = field(default_factory=lambda: [0])  # history length after each step's observation
    ends: list[int] = field(default_factory=lambda: [0])  # history length at each step's end (its reply included)
    digests: list[bytes] = field(default_factory=lambda: [bytes(DIGEST_BYTES)])
    finish: list[FinishReason | None] = field(default_factory=lambda: [None])  # how each step's reply ended, if it did

    @property
    def last(self) -> int:
        return len(self.ends) - 1

    def copy(self) -> "StepTable":
        return StepTable(list(self.observed), list(self.ends), list(self.digests), list(self.finish))

    def check_new(self, step: int | None, digest: bytes) -> bool:
        """Whether an observation under ``step`` is new (True) or an acknowledged re-send
        (False); raises for a conflict or a gap. No step number means new."""
        if step is None or step == self.last + 1:
            return True
        if step > self.last + 1 or step < 1:
            raise StepGapError(f"step {step} does not follow the session's step {self.last}; send step {self.last + 1}", self.last + 1)
        if self.digests[step] != digest:
            raise StepConflictError(f"step {step} was already applied with other content; the next step is {self.last + 1}")
        return False

    def add(self, length: int, digest: bytes) -> None:
        self.observed.append(length)
        self.ends.append(length)
        self.digests.append(digest)
        self.finish.append(None)

    def extend_reply(self, length: int, finish: FinishReason | None) -> None:
        self.ends[-1] = length
        self.finish[-1] = finish

    def truncate(self, step: int) -> None:
        for column in (self.observed, self.ends, self.digests, self.finish):
            del column[step + 1 :]

    # ------------------------------------------------------------------ serialisation
    def to_tensors(self, first: int = 0) -> dict[str, torch.Tensor]:
        """The entries after step ``first`` as tensors, for the checkpoint log."""
        rows = slice(first + 1, None)
        return {
            "steps.observed": torch.tensor(self.observed[rows], dtype=torch.int64),
            "steps.ends": torch.tensor(self.ends[rows], dtype=torch.int64),
            "steps.digests": torch.tensor(list(b"".join(self.digests[rows])), dtype=torch.uint8).reshape(-1, DIGEST_BYTES),
            "steps.finish": torch.tensor([FINISH_CODES[f] for f in self.finish[rows]], dtype=torch.uint8),
        }

    def replace_from(self, first: int, tensors: dict[str, torch.Tensor], length: int) -> None:
        """Replace the entries after step ``first`` with logged ones; they must fit a
        history of ``length`` tokens. Checked before anything changes."""
        if first > self.last:
            raise ValueError(f"logged steps start after step {first} but the table ends at step {self.last}")
        try:
            observed, ends = tensors["steps.observed"].tolist(), tensors["steps.ends"].tolist()
            digests, codes = tensors["steps.digests"], tensors["steps.finish"].tolist()
        except KeyError:
            raise ValueError("logged steps are missing a column") from None
        n = len(ends)
        if not (len(observed) == len(codes) == n and tuple(digests.shape) == (n, DIGEST_BYTES)):
            raise ValueError("logged step columns disagree in length")
        previous = self.ends[first]
        for seen, end in zip(observed, ends):
            if not previous <= seen <= end:
                raise ValueError("logged step ends are not in order")
            previous = end
        if previous != length or any(c not in _FINISH_OF for c in codes):
            raise ValueError("logged steps do not end where the history does")
        self.truncate(first)
        self.observed += observed
        self.ends += ends
        self.digests += [bytes(row) for row in digests.tolist()]
        self.finish += [_FINISH_OF[c] for c in codes]

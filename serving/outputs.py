"""Output processing: sampled token ids to streamed text, with EOS and stop strings.

One ``OutputStream`` per session and generation. It is fed every token that joined the
history and says which events to stream, holding back text that may still turn into a
stop string. Replaying a step's stored reply through a new stream gives the same events
as the first time.
"""

from __future__ import annotations

from model.tokenizer import IncrementalDecoder, Tokenizer

from .sampling import find_stop
from .types import FinishReason, SamplingParams, TokenEvent


class OutputStream:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...], sampling: SamplingParams):
        self.sampling = sampling
        self.decoder = IncrementalDecoder(tokenizer)
        self.eos = set() if sampling.ignore_eos else set(eos_token_ids)
        self.hold = max((len(x) for x in sampling.stop), default=1) - 1  # text that may still become a stop string
        self.text, self.sent, self.count = "", 0, 0
        self.finish: FinishReason | None = None

    def accept(self, token: int) -> list[TokenEvent]:
        """The events for a token that has just joined the history; the last one ends it."""
        self.count += 1
        if token in self.eos:
            return self._end("eos")
        self.text += self.decoder.feed(token)
        last = self.count == self.sampling.max_new_tokens
        if last:
            self.text += self.decoder.finish()
        cut = find_stop(self.text, self.sampling.stop)
        if cut is not None:
            self.text = self.text[:cut]
            return self._end("stop")
        ready = max(self.sent, len(self.text) - self.hold)  # hold back what may still become a stop string
        event = TokenEvent(token_id=token, text=self.text[self.sent : ready])
        self.sent = ready
        return [event, *self._end("length")] if last else [event]

    def _end(self, reason: FinishReason) -> list[TokenEvent]:
        self.finish = reason
        return [TokenEvent(text=self.text[self.sent :], finish_reason=reason)]

    def replay(self, tokens: list[int]) -> list[TokenEvent]:
        """The events of a reply already in the history (a re-sent generation)."""
        events: list[TokenEvent] = []
        for token in tokens:
            events += self.accept(token)
            if self.finish is not None:
                break
        return events or self._end("length")

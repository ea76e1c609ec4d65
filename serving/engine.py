"""The in-process Engine: sessions whose history lives in a recurrent state.

Used directly by tests and by the agent's local backend, and inside each Ray Serve replica.
A session is a ``SessionState`` plus its step boundaries. ``append`` adds an observation
(text, images, video frames) as one step and costs only the new tokens; ``generate``
streams tokens and extends the current step with them; ``fork`` and ``rollback`` work on
step numbers.

Step numbers travel with appends: passing ``step=n`` makes a re-sent append idempotent
(the step already applied is acknowledged, not applied twice), which is what a remote
backend needs when it retries.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from pydantic import BaseModel

from model import ops
from model.checkpoint import load_checkpoint
from model.default import default_model
from model.longllava import LongLLaVA
from model.prompt import Piece, Text, render_pieces
from model.state import DecodeBatch, SessionState
from model.tokenizer import IncrementalDecoder, Tokenizer, load_tokenizer, tokenize_prompt

from .sampling import SamplingParams, find_stop, sample_batch

log = logging.getLogger(__name__)


class UnknownSessionError(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class SessionBusyError(RuntimeError):
    """Another call is using this session; sessions take one request at a time."""


class StepResult(BaseModel):
    session: str
    step: int  # steps appended so far; the one just applied or acknowledged
    tokens: int  # tokens this call added (0 for an acknowledged re-send)
    length: int  # tokens in the session's history


class TokenEvent(BaseModel):
    """One streamed token and the text it completes (possibly empty: a partial character,
    or text that may still turn into a stop string). The last event carries no token and
    sets ``finish_reason``; a token that ends generation (EOS, a stop string) is not streamed."""

    token_id: int | None = None
    text: str = ""
    finish_reason: Literal["eos", "stop", "length"] | None = None  # EOS, a stop string, max_new_tokens


@dataclass
class _Session:
    state: SessionState
    step_ends: list[int] = field(default_factory=lambda: [0])  # history length at the end of each step
    next_logits: torch.Tensor | None = None  # logits after the last token: where generation starts
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def step(self) -> int:
        return len(self.step_ends) - 1


class _Generation:
    """One session's side of a generation: sampling state, detokenising and stop strings."""

    def __init__(self, engine: "Engine", sampling: SamplingParams):
        self.sampling = sampling
        self.rng = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.decoder = IncrementalDecoder(engine.tokenizer)
        self.eos = set() if sampling.ignore_eos else set(engine.model.config.eos_token_ids)
        self.hold = max((len(x) for x in sampling.stop), default=1) - 1  # text that may still become a stop string
        self.text, self.sent, self.count = "", 0, 0
        self.finish: Literal["eos", "stop", "length"] | None = None

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

    def _end(self, reason: Literal["eos", "stop", "length"]) -> list[TokenEvent]:
        self.finish = reason
        return [TokenEvent(text=self.text[self.sent :], finish_reason=reason)]


def _pick_device(device: str | torch.device | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dev, dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)


class Engine:
    """Sessions over one LongLLaVA model on one device.

    ``rollback_window`` bounds how many steps back ``rollback`` can go from memory (one
    Mamba snapshot per step); ``max_chunk_tokens`` bounds one append. ``kernels`` picks the
    Mamba kernels ("auto", "torch" or "triton"; see ``model.ops``).
    """

    def __init__(
        self,
        model: LongLLaVA | None = None,
        tokenizer: Tokenizer | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_chunk_tokens: int = 32768,
        max_sessions: int = 1024,
        rollback_window: int = 64,
        kernels: ops.Kernels | None = None,
    ):
        if kernels is not None:  # process-wide, like LONGLLAVA_KERNELS
            ops.set_kernels(kernels)
        self.device, self.dtype = _pick_device(device, dtype)
        model = model if model is not None else default_model()
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(None)
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} ids but the model only {model.config.vocab_size}"
            )
        self.max_chunk_tokens = max_chunk_tokens
        self.max_sessions = max_sessions
        self.rollback_window = rollback_window
        self._sessions: dict[str, _Session] = {}
        self._model_lock = threading.Lock()
        log.info(
            "engine: %s on %s (%s); kernels: %s",
            type(model).__name__,
            self.device,
            str(self.dtype).removeprefix("torch."),
            ops.describe(self.device),
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        vision_tower_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> "Engine":
        """An engine for a local checkpoint, or for the embedded default model when ``path`` is None."""
        if path is None:
            return cls(device=device, dtype=dtype, **kwargs)
        dev, dt = _pick_device(device, dtype)
        model = load_checkpoint(path, vision_tower_path, device=dev, dtype=dt)
        tokenizer = load_tokenizer(tokenizer_path or path, builtin=model.config.builtin_tokenizer)
        return cls(model, tokenizer, device=dev, dtype=dt, **kwargs)

    # ------------------------------------------------------------------ sessions
    def _get(self, session: str) -> _Session:
        try:
            return self._sessions[session]
        except (KeyError, TypeError):
            raise UnknownSessionError(f"unknown session {str(session)[:64]!r}") from None

    def _hold(self, session: str) -> _Session:
        s = self._get(session)
        if not s.lock.acquire(blocking=False):
            raise SessionBusyError(f"session {session[:8]}… is busy with another request")
        return s

    def _add(self, s: _Session) -> str:
        if len(self._sessions) >= self.max_sessions:
            raise RuntimeError(f"the engine holds its maximum of {self.max_sessions} sessions; close some first")
        session = secrets.token_urlsafe(18)  # 144 random bits: unguessable
        self._sessions[session] = s
        return session

    def create(self) -> str:
        return self._add(_Session(self.model.new_state(max_snapshots=self.rollback_window)))

    def close(self, session: str) -> None:
        self._get(session)
        del self._sessions[session]

    def session_info(self, session: str) -> StepResult:
        s = self._get(session)
        return StepResult(session=session, step=s.step, tokens=0, length=s.state.length)

    def state_of(self, session: str) -> SessionState:
        """The live state (for checkpointing and measurement; do not mutate)."""
        return self._get(session).state

    # ------------------------------------------------------------------ append
    def _embed(self, pieces: Sequence[Piece] | str) -> torch.Tensor:
        """Validate, tokenise and encode everything before any state changes."""
        if isinstance(pieces, str):
            pieces = [Text(pieces)]
        text, images = render_pieces(pieces)
        ids = tokenize_prompt(self.tokenizer, text)
        features = self.model.encode_images(images) if images else None
        embeds = self.model.embed(ids, features)
        if embeds.shape[0] > self.max_chunk_tokens:
            raise ValueError(
                f"this append is {embeds.shape[0]} tokens, over the engine's max_chunk_tokens={self.max_chunk_tokens}"
            )
        return embeds

    def append(self, session: str, pieces: Sequence[Piece] | str, step: int | None = None) -> StepResult:
        """Add one observation as a new step. ``step`` (1-based, optional) makes re-sends idempotent."""
        s = self._hold(session)
        try:
            if step is not None:
                if step == s.step and step > 0:
                    return StepResult(session=session, step=s.step, tokens=0, length=s.state.length)
                if step != s.step + 1:
                    raise ValueError(f"step {step} does not follow the session's step {s.step}")
            with self._model_lock, torch.no_grad():
                embeds = self._embed(pieces)
                start = s.state.length
                s.state.snapshot()  # the end of the previous step: a rollback target
                try:
                    s.next_logits = self.model.prefill(s.state, embeds)
                except BaseException:
                    s.state.rollback(start)  # a failed prefill leaves no half-written state
                    raise
            s.step_ends.append(s.state.length)
            return StepResult(session=session, step=s.step, tokens=s.state.length - start, length=s.state.length)
        finally:
            s.lock.release()

    # ------------------------------------------------------------------ generate
    def generate(self, session: str, sampling: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Stream tokens. Every sampled token (EOS included) joins the history, so the next
        append continues after it; the current step grows to cover them."""
        for _, event in self.generate_batch([session], [sampling or SamplingParams()]):
            yield event

    def generate_batch(
        self, sessions: Sequence[str], sampling: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> Iterator[tuple[str, TokenEvent]]:
        """Generate for several sessions at once: one forward per token decodes all of them,
        whatever their history lengths. Yields ``(session, event)``; each session's events
        are those ``generate`` would give, and a finished session leaves the batch."""
        if len(set(sessions)) != len(sessions) or not sessions:
            raise ValueError("generate_batch takes one or more distinct sessions")
        params = list(sampling) if isinstance(sampling, Sequence) else [sampling or SamplingParams()] * len(sessions)
        if len(params) != len(sessions):
            raise ValueError(f"{len(sessions)} sessions but {len(params)} sampling parameters")
        held = self._hold_all(sessions)
        try:
            for sid, s in held.items():
                if s.next_logits is None:
                    raise ValueError(f"session {sid[:8]}… has nothing to generate from: append a prompt first")
            running = {sid: _Generation(self, p) for sid, p in zip(sessions, params)}
            logits = torch.stack([held[sid].next_logits for sid in running])
            while running:
                # the batch is rebuilt only when a session finishes
                with DecodeBatch([held[sid].state for sid in running]) as batch:
                    members = list(running)
                    while len(running) == len(members):
                        tokens = sample_batch(logits, [running[sid].sampling for sid in members], [running[sid].rng for sid in members])
                        with self._model_lock, torch.no_grad():
                            logits = self.model.decode(batch, self.model.embed(tokens))
                        for j, (sid, token) in enumerate(zip(members, tokens)):
                            held[sid].next_logits = logits[j]
                            held[sid].step_ends[-1] = held[sid].state.length
                            for event in running[sid].accept(token):
                                yield sid, event
                            if running[sid].finish is not None:
                                del running[sid]
                keep = [j for j, sid in enumerate(members) if sid in running]
                logits = logits[keep]
        finally:
            for s in held.values():
                s.lock.release()

    def _hold_all(self, sessions: Sequence[str]) -> dict[str, _Session]:
        held: dict[str, _Session] = {}
        try:
            for sid in sessions:
                held[sid] = self._hold(sid)
        except BaseException:
            for s in held.values():
                s.lock.release()
            raise
        return held

    def generate_text(self, session: str, sampling: SamplingParams | None = None) -> tuple[str, str]:
        """The whole generation as ``(text, finish_reason)``; the reason is "eos", "stop" or "length"."""
        events = list(self.generate(session, sampling))
        return "".join(e.text for e in events), events[-1].finish_reason or "length"

    # ------------------------------------------------------------------ fork and rollback
    def fork(self, session: str) -> str:
        """A new session with the same history; the two then diverge independently."""
        s = self._hold(session)
        try:
            child = _Session(
                s.state.fork(),
                list(s.step_ends),
                None if s.next_logits is None else s.next_logits.clone(),
            )
            return self._add(child)
        finally:
            s.lock.release()

    def rollback(self, session: str, step: int) -> StepResult:
        """Return the session to the end of ``step`` (0 is the empty history)."""
        s = self._hold(session)
        try:
            if not 0 <= step <= s.step:
                raise ValueError(f"step {step} is outside the session's steps 0..{s.step}")
            target = s.step_ends[step]
            try:
                s.state.rollback(target)
            except KeyError:
                raise ValueError(
                    f"step {step} is further back than the engine's rollback_window of {self.rollback_window} steps"
                ) from None
            if step < s.step:
                s.next_logits = None  # the logits there were not kept; the next call must append
            del s.step_ends[step + 1 :]
            return StepResult(session=session, step=s.step, tokens=0, length=s.state.length)
        finally:
            s.lock.release()

"""The in-process Engine: sessions whose history lives in a recurrent state.

Used directly by tests and by the agent's local backend, and inside each Ray Serve replica.
``append`` adds an observation (text, images, video frames) as one step and costs only the
new tokens; ``generate`` streams tokens and extends the current step with them; ``fork``
and ``rollback`` work on step numbers.

The Engine is thin: input processing (``inputs``) renders, counts and encodes an
observation; the session table (``sessions``) finds, locks, restores and evicts sessions;
the decode loop (``generation``) batches generation across sessions; output processing
(``outputs``) turns tokens into text. With a checkpoint store, every change is logged as
it happens (``checkpoint``) and replies say which steps are durable.

Step numbers make retries safe (see ``serving.steps`` for the rules): ``append(step=n)``
acknowledges a re-sent observation instead of applying it twice, and
``generate(step=n)`` re-sends a reply already in the history instead of adding another.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator, Sequence

import torch

from model import ops
from model.checkpoint import load_checkpoint
from model.default import default_model
from model.longllava import LongLLaVA
from model.prompt import Piece
from model.state_codec import recurrent_from, state_layout
from model.state import SessionState
from model.tokenizer import Tokenizer, load_tokenizer

from .checkpoint import CheckpointPolicy, DirectoryStore, model_fingerprint, read_point
from .errors import StepGapError
from .generation import DecodeLoop, Request
from .inputs import InputProcessor, Observation
from .outputs import OutputStream
from .scheduler import Scheduler
from .sessions import Session, SessionTable
from .types import EngineStats, SamplingParams, SessionInfo, StepResult, TokenEvent

log = logging.getLogger(__name__)


def _pick_device(device: str | torch.device | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dev, dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)


class Engine:
    """Sessions over one LongLLaVA model on one device.

    ``rollback_window`` bounds how many steps back ``rollback`` can go from memory (one
    Mamba snapshot per step; with a store, older steps come from the log);
    ``max_chunk_tokens`` bounds one append; ``max_sessions`` the sessions in memory.
    ``kernels`` picks the Mamba kernels ("auto", "torch" or "triton"; see ``model.ops``).

    ``checkpoint_dir`` (a path or fsspec URL) or ``store`` makes sessions durable; then
    ``max_resident_bytes`` bounds the memory their states take, evicting idle ones to the
    store, and ``checkpoint`` says how the log is written (``CheckpointPolicy``).
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
        checkpoint_dir: str | Path | None = None,
        store: DirectoryStore | None = None,
        checkpoint: CheckpointPolicy | None = None,
        max_resident_bytes: int | None = None,
    ):
        self.device, self.dtype = _pick_device(device, dtype)
        if kernels is not None:  # process-wide, like LONGLLAVA_KERNELS; checked before it is set
            with ops.use_kernels(kernels):
                ops.resolve(self.device)
            ops.set_kernels(kernels)
        if checkpoint_dir is not None and store is not None:
            raise ValueError("pass checkpoint_dir or store, not both")
        model = model if model is not None else default_model()
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(None)
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} ids but the model only {model.config.vocab_size}"
            )
        self.rollback_window = rollback_window
        self.inputs = InputProcessor(self.model, self.tokenizer, max_chunk_tokens)
        self.store = DirectoryStore(checkpoint_dir) if checkpoint_dir is not None else store
        self.policy = checkpoint or CheckpointPolicy()
        self.sessions = SessionTable(
            self._new_state,
            store=self.store,
            policy=self.policy,
            model=model_fingerprint(self.model, json.dumps(model.config.to_dict(), sort_keys=True)),
            layout=state_layout(self._new_state()),
            max_sessions=max_sessions,
            max_resident_bytes=max_resident_bytes,
        )
        self.scheduler = Scheduler(DecodeLoop(self.model, self.tokenizer.vocab_size))
        log.info(
            "engine: %s on %s (%s); kernels: %s; sessions: %s",
            type(model).__name__,
            self.device,
            str(self.dtype).removeprefix("torch."),
            ops.describe(self.device),
            self.store or "in memory only",
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

    def _new_state(self) -> SessionState:
        return self.model.new_state(max_snapshots=self.rollback_window)

    # ------------------------------------------------------------------ sessions
    def create(self, session_id: str | None = None) -> str:
        """A new session's id: ``session_id`` if given (URL-safe base64, new), else a random one."""
        return self.sessions.create(session_id).id

    def close(self, session: str) -> None:
        self.sessions.close(session)

    def session_info(self, session: str) -> SessionInfo:
        """What the session holds; one that is not in memory is restored to answer."""
        resident = self.sessions.is_resident(session)
        s = self.sessions.get(session)
        return SessionInfo(
            session=session, step=s.steps.last, length=s.state.length, state_bytes=s.state.nbytes,
            resident=resident, durable_step=s.durable_step, finish_reason=s.steps.finish[s.steps.last],
        )

    def adopt(self, session: str) -> SessionInfo:
        """Serve ``session`` from this engine: restore it from the store, taking it over from
        whichever engine had it, unless it is here already and still ours."""
        with self.sessions.hold(session):
            pass
        return self.session_info(session)

    def state_of(self, session: str) -> SessionState:
        """The live state (for checkpointing and measurement; do not mutate)."""
        return self.sessions.get(session).state

    def flush(self, session: str | None = None) -> None:
        """Wait until every change so far (of one session, or of all) is durable."""
        sessions = [self.sessions.get(session)] if session is not None else self.sessions.resident()
        for s in sessions:
            if s.log is not None:
                s.log.wait()

    def stats(self) -> EngineStats:
        resident = self.sessions.resident()
        logged = [s for s in resident if s.log is not None]
        writer = self.sessions.writer
        failure = self.scheduler.failure
        broken = f"the model thread failed: {failure!r}" if failure else None
        if writer is not None and not writer.alive:
            broken = "the checkpoint writer thread is not running"
        return EngineStats(
            resident=len(resident), state_bytes=sum(s.resident_nbytes for s in resident),
            generating=self.scheduler.generating, evictions=self.sessions.evictions,
            decode_steps=self.scheduler.steps, decoded_tokens=self.scheduler.decoded,
            checkpoint_lag_steps=sum(s.steps.last - s.durable_step for s in logged),
            failing_logs=sum(s.log.error is not None for s in logged), broken=broken,
        )

    def shutdown(self) -> None:
        """Write what is still queued, then stop the checkpoint writer."""
        self.sessions.shutdown()

    def _reply(self, s: Session, step: int | None = None, tokens: int = 0) -> StepResult:
        step = s.steps.last if step is None else step
        return StepResult(session=s.id, step=step, tokens=tokens, length=s.steps.ends[step], durable_step=s.durable_step)

    def _sync(self, s: Session, sync: bool | None) -> None:
        if s.log is not None and (self.policy.sync if sync is None else sync):
            s.log.wait()

    # ------------------------------------------------------------------ append
    def append(self, session: str, pieces: Sequence[Piece] | str, step: int | None = None, sync: bool | None = None) -> StepResult:
        """Add one observation as a new step. ``step`` (1-based, optional) makes re-sends
        idempotent; ``sync`` waits until the step is durable (default: the policy's)."""
        observation = self.inputs.process(pieces)  # refuses bad input before the session is touched
        with self.sessions.hold(session) as s:
            if not s.steps.check_new(step, observation.digest):
                return self._reply(s, step)
            start = s.state.length
            self.scheduler.run(lambda: self._prefill(s, observation))
            s.tokens.extend(observation.history_ids(self.model.config.image_tokens))
            s.steps.add(s.state.length, observation.digest)
            s.record("append", first_step=s.steps.last - 1)
            self._sync(s, sync)
            return self._reply(s, tokens=s.state.length - start)

    @torch.no_grad()
    def _prefill(self, s: Session, observation: Observation) -> None:
        """On the model thread: encode the observation and run it onto the session's state."""
        start = s.state.length
        embeds = self.inputs.embed(observation)
        s.state.snapshot()  # the end of the previous step: a rollback target
        try:
            self.model.prefill(s.state, embeds, logits="none")
        except BaseException:
            s.state.rollback(start)  # a failed prefill leaves no half-written state
            raise

    # ------------------------------------------------------------------ generate
    def generate(
        self, session: str, sampling: SamplingParams | None = None, step: int | None = None
    ) -> Iterator[TokenEvent]:
        """Stream tokens. Every sampled token (EOS included) joins the history, so the next
        append continues after it; the current step grows to cover them. With ``step``, a
        step whose reply is already in the history re-sends that reply."""
        for _, event in self.generate_batch([session], [sampling or SamplingParams()], None if step is None else [step]):
            yield event

    def generate_batch(
        self,
        sessions: Sequence[str],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        steps: Sequence[int | None] | None = None,
    ) -> Iterator[tuple[str, TokenEvent]]:
        """Generate for several sessions at once: one forward per token decodes all of them,
        whatever their history lengths. Yields ``(session, event)``; each session's events
        are those ``generate`` would give, and a finished session leaves the batch."""
        if len(set(sessions)) != len(sessions) or not sessions:
            raise ValueError("generate_batch takes one or more distinct sessions")
        params = list(sampling) if isinstance(sampling, Sequence) else [sampling or SamplingParams()] * len(sessions)
        steps = list(steps) if steps is not None else [None] * len(sessions)
        if not len(params) == len(steps) == len(sessions):
            raise ValueError(f"{len(sessions)} sessions but {len(params)} sampling parameters and {len(steps)} steps")
        with self.sessions.hold_all(sessions) as held:
            replays = [self._replay(s, p, n) for s, p, n in zip(held, params, steps)]
            for s, events in zip(held, replays):
                for event in events or ():
                    yield s.id, event
            requests = [self._request(s, p) for s, p, events in zip(held, params, replays) if events is None]
            if requests:
                yield from self._decode(requests)

    def _replay(self, s: Session, sampling: SamplingParams, step: int | None) -> list[TokenEvent] | None:
        """The events of step ``step``'s reply if it is already in the history, else None."""
        if step is None:
            return None
        last = s.steps.last
        if step > last or step < 1:
            raise StepGapError(f"step {step} has no observation yet: append step {last + 1} first", last + 1)
        if s.steps.finish[step] is None:
            if step == last:
                return None
            raise ValueError(f"step {step} has no finished reply to re-send, and later steps follow it")
        stream = OutputStream(self.tokenizer, self.model.config.eos_token_ids, sampling)
        events = stream.replay(list(s.tokens[s.steps.observed[step] : s.steps.ends[step]]))
        events[-1] = events[-1].model_copy(
            update={"tokens": 0, "length": s.state.length, "replayed": True, "durable_step": s.durable_step}
        )
        return events

    def check_sampling(self, sampling: SamplingParams) -> None:
        """Raises for sampling this engine cannot do (before a step's append, so a bad
        reply request leaves the history alone)."""
        if sampling.logit_bias and not 0 <= min(sampling.logit_bias) <= max(sampling.logit_bias) < self.tokenizer.vocab_size:
            raise ValueError(f"logit_bias names token ids outside the tokenizer's 0..{self.tokenizer.vocab_size - 1}")

    def _request(self, s: Session, sampling: SamplingParams) -> Request:
        if s.state.last_hidden is None:
            raise ValueError(f"session {s.id[:8]}… has nothing to generate from: append a prompt first")
        self.check_sampling(sampling)
        rng = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        return Request(s, OutputStream(self.tokenizer, self.model.config.eos_token_ids, sampling), rng, s.state.length)

    def _decode(self, requests: list[Request]) -> Iterator[tuple[str, TokenEvent]]:
        """The requests' events from the model thread, which decodes them together with
        every other generation running on this engine."""
        events = self.scheduler.decode(requests)
        try:
            for r, event in events:
                if event.finish_reason is not None:
                    event = self._finish(r, event)
                yield r.session.id, event
        finally:
            events.close()  # withdraws the requests still running
            for r in requests:  # stopped early (the caller went away): log what joined the history
                if r.stream.finish is None and r.added:
                    r.session.record("generate", first_step=r.session.steps.last - 1)

    def _finish(self, r: Request, event: TokenEvent) -> TokenEvent:
        s = r.session
        s.steps.extend_reply(s.state.length, event.finish_reason)
        s.record("generate", first_step=s.steps.last - 1)
        self._sync(s, None)
        return event.model_copy(update={"tokens": r.added, "length": s.state.length, "durable_step": s.durable_step})

    def generate_text(
        self, session: str, sampling: SamplingParams | None = None, step: int | None = None
    ) -> tuple[str, str]:
        """The whole generation as ``(text, finish_reason)``; the reason is "eos", "stop" or "length"."""
        events = list(self.generate(session, sampling, step))
        return "".join(e.text for e in events), events[-1].finish_reason or "length"

    # ------------------------------------------------------------------ fork and rollback
    def fork(self, session: str) -> str:
        """A new session with the same history; the two then diverge independently. With a
        store the child is durable by itself: it does not need the parent to restore."""
        with self.sessions.hold(session) as s:
            return self.sessions.fork(s).id

    def rollback(self, session: str, step: int) -> StepResult:
        """Return the session to the end of ``step`` (0 is the empty history): from the
        in-memory snapshots where they reach, otherwise from the checkpoint log."""
        with self.sessions.hold(session) as s:
            if not 0 <= step <= s.steps.last:
                raise ValueError(f"step {step} is outside the session's steps 0..{s.steps.last}")
            target = s.steps.ends[step]
            if target == s.state.length:
                return self._reply(s)
            if s.state.can_rollback(target):
                s.state.rollback(target)
            else:
                self._rollback_from_log(s, step, target)
            s.steps.truncate(step)
            del s.tokens[target:]
            s.record("rollback", first_step=step, base=target)
            self._sync(s, None)
            return self._reply(s)

    def _rollback_from_log(self, s: Session, step: int, target: int) -> None:
        if s.log is None:
            raise ValueError(f"step {step} is further back than the engine's rollback_window of {self.rollback_window} steps")
        s.log.wait()
        points = s.log.disk.points
        ref = points.get(target)
        if ref is None:
            kept = [n for n in range(s.steps.last + 1) if s.steps.ends[n] in points]
            raise ValueError(f"step {step} is not a rollback target any more; the log keeps steps {kept}")
        item = read_point(self.store, s.id, ref)
        if item.meta.length != target:
            raise ValueError(f"the log's state for step {step} has {item.meta.length} tokens, not {target}")
        recurrent = {k: v for k, v in item.tensors.items() if k.startswith("mamba.") or k == "hidden"}
        s.state.rewind(target, *recurrent_from(s.state, recurrent, target))

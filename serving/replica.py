"""The model deployment: each replica is one Engine over the shared checkpoint store.

Any replica can serve any session: one that is not in its memory is restored from the
store on its first call, and the replica that had it is fenced (``serving.sessions``).
Requests reach a session's replica by consistent hashing on its id (``serving.app``), so
a session stays where its state is, and moves only when its replica dies or leaves.

The Engine is synchronous and thread-safe; each request runs it on a thread of the
replica's own pool (as many threads as the replica takes requests at once), and its model
thread decodes every generating session together whatever request started it. A
generation streams back as lists of events: whatever is ready each time the caller reads,
so a slow reader gets fewer, larger messages rather than falling behind; for a caller that
does not stream, it comes back whole, as one message (``generate_all``). An agent's step
(``step``, ``step_all``) is an append and then its reply in one call.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Iterator, Sequence

from pydantic import BaseModel, ConfigDict
from ray import serve

from model.prompt import Piece

from .errors import TooManySessionsError
from .limits import Limits, check_grpc_bound
from .metrics import ReplicaMetrics
from .types import SamplingParams, SessionInfo, StepResult, TokenEvent

METRICS_PERIOD_S = 2.0


class ReplicaSettings(BaseModel):
    """What one model replica loads and how it bounds itself (from the app's arguments)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None  # a local checkpoint directory; None: the embedded default model
    vision_tower: str | None = None
    tokenizer: str | None = None
    checkpoint_dir: str
    max_resident_bytes: int | None = None
    rollback_window: int = 16
    device: str = "cpu"
    torch_threads: int = 1
    max_ongoing_requests: int = 64
    limits: Limits = Limits()


class ModelReplica:
    def __init__(self, settings: ReplicaSettings):
        import torch  # here, not at import: the app's builder and ingress never load torch

        from .engine import Engine

        check_grpc_bound(settings.limits)
        torch.set_num_threads(settings.torch_threads)
        self.limits = settings.limits
        self.engine = Engine.from_pretrained(
            settings.model, vision_tower_path=settings.vision_tower, tokenizer_path=settings.tokenizer,
            device=settings.device, checkpoint_dir=settings.checkpoint_dir,
            max_resident_bytes=settings.max_resident_bytes, max_chunk_tokens=settings.limits.max_observation_tokens,
            rollback_window=settings.rollback_window,
        )
        self.threads = ThreadPoolExecutor(max_workers=settings.max_ongoing_requests + 4, thread_name_prefix="request")
        self.name = serve.get_replica_context().replica_id.unique_id
        self.open: set[str] = set()  # sessions served here and not closed: the max_sessions limit
        self.metrics = ReplicaMetrics()
        self._reported = self.engine.stats()
        self._metrics_task = asyncio.get_running_loop().create_task(self._report_metrics())

    # ------------------------------------------------------------------ sessions
    async def create(self, session_id: str | None = None) -> str:
        self._check_room()
        session = await self._run(self.engine.create, session_id)
        self.open.add(session)
        return session

    async def fork(self, session: str) -> str:
        self._check_room()
        child = await self._run(self.engine.fork, session)
        self.open.update((session, child))
        return child

    async def close(self, session: str) -> None:
        await self._run(self.engine.close, session)
        self.open.discard(session)

    async def info(self, session: str) -> SessionInfo:
        info = await self._run(self.engine.session_info, session)
        self.open.add(session)
        return info.model_copy(update={"replica": self.name})

    async def rollback(self, session: str, step: int) -> StepResult:
        return await self._run(self.engine.rollback, session, step)

    def _check_room(self) -> None:
        if len(self.open) >= self.limits.max_sessions:
            raise TooManySessionsError(
                f"this replica holds its maximum of {self.limits.max_sessions} open sessions (max_sessions); close some first"
            )

    # ------------------------------------------------------------------ steps
    async def append(self, session: str, pieces: Sequence[Piece], step: int | None = None, sync: bool | None = None) -> StepResult:
        start = time.perf_counter()
        result = await self._run(self.engine.append, session, pieces, step, sync)
        self.open.add(session)
        self.metrics.step("append", time.perf_counter() - start, result.tokens, _lag(result.step, result.durable_step))
        return result

    async def generate(self, session: str, sampling: SamplingParams, step: int | None = None) -> AsyncIterator[list[TokenEvent]]:
        """The generation's events, in lists of whatever is ready (the last list ends with
        the final event)."""
        start = time.perf_counter()
        async for events in self._stream(lambda: self.engine.generate(session, sampling, step)):
            if events[-1].finish_reason is not None:
                self._generated(session, step, events[-1], start)
            yield events

    async def generate_all(self, session: str, sampling: SamplingParams, step: int | None = None) -> list[TokenEvent]:
        """The whole generation's events at once, for a caller that does not stream."""
        start = time.perf_counter()
        events = await self._run(lambda: list(self.engine.generate(session, sampling, step)))
        self._generated(session, step, events[-1], start)
        return events

    async def step(self, session: str, pieces: Sequence[Piece], step: int | None, sync: bool | None,
                   sampling: SamplingParams) -> AsyncIterator[StepResult | list[TokenEvent]]:
        """An agent's step in one call: the append's result, then its reply's events as
        ``generate`` streams them. The reply is generated under the step's number, so a
        re-sent step whose observation is already here is acknowledged, not appended again,
        and its reply is re-sent if it was generated, else generated."""
        appended = await self._step_append(session, pieces, step, sync, sampling)
        yield appended
        async for events in self.generate(session, sampling, appended.step):
            yield events

    async def step_all(self, session: str, pieces: Sequence[Piece], step: int | None, sync: bool | None,
                       sampling: SamplingParams) -> tuple[StepResult, list[TokenEvent]]:
        """``step``, its reply whole, for a caller that does not stream."""
        appended = await self._step_append(session, pieces, step, sync, sampling)
        return appended, await self.generate_all(session, sampling, appended.step)

    async def _step_append(self, session: str, pieces: Sequence[Piece], step: int | None, sync: bool | None,
                           sampling: SamplingParams) -> StepResult:
        self.engine.check_sampling(sampling)  # a reply that cannot be generated leaves the history alone
        return await self.append(session, pieces, step, sync)

    def _generated(self, session: str, step: int | None, last: TokenEvent, start: float) -> None:
        self.open.add(session)
        self.metrics.step("generate", time.perf_counter() - start, last.tokens or 0, _lag(step, last.durable_step))

    def __del__(self) -> None:
        """Serve calls this on a graceful shutdown (scaling down, redeploying): write what
        the checkpoint writer still holds before the process goes."""
        self.engine.shutdown()

    # ------------------------------------------------------------------ health and metrics
    def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica."""
        broken = self.engine.stats().broken
        if broken is not None:
            raise RuntimeError(broken)

    async def _report_metrics(self) -> None:
        while True:
            stats = self.engine.stats()
            m, before = self.metrics, self._reported
            m.resident.set(stats.resident)
            m.state_bytes.set(stats.state_bytes)
            m.lag_total.set(stats.checkpoint_lag_steps)
            if stats.evictions > before.evictions:
                m.evicted.inc(stats.evictions - before.evictions)
            restores = self.engine.sessions.restores
            while restores:
                m.restores.inc()
                m.restore_seconds.observe(restores.popleft())
            if stats.decode_steps > before.decode_steps:
                m.batch.observe((stats.decoded_tokens - before.decoded_tokens) / (stats.decode_steps - before.decode_steps))
            self._reported = stats
            await asyncio.sleep(METRICS_PERIOD_S)

    # ------------------------------------------------------------------ running the engine
    async def _run(self, call: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.threads, call, *args)

    async def _stream(self, start: Callable[[], Iterator]) -> AsyncIterator[list]:
        """Iterate a blocking iterator on a pool thread; yield what it has produced so far,
        each time the caller asks. If the caller goes away, the iterator is closed."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue = asyncio.Queue()
        stop = False
        end = object()

        def pump() -> None:
            items = start()  # a generator: nothing runs until the first next()
            try:
                for item in items:
                    loop.call_soon_threadsafe(ready.put_nowait, item)
                    if stop:
                        break
                loop.call_soon_threadsafe(ready.put_nowait, end)
            except BaseException as exc:
                loop.call_soon_threadsafe(ready.put_nowait, exc)
            finally:
                items.close()

        pumping = loop.run_in_executor(self.threads, pump)
        try:
            while True:
                batch = [await ready.get()]
                while not ready.empty():
                    batch.append(ready.get_nowait())
                done = batch[-1] is end or isinstance(batch[-1], BaseException)
                items = batch[:-1] if done else batch
                if items:
                    yield items
                if isinstance(batch[-1], BaseException):
                    raise batch[-1]
                if done:
                    return
        finally:
            stop = True
            await pumping


def _lag(step: int | None, durable_step: int | None) -> int | None:
    return None if step is None or durable_step is None else step - durable_step

"""The HTTP API: the session API, the OpenAI-compatible chat API, and the ingress that serves both.

The ingress validates, authenticates and decodes every request, then calls the model
deployment with the session's id, which Serve's consistent-hash router maps to the
replica that holds the session. It picks new sessions' ids itself, so a session is
created on the replica that will serve it.

When a replica dies mid-request, Serve raises ``RayActorError`` and does not retry; the
ingress re-sends the request until the replica that takes the session over (restoring it
from the store) answers. That is exact only for requests with a step number, which the
engine acknowledges rather than applies twice: a streamed generation resumes where it
broke off, its re-sent tokens checked against those already sent. Sampling without a
seed is given one here, so a re-sent generation samples the same tokens.

Routes (all JSON unless said; errors are ``ErrorReply`` with a 4xx, or 503 to retry):

- ``POST /v1/sessions``: a new session and its token;
- ``POST /v1/sessions/{id}/steps``: append an observation (msgpack, JSON or multipart);
- ``POST /v1/sessions/{id}/generate``: Server-Sent Events (``token``, then ``done``, or
  ``error``), or one ``Generation`` with ``"stream": false``;
- ``POST /v1/sessions/{id}/step``: an agent's step in one request, an append then its
  reply's generation: an observation as for ``steps`` plus ``sampling`` (and ``stream``);
  the events of ``generate`` after one ``appended`` event, or one ``StepReply``;
- ``POST /v1/sessions/{id}/fork``, ``POST /v1/sessions/{id}/rollback``,
  ``GET /v1/sessions/{id}``, ``DELETE /v1/sessions/{id}``;
- ``POST /v1/chat/completions`` and ``GET /v1/models``, as OpenAI's API; with an
  ``x-session-id`` header (and its token) the messages are only the new turn;
- ``GET /openapi.json``.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from typing import AsyncIterator, TypeVar

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from . import chat
from .access import Access
from .errors import HTTP_ERRORS, LimitExceededError, ReplicaUnavailableError, UnknownModelError
from .limits import Limits, check_grpc_bound
from .types import (
    AppendRequest,
    ErrorDetail,
    ErrorReply,
    GenerateRequest,
    Generation,
    RollbackRequest,
    SamplingParams,
    SessionCreated,
    SessionInfo,
    StepReply,
    StepRequest,
    StepResult,
    TokenEvent,
)
from .uploads import read_append, to_pieces

RETRY_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)
Event = TypeVar("Event")

api = FastAPI(
    title="LongLLaVA agent runtime",
    summary="Sessions whose history lives on the server, and an OpenAI-compatible chat API",
    version="0.1.0",
    docs_url=None,  # the interactive pages load scripts from the internet; /openapi.json is here
    redoc_url=None,
)


# ---------------------------------------------------------------------------- errors
def error_reply(exc: BaseException) -> JSONResponse:
    cause = getattr(exc, "cause", None) or exc  # a replica's error arrives wrapped in a RayTaskError
    status, kind = next((HTTP_ERRORS[c] for c in type(cause).__mro__ if c in HTTP_ERRORS), (500, "internal_error"))
    message = cause.args[0] if cause.args and isinstance(cause.args[0], str) else str(cause)
    detail = ErrorDetail(message=message, type=kind, code=kind, next_step=getattr(cause, "next_step", None))
    return JSONResponse(ErrorReply(error=detail).model_dump(), status_code=status)


async def _on_error(request: Request, exc: Exception) -> JSONResponse:
    return error_reply(exc)


async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
    return error_reply(ValueError(f"the request is invalid: {problems}"))


for _error in HTTP_ERRORS:
    api.add_exception_handler(_error, _on_error)
api.add_exception_handler(RayActorError, _on_error)
api.add_exception_handler(RequestValidationError, _on_invalid)


def ingress() -> "Ingress":
    """The ingress serving this request (routes are plain functions: Serve's class-based
    views do not work with FastAPI 0.165's included routers)."""
    return serve.get_replica_context().servable_object


async def current() -> "Ingress":
    """``ingress`` as a dependency. The dependencies are ``async def``: FastAPI runs a plain
    ``def`` one on a worker thread, and under Serve AnyIO starts a new thread for each
    request (it ties its threads to the request's task, which Serve makes the root)."""
    return ingress()


@api.middleware("http")
async def _guard(request: Request, call_next):
    """Every route: the API key, and a body size known up front (chunked bodies are read
    with the same bound by the routes that take them)."""
    server = ingress()
    request.state.failovers = 0
    try:
        server.access.check_api_key(request.headers.get("authorization"))
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > server.limits.max_body_bytes:
            raise LimitExceededError(f"the body is {length} bytes, over the limit of {server.limits.max_body_bytes} (max_body_bytes)")
    except (PermissionError, LimitExceededError) as exc:
        return error_reply(exc)
    response = await call_next(request)
    if request.state.failovers:
        response.headers["x-failovers"] = str(request.state.failovers)
    return response


async def session_token(x_session_token: str | None = Header(None, description="the token the session was created with")) -> str | None:
    return x_session_token


def sse(event: str, data: BaseModel) -> str:
    return f"event: {event}\ndata: {data.model_dump_json(exclude_none=True)}\n\n"


def new_session_id() -> str:
    return secrets.token_urlsafe(18)  # 144 random bits, as the engine's own ids


def checked(sampling: SamplingParams, limits: Limits) -> SamplingParams:
    if sampling.max_new_tokens > limits.max_new_tokens:
        raise LimitExceededError(
            f"max_new_tokens={sampling.max_new_tokens} is over the limit of {limits.max_new_tokens} (max_new_tokens)"
        )
    return sampling


def seeded(sampling: SamplingParams) -> SamplingParams:
    """A seed for sampling that has none, so a generation re-sent after a failover samples the same tokens."""
    if sampling.temperature > 0 and sampling.seed is None:
        return sampling.model_copy(update={"seed": secrets.randbits(63)})
    return sampling


# ---------------------------------------------------------------------------- sessions
@api.post("/v1/sessions", status_code=201, response_model=SessionCreated, tags=["sessions"])
async def create_session(request: Request, server: Ingress = Depends(current)) -> SessionCreated:
    """A new, empty session, and the token every later request for it presents."""
    session = new_session_id()
    await server.call(request, session, "create", session)
    return SessionCreated(session=session, token=server.access.token(session))


def observation_body(model: type[AppendRequest], **fields: dict) -> dict:
    """The OpenAPI request body of a route that takes an observation as ``model``, in each
    of its encodings; ``fields``: a form's fields beside those of every append."""
    form = {"text": {"type": "string"}, "image": {"type": "string", "format": "binary"},
            "step": {"type": "integer"}, "user_turn": {"type": "boolean"}, "sync": {"type": "boolean"}, **fields}
    return {"requestBody": {"content": {
        "application/msgpack": {"schema": model.model_json_schema()},
        "application/json": {"schema": model.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": form}},
    }}}


@api.post("/v1/sessions/{session}/steps", response_model=StepResult, tags=["sessions"], openapi_extra=observation_body(AppendRequest))
async def append(session: str, request: Request, token: str | None = Depends(session_token), server: Ingress = Depends(current)) -> StepResult:
    """Append one observation (text and PNG or JPEG images) as the next step."""
    server.access.check_token(session, token)
    body = await read_append(request, server.limits)
    pieces = to_pieces(body, server.limits)
    return await server.call(request, session, "append", session, pieces, body.step, body.sync, retry=body.step is not None)


@api.post("/v1/sessions/{session}/generate", tags=["sessions"], responses={200: {"model": Generation, "content": {"text/event-stream": {}}}})
async def generate(session: str, body: GenerateRequest, request: Request, token: str | None = Depends(session_token),
                   server: Ingress = Depends(current)) -> Response:
    """Generate the step's reply: Server-Sent Events (``token`` events, then ``done``
    with the whole reply's counts, or ``error``), or one ``Generation``."""
    server.access.check_token(session, token)
    sampling = seeded(checked(body.sampling(), server.limits))
    if not body.stream:
        return JSONResponse((await server.generated(request, session, sampling, body.step)).model_dump())
    return streaming(session_events(await started(server.generation(request, session, "generate", session, sampling, body.step, retry=body.step is not None))))


@api.post(
    "/v1/sessions/{session}/step", tags=["sessions"], responses={200: {"model": StepReply, "content": {"text/event-stream": {}}}},
    openapi_extra=observation_body(StepRequest, sampling={"type": "string", "description": "SamplingParams as JSON"},
                                   stream={"type": "boolean"}),
)
async def step(session: str, request: Request, token: str | None = Depends(session_token), server: Ingress = Depends(current)) -> Response:
    """An agent's step in one request: append the observation (as ``steps`` does), then
    generate its reply (as ``generate`` does, under the same step number). Server-Sent
    Events (``appended`` with the append's result, then ``token`` events, then ``done``, or
    ``error``), or one ``StepReply`` with ``"stream": false``. Re-sending a step is exact:
    an observation already applied is acknowledged, and its reply re-sent or, if it was
    not generated yet, generated."""
    server.access.check_token(session, token)
    body = await read_append(request, server.limits, StepRequest)
    sampling = seeded(checked(body.sampling, server.limits))
    pieces = to_pieces(body, server.limits)
    args, retry = (session, pieces, body.step, body.sync, sampling), body.step is not None
    if not body.stream:
        appended, events = await server.call(request, session, "step_all", *args, retry=retry)
        return JSONResponse(StepReply(appended=appended, generation=as_generation(events)).model_dump())
    return streaming(session_events(await started(server.generation(request, session, "step", *args, retry=retry))))


@api.post("/v1/sessions/{session}/fork", status_code=201, response_model=SessionCreated, tags=["sessions"])
async def fork(session: str, request: Request, token: str | None = Depends(session_token), server: Ingress = Depends(current)) -> SessionCreated:
    """A new session with this one's history (copy-on-write; durable by itself)."""
    server.access.check_token(session, token)
    child = await server.call(request, session, "fork", session, retry=False)
    return SessionCreated(session=child, token=server.access.token(child))


@api.post("/v1/sessions/{session}/rollback", response_model=StepResult, tags=["sessions"])
async def rollback(session: str, body: RollbackRequest, request: Request, token: str | None = Depends(session_token),
                   server: Ingress = Depends(current)) -> StepResult:
    """Return the session to the end of ``step`` (0: the empty history)."""
    server.access.check_token(session, token)
    return await server.call(request, session, "rollback", session, body.step)


@api.get("/v1/sessions/{session}", response_model=SessionInfo, tags=["sessions"])
async def info(session: str, request: Request, token: str | None = Depends(session_token), server: Ingress = Depends(current)) -> SessionInfo:
    """Steps, tokens, state bytes, durable step, and whether the state is in memory."""
    server.access.check_token(session, token)
    return await server.call(request, session, "info", session)


@api.delete("/v1/sessions/{session}", status_code=204, tags=["sessions"])
async def close(session: str, request: Request, token: str | None = Depends(session_token), server: Ingress = Depends(current)) -> Response:
    """Forget the session, in memory and in the store."""
    server.access.check_token(session, token)
    await server.call(request, session, "close", session)
    return Response(status_code=204)


# ---------------------------------------------------------------------------- OpenAI
@api.get("/v1/models", response_model=chat.ModelList, tags=["openai"])
async def models(server: Ingress = Depends(current)) -> chat.ModelList:
    return chat.ModelList(data=[chat.ModelCard(id=server.model_name, created=server.started)])


@api.post("/v1/chat/completions", response_model=chat.ChatCompletion, tags=["openai"])
async def chat_completions(
    body: chat.ChatRequest, request: Request, token: str | None = Depends(session_token),
    x_session_id: str | None = Header(None, description="continue this session: the messages are only the new turn"),
    server: Ingress = Depends(current),
) -> Response:
    """OpenAI's chat completions. Without ``x-session-id`` each request is a fresh
    conversation; with it (and its ``x-session-token``) the history stays in the session
    and ``messages`` holds only what is new."""
    if body.model != server.model_name:
        raise UnknownModelError(f"this server serves the model {server.model_name!r}, not {body.model!r}")
    sampling = seeded(body.sampling(server.limits))
    if x_session_id is not None:
        server.access.check_token(x_session_id, token)
        session, ephemeral = x_session_id, False
        state = await server.call(request, session, "info", session)
        pieces = chat.chat_pieces(body.messages, server.limits, close_reply=state.finish_reason in ("length", "stop"))
        step = state.step + 1
    else:
        pieces = chat.chat_pieces(body.messages, server.limits)
        session, ephemeral, step = new_session_id(), True, 1
        await server.call(request, session, "create", session)
    closing = server.close_quietly(request, session) if ephemeral else None
    try:
        appended = await server.call(request, session, "append", session, pieces, step, None)
        if body.stream:
            events = await started(server.generation(request, session, "generate", session, sampling, step, retry=True))
            chunks, closing = chat_stream(events, body, server.model_name, appended.tokens, closing), None
            return streaming(chunks)
        generation = await server.generated(request, session, sampling, step)
        return JSONResponse(chat_completion(generation, server.model_name, appended.tokens).model_dump())
    finally:
        if closing is not None:
            await closing


# ---------------------------------------------------------------------------- the ingress
class Ingress:
    """The deployment behind ``api``: ``model`` is the model deployment's handle, and
    ``secret`` signs session tokens.

    Calls reach the model replicas over Serve's gRPC transport (``_by_reference=False``)
    rather than as Ray actor calls, which cost the replica about twice the CPU per call
    (docs/benchmarks.md). A replica's death is still a ``RayActorError`` to ``call`` (its
    subclass ``ActorUnavailableError``). A gRPC message is bounded at both ends
    (``Limits.max_message_bytes``, set by ``serving.application``): a request carries its
    images decoded.
    """

    def __init__(self, model: DeploymentHandle, limits: Limits, secret: str, api_key: str | None,
                 model_name: str = chat.MODEL_NAME, failover_timeout_s: float = 60.0):
        check_grpc_bound(limits)
        self.model, self.limits, self.model_name = model.options(_by_reference=False), limits, model_name
        self.access = Access(secret, api_key)
        self.failover_timeout_s = failover_timeout_s
        self.started = chat.now()

    async def call(self, request: Request, session: str, method: str, *args, retry: bool = True):
        """``method`` on the session's replica; after a replica's death, again on the one
        that takes the session over (only where re-sending is exact: ``retry``)."""
        deadline = time.monotonic() + self.failover_timeout_s
        for attempt in itertools.count():
            try:
                return await getattr(self.model.options(session_id=session), method).remote(*args)
            except RayActorError:
                await self._failover(request, attempt, deadline, retry, method)

    async def generated(self, request: Request, session: str, sampling: SamplingParams, step: int | None) -> Generation:
        """The whole generation in one reply (no stream between the deployments: one
        message rather than one per token)."""
        events = await self.call(request, session, "generate_all", session, sampling, step, retry=step is not None)
        return as_generation(events)

    async def generation(self, request: Request, session: str, method: str, *args, retry: bool) -> AsyncIterator[list[TokenEvent] | StepResult]:
        """The events of a streaming ``method`` (``generate``; or ``step``, whose append's
        result comes first) in lists; after a failover, the re-sent call continues after
        what was already yielded: its append's result is not yielded again, and its tokens
        must repeat those yielded exactly."""
        deadline = time.monotonic() + self.failover_timeout_s
        sent: list[int] = []
        appended = False
        for attempt in itertools.count():
            stream = getattr(self.model.options(session_id=session, stream=True), method).remote(*args)
            seen = 0
            try:
                async for events in stream:
                    if isinstance(events, StepResult):
                        if not appended:
                            appended = True
                            yield events
                        continue
                    fresh = []
                    for e in events:
                        if e.token_id is not None and seen < len(sent):
                            if e.token_id != sent[seen]:
                                raise ReplicaUnavailableError(
                                    "the generation re-sent after a failover differs from the one begun; roll back and retry the step"
                                )
                            seen += 1
                            continue
                        if e.token_id is not None:
                            sent.append(e.token_id)
                            seen += 1
                        fresh.append(e)
                    if fresh:
                        yield fresh
                return
            except RayActorError:
                await self._failover(request, attempt, deadline, retry, method)
            finally:
                stream.cancel()  # the caller went away (or the replica did): stop decoding for it

    async def _failover(self, request: Request, attempt: int, deadline: float, retry: bool, method: str) -> None:
        """Wait before re-sending after a replica died, or give up with a 503."""
        if not retry:
            raise ReplicaUnavailableError(
                f"the replica serving this {method} died; it was not re-sent because, without a step number, it might apply twice"
            )
        if time.monotonic() > deadline:
            raise ReplicaUnavailableError(f"no replica took the session over within {self.failover_timeout_s:.0f} s; retry later")
        request.state.failovers += 1
        await asyncio.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])

    async def close_quietly(self, request: Request, session: str) -> None:
        try:
            await self.call(request, session, "close", session)
        except Exception:  # the reply is what matters; an orphan costs only disk
            pass


# ---------------------------------------------------------------------------- replies
async def started(events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """``events`` with its first item awaited already, so that an error before any token
    (an unknown session, a bad step) is an HTTP status rather than an event."""
    first = await anext(events)

    async def chained() -> AsyncIterator[Event]:
        yield first
        async for batch in events:
            yield batch

    return chained()


def streaming(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"cache-control": "no-cache"})


async def session_events(events: AsyncIterator[list[TokenEvent] | StepResult]) -> AsyncIterator[str]:
    """``token`` events, then ``done`` (after ``appended``, for a step); an error after the
    first event is an ``error`` event."""
    try:
        async for batch in events:
            if isinstance(batch, StepResult):
                yield sse("appended", batch)
                continue
            yield "".join(sse("done" if e.finish_reason else "token", e) for e in batch)
    except Exception as exc:
        reply = error_reply(exc)
        yield f"event: error\ndata: {reply.body.decode()}\n\n"
        return


def as_generation(events: list[TokenEvent]) -> Generation:
    last = events[-1]
    return Generation(
        text="".join(e.text for e in events), finish_reason=last.finish_reason, tokens=last.tokens or 0, length=last.length or 0,
        durable_step=last.durable_step, replayed=last.replayed, token_ids=[e.token_id for e in events if e.token_id is not None],
    )


def chat_completion(g: Generation, model: str, prompt_tokens: int) -> chat.ChatCompletion:
    usage = chat.Usage(prompt_tokens=prompt_tokens, completion_tokens=g.tokens, total_tokens=prompt_tokens + g.tokens)
    choice = chat.Choice(message=chat.ReplyMessage(content=g.text), finish_reason=chat.openai_finish(g.finish_reason))
    return chat.ChatCompletion(id=chat.completion_id(), created=chat.now(), model=model, choices=[choice], usage=usage)


async def chat_stream(events: AsyncIterator[list[TokenEvent]], body: chat.ChatRequest, model: str, prompt_tokens: int, closing) -> AsyncIterator[str]:
    """OpenAI's stream: a chunk per piece of text as ``data:`` lines, then ``data: [DONE]``;
    ``closing`` (an ephemeral session's close) is awaited at the end, however it ends."""

    def line(choices: list[chat.ChunkChoice], usage: chat.Usage | None = None) -> str:
        chunk = chat.ChatCompletionChunk(id=cid, created=created, model=model, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json()}\n\n"

    cid, created = chat.completion_id(), chat.now()
    try:
        yield line([chat.ChunkChoice(delta=chat.Delta(role="assistant", content=""))])
        async for batch in events:
            for e in batch:
                finish = chat.openai_finish(e.finish_reason) if e.finish_reason else None
                if e.text or finish:
                    yield line([chat.ChunkChoice(delta=chat.Delta(content=e.text or None), finish_reason=finish)])
                if finish and body.stream_options is not None and body.stream_options.include_usage:
                    tokens = e.tokens or 0
                    yield line([], chat.Usage(prompt_tokens=prompt_tokens, completion_tokens=tokens, total_tokens=prompt_tokens + tokens))
        yield "data: [DONE]\n\n"
    except Exception as exc:
        yield f"data: {error_reply(exc).body.decode()}\n\n"
    finally:
        if closing is not None:
            await closing

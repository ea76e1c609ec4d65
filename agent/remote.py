"""`RemoteBackend`: an agent's sessions on a LongLLaVA server (the Ray Serve app) over HTTP.

    from agent import Agent, RemoteBackend
    agent = Agent(RemoteBackend("http://127.0.0.1:8000", api_key=None))

It implements the same protocol as `LocalBackend` and needs neither torch nor Ray: each
step sends only the new observation (its images as PNG, which is lossless, so the server
sees exactly the pixels a local engine would), in msgpack. An agent's step (`step`) is one
request, `POST /v1/sessions/{id}/step`, that appends the observation and returns its
reply; `append` and `generate` are a request each.

**Failover.** Every append, generation and step carries its step number, so a request can
be re-sent: the server acknowledges a step it already has, and re-sends a reply it already
generated (or generates it, when only the observation got there). After a replica dies, the one that takes the session over restores it from
the checkpoint store, which holds every step up to the last reply's `durable_step`; the
steps after that may be lost. So the backend keeps each step after the durable one (the
observation and the sampling of its reply) and, when the server answers that it expects
an earlier step than the one sent, replays them in order (a step whose reply was asked for
as one request with it). Sampling with a temperature is
given a seed here, so a replayed reply is the one the agent already read. Requests that
fail in transit, or meet a 503 while the server fails over, are re-sent after a pause.
"""

from __future__ import annotations

import io
import secrets
import time
from dataclasses import dataclass, field
from typing import Sequence

import httpx2
import msgpack

from model.prompt import (
    FRAME_SEPARATOR,
    IMAGE_MARKUP,
    VIDEO_END,
    VIDEO_START,
    HighResImage,
    Image,
    Piece,
    Text,
    Video,
    as_rgb,
    highres_markup,
    tile_image,
)
from serving.errors import HTTP_ERRORS, ReplicaUnavailableError, StepGapError, UnknownSessionError
from serving.types import (
    AppendRequest,
    ErrorReply,
    Generation,
    GenerateRequest,
    ImagePart,
    SamplingParams,
    StepReply,
    StepResult,
    TextPart,
)

RETRY_PAUSES_S = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0)  # about 40 s in all
MAX_REPLAYS = 3
ERRORS = {kind: error for error, (_, kind) in HTTP_ERRORS.items()}  # the server's type words as the errors a local engine raises


@dataclass
class _Step:
    parts: list[TextPart | ImagePart]  # the observation, encoded (images as PNG)
    sampling: SamplingParams | None = None  # its reply's, once asked for

    def append_body(self, step: int) -> bytes:
        return msgpack.packb(_append_fields(self.parts, step))

    def step_body(self, step: int) -> bytes:
        """The observation and its reply's sampling, as one request (``/step``, not streamed)."""
        return msgpack.packb({**_append_fields(self.parts, step), "sampling": self.sampling.model_dump(mode="json"), "stream": False})


@dataclass
class _Session:
    token: str
    steps: dict[int, _Step] = field(default_factory=dict)  # the steps the store may not hold yet


class RemoteBackend:
    """`url` is the app's root (`http://host:8000`); `api_key` its key, if it has one."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout_s: float = 600.0):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx2.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.sessions: dict[str, _Session] = {}
        self.failovers = 0  # times the server re-sent one of our requests to another replica
        self.replays = 0  # steps re-sent because the server had lost them in a failover

    def create(self) -> str:
        created = self._send("POST", "/v1/sessions")
        self.sessions[created["session"]] = _Session(created["token"])
        return created["session"]

    def append(self, session: str, pieces: Sequence[Piece], step: int) -> StepResult:
        s = self._session(session)
        s.steps[step] = _Step(encode_parts(pieces))
        return self._append(session, step)

    def generate(self, session: str, sampling: SamplingParams, step: int | None) -> Generation:
        s = self._session(session)
        sampling = _seeded(sampling)
        if step in s.steps:
            s.steps[step].sampling = sampling
        reply = Generation.model_validate(self._step_request(session, step, "generate", json=_generate_body(sampling, step)))
        self._forget_durable(s, reply.durable_step)
        return reply

    def step(self, session: str, pieces: Sequence[Piece], step: int, sampling: SamplingParams) -> StepReply:
        """An agent's step in one request: the observation's append, then its reply."""
        s = self._session(session)
        kept = s.steps[step] = _Step(encode_parts(pieces), _seeded(sampling))
        reply = StepReply.model_validate(self._step_request(session, step, "step", content=kept.step_body(step)))
        self._forget_durable(s, reply.generation.durable_step)
        return reply

    def fork(self, session: str) -> str:
        parent = self._session(session)
        created = self._send("POST", f"/v1/sessions/{session}/fork", token=parent.token)
        self.sessions[created["session"]] = _Session(created["token"], dict(parent.steps))
        return created["session"]

    def rollback(self, session: str, step: int) -> StepResult:
        s = self._session(session)
        result = StepResult.model_validate(self._send("POST", f"/v1/sessions/{session}/rollback", token=s.token, json={"step": step}))
        s.steps = {n: v for n, v in s.steps.items() if n <= step}
        return result

    def close(self, session: str) -> None:
        s = self.sessions.pop(session, None)
        if s is None:
            raise UnknownSessionError(f"unknown session {session[:64]!r}")
        self._send("DELETE", f"/v1/sessions/{session}", token=s.token)

    def info(self, session: str) -> dict:
        """What the server holds for the session (`serving.types.SessionInfo` as a dict)."""
        return self._send("GET", f"/v1/sessions/{session}", token=self._session(session).token)

    # ------------------------------------------------------------------ steps and replay
    def _append(self, session: str, step: int) -> StepResult:
        body = self.sessions[session].steps[step].append_body(step)
        result = StepResult.model_validate(self._step_request(session, step, "steps", content=body))
        self._forget_durable(self.sessions[session], result.durable_step)
        return result

    def _step_request(self, session: str, step: int | None, route: str, *, content: bytes | None = None, json: dict | None = None) -> dict:
        """A step's request. When the server expects an earlier step (it lost the steps
        since its last durable one in a failover), replay those and send it again."""
        s = self.sessions[session]
        for replays in range(MAX_REPLAYS + 1):
            try:
                return self._send("POST", f"/v1/sessions/{session}/{route}", token=s.token, content=content, json=json,
                                  media="application/msgpack" if content is not None else None, retry=step is not None)
            except StepGapError as gap:
                if step is None or replays == MAX_REPLAYS:
                    raise
                self._replay(session, gap.next_step, step, observation=route == "generate")
        raise AssertionError("unreachable")

    def _replay(self, session: str, first: int, step: int, observation: bool) -> None:
        """Re-send steps ``first`` up to ``step``, each observation with its reply (one
        ``/step`` request), and ``step``'s own observation when it is its reply that is
        being sent."""
        s = self.sessions[session]
        for n in range(first, step + observation):
            if n not in s.steps:
                raise StepGapError(f"the server lost step {n}, which this client no longer holds", n)
            self.replays += 1
            kept = s.steps[n]
            if n < step and kept.sampling is not None:
                self._send("POST", f"/v1/sessions/{session}/step", token=s.token, content=kept.step_body(n), media="application/msgpack")
            else:
                self._send("POST", f"/v1/sessions/{session}/steps", token=s.token, content=kept.append_body(n), media="application/msgpack")

    @staticmethod
    def _forget_durable(s: _Session, durable_step: int | None) -> None:
        if durable_step is not None:
            s.steps = {n: v for n, v in s.steps.items() if n > durable_step}

    # ------------------------------------------------------------------ HTTP
    def _session(self, session: str) -> _Session:
        if session not in self.sessions:
            raise UnknownSessionError(f"unknown session {session[:64]!r} (not created through this backend)")
        return self.sessions[session]

    def _send(self, method: str, path: str, *, token: str | None = None, json: dict | None = None,
              content: bytes | None = None, media: str | None = None, retry: bool = True) -> dict:
        """One request, re-sent while the server is unreachable or failing over (exact for
        every request that names its step, or changes nothing; ``retry`` is off otherwise)."""
        headers = {"x-session-token": token} if token else {}
        if media:
            headers["content-type"] = media
        for pause in (*RETRY_PAUSES_S, None) if retry else (None,):
            try:
                response = self.http.request(method, path, headers=headers, json=json, content=content)
            except httpx2.TransportError:
                if pause is None:
                    raise
                time.sleep(pause)
                continue
            if response.status_code == 503 and pause is not None:
                time.sleep(pause)
                continue
            self.failovers += int(response.headers.get("x-failovers", 0))
            if response.status_code >= 400:
                raise _error(response)
            return response.json() if response.content else {}
        raise AssertionError("unreachable")


def _error(response: httpx2.Response) -> Exception:
    try:
        detail = ErrorReply.model_validate_json(response.content).error
    except ValueError:
        return RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
    if detail.type == "step_gap":
        return StepGapError(detail.message, detail.next_step or 1)
    if response.status_code == 503:
        return ReplicaUnavailableError(detail.message)
    return ERRORS.get(detail.type, ValueError if response.status_code < 500 else RuntimeError)(detail.message)


def _generate_body(sampling: SamplingParams, step: int | None) -> dict:
    return GenerateRequest(**sampling.model_dump(), step=step, stream=False).model_dump(mode="json")


def _seeded(sampling: SamplingParams) -> SamplingParams:
    """Sampling with a temperature and no seed gets one, so a re-sent reply is the one already read."""
    if sampling.temperature > 0 and sampling.seed is None:
        return sampling.model_copy(update={"seed": secrets.randbits(63)})
    return sampling


# ---------------------------------------------------------------------------- encoding
def encode_parts(pieces: Sequence[Piece]) -> list[TextPart | ImagePart]:
    """An observation as the server's parts: text, and images as PNG."""
    return [TextPart(text=p.text) if isinstance(p, Text) else ImagePart(image=png(p.image)) for p in flat_pieces(pieces)]


def _append_fields(parts: list[TextPart | ImagePart], step: int) -> dict:
    return AppendRequest(parts=parts, step=step).model_dump(mode="python")


def flat_pieces(pieces: Sequence[Piece]) -> list[Text | Image]:
    """Videos and high-resolution images as the text and images they render to, so that
    the server renders exactly what a local engine would."""
    flat: list[Text | Image] = []
    for piece in pieces:
        if isinstance(piece, Video):
            flat.append(Text(VIDEO_START))
            for j, frame in enumerate(piece.frames):
                flat += [Text(FRAME_SEPARATOR)] * (j > 0) + [Image(frame)]
            flat.append(Text(VIDEO_END))
        elif isinstance(piece, HighResImage):
            global_image, tiles, rows, cols = tile_image(as_rgb(piece.image), piece.tile, piece.max_tiles)
            markup = highres_markup(rows, cols).split(IMAGE_MARKUP)
            images = [global_image, *tiles]
            for j, text in enumerate(markup):
                flat += [Text(text)] * bool(text) + [Image(images[j])] * (j < len(images))
        elif isinstance(piece, (Text, Image)):
            flat.append(piece)
        else:
            raise TypeError(f"unknown prompt piece type {type(piece).__name__}; expected Text, Image, Video or HighResImage")
    return flat


def png(image) -> bytes:
    """The image as the RGB the engine would see, in PNG (lossless)."""
    out = io.BytesIO()
    as_rgb(image).save(out, format="PNG", compress_level=1)
    return out.getvalue()

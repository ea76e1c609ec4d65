"""The Engine's requests and replies as plain pydantic types, with no torch.

The server and a remote client both import these (and ``serving.errors``), so a client
installs and starts without the model's dependencies.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["eos", "stop", "length"]  # EOS, a stop string, max_new_tokens


class SamplingParams(BaseModel):
    """How to pick tokens. ``temperature=0`` is greedy; ``stop`` strings end generation
    and are cut from the returned text, as in vLLM."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(64, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(default_factory=dict, max_length=1024)  # added to a token id's logit, as in OpenAI's API


class StepResult(BaseModel):
    """The reply to an append or a rollback."""

    session: str
    step: int  # the step just applied, acknowledged or rolled back to
    tokens: int  # tokens this call added (0 for an acknowledged re-send)
    length: int  # tokens in the session's history at the end of ``step``
    durable_step: int | None = None  # every step up to this one, its reply included, is in the checkpoint store (None: no store)


class TokenEvent(BaseModel):
    """One streamed token and the text it completes (possibly empty: a partial character,
    or text that may still turn into a stop string). The last event carries no token and
    sets ``finish_reason``, plus what the whole generation did; a token that ends
    generation (EOS, a stop string) is not streamed."""

    token_id: int | None = None
    text: str = ""
    finish_reason: FinishReason | None = None
    tokens: int | None = None  # last event: tokens this call added to the history (0 when replayed)
    length: int | None = None  # last event: the history's length after it
    replayed: bool = False  # last event: the step's reply was already in the history and was re-sent
    durable_step: int | None = None  # last event: as in StepResult


class SessionInfo(BaseModel):
    session: str
    step: int  # steps in the history
    length: int  # tokens in the history
    state_bytes: int  # bytes of live state (K/V rows, Mamba states); 0 while not resident
    resident: bool  # in memory now, rather than only in the checkpoint store
    durable_step: int | None = None  # as in StepResult
    finish_reason: FinishReason | None = None  # how the last step's reply ended (None: no reply, or it stopped early)
    replica: str | None = None  # the Serve replica that holds it (the app's replies only)


class EngineStats(BaseModel):
    """What an engine holds and has done, for metrics and health checks."""

    resident: int  # sessions in memory
    state_bytes: int  # their states' bytes
    generating: int  # sessions decoding now
    evictions: int  # sessions evicted to the store so far
    decode_steps: int  # decode forwards so far
    decoded_tokens: int  # tokens those forwards produced
    checkpoint_lag_steps: int  # over resident sessions: acknowledged steps not yet durable
    failing_logs: int  # sessions whose store writes are failing (full or read-only store)
    broken: str | None = None  # why the engine cannot serve (its model or writer thread died), if it cannot


class Generation(BaseModel):
    """One whole reply. ``tokens`` counts every token that joined the history, the ending
    one included (0 when the reply was already there and was re-sent); ``length`` is the
    history's length after it."""

    text: str
    finish_reason: FinishReason
    tokens: int
    length: int
    durable_step: int | None = None  # every step up to this one is in the checkpoint store
    replayed: bool = False  # the step's reply was already in the history and was re-sent
    token_ids: list[int] = []  # the reply's tokens as streamed (those that end it are not)


# ---------------------------------------------------------------------------- the HTTP API
# The Ray Serve app's requests and replies (serving.http); agent.RemoteBackend sends the
# same. Bytes travel raw in msgpack and as base64 in JSON.

class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str


class ImagePart(BaseModel):
    """A PNG or JPEG file's bytes."""

    model_config = ConfigDict(extra="forbid", val_json_bytes="base64", ser_json_bytes="base64")

    image: bytes


class AppendRequest(BaseModel):
    """One observation: its parts in prompt order. The text is the prompt as it is (the
    chat template included, as ``model.prompt.user_message`` writes it) unless
    ``user_turn`` asks the server to wrap the parts as a user turn."""

    model_config = ConfigDict(extra="forbid")

    parts: list[TextPart | ImagePart] = Field(min_length=1)
    step: int | None = Field(None, ge=1)  # makes a re-send exact; without it a failover is not retried
    user_turn: bool = False
    sync: bool | None = None  # reply only once the step is durable


class StepRequest(AppendRequest):
    """One agent step in one request (``POST /v1/sessions/{id}/step``): the observation, as
    an append takes it, then its reply, sampled with ``sampling``. ``stream`` as in a
    ``GenerateRequest``; ``sync`` makes the observation durable before its reply starts."""

    sampling: SamplingParams = SamplingParams()
    stream: bool = True


class GenerateRequest(SamplingParams):
    """Sampling, plus the step whose reply this is (``step`` makes a re-send exact) and
    whether to stream the tokens as Server-Sent Events or reply once with the whole text."""

    step: int | None = Field(None, ge=1)
    stream: bool = True

    def sampling(self) -> SamplingParams:
        return SamplingParams(**self.model_dump(exclude={"step", "stream"}))


class StepReply(BaseModel):
    """The reply to a step request: its append's result, then its reply's generation. A
    re-sent step says what the re-send did, as an append and a generation re-sent apart
    would: where the observation was there already, ``appended.tokens`` is 0 (and
    ``appended.length`` the step's end, its reply included if it has one); where its reply
    was too, ``generation.replayed`` is set and ``generation.tokens`` is 0. The reply's
    text and tokens are those of the first time."""

    appended: StepResult
    generation: Generation


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0)


class SessionCreated(BaseModel):
    """A new session (or fork) and its secret token: every later request for the session
    presents it in the ``x-session-token`` header."""

    session: str
    token: str


class ErrorDetail(BaseModel):
    message: str
    type: str  # what went wrong, as a stable word: "step_gap", "limit_exceeded", ...
    code: str
    next_step: int | None = None  # for "step_gap": the step the session expects next


class ErrorReply(BaseModel):
    """Every 4xx and 5xx body, in the OpenAI API's shape so its clients read it too."""

    error: ErrorDetail

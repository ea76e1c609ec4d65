"""The Engine's requests and replies as plain pydantic types, with no torch.

The server and a remote client both import these (and ``serving.errors``), so a client
installs and starts without the model's dependencies.
"""

from __future__ import annotations

from typing import Literal

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

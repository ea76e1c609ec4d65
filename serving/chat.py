"""The OpenAI chat-completions protocol: its requests and replies, and messages as prompt pieces.

Messages render in LongLLaVA's template: a user turn as ``model.prompt.user_message``
writes it (ending with the assistant prefix, so generation answers it), an assistant
message as its text and EOS, and system or developer text at the start of the next
user turn (the template has no system role). Images come as ``image_url`` data URLs;
nothing is ever fetched.

Rendering is compositional, which is what the session extension rests on: the pieces of
a whole conversation are the pieces of its turns one after another, so a session that is
sent only each new turn holds the history a fresh session would get from the whole
conversation, provided each reply in that conversation is the text the session
generated. ``close_reply`` ends a reply that stopped short of EOS before the next turn,
as the whole conversation's rendering of that reply does.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from typing import Annotated, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from model.prompt import ASSISTANT_PREFIX, EOS_TOKEN, Image, Piece, Text, user_message

from .errors import MalformedRequestError
from .limits import Limits
from .types import FinishReason, SamplingParams
from .uploads import check_text, decode_images

MODEL_NAME = "longllava"
DATA_URL_PREFIX = "data:"


# ---------------------------------------------------------------------------- requests
class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextContent(BaseModel):
    type: Literal["text"]
    text: str


class ImageContent(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


Content = Annotated[TextContent | ImageContent, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Content] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields this server reads; other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = MODEL_NAME
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default: sampling, not greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    logit_bias: dict[int, float] | None = None

    def sampling(self, limits: Limits) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        wanted = self.max_completion_tokens or self.max_tokens or min(256, limits.max_new_tokens)
        return SamplingParams(
            max_new_tokens=min(wanted, limits.max_new_tokens), temperature=self.temperature, top_p=self.top_p,
            stop=stop, seed=self.seed, logit_bias=self.logit_bias or {},
        )


# ---------------------------------------------------------------------------- messages as pieces
def chat_pieces(messages: list[ChatMessage], limits: Limits, close_reply: bool = False) -> list[Piece]:
    """The messages as one observation, after a history whose last reply is unfinished
    when ``close_reply`` (it stopped at max_tokens, so it still needs its EOS)."""
    pieces: list[Piece] = [Text(EOS_TOKEN)] if close_reply else []
    preamble: list[Piece] = []
    awaiting_reply = False  # the history ends with the assistant prefix
    text_bytes = 0
    arrays = iter(decode_images(_image_files(messages), limits))
    for m in messages:
        body = _content(m.content, arrays)
        text_bytes += sum(len(p.text.encode("utf-8", "surrogatepass")) for p in body if isinstance(p, Text))
        if m.role in ("system", "developer"):
            preamble += [*body, Text("\n")]
        elif m.role == "user":
            pieces += user_message([*preamble, *body])
            preamble, awaiting_reply = [], True
        else:
            reply = "".join(p.text for p in body if isinstance(p, Text))
            pieces += [Text(("" if awaiting_reply else ASSISTANT_PREFIX) + reply + EOS_TOKEN)]
            awaiting_reply = False
    check_text(text_bytes, limits)
    if not awaiting_reply:
        raise MalformedRequestError("the messages must end with a user message, which the reply answers")
    return pieces


def _image_files(messages: list[ChatMessage]) -> list[tuple[bytes, str]]:
    """Every image in the messages, in order, as its file's bytes and where it is."""
    files = []
    for i, m in enumerate(messages):
        for j, c in enumerate(m.content if isinstance(m.content, list) else []):
            if isinstance(c, ImageContent):
                where = f"message {i} part {j}"
                files.append((_data_url(c.image_url.url, where), where))
    return files


def _content(content: str | list[Content] | None, images: Iterator[np.ndarray]) -> list[Piece]:
    """A message's content as pieces, its images the next of the decoded ``images``."""
    if content is None:
        return []
    if isinstance(content, str):
        return [Text(content)]
    return [Text(c.text) if isinstance(c, TextContent) else Image(next(images)) for c in content]


def _data_url(url: str, where: str) -> bytes:
    """``data:image/png;base64,...`` to its bytes; URLs to fetch are refused."""
    if not url.startswith(DATA_URL_PREFIX):
        raise MalformedRequestError(f"{where}: images come as data: URLs (base64 PNG or JPEG); this server fetches nothing")
    header, _, payload = url[len(DATA_URL_PREFIX) :].partition(",")
    if not header.endswith(";base64"):
        raise MalformedRequestError(f"{where}: the data URL must be base64 ('data:image/png;base64,...')")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedRequestError(f"{where}: the data URL's base64 is malformed") from None


# ---------------------------------------------------------------------------- replies
class ReplyMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ReplyMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "longllava-runtime"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def openai_finish(reason: FinishReason) -> Literal["stop", "length"]:
    return "length" if reason == "length" else "stop"


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_urlsafe(18)


def now() -> int:
    return int(time.time())

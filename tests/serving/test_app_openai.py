"""The OpenAI-compatible API through the real ``openai`` package: chat with an image,
streamed and not, equal to the in-process engine; and the session extension, where each
request carries only the new turn, equal to sending the whole conversation each time."""

from __future__ import annotations

import base64

import httpx2
import openai
import pytest

from serving.chat import ChatMessage, chat_pieces
from serving.limits import Limits

from served_app import API_KEY, png_bytes, screenshot

# Random weights emit any byte; ASCII text is what a conversation can send back and have
# read as the same tokens. Ids 4..131 are the ASCII bytes, 2 is EOS.
ASCII_ONLY = {str(i): -100 for i in (0, 1, 3, *range(4 + 128, 4 + 256))}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.one.url}/v1", api_key=API_KEY, max_retries=0)


def in_process(reference, messages: list[dict], max_tokens: int, logit_bias=None) -> str:
    from serving.types import SamplingParams

    session = reference.create()
    pieces = chat_pieces([ChatMessage.model_validate(m) for m in messages], Limits())
    reference.append(session, pieces)
    text, _ = reference.generate_text(session, SamplingParams(max_new_tokens=max_tokens, logit_bias={int(k): v for k, v in (logit_bias or {}).items()}))
    reference.close(session)
    return text


def test_chat_with_an_image_streamed_and_not(client, reference):
    image = base64.b64encode(png_bytes(screenshot(7))).decode()
    messages = [
        {"role": "system", "content": "You read screens."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is on this screen?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        ]},
    ]
    expected = in_process(reference, messages, 12)
    reply = client.chat.completions.create(model="longllava", messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 12
    stream = client.chat.completions.create(model="longllava", messages=messages, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [m.id for m in client.models.list()] == ["longllava"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}]
        client.chat.completions.create(model="longllava", messages=bad, max_tokens=2)


def test_a_session_holds_the_conversation(served, client):
    created = httpx2.post(f"{served.one.url}/v1/sessions", headers=served.one.headers).json()
    headers = {"x-session-id": created["session"], "x-session-token": created["token"]}
    conversation: list[dict] = []
    texts = set()
    for turn in range(30):
        message = {"role": "user", "content": f"turn {turn}: and then?"}
        # seeded sampling: any difference in the history shows in the tokens drawn
        ask = dict(model="longllava", max_tokens=6, temperature=2.0, seed=turn, logit_bias=ASCII_ONLY)
        incremental = client.chat.completions.create(messages=[message], extra_headers=headers, **ask)
        conversation.append(message)
        whole = client.chat.completions.create(messages=conversation, **ask)  # a fresh session each time
        text = incremental.choices[0].message.content
        assert text == whole.choices[0].message.content, f"turn {turn}"
        assert incremental.usage.prompt_tokens < whole.usage.prompt_tokens or turn == 0  # only the new turn was sent
        held = httpx2.get(f"{served.one.url}/v1/sessions/{created['session']}", headers={**served.one.headers, **headers}).json()
        assert held["length"] == whole.usage.prompt_tokens + incremental.usage.completion_tokens  # the same history
        conversation.append({"role": "assistant", "content": text})
        texts.add(text)
    assert len(texts) > 20
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(messages=[message], extra_headers={**headers, "x-session-token": "wrong"}, **ask)
    httpx2.delete(f"{served.one.url}/v1/sessions/{created['session']}", headers={**served.one.headers, **headers})

"""Bad input over HTTP: each case is a 4xx whose body names the problem, never a 500; and
the app keeps serving: a session that was mid-episode throughout goes on as the
in-process engine does."""

from __future__ import annotations

import base64
import struct
import zlib

import httpx2
import msgpack
import numpy as np
import pytest

from agent import RemoteBackend
from model.prompt import Image, Text, user_message
from serving.chat import ChatMessage, chat_pieces
from serving.errors import LimitExceededError, MalformedRequestError
from serving.limits import Limits
from serving.types import AppendRequest, ImagePart, SamplingParams
from serving.uploads import check_decoded, to_pieces

from served_app import API_KEY, LIMITS, png_bytes, screenshot

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width x height white pixels: 0.4 gigapixels in about 50 KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\xff" * ((width + 7) // 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bystander(served, reference):
    """A session in the middle of an episode, served and in-process."""
    backend = RemoteBackend(served.one.url, api_key=API_KEY)
    session, ref = backend.create(), reference.create()
    yield backend, session, ref
    backend.close(session)
    reference.close(ref)


def step_both(bystander, reference, k: int) -> None:
    backend, session, ref = bystander
    pieces = user_message([Image(screenshot(500 + k)), Text(f"bystander {k}")])
    assert backend.append(session, pieces, step=k).length == reference.append(ref, pieces, step=k).length
    events = list(reference.generate(ref, GREEDY, step=k))
    assert backend.generate(session, GREEDY, k).token_ids == [e.token_id for e in events if e.token_id is not None]


def append_raw(app, session: str, token: str, content: bytes, media: str) -> httpx2.Response:
    return httpx2.post(f"{app.url}/v1/sessions/{session}/steps", content=content,
                       headers={**app.headers, "x-session-token": token, "content-type": media})


def observation(*parts: dict, step: int = 1) -> bytes:
    return msgpack.packb({"parts": list(parts), "step": step})


def assert_refused(r: httpx2.Response, status: int, kind: str, words: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == kind and words in error["message"], error


def test_bad_input_is_refused_and_the_app_keeps_serving(served, reference, bystander):
    app = served.one
    backend = RemoteBackend(app.url, api_key=API_KEY)
    victim = backend.create()
    token = backend.sessions[victim].token
    step_both(bystander, reference, 1)

    truncated = png_bytes(screenshot(1))[:-200]
    assert_refused(append_raw(app, victim, token, observation({"image": truncated}), "application/msgpack"), 400, "malformed_request", "cannot be decoded")
    assert_refused(append_raw(app, victim, token, observation({"image": b"GIF89a not a png"}), "application/msgpack"), 400, "malformed_request", "not a PNG or JPEG")
    assert_refused(append_raw(app, victim, token, observation({"image": png_bomb()}), "application/msgpack"), 413, "limit_exceeded", "max_image_pixels")
    assert_refused(append_raw(app, victim, token, b"hello", "text/plain"), 415, "unsupported_media_type", "application/msgpack")
    assert_refused(append_raw(app, victim, token, b"\xc1\xff\x00garbage", "application/msgpack"), 400, "malformed_request", "msgpack")
    assert_refused(append_raw(app, victim, token, msgpack.packb([1, 2, 3]), "application/msgpack"), 400, "malformed_request", "valid dictionary")
    assert_refused(append_raw(app, victim, token, msgpack.packb({"parts": [{"image": msgpack.ExtType(1, b"x")}]}), "application/msgpack"), 400, "malformed_request", "msgpack")
    assert_refused(append_raw(app, victim, token, b'{"parts": [{"text": 1', "application/json"), 400, "malformed_request", "observation is malformed")
    tiny = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png_bytes(screenshot(2, (8, 8)))).decode()}}
    chat = {"messages": [{"role": "user", "content": [tiny] * 65}]}
    assert_refused(httpx2.post(f"{app.url}/v1/chat/completions", json=chat, headers=app.headers), 413, "limit_exceeded", "max_images")
    step_both(bystander, reference, 2)

    oversize = "x" * (LIMITS["max_text_bytes"] + 1)
    assert_refused(append_raw(app, victim, token, observation({"text": oversize}), "application/msgpack"), 413, "limit_exceeded", "max_text_bytes")
    long = "y" * (LIMITS["max_observation_tokens"] + 1)  # under max_text_bytes, but a token per byte
    assert_refused(append_raw(app, victim, token, observation({"text": long}), "application/msgpack"), 413, "limit_exceeded", "max_chunk_tokens")

    assert_refused(append_raw(app, victim, "not-its-token", observation({"text": "hi"}), "application/msgpack"), 403, "forbidden", "does not belong")
    r = httpx2.post(f"{app.url}/v1/sessions/{victim}/steps", content=observation({"text": "hi"}), headers={**app.headers, "content-type": "application/msgpack"})
    assert_refused(r, 401, "unauthenticated", "x-session-token")
    r = httpx2.get(f"{app.url}/v1/sessions/AAAAAAAAAAAAAAAAAAAAAAAA", headers={**app.headers, "x-session-token": token})
    assert_refused(r, 403, "forbidden", "does not belong")  # an unknown id: no token can be right for it
    closed = backend.create()
    closed_token = backend.sessions[closed].token
    backend.close(closed)
    r = httpx2.get(f"{app.url}/v1/sessions/{closed}", headers={**app.headers, "x-session-token": closed_token})
    assert_refused(r, 404, "unknown_session", closed[:8])

    assert_refused(httpx2.post(f"{app.url}/v1/sessions"), 401, "unauthenticated", "API key")
    assert_refused(httpx2.post(f"{app.url}/v1/sessions", headers={"authorization": "Bearer wrong"}), 403, "forbidden", "API key")
    assert_refused(httpx2.get(f"{app.url}/openapi.json"), 401, "unauthenticated", "API key")
    step_both(bystander, reference, 3)

    r = httpx2.post(f"{app.url}/v1/sessions/{victim}/generate", json={"max_new_tokens": 4, "step": 7}, headers={**app.headers, "x-session-token": token})
    assert_refused(r, 409, "step_gap", "step 7")
    assert r.json()["error"]["next_step"] == 1
    r = httpx2.post(f"{app.url}/v1/sessions/{victim}/generate", json={"max_new_tokens": 4, "temperature": -1}, headers={**app.headers, "x-session-token": token})
    assert_refused(r, 422, "invalid_request", "temperature")

    created = []
    for _ in range(LIMITS["max_sessions"] + 1):
        r = httpx2.post(f"{app.url}/v1/sessions", headers=app.headers)
        if r.status_code != 201:
            break
        created.append(r.json())
    assert_refused(r, 429, "too_many_sessions", "max_sessions")
    for c in created:
        assert httpx2.delete(f"{app.url}/v1/sessions/{c['session']}", headers={**app.headers, "x-session-token": c["token"]}).status_code == 204
    step_both(bystander, reference, 4)
    backend.close(victim)


def test_images_that_one_call_to_a_replica_cannot_carry_are_refused():
    """The default limits allow 64 images of 16 MP, 3.1 GB decoded: more than one gRPC
    message between the deployments holds (2 GiB). What does not fit is a 413."""
    limits = Limits()
    assert limits.max_images * limits.max_image_pixels * 3 > limits.max_message_bytes == 2**31 - 1
    fits = limits.max_decoded_bytes // (3 * 4000 * 4000)
    check_decoded([(4000, 4000)] * fits, limits)
    with pytest.raises(LimitExceededError, match="max_images x max_image_pixels"):
        check_decoded([(4000, 4000)] * (fits + 1), limits)


def test_the_decoded_total_is_refused_from_the_headers_before_any_pixel_is_decoded():
    """Forty 4000x4000 PNGs are a few kilobytes of body but 1.9 GB decoded. They are refused
    from their headers alone: these files are cut off after the header, so decoding even
    one of them would fail as malformed instead. The same holds for the chat endpoint."""
    header_only = png_bomb(4000, 4000)[:100]
    limits = Limits()
    request = AppendRequest(parts=[ImagePart(image=header_only)] * 40)
    with pytest.raises(LimitExceededError, match="max_images x max_image_pixels"):
        to_pieces(request, limits)
    with pytest.raises(MalformedRequestError, match="part 0"):
        to_pieces(AppendRequest(parts=[ImagePart(image=header_only)]), limits)
    url = "data:image/png;base64," + base64.b64encode(header_only).decode()
    messages = [ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": url}}] * 40)]
    with pytest.raises(LimitExceededError, match="max_images x max_image_pixels"):
        chat_pieces(messages, limits)
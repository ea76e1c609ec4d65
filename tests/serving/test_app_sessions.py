"""The session API over real HTTP against the in-process Engine: the same observations give
the same tokens (greedy), through msgpack and multipart appends, JSON and SSE generations,
forks and rollbacks; and every session stays on one replica (consistent hashing)."""

from __future__ import annotations

import io
import json

import httpx2
from PIL import Image as PILImage

from agent import RemoteBackend
from model.prompt import Image, Text, user_message
from serving.types import SamplingParams, StepResult
from serving.uploads import decode_images
from serving.limits import Limits

from served_app import screenshot, png_bytes

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)
STEPS = 50


def jpeg_bytes(array) -> bytes:
    out = io.BytesIO()
    PILImage.fromarray(array).save(out, format="JPEG", quality=80)
    return out.getvalue()


def append_multipart(app, backend: RemoteBackend, session: str, text: str, jpeg: bytes, step: int) -> StepResult:
    """An append as a browser form would send it: text fields and a JPEG file, in order."""
    files = [("text", (None, text)), ("image", ("screen.jpg", jpeg, "image/jpeg")), ("text", (None, "\n"))]
    r = httpx2.post(f"{app.url}/v1/sessions/{session}/steps", files=files, data={"step": str(step), "user_turn": "true"},
                    headers={**app.headers, "x-session-token": backend.sessions[session].token})
    assert r.status_code == 200, r.text
    return StepResult.model_validate(r.json())


def generate_sse(app, backend: RemoteBackend, session: str, step: int) -> tuple[list[int], dict]:
    """Token ids from the Server-Sent Events stream, and the final event."""
    body = {**GREEDY.model_dump(), "step": step}
    ids, done = [], None
    with httpx2.stream("POST", f"{app.url}/v1/sessions/{session}/generate", json=body,
                       headers={**app.headers, "x-session-token": backend.sessions[session].token}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for block in r.read().decode().split("\n\n"):
            if not block.strip():
                continue
            event, data = (line.split(": ", 1)[1] for line in block.splitlines())
            if event == "token":
                ids.append(json.loads(data)["token_id"])
            else:
                assert event == "done", data
                done = json.loads(data)
    return ids, done


def reference_tokens(engine, session: str, step: int) -> tuple[list[int], int]:
    events = list(engine.generate(session, GREEDY, step=step))
    return [e.token_id for e in events if e.token_id is not None], events[-1].length


def test_round_trip_equals_the_in_process_engine(served, reference):
    app = served.one
    backend = RemoteBackend(app.url, api_key=app.api_key)
    s, ref = backend.create(), reference.create()
    for k in range(1, STEPS + 1):
        image = screenshot(k)
        if k % 5 == 0:  # a form with a JPEG: the reference decodes the same file
            jpeg = jpeg_bytes(image)
            served_step = append_multipart(app, backend, s, f"step {k}", jpeg, k)
            pieces = user_message([Text(f"step {k}"), Image(decode_images([(jpeg, "jpeg")], Limits())[0]), Text("\n")])
        else:
            pieces = user_message([Image(image), Text(f"step {k}: what now?")])
            served_step = backend.append(s, pieces, step=k)
        ref_step = reference.append(ref, pieces, step=k)
        assert (served_step.step, served_step.tokens, served_step.length) == (ref_step.step, ref_step.tokens, ref_step.length)
        expected, length = reference_tokens(reference, ref, k)
        if k % 7 == 0:
            ids, done = generate_sse(app, backend, s, k)
            assert ids == expected and done["length"] == length and done["finish_reason"] == "length", f"step {k}"
        else:
            g = backend.generate(s, GREEDY, k)
            assert g.token_ids == expected and g.length == length, f"step {k}"

    # a fork diverges from its parent; the parent rolls back and goes another way
    child, ref_child = backend.fork(s), reference.fork(ref)
    pieces = user_message([Text("on the fork")])
    assert backend.append(child, pieces, step=STEPS + 1).length == reference.append(ref_child, pieces, step=STEPS + 1).length
    assert backend.generate(child, GREEDY, STEPS + 1).token_ids == reference_tokens(reference, ref_child, STEPS + 1)[0]
    back, ref_back = backend.rollback(s, 40), reference.rollback(ref, 40)
    assert (back.step, back.length) == (ref_back.step, ref_back.length) == (40, reference.session_info(ref).length)
    pieces = user_message([Image(screenshot(99)), Text("another way")])
    assert backend.append(s, pieces, step=41).tokens == reference.append(ref, pieces, step=41).tokens
    assert backend.generate(s, GREEDY, 41).token_ids == reference_tokens(reference, ref, 41)[0]
    info = backend.info(s)
    assert info["step"] == 41 and info["length"] == reference.session_info(ref).length and info["resident"]
    for session in (s, child):
        backend.close(session)
    for session in (ref, ref_child):
        reference.close(session)


def test_a_full_hd_screenshot_reaches_the_model_replica(served, reference):
    """A 1920x1080 screenshot: its PNG is small, but the ingress sends it to the model
    replica decoded, 6.2 MB of RGB, over gRPC's default 4 MiB a message. The app raises
    Serve's bound from its Limits; the reply is still the in-process Engine's."""
    app = served.one
    backend = RemoteBackend(app.url, api_key=app.api_key)
    s, ref = backend.create(), reference.create()
    image = screenshot(7, (192, 108)).repeat(10, axis=0).repeat(10, axis=1)  # 1080 rows of 1920, in 10-pixel blocks
    assert image.shape == (1080, 1920, 3) and image.nbytes > 4 * 2**20
    pieces = user_message([Image(image), Text("what now?")])
    assert backend.append(s, pieces, step=1).tokens == reference.append(ref, pieces, step=1).tokens
    assert backend.generate(s, GREEDY, 1).token_ids == reference_tokens(reference, ref, 1)[0]
    backend.close(s)
    reference.close(ref)


def test_every_session_stays_on_one_replica(served):
    """Consistent hashing on the session id keeps each session where its state is: no
    replica ever takes one over from the other (each has one owner in the store)."""
    app = served.two
    backend = RemoteBackend(app.url)
    sessions = [backend.create() for _ in range(16)]
    for k in range(1, 4):
        for s in sessions:
            backend.append(s, user_message([Text(f"step {k}")]), step=k)
            backend.generate(s, SamplingParams(max_new_tokens=2), k)
    replicas = {s: backend.info(s)["replica"] for s in sessions}
    assert len(set(replicas.values())) == 2  # the ring spreads them over both replicas (all on one: p = 2^-15)
    for s in sessions:
        owners = sorted(p.name for p in (app.store / "sessions" / s).glob("owner-*"))
        assert owners == ["owner-0000000001"], (s, owners)
        backend.close(s)

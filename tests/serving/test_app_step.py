"""One request per agent step, ``POST /v1/sessions/{id}/step``, over real HTTP: over several
steps with screenshots (msgpack, a multipart form, and Server-Sent Events) it gives what an
append then a generation give, and what the in-process Engine gives (greedy); a re-sent
step is answered again, not applied twice, and one with other content is refused; bad
input is a 4xx; and a replica killed during a step loses nothing: the ingress re-sends the
step, and the replica that takes the session over acknowledges an observation it has and
generates its reply."""

from __future__ import annotations

import json
import threading

import httpx2
import msgpack

from agent import RemoteBackend
from agent.remote import encode_parts
from model.prompt import Image, Text, user_message
from serving.types import SamplingParams, StepReply

from served_app import API_KEY, LIMITS, kill, png_bytes, screenshot, wait_for_replicas, wait_until_busy

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)
STEPS = 6


def observation(k: int, text: str | None = None) -> list:
    return user_message([Image(screenshot(2000 + k)), Text(text or f"step {k}: what now?")])


def body(pieces: list, step: int, **fields) -> bytes:
    return msgpack.packb({"parts": [p.model_dump() for p in encode_parts(pieces)], "step": step, **fields})


def headers(app, token: str | None, media: str | None = "application/msgpack") -> dict:
    return {**app.headers, **({"x-session-token": token} if token else {}), **({"content-type": media} if media else {})}


def post_step(app, session: str, token: str | None, content: bytes, media: str = "application/msgpack") -> httpx2.Response:
    return httpx2.post(f"{app.url}/v1/sessions/{session}/step", content=content, headers=headers(app, token, media), timeout=120)


def sse_events(lines) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[6:])))
    return events


def token_ids(events: list[tuple[str, dict]]) -> list[int]:
    return [data["token_id"] for kind, data in events if kind == "token"]


def expected(reference, ref: str, pieces: list, k: int, sampling: SamplingParams = GREEDY) -> tuple[tuple, tuple]:
    """The in-process step: its append's (step, tokens, length), and its reply's (token ids, text, finish, length)."""
    a = reference.append(ref, pieces, step=k)
    events = list(reference.generate(ref, sampling, step=k))
    ids = [e.token_id for e in events if e.token_id is not None]
    return (a.step, a.tokens, a.length), (ids, "".join(e.text for e in events), events[-1].finish_reason, events[-1].length)


def as_tuples(reply: StepReply) -> tuple[tuple, tuple]:
    a, g = reply.appended, reply.generation
    return (a.step, a.tokens, a.length), (g.token_ids, g.text, g.finish_reason, g.length)


def test_one_request_per_step_equals_append_then_generate_and_the_engine(served, reference):
    app = served.one
    backend = RemoteBackend(app.url, api_key=app.api_key)
    combined, apart, ref = backend.create(), backend.create(), reference.create()
    token = backend.sessions[combined].token
    for k in range(1, STEPS + 1):
        pieces = observation(k)
        want = expected(reference, ref, pieces, k)
        two = (backend.append(apart, pieces, step=k), backend.generate(apart, GREEDY, k))
        assert as_tuples(StepReply(appended=two[0], generation=two[1])) == want, f"step {k}: append then generate"
        if k == 3:  # a form, as a browser sends it: the screenshot file, the text, the sampling as JSON
            files = [("image", ("screen.png", png_bytes(screenshot(2000 + k)), "image/png")), ("text", (None, f"step {k}: what now?"))]
            fields = {"step": str(k), "user_turn": "true", "sampling": GREEDY.model_dump_json(), "stream": "false"}
            r = httpx2.post(f"{app.url}/v1/sessions/{combined}/step", files=files, data=fields, headers=headers(app, token, None))
            assert r.status_code == 200, r.text
            reply = StepReply.model_validate(r.json())
        elif k == 5:  # streamed: the append's result, then the reply's tokens and done
            content = body(pieces, k, sampling=GREEDY.model_dump(mode="json"), stream=True)
            with httpx2.stream("POST", f"{app.url}/v1/sessions/{combined}/step", content=content, headers=headers(app, token)) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                events = sse_events(r.iter_lines())
            assert [kind for kind, _ in events] == ["appended"] + ["token"] * GREEDY.max_new_tokens + ["done"]
            appended, done = events[0][1], events[-1][1]
            assert ((appended["step"], appended["tokens"], appended["length"]), (token_ids(events), done["finish_reason"], done["length"])) == (
                want[0], (want[1][0], want[1][2], want[1][3]))
            continue
        else:
            reply = backend.step(combined, pieces, k, GREEDY)
        assert as_tuples(reply) == want, f"step {k}"
        assert reply.generation.durable_step is not None and not reply.generation.replayed
    assert "/v1/sessions/{session}/step" in httpx2.get(f"{app.url}/openapi.json", headers=app.headers).json()["paths"]
    for s in (combined, apart):
        info = backend.info(s)
        assert (info["step"], info["length"]) == (STEPS, reference.session_info(ref).length)
        backend.close(s)
    reference.close(ref)


def held(backend: RemoteBackend, session: str) -> dict:
    """What the server holds for the session, but for how much of it is durable yet (that changes by itself)."""
    return {k: v for k, v in backend.info(session).items() if k != "durable_step"}


def test_a_resent_step_is_answered_again_not_applied_twice(served, reference):
    app = served.one
    backend = RemoteBackend(app.url, api_key=app.api_key)
    s, ref = backend.create(), reference.create()
    token = backend.sessions[s].token
    want = expected(reference, ref, observation(1), 1)
    first = backend.step(s, observation(1), 1, GREEDY)
    assert as_tuples(first) == want
    before = held(backend, s)

    again = backend.step(s, observation(1), 1, GREEDY)  # as an append re-sent alone: nothing added, the step's end
    assert (again.appended.step, again.appended.tokens, again.appended.length) == (1, 0, first.generation.length)
    g = again.generation
    assert (g.token_ids, g.text, g.length, g.finish_reason, g.tokens, g.replayed) == (*want[1][:2], want[1][3], want[1][2], 0, True)
    assert held(backend, s) == before

    r = post_step(app, s, token, body(observation(1, "other content"), 1, sampling=GREEDY.model_dump(mode="json"), stream=False))
    assert r.status_code == 409 and r.json()["error"]["type"] == "step_conflict", r.text
    assert held(backend, s) == before

    # the observation applied and durable, its reply never generated (a replica died between
    # them): the step request acknowledges the observation and generates the reply
    r = httpx2.post(f"{app.url}/v1/sessions/{s}/steps", content=body(observation(2), 2, sync=True), headers=headers(app, token))
    assert r.status_code == 200 and r.json()["tokens"] > 0, r.text
    want = expected(reference, ref, observation(2), 2)
    reply = backend.step(s, observation(2), 2, GREEDY)
    assert reply.appended.tokens == 0 and (reply.appended.step, reply.appended.length) == (2, want[0][2])
    assert (reply.generation.token_ids, reply.generation.length, reply.generation.replayed) == (want[1][0], want[1][3], False)
    assert reply.generation.tokens == GREEDY.max_new_tokens
    info = backend.info(s)
    assert (info["step"], info["length"]) == (2, reference.session_info(ref).length)
    backend.close(s)
    reference.close(ref)


def assert_refused(r: httpx2.Response, status: int, kind: str, words: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == kind and words in error["message"], error


def test_bad_step_requests_are_refused_with_a_4xx(served, reference):
    app = served.one
    backend = RemoteBackend(app.url, api_key=API_KEY)
    s, ref = backend.create(), reference.create()
    token = backend.sessions[s].token
    sampling = GREEDY.model_dump(mode="json")
    good = body(observation(1), 1, sampling=sampling, stream=False)

    assert_refused(post_step(app, s, None, good), 401, "unauthenticated", "x-session-token")
    assert_refused(post_step(app, s, "not-its-token", good), 403, "forbidden", "does not belong")
    assert_refused(post_step(app, s, token, b"hello", "text/plain"), 415, "unsupported_media_type", "application/msgpack")
    assert_refused(post_step(app, s, token, b"\xc1\xff\x00garbage"), 400, "malformed_request", "msgpack")
    assert_refused(post_step(app, s, token, msgpack.packb({"step": 1, "sampling": sampling})), 400, "malformed_request", "parts")
    assert_refused(post_step(app, s, token, body(observation(1), 1, smpling=sampling)), 400, "malformed_request", "smpling")
    assert_refused(post_step(app, s, token, body(observation(1), 1, sampling={"temperature": -1})), 400, "malformed_request", "temperature")
    assert_refused(post_step(app, s, token, body(observation(1), 1, sampling=3)), 400, "malformed_request", "sampling")
    assert_refused(post_step(app, s, token, body(observation(1), 1, sampling={"max_new_tokens": 5000})), 413, "limit_exceeded", "max_new_tokens")
    assert_refused(post_step(app, s, token, body([Text("x" * (LIMITS["max_text_bytes"] + 1))], 1, sampling=sampling)), 413, "limit_exceeded", "max_text_bytes")
    truncated = msgpack.packb({"parts": [{"image": png_bytes(screenshot(1))[:-200]}], "step": 1, "sampling": sampling})
    assert_refused(post_step(app, s, token, truncated), 400, "malformed_request", "cannot be decoded")
    for stream in (False, True):  # streamed or not, a bad step is a status, not an event
        gap = body(observation(5), 5, sampling=sampling, stream=stream)
        r = post_step(app, s, token, gap)
        assert_refused(r, 409, "step_gap", "step 5")
        assert r.json()["error"]["next_step"] == 1
    # a reply the engine cannot sample is refused before its observation is appended
    assert_refused(post_step(app, s, token, body(observation(1), 1, sampling={"logit_bias": {"100000": 1.0}})), 422, "invalid_request", "logit_bias")
    assert backend.info(s)["step"] == 0

    def form(**fields: str) -> httpx2.Response:
        return httpx2.post(f"{app.url}/v1/sessions/{s}/step", files=[("text", (None, "hi"))], data={"step": "1", **fields},
                           headers=headers(app, token, None))

    assert_refused(form(sampling='{"max_new_tokens": 4'), 400, "malformed_request", "not valid JSON")
    assert_refused(form(sampling="{" * 5000), 400, "malformed_request", "not valid JSON")
    assert_refused(form(sampling="greedy"), 400, "malformed_request", "sampling")
    assert_refused(form(samples="3"), 400, "malformed_request", "unexpected form part")
    assert backend.info(s)["step"] == 0

    assert as_tuples(backend.step(s, observation(1), 1, GREEDY)) == expected(reference, ref, observation(1), 1)  # and it goes on
    backend.close(s)
    reference.close(ref)


def test_a_replica_killed_during_a_step_loses_nothing(served, reference):
    app = served.two
    backend = RemoteBackend(app.url)
    s, ref = backend.create(), reference.create()
    token = backend.sessions[s].token
    for k in range(1, 4):
        assert as_tuples(backend.step(s, observation(k), k, GREEDY)) == expected(reference, ref, observation(k), k), f"step {k}"

    # killed while it works on a step that is not streamed: the ingress re-sends it
    k, home, failovers = 4, backend.info(s)["replica"], backend.failovers
    pieces = observation(k, "a long observation " * 200)
    sampling = SamplingParams(max_new_tokens=24, ignore_eos=True)
    replies = []
    stepping = threading.Thread(target=lambda: replies.append(backend.step(s, pieces, k, sampling)))
    stepping.start()
    wait_until_busy(app, home)
    kill(app, home)
    stepping.join()
    assert backend.failovers > failovers  # the ingress re-sent the step to the replica that took over
    (appended, reply), (want_appended, want_reply) = as_tuples(replies[0]), expected(reference, ref, pieces, k, sampling)
    assert reply == want_reply
    # its observation's tokens, or 0 where the observation was durable before the kill (then acknowledged)
    assert appended in (want_appended, (want_appended[0], 0, want_appended[2]))
    assert backend.info(s)["replica"] != home
    wait_for_replicas(app)

    # killed once the observation is durable (sync) and its reply has begun, streamed: the
    # re-sent step acknowledges the observation, generates the reply, and the stream goes
    # on where it broke off
    k, home = 5, backend.info(s)["replica"]
    sampling = SamplingParams(max_new_tokens=96, ignore_eos=True)
    content = body(observation(k), k, sync=True, sampling=sampling.model_dump(mode="json"), stream=True)
    lines = []
    with httpx2.stream("POST", f"{app.url}/v1/sessions/{s}/step", content=content, headers=headers(app, token), timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            lines.append(line)
            if line == "event: appended":
                kill(app, home)
    events = sse_events(lines)
    assert [kind for kind, _ in events] == ["appended"] + ["token"] * 96 + ["done"], [kind for kind, _ in events][-3:]
    want = expected(reference, ref, observation(k), k, sampling)
    appended, done = events[0][1], events[-1][1]
    assert (appended["step"], appended["tokens"], appended["length"]) == want[0]
    assert (token_ids(events), done["finish_reason"], done["length"]) == (want[1][0], want[1][2], want[1][3])
    assert backend.info(s)["replica"] != home

    # the client re-sends the step after the restore: the reply that was streamed, not another
    again = backend.step(s, observation(k), k, sampling)
    assert again.generation.replayed and (again.generation.token_ids, again.generation.length) == (want[1][0], want[1][3])
    info = backend.info(s)
    assert (info["step"], info["length"]) == (k, reference.session_info(ref).length)  # no step lost or applied twice
    wait_for_replicas(app)
    backend.close(s)
    reference.close(ref)

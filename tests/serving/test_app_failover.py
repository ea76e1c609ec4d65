"""Failover: a model replica is killed (``ray.kill`` on its actor) between requests, during
an append and during a streamed generation. The other replica restores the session from
the store, and the episode goes on exactly as an uninterrupted one: the same tokens,
the same history length, no step lost or applied twice."""

from __future__ import annotations

import base64
import json
import threading

import httpx2

from agent import RemoteBackend
from model.prompt import Image, Text, user_message
from serving.types import SamplingParams

from served_app import kill, png_bytes, screenshot, wait_for_replicas, wait_until_busy

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)


def observation(k: int) -> list:
    return user_message([Image(screenshot(1000 + k)), Text(f"step {k}: what now?")])


class Episode:
    """One episode on the server and the same one in-process, step by step."""

    def __init__(self, app, reference):
        self.app, self.reference = app, reference
        self.backend = RemoteBackend(app.url)
        self.session, self.ref = self.backend.create(), reference.create()
        self.steps = 0

    def step(self, pieces: list) -> None:
        k = self.steps = self.steps + 1
        served = self.backend.append(self.session, pieces, step=k)
        expected = self.reference.append(self.ref, pieces, step=k)
        assert (served.step, served.length) == (expected.step, expected.length), f"step {k}"
        self.check_reply(k, self.backend.generate(self.session, GREEDY, k).token_ids)

    def check_reply(self, k: int, token_ids: list[int]) -> None:
        events = list(self.reference.generate(self.ref, GREEDY, step=k))
        assert token_ids == [e.token_id for e in events if e.token_id is not None], f"step {k}"

    def check_whole(self) -> None:
        info, expected = self.backend.info(self.session), self.reference.session_info(self.ref)
        assert (info["step"], info["length"]) == (expected.step, expected.length)

    def replica(self) -> str:
        return self.backend.info(self.session)["replica"]


def test_a_killed_replica_loses_no_step(served, reference):
    app = served.two
    episode = Episode(app, reference)
    for _ in range(20):
        episode.step(observation(episode.steps + 1))
    home = episode.replica()

    # between requests
    kill(app, home)
    episode.step(observation(21))
    assert episode.replica() != home
    owners = list((app.store / "sessions" / episode.session).glob("owner-*"))
    assert len(owners) >= 2  # the other replica took the session over from the store
    episode.check_whole()
    wait_for_replicas(app)

    # during an append: a long one, so that it is still running when the replica dies
    pieces = user_message([Text("a long observation " * 200)])
    home = episode.replica()
    failovers = episode.backend.failovers
    done = threading.Thread(target=episode.step, args=(pieces,))
    done.start()
    wait_until_busy(app, home)
    kill(app, home)
    done.join()
    assert episode.backend.failovers > failovers  # the ingress re-sent the append to the replica that took over
    episode.check_whole()
    wait_for_replicas(app)

    # during a generation, streamed: the stream goes on where it broke off
    k = episode.steps + 1
    pieces = observation(k)
    body = {"parts": [{"text": pieces[0].text}, {"image": base64.b64encode(png_bytes(pieces[1].image)).decode()}, {"text": pieces[2].text}, {"text": pieces[3].text}],
            "step": k, "sync": True}  # durable before the kill, so the new replica has the observation
    token = {"x-session-token": episode.backend.sessions[episode.session].token}
    assert httpx2.post(f"{app.url}/v1/sessions/{episode.session}/steps", json=body, headers=token).status_code == 200
    assert reference.append(episode.ref, pieces, step=k).step == k
    episode.steps = k
    home = episode.replica()
    ids, finish = [], None
    long = {**GREEDY.model_dump(), "max_new_tokens": 24, "step": k}
    with httpx2.stream("POST", f"{app.url}/v1/sessions/{episode.session}/generate", json=long, headers=token, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event.get("token_id") is not None:
                    ids.append(event["token_id"])
                    if len(ids) == 1:
                        kill(app, home)
                finish = event.get("finish_reason") or finish
    assert finish == "length" and len(ids) == 24
    expected = list(reference.generate(episode.ref, SamplingParams(max_new_tokens=24, ignore_eos=True), step=k))
    assert ids == [e.token_id for e in expected if e.token_id is not None]
    assert episode.replica() != home
    episode.step(observation(k + 1))
    episode.check_whole()
    print(f"\nfailovers: {episode.backend.failovers} requests re-sent by the ingress, {episode.backend.replays} steps replayed by the client")
    wait_for_replicas(app)

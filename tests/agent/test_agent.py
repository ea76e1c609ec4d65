"""The Agent on a real Engine (embedded default model) and on a scripted backend."""

import dataclasses

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401  (registers the environments)
import envs.actions as env_actions
from agent import Agent, Click, Generation, LocalBackend, NoSessionError, Observation, Wait
from agent.policy import ModelDecision
from envs.policies import Decision, load_policy
from model.prompt import EOS_TOKEN, Text
from agent.prompt import step_pieces
from serving.errors import StepConflictError, StepGapError
from serving.types import SamplingParams, StepResult

SAMPLING = SamplingParams(max_new_tokens=8)


def observation(seed: int, text: str = "Reply wait() to continue.") -> Observation:
    screenshot = np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    return Observation(screenshot, text)


def same_step(a, b) -> bool:
    """The same step, reply and history length, whatever the timings."""
    return dataclasses.replace(a, timings={}) == dataclasses.replace(b, timings={})


@pytest.fixture
def agent(engine):
    agent = Agent(LocalBackend(engine), SAMPLING)
    agent.reset("Remember what you see.")
    yield agent
    agent.close()


def test_step_keeps_the_raw_reply_and_falls_back(agent, engine):
    action = agent.step(observation(0))
    record = agent.records[-1]
    assert record.step == agent.steps == 1
    assert action == record.parsed.action
    # the reply may hold an action or not; with none, the step plays wait() and keeps the error
    assert record.parsed.ok or (action == Wait() and record.parsed.error)
    assert record.finish_reason in ("eos", "length") and 1 <= record.generated_tokens <= SAMPLING.max_new_tokens
    info = engine.session_info(agent.session)
    assert (info.step, info.length) == (1, record.observation_tokens + record.generated_tokens)
    assert set(record.timings) == {"model_step_s", "parse_s"}


def test_a_resent_step_is_acknowledged_not_applied_twice(agent, engine):
    agent.step(observation(0))
    before = engine.session_info(agent.session)
    sent = step_pieces(observation(0), instruction="Remember what you see.")
    again = agent.backend.append(agent.session, sent, step=1)
    assert (again.step, again.tokens, again.length) == (1, 0, before.length)
    reply = agent.backend.generate(agent.session, SAMPLING, 1)  # the reply already given is sent again
    assert reply.text == agent.records[0].parsed.raw and reply.tokens == 0
    both = agent.backend.step(agent.session, sent, 1, SAMPLING)  # the same, as one call
    assert (both.appended.tokens, both.generation.text, both.generation.replayed) == (0, reply.text, True)
    assert engine.session_info(agent.session) == before
    with pytest.raises(StepConflictError, match="other content"):
        agent.backend.append(agent.session, [Text("another step 1")], step=1)
    with pytest.raises(StepGapError, match="send step 2"):
        agent.backend.append(agent.session, [Text("a step from the future")], step=3)


def test_fork_diverges_without_touching_the_parent(agent, engine):
    agent.step(observation(0))
    before = engine.session_info(agent.session)
    child = agent.fork()
    assert child.session != agent.session and child.records == agent.records
    child.step(observation(1))
    child.step(observation(2))
    assert engine.session_info(child.session).step == child.steps == 3
    after = engine.session_info(agent.session)
    assert (after.step, after.length) == (before.step, before.length) and agent.steps == 1
    # the fork copied the state exactly: the same observation gets the same greedy reply
    agent.step(observation(1))
    assert same_step(agent.records[-1], child.records[1])
    child.close()


def test_rollback_returns_the_session_to_k_steps_back(agent, engine):
    seen = []
    for seed in range(3):
        agent.step(observation(seed))
        seen.append(engine.session_info(agent.session))
    first, second = agent.records[:2]
    agent.rollback(2)
    now = engine.session_info(agent.session)
    assert (now.step, now.length) == (seen[0].step, seen[0].length) and agent.records == [first]
    # the step numbers go on from there, and the state is the one step 2 started from
    agent.step(observation(1))
    assert same_step(agent.records[-1], second)
    agent.rollback(0)
    assert agent.steps == 2
    with pytest.raises(ValueError, match="cannot undo 3 steps"):
        agent.rollback(3)
    agent.rollback(2)
    now = engine.session_info(agent.session)
    assert (now.step, now.length, agent.steps) == (0, 0, 0)
    agent.step(observation(0))  # the instruction comes again with the first step
    assert same_step(agent.records[-1], first)


def test_no_session_and_unknown_session_errors(engine):
    agent = Agent(LocalBackend(engine), SAMPLING)
    with pytest.raises(NoSessionError, match="reset"):
        agent.step(observation(0))
    agent.reset("task")
    session = agent.session
    agent.close()
    with pytest.raises(NoSessionError):
        agent.fork()
    with pytest.raises(KeyError, match="unknown session"):
        LocalBackend(engine).append(session, [Text("hi")], step=1)
    agent.reset("task")
    engine.close(agent.session)  # closed behind the agent's back
    with pytest.raises(KeyError, match="unknown session"):
        agent.step(observation(0))


def test_a_failed_generation_undoes_its_append(agent, engine):
    agent.step(observation(0))

    class Failing(LocalBackend):
        def generate(self, session, sampling, step):
            raise TimeoutError("the replica went away")

    agent.backend = Failing(engine)
    with pytest.raises(TimeoutError):
        agent.step(observation(1))
    assert engine.session_info(agent.session).step == 1 and agent.steps == 1
    agent.backend = LocalBackend(engine)
    agent.step(observation(1))  # step 2 is appended again, not refused as a duplicate
    assert agent.steps == 2


def test_local_backend_reports_how_a_reply_ended(agent, engine):
    agent.step(observation(0))
    probe = engine.fork(agent.session)
    text, _ = engine.generate_text(probe, SamplingParams(max_new_tokens=12, ignore_eos=True))
    stop = text[2:4]
    before = engine.session_info(agent.session).length
    reply = agent.backend.generate(agent.session, SamplingParams(max_new_tokens=12, stop=(stop,), ignore_eos=True), None)
    assert reply.finish_reason == "stop" and reply.text == text[: text.index(stop)]
    assert reply.length == before + reply.tokens == engine.session_info(agent.session).length


class ScriptedBackend:
    """The backend protocol in memory, replying from a script: shows what an agent sends."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.sent = []
        self.length = 0

    def create(self):
        return "s"

    def append(self, session, pieces, step):
        self.sent.append(pieces)
        return StepResult(session=session, step=step, tokens=len(pieces), length=self.length)

    def generate(self, session, sampling, step):
        text, finish_reason = self.replies.pop(0)
        return Generation(text=text, finish_reason=finish_reason, tokens=1, length=self.length)

    def fork(self, session):
        return "fork"

    def rollback(self, session, step):
        return StepResult(session=session, step=step, tokens=0, length=self.length)

    def close(self, session):
        pass


def test_instruction_once_and_unfinished_turns_closed():
    backend = ScriptedBackend([("Action: click(500, 250)", "eos"), ("click(5", "length"), ("wait()", "eos")])
    agent = Agent(backend)
    agent.reset("Find the button.")
    assert agent.step(observation(0, "")) == Click(x=500, y=250)
    assert agent.step(observation(1)) == Wait() and not agent.records[-1].parsed.ok
    assert agent.records[-1].parsed.raw == "click(5"
    agent.step(observation(2))
    first, second, third = backend.sent
    assert Text("Find the button.\n") in first and all(Text("Find the button.\n") not in p for p in (second, third))
    assert Text(EOS_TOKEN) not in second  # the reply before it ended with EOS
    assert third[0] == Text(EOS_TOKEN)  # the reply before it was cut at max_new_tokens


def test_model_policy_plays_an_env(engine):
    factory = load_policy("model")
    env = gym.make("longllava/RecallCode-v0", memory_span=2)
    policy = factory(env_id="longllava/RecallCode-v0", action_space=env.action_space, max_new_tokens=8)
    assert policy.agent.backend.engine is engine  # one engine per process
    # agent/ may not import envs, so the policy returns its own type with Decision's fields
    assert [f.name for f in dataclasses.fields(ModelDecision)] == [f.name for f in dataclasses.fields(Decision)]
    observation_, info = env.reset(seed=0)
    policy.reset(seed=0)
    for _ in range(3):
        decision = policy.act(observation_, info)
        assert env_actions.parse_action(decision.action) is not None
        assert decision.model_output == policy.agent.records[-1].parsed.raw
        assert set(decision.timings) == {"model_step_s", "parse_s"}
        observation_, _, terminated, _, info = env.step(decision.action)
    assert terminated
    session = policy.agent.session
    policy.reset(seed=1)  # a new episode: a new session, the old one closed
    assert policy.agent.steps == 0 and policy.agent.session != session
    with pytest.raises(KeyError):
        engine.session_info(session)

"""The agent on a remote session: a 100-step RecallCode episode through envs.rollout with
``ModelPolicy(url=...)`` (``Agent(RemoteBackend(...))``) sends only each new observation,
and the client side needs no torch."""

from __future__ import annotations

import subprocess
import sys

from agent.actions import GRAMMAR_HELP
from agent.policy import ModelPolicy
from agent.prompt import Observation, step_pieces
from envs.rollout import run_rollout
from envs.trajectory import read_trajectory

from served_app import API_KEY

STEPS = 100
MAX_NEW_TOKENS = 4


def test_a_remote_episode_sends_only_new_observations(served, reference, tmp_path):
    policies = []

    def remote_policy(**kwargs):
        policies.append(ModelPolicy(url=served.one.url, api_key=API_KEY, max_new_tokens=MAX_NEW_TOKENS, **kwargs))
        return policies[-1]

    result = run_rollout("longllava/RecallCode-v0", remote_policy, episodes=1, out=tmp_path, env_kwargs={"memory_span": STEPS - 1})
    assert result.episodes[0].length == STEPS
    trajectory = read_trajectory(tmp_path / "episode_000000")
    (policy,) = policies
    records = policy.agent.records
    length = 0
    for t, record in enumerate(records):
        observation = Observation(trajectory.screenshot(t), trajectory.steps[t]["instruction"])
        close = t > 0 and records[t - 1].finish_reason != "eos"
        pieces = step_pieces(observation, instruction=GRAMMAR_HELP if t == 0 else None, close_turn=close)
        assert record.observation_tokens == reference.inputs.process(pieces).tokens, f"step {t}"  # this step's alone
        length += record.observation_tokens + record.generated_tokens
        assert record.length == length, f"step {t}"
    held = policy.agent.backend.info(policy.agent.session)
    assert (held["step"], held["length"]) == (STEPS, length)
    policy.agent.close()


def test_the_remote_rollout_command_and_a_client_without_torch(served, tmp_path, cli):
    done = cli.finish(cli.start(
        "envs.rollout", "--env", "longllava/RecallCode-v0", "--agent", "model", "--episodes", "1",
        "--env-arg", "memory_span=2", "--agent-arg", f"url={served.one.url}", "--agent-arg", f"api_key={API_KEY}",
        "--agent-arg", "max_new_tokens=2", "--out", str(tmp_path),
    ))
    assert done.returncode == 0, done.stderr
    assert read_trajectory(tmp_path / "episode_000000").complete
    probe = "import sys, agent; from agent import RemoteBackend; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"

"""The key test: a 300-step episode through the model policy costs each step only its new
observation, and is recorded whole.

It runs longllava/RecallCode-v0 with memory_span=299 (299 inbox screens after the code,
then the sign-in form) through envs.rollout with ModelPolicy on the embedded default
model, and checks every append against the observation's tokens counted independently.
"""

import time
from pathlib import Path

import pytest

from agent.actions import GRAMMAR_HELP
from agent.policy import ModelPolicy
from envs.rollout import run_rollout
from envs.trajectory import read_trajectory
from model.default import DEFAULT_CONFIG
from model.prompt import IMAGE_TOKEN_INDEX
from model.tokenizer import ByteTokenizer, tokenize_prompt

STEPS = 300
IMAGE_TOKENS = DEFAULT_CONFIG.image_tokens  # the embedded model's pooled grid
MAX_NEW_TOKENS = 8


def observation_tokens(instruction: str, text: str, close_previous_turn: bool) -> int:
    """The tokens one step's user turn should add, from LongLLaVA's template written out."""
    prompt = (
        ("<|endoftext|>" if close_previous_turn else "")
        + "<|startoftext|><|User|>\n"
        + (f"{instruction}\n" if instruction else "")
        + "<img><image></img>\n"
        + text
        + "\n<|startoftext|><|Assistant|>\n"
    )
    ids = tokenize_prompt(ByteTokenizer(), prompt)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    return len(ids) - 1 + IMAGE_TOKENS


# about 2.5 minutes on 2 shared cores: the attention layer reads a history that grows past 70k tokens
@pytest.mark.slow
def test_300_step_episode_sends_only_new_observations(tmp_path, engine):
    policies = []

    def model_policy(**kwargs):
        policies.append(ModelPolicy(max_new_tokens=MAX_NEW_TOKENS, **kwargs))
        return policies[-1]

    began = time.perf_counter()
    result = run_rollout(
        "longllava/RecallCode-v0", model_policy, episodes=1, out=tmp_path, env_kwargs={"memory_span": STEPS - 1}
    )
    print(f"\n{STEPS}-step episode through ModelPolicy: {time.perf_counter() - began:.1f} s")

    assert result.episodes[0].length == STEPS
    trajectory = read_trajectory(tmp_path / "episode_000000")
    assert trajectory.complete and trajectory.meta["length"] == STEPS and len(trajectory.steps) == STEPS
    assert all((Path(trajectory.path) / step["screenshot"]).is_file() for step in trajectory.steps)

    (policy,) = policies
    records = policy.agent.records
    assert len(records) == STEPS
    length = 0
    for t, (record, step) in enumerate(zip(records, trajectory.steps)):
        close = t > 0 and records[t - 1].finish_reason != "eos"
        expected = observation_tokens(GRAMMAR_HELP if t == 0 else "", step["instruction"], close)
        assert record.observation_tokens == expected, f"step {t}"
        assert 1 <= record.generated_tokens <= MAX_NEW_TOKENS
        length += record.observation_tokens + record.generated_tokens
        assert record.length == length, f"step {t}"
        assert step["action"] == record.parsed.action.to_text() and step["model_output"] == record.parsed.raw
        assert {"model_step_s", "parse_s"} <= set(step["timings"])
    assert engine.session_info(policy.agent.session).length == length
    assert engine.session_info(policy.agent.session).step == STEPS

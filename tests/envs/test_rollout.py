"""Baselines through the rollout code path: the oracle always wins, random sits at chance."""

import math

import gymnasium as gym
import pytest

import envs
from envs.policies import load_policy
from envs.rollout import main, run_rollout

# Short spans keep 200 random episodes per task cheap; OrderEvents needs two watch steps.
SHORT = {env_id: {"memory_span": 2 if "OrderEvents" in env_id else 1} for env_id in envs.TASK_IDS}


@pytest.mark.parametrize("env_id", envs.TASK_IDS)
def test_oracle_always_succeeds(env_id):
    result = run_rollout(env_id, "oracle", episodes=6, num_envs=2, seed=11, env_kwargs={"difficulty": "hard"})
    assert result.success_rate == 1.0 and result.mean_return == 1.0
    assert [e.episode for e in result.episodes] == list(range(6))


@pytest.mark.parametrize("env_id", envs.TASK_IDS)
def test_random_scores_at_chance(env_id):
    episodes = 200
    result = run_rollout(env_id, "random", episodes=episodes, num_envs=2, vectorization="sync", env_kwargs=SHORT[env_id])
    chance = gym.make(env_id, **SHORT[env_id]).unwrapped.chance
    tolerance = 3 * math.sqrt(chance * (1 - chance) / episodes) + 0.01
    assert abs(result.success_rate - chance) <= tolerance
    assert result.mean_return == pytest.approx(2 * result.success_rate - 1)


def test_episodes_do_not_depend_on_the_number_of_envs():
    runs = [
        run_rollout("longllava/CountEvents-v0", "random", episodes=5, num_envs=k, seed=3, env_kwargs={"memory_span": 4})
        for k in (1, 3)
    ]
    assert runs[0].episodes == runs[1].episodes


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown policy"):
        load_policy("telepathy")


def test_command_line_reports_and_records(tmp_path, capsys):
    code = main([
        "--env", "longllava/OrderEvents-v0", "--agent", "oracle", "--episodes", "3", "--num-envs", "2",
        "--out", str(tmp_path), "--env-arg", "memory_span=3", "--env-arg", "difficulty=easy",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "success rate 100.0%" in printed and "steps/s" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["episode_000000", "episode_000001", "episode_000002"]


def test_the_progress_bar_counts_steps(capsys):
    """One long episode must move the bar; OrderEvents with span 3 is 4 steps an episode."""
    run_rollout("longllava/OrderEvents-v0", "oracle", episodes=3, env_kwargs={"memory_span": 3}, progress=True)
    final = capsys.readouterr().err.split("\r")[-1]
    assert final.startswith("12step [") and "episodes=3/3" in final


@pytest.mark.parametrize(
    "args, message",
    [
        (["--env-arg", "memory_span"], "argument --env-arg: expected KEY=VALUE, got 'memory_span'"),
        (["--agent-arg", "=3"], "argument --agent-arg: expected KEY=VALUE, got '=3'"),
        (["--episodes", "0"], "argument --episodes: must be at least 1, got 0"),
        (["--num-envs", "two"], "argument --num-envs: expected a whole number, got 'two'"),
        (["--env-arg", "memory_span=-4"], "--env-arg: RecallCodeEnv needs 1 <= memory_span <= 1000, got -4"),
        (["--env-arg", "colour=1"], "unexpected keyword argument 'colour'"),
        (["--agent-arg", "speed=3"], "--agent-arg for --agent random: got an unexpected keyword argument 'speed'"),
        (["--env", "longllava/Nope-v0"], "--env longllava/Nope-v0: Environment `Nope` doesn't exist"),
    ],
)
def test_command_line_mistakes_are_usage_errors(cli, args, message):
    done = cli.finish(cli.start("envs.rollout", "--env", "longllava/RecallCode-v0", *args))
    cli.assert_usage_error(done, message)

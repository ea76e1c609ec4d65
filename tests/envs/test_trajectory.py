"""Trajectories as training reads them, including episodes cut short."""

import gymnasium as gym
import numpy as np
import pytest

from envs.policies import Decision
from envs.rollout import run_rollout
from envs.trajectory import FORMAT, read_trajectories, read_trajectory

ENV = "longllava/RecallCode-v0"


def test_rollout_writes_readable_trajectories(tmp_path):
    result = run_rollout(ENV, "oracle", episodes=3, num_envs=2, seed=5, out=tmp_path, env_kwargs={"memory_span": 3})
    trajectories = list(read_trajectories(tmp_path))
    assert [t.meta["episode"] for t in trajectories] == [0, 1, 2]
    for trajectory, episode in zip(trajectories, result.episodes):
        assert trajectory.complete and trajectory.meta["format"] == FORMAT
        assert trajectory.meta["length"] == len(trajectory.steps) == episode.length == 4
        assert trajectory.meta["success"] is True and trajectory.meta["env_kwargs"] == {"memory_span": 3}
        assert [s["action"] for s in trajectory.steps[:3]] == ["wait()"] * 3
        assert trajectory.steps[-1]["action"].startswith("type(") and trajectory.steps[-1]["reward"] == 1.0
        assert {"act_s", "env_step_s"} <= trajectory.steps[0]["timings"].keys()

        # The recorded screens are the env's own: replay the episode from its seed.
        env = gym.make(ENV, memory_span=3)
        observation, _ = env.reset(seed=trajectory.meta["seed"])
        for t, step in enumerate(trajectory.steps):
            assert np.array_equal(trajectory.screenshot(t), observation["screenshot"])
            assert step["instruction"] == observation["instruction"]
            observation, *_ = env.step(step["action"])


class InterruptedPolicy:
    """A policy whose user presses Ctrl-C on the third step."""

    def __init__(self, *, env_id, action_space):
        self.steps = 0

    def reset(self, seed=None):
        pass

    def act(self, observation, info):
        self.steps += 1
        if self.steps == 3:
            raise KeyboardInterrupt
        return Decision("wait()", model_output="<thinking> wait", timings={"decode_s": 0.5})


def test_interrupted_episode_is_readable_and_marked_incomplete(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_rollout(ENV, InterruptedPolicy, episodes=1, out=tmp_path)
    assert list(read_trajectories(tmp_path)) == []
    (trajectory,) = read_trajectories(tmp_path, include_incomplete=True)
    assert trajectory.meta["status"] == "incomplete" and not trajectory.complete
    assert [s["action"] for s in trajectory.steps] == ["wait()", "wait()"]
    assert trajectory.steps[0]["model_output"] == "<thinking> wait"
    assert trajectory.steps[0]["timings"]["decode_s"] == 0.5
    assert trajectory.screenshot(1).shape == (336, 336, 3)

    # A process killed mid-write leaves half a line: the reader drops it.
    with open(trajectory.path / "steps.jsonl", "a") as steps:
        steps.write('{"t": 2, "screensh')
    assert len(read_trajectory(trajectory.path).steps) == 2

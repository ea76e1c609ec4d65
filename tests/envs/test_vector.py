"""The tasks run in Gymnasium's vector environments, synchronous and asynchronous."""

import gymnasium as gym
import numpy as np
import pytest

import envs


@pytest.mark.parametrize("mode, vector_kwargs", [("sync", {}), ("async", {"shared_memory": False})])
def test_vector_envs_step_every_task(mode, vector_kwargs):
    for env_id in envs.TASK_IDS:
        vector_env = gym.make_vec(env_id, 2, vectorization_mode=mode, vector_kwargs=vector_kwargs, memory_span=2)
        try:
            vector_env.action_space.seed(0)
            observations, infos = vector_env.reset(seed=[1, 2])
            assert observations["screenshot"].shape == (2, 336, 336, 3)
            assert len(observations["instruction"]) == 2 and list(infos["solution"]) == ["wait()", "wait()"]
            for _ in range(6):  # long enough to cross an automatic reset
                observations, rewards, terminations, truncations, infos = vector_env.step(vector_env.action_space.sample())
                assert observations in vector_env.observation_space
                assert not truncations.any()
            assert rewards.dtype == np.float64
        finally:
            vector_env.close()


def test_sync_and_async_give_the_same_episodes():
    results = []
    for mode, vector_kwargs in [("sync", {}), ("async", {"shared_memory": False})]:
        vector_env = gym.make_vec(
            "longllava/CountEvents-v0", 2, vectorization_mode=mode, vector_kwargs=vector_kwargs, memory_span=3
        )
        observations, _ = vector_env.reset(seed=[5, 6])
        trace = [observations["screenshot"].copy()]
        for _ in range(4):
            observations, rewards, *_ = vector_env.step(("wait()", 'answer("1")'))
            trace += [observations["screenshot"].copy(), rewards.copy()]
        vector_env.close()
        results.append(trace)
    assert all(np.array_equal(a, b) for a, b in zip(*results, strict=True))

"""MiniWoB++ in a real headless Chromium, through the adapter and the action grammar."""

import shutil
import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401
from envs.rollout import run_rollout

pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("chromedriver") is None,
    reason="MiniWoB++ needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)

CLICK_TEST_2 = "longllava-miniwob/click-test-2-v1"


@pytest.fixture(scope="module")
def env():
    env = gym.make(CLICK_TEST_2)
    yield env
    env.close()


@pytest.mark.parametrize("vectorization, num_envs", [("sync", 1), ("async", 2)])
def test_scripted_policy_solves_click_test_2_in_the_browser(vectorization, num_envs):
    result = run_rollout(CLICK_TEST_2, "scripted", episodes=3, num_envs=num_envs, vectorization=vectorization)
    assert all(e.success and e.episode_return > 0 and e.length == 1 for e in result.episodes)


def test_observations_are_a_screenshot_and_the_utterance(env):
    observation, info = env.reset(seed=1)
    assert observation["screenshot"].shape == (210, 160, 3) and observation["screenshot"].any()
    assert observation["instruction"] == "Click button ONE."
    assert observation in env.observation_space
    assert {"ONE", "TWO"} <= {e["text"] for e in info["dom"] if e["tag"] == "button"}


def test_grammar_actions_map_onto_miniwob(env):
    env.reset(seed=2)
    for action, error in [
        ("wait()", ""), ('key("Enter")', ""), ('key("ctrl+a")', ""), ("scroll(0, 3)", ""), ('type("hi")', ""),
        ('key("NoSuchKey")', "unknown key 'NoSuchKey'"),
        ('answer("ONE")', "answer is not supported on MiniWoB"),
        ("clik(1, 2)", "not an action in the grammar: 'clik(1, 2)'"),
    ]:
        _, reward, terminated, truncated, info = env.step(action)
        assert (reward, terminated, info["action_error"]) == (0.0, False, error), action


def test_passes_gymnasium_env_checker():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(gym.make(CLICK_TEST_2).unwrapped)
    # MiniWoB runs in real time, so it declares no render fps; nothing else may warn.
    assert [str(w.message) for w in caught if "render fps" not in str(w.message)] == []

"""Trajectory fine-tuning records hold, token for token, what the Agent's session holds
after the same episode, and label only the actions."""

import numpy as np

from agent import Agent, Observation
from agent.actions import GRAMMAR_HELP, parse_action
from agent.backend import Generation
from envs.rollout import run_rollout
from envs.trajectory import read_trajectories
from model.prompt import EOS_TOKEN, render_pieces
from model.tokenizer import ByteTokenizer, tokenize_prompt
from serving.types import StepResult
from training.collate import IGNORE_INDEX, encode
from training.data import LlavaDataset
from training.trajectories import episode_record, write_records

TOKENIZER = ByteTokenizer()


class ReplayBackend:
    """A backend that records what the agent appends and replies with given actions,
    ending each reply with EOS as the engine does (the EOS token joins the history)."""

    def __init__(self, replies: list[str]):
        self.replies = iter(replies)
        self.ids: list[int] = []
        self.images: list = []

    def create(self) -> str:
        return "s"

    def append(self, session, pieces, step) -> StepResult:
        text, images = render_pieces(pieces)
        self.ids += tokenize_prompt(TOKENIZER, text)
        self.images += images
        return StepResult(session=session, step=step, tokens=0, length=len(self.ids))

    def generate(self, session, sampling, step=None) -> Generation:
        text = next(self.replies)
        self.ids += TOKENIZER.encode(text + EOS_TOKEN)
        return Generation(text=text, finish_reason="eos", tokens=0, length=len(self.ids))

    def close(self, session) -> None:
        pass


def test_an_episode_is_the_agents_own_token_stream(tmp_path):
    run_rollout("longllava/RecallCode-v0", "oracle", episodes=2, seed=5, out=tmp_path / "runs",
                env_kwargs={"memory_span": 3, "difficulty": "easy"})
    trajectory = next(read_trajectories(tmp_path / "runs"))
    record = episode_record(trajectory, GRAMMAR_HELP)

    backend = ReplayBackend([step["action"] for step in trajectory.steps])
    agent = Agent(backend)
    agent.reset(GRAMMAR_HELP)
    for t, step in enumerate(trajectory.steps):
        agent.step(Observation(trajectory.screenshot(t), step["instruction"]))

    example = LlavaDataset([write_jsonl_record(tmp_path, record)])[0]
    encoded = encode(example, TOKENIZER, 36)
    assert encoded.input_ids == backend.ids
    assert len(example.images) == len(backend.images) == len(trajectory.steps)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(example.images, backend.images))

    labelled = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert labelled == [t for s in trajectory.steps for t in TOKENIZER.encode(s["action"] + EOS_TOKEN)]
    solution = trajectory.steps[-1]["info"]["solution"]
    prompts = "".join(turn["value"] for turn in record["conversations"] if turn["from"] == "human")
    assert solution.split('"')[1] not in prompts  # the code never leaks into the prompt
    assert "info" not in record and "solution" not in prompts


def test_a_click_episode_teaches_the_oracles_whole_reply(tmp_path):
    run_rollout("longllava/ClickTarget-v0", "oracle", episodes=1, seed=2, out=tmp_path / "runs",
                env_kwargs={"difficulty": "easy"})
    trajectory = next(read_trajectories(tmp_path / "runs"))
    step, record = trajectory.steps[-1], episode_record(trajectory, GRAMMAR_HELP)
    reply = record["conversations"][-1]["value"]
    assert reply == step["info"]["rationale"] + "\n" + step["action"] == step["model_output"]
    assert parse_action(reply).action.to_text() == step["action"]  # the agent reads the click out of it


def write_jsonl_record(tmp_path, record):
    import json

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return path


def test_write_records_keeps_successful_complete_episodes(tmp_path):
    run_rollout("longllava/OrderEvents-v0", "random", episodes=6, seed=0, out=tmp_path / "runs",
                env_kwargs={"memory_span": 2, "difficulty": "easy"})
    results = [t.meta["success"] for t in read_trajectories(tmp_path / "runs")]
    assert write_records([tmp_path / "runs"], tmp_path / "ok.jsonl", "x") == sum(results)
    assert write_records([tmp_path / "runs"], tmp_path / "all.jsonl", "x", successful_only=False) == 6

"""Gymnasium environments that render screenshots and need long memory, plus rollout
recording. Importing `envs` registers the tasks:

    import envs, gymnasium
    env = gymnasium.make("longllava/RecallCode-v0", memory_span=100, difficulty="hard")

and, when the `miniwob` package is installed, every MiniWoB++ task under the
`longllava-miniwob/` namespace (e.g. "longllava-miniwob/click-test-2-v1"), seen through
the same observations and action grammar (`envs.miniwob_adapter`).

The tasks import nothing from the rest of the project. See envs/README.md.
"""

import importlib.util

import gymnasium

TASKS = {
    "ClickTarget": "envs.tasks.click_target:ClickTargetEnv",
    "RecallCode": "envs.tasks.recall_code:RecallCodeEnv",
    "CountEvents": "envs.tasks.count_events:CountEventsEnv",
    "OrderEvents": "envs.tasks.order_events:OrderEventsEnv",
    "NeedleFrame": "envs.tasks.needle_frame:NeedleFrameEnv",
}
TASK_IDS = tuple(f"longllava/{name}-v0" for name in TASKS)

for _name, _entry_point in TASKS.items():
    gymnasium.register(id=f"longllava/{_name}-v0", entry_point=_entry_point)

if importlib.util.find_spec("miniwob") is not None:
    from envs.miniwob_adapter import register_miniwob_tasks

    register_miniwob_tasks()

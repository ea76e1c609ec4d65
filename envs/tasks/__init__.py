"""The screenshot tasks, one module each; `envs/__init__.py` registers them.

Every task is a `envs.base.ScreenEnv`: its episode is drawn whole at reset from the
seeded generator, watch screens come first and one question screen last.
"""

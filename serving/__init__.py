"""Serving LongLLaVA sessions: the in-process ``Engine`` (``serving.engine``) and the Ray Serve app.

``serving.app`` is the app's builder, for ``serve run serving.app [key=value ...]`` and for
a config file's ``args:``. ``serve build`` takes only a built application, so under
``serve build serving:app`` the name is the app built with no arguments; the config it
writes still names ``serving:app``, which ``serve run serve.yaml`` calls as the builder.
It loads on first use, so that ``serving.types`` and ``serving.errors``, which a remote
client imports, need neither torch nor Ray.
"""

import sys
from pathlib import Path


def __getattr__(name: str):
    if name == "app":
        from .application import AppArgs, app

        return app(AppArgs()) if _serve_build() else app
    raise AttributeError(f"module 'serving' has no attribute {name!r}")


def _serve_build() -> bool:
    return Path(sys.argv[0]).name == "serve" and sys.argv[1:2] == ["build"]

"""Serving LongLLaVA sessions: the in-process ``Engine`` (``serving.engine``) and the Ray Serve app.

``serving.app`` is the app's builder (``serve run serving.app [key=value ...]``) and
``serving.default_app`` the app built with no arguments (``serve build
serving:default_app``). Both load on first use, so that ``serving.types`` and
``serving.errors``, which a remote client imports, need neither torch nor Ray.
"""


def __getattr__(name: str):
    if name == "app":
        from .application import app

        return app
    if name == "default_app":
        from .application import default_app

        return default_app()
    raise AttributeError(f"module 'serving' has no attribute {name!r}")

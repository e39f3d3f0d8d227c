"""OpenAI-compatible HTTP server over the inference engine (app.py tells how to deploy it).

Imported lazily so that `nanoseek --help` does not load FastAPI."""


def __getattr__(name):
    if name in ("create_app", "Settings"):
        from . import app
        return getattr(app, name)
    raise AttributeError(name)


__all__ = ["Settings", "create_app"]

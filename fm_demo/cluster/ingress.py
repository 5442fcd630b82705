"""The ingress: the app's Gradio UI and HTTP APIs, as `python app.py` serves them, with no model.

It is build_demo() on a context whose ModelManager is a RemoteModelManager: every conversation
(transcript and kept states) lives here, every reply runs on a model replica. Serve's HTTP proxy
sends requests here; several ingress replicas can run (cluster_ingress_replicas), each browser
session pinned to one of them by SessionRouter (Gradio's queue lives in the process that took the
session's first request).
"""

from __future__ import annotations

import uuid
from typing import Any, Mapping

from ray import serve

from ..conversations.store import SessionStore
from ..ui.common import AppContext
from .config import IngressSettings
from .remote import RemoteModelManager
from .router import SESSION_COOKIE


def make_context(settings: IngressSettings, models, copy_state_bytes: int) -> AppContext:
    """The app context of an ingress: models on the replicas behind `models` (a DeploymentHandle)."""
    manager = RemoteModelManager(settings, models, copy_state_bytes)
    return AppContext(settings, manager, SessionStore(settings, manager))


def asgi_app(settings: IngressSettings, ctx: AppContext):
    """The app's UI and APIs, mounted as an ASGI app (what demo.launch() would serve)."""
    import gradio as gr
    from fastapi import FastAPI

    from ..ui import build_demo, launch_kwargs, queue_kwargs

    demo = build_demo(settings, ctx).queue(**queue_kwargs(settings))
    demo.max_threads = max(demo.max_threads, settings.event_concurrency() + 16)  # a thread per reply
    server = FastAPI()

    @server.middleware("http")
    async def session_cookie(request, call_next):
        response = await call_next(request)
        if SESSION_COOKIE not in request.cookies:
            response.set_cookie(SESSION_COOKIE, uuid.uuid4().hex, httponly=True, samesite="lax")
        return response

    return gr.mount_gradio_app(server, demo, path="/", **launch_kwargs(settings))


@serve.ingress()
class Ingress:
    """The Serve deployment of the UI and APIs (fm_demo/cluster/app.py sets its options)."""

    def __init__(self, env: Mapping[str, str], resolved: Mapping[str, Any], replicas: int,
                 copy_state_bytes: int, models):
        self.settings = IngressSettings.for_replicas(env, resolved, replicas)
        self.ctx = make_context(self.settings, models, copy_state_bytes)

    def __serve_build_asgi_app__(self):
        return asgi_app(self.settings, self.ctx)

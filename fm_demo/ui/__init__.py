"""The Gradio app: one module per tab, build_demo() lays them out and wires every event."""

from .build import build_demo, launch_kwargs, queue_kwargs, server_kwargs

__all__ = ["build_demo", "launch_kwargs", "queue_kwargs", "server_kwargs"]

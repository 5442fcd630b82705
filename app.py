"""Falcon Mamba demo: `python app.py` serves it (bundled tiny models on CPU, 7B on CUDA).

Settings come from FM_DEMO_* environment variables, and under `python app.py` also from flags
(`python app.py --help`). `demo` is module-level so `gradio app.py` and Hugging Face Spaces find it.
It listens where Gradio's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say (a Space sets them) unless
FM_DEMO_HOST / FM_DEMO_PORT or --host / --port name an address. The same server answers the
OpenAI-compatible API at /v1 and, with FM_DEMO_MCP_SERVER, Gradio's MCP server (launch_kwargs).
"""

from fm_demo.zerogpu import on_zerogpu, prepare

prepare()  # on ZeroGPU, `spaces` must patch torch before anything touches CUDA

from fm_demo.settings import Settings  # noqa: E402
from fm_demo.ui import build_demo, launch_kwargs, queue_kwargs, server_kwargs  # noqa: E402


def build(settings: Settings):
    """The queued app for `settings`, with the process set up for it (once, at start-up)."""
    import torch

    if (threads := settings.torch_threads()) is not None:
        torch.set_num_threads(threads)
    app = build_demo(settings).queue(**queue_kwargs(settings))
    if on_zerogpu():  # `spaces` hands its GPU worker only the weights on "cuda" at launch
        app.fm_context.manager.preload()
    return app


settings = Settings.from_env()
demo = build(settings)


def main() -> None:
    import argparse

    parser = Settings.add_cli_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    cli = Settings.from_cli(args)
    app = demo if cli == settings else build(cli)
    app.launch(**server_kwargs(cli), **launch_kwargs(cli))


if __name__ == "__main__":
    main()

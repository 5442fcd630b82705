"""Falcon Mamba demo: `python app.py` serves it (bundled tiny models on CPU, 7B on CUDA).

Settings come from FM_DEMO_* environment variables, and under `python app.py` also from flags
(`python app.py --help`). `demo` is module-level so `gradio app.py` and Hugging Face Spaces find it.
"""

from fm_demo.zerogpu import prepare

prepare()  # on ZeroGPU, `spaces` must patch torch before anything touches CUDA

from fm_demo.settings import Settings  # noqa: E402
from fm_demo.ui import build_demo, launch_kwargs, queue_kwargs  # noqa: E402

settings = Settings.from_env()
demo = build_demo(settings)
demo.queue(**queue_kwargs())


def main() -> None:
    import argparse

    parser = Settings.add_cli_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    cli = Settings.from_cli(args)
    app = demo if cli == settings else build_demo(cli).queue(**queue_kwargs())
    app.launch(server_name=cli.host, server_port=cli.port, **launch_kwargs(cli))


if __name__ == "__main__":
    main()

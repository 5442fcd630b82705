"""The shared prefix-state cache: a document read once for everyone, a stateless API chat that
resends its history, and one state for many conversations about one document.

    python bench/prefix.py --json

- shared_doc: sharing on, two users of the Long-context path (Conversation.send with the document
  marked), the same ~32k-token document and different questions: time to first token of the first
  user (reads the document) over the second's (finds its state in the tree), and the fraction of
  the document's tokens the second user got from the cache.
- api_chat: a 20-turn chat through the app's own /v1/chat/completions (the official `openai` client,
  streaming, the whole history resent every turn, as OpenAI clients do) on a server started here:
  time to first token per turn, with the prefix cache and without it (a fresh `cache_salt` each
  turn: a namespace with nothing in it), on the same server in the same run.
- shared_doc_memory: 200 conversations about one ~16k-token document (sharing on): how many states
  the tree holds at the document's end (one) and how many conversations hold it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fm_demo.conversations.sessions import Conversation  # noqa: E402
from fm_demo.engine import SamplingParams  # noqa: E402
from fm_demo.models import ModelManager  # noqa: E402
from fm_demo.settings import Settings  # noqa: E402

GREEDY = SamplingParams()


def document(tokens_wanted: int, tokenizer) -> str:
    """Plain English lines until the document has about `tokens_wanted` tokens."""
    line = "Line {i}: the falcon glides over the desert at dawn, and the river keeps its slow course."
    per_line = len(tokenizer.encode(line.format(i=100)))
    return " ".join(line.format(i=i) for i in range(tokens_wanted // per_line + 1))


def ttft(conv: Conversation, text: str, doc_chars: int, max_new: int = 4) -> tuple[float, int, int]:
    """(time to first token, tokens reused from the cache, tokens of the document) of one question."""
    gen = conv.send(text, GREEDY, max_new, allow_long=True, document_chars=doc_chars)
    first = next(gen)
    for _ in gen:
        pass
    return first.metrics.ttft_s, first.metrics.reused_tokens, conv.turns[-1].keep_at or 0


def shared_doc(manager: ModelManager, settings: Settings, tokens: int) -> dict:
    lm = manager.get("tiny-instruct")
    doc = document(tokens, lm.tokenizer)
    first = Conversation(lm, settings, namespace="alice")
    t1, reused1, doc_tokens = ttft(first, f"{doc}\n\nWhat glides over the desert?", len(doc))
    second = Conversation(lm, settings, namespace="bob")
    t2, reused2, _ = ttft(second, f"{doc}\n\nWhen does the falcon glide?", len(doc))
    return {"doc_tokens": doc_tokens, "ttft_first_s": t1, "ttft_second_s": t2, "ratio": t1 / t2,
            "reused_first": reused1, "cached_tokens_second": reused2,
            "cached_fraction": reused2 / doc_tokens if doc_tokens else 0.0}


def shared_doc_memory(manager: ModelManager, settings: Settings, tokens: int, conversations: int) -> dict:
    lm = manager.get("tiny-instruct")
    doc = document(tokens, lm.tokenizer)
    convs = []
    for i in range(conversations):
        conv = Conversation(lm, settings, namespace=f"user-{i}")
        ttft(conv, f"{doc}\n\nQuestion {i}: what glides over the desert?", len(doc), max_new=2)
        convs.append(conv)
    doc_end = convs[0].turns[0].keep_at
    tree = lm.prefix_cache
    at_doc_end = [n for n in tree._nodes() if n.state is not None and n.depth == doc_end]
    holders = sum(n.holders for n in at_doc_end)
    reread = sum(1 for c in convs[1:] if c.turns[0].metrics.reused_tokens < doc_end)
    return {"conversations": conversations, "doc_tokens": doc_end, "state_copies": len(at_doc_end),
            "holders_of_that_state": holders, "conversations_that_read_the_document": 1 + reread,
            "state_bytes": lm.engine.state_nbytes(), "tree_states": tree.stats()["states"]}


def user_message(turn: int) -> str:
    """About a hundred tokens a turn, so twenty turns make a history worth caching."""
    return (f"Turn {turn + 1}. A note for the record: the falcon glides over the desert at dawn, the river "
            f"keeps its slow course, and the wind carries sand from the dunes to the city walls, where the "
            f"market opens early and the bells ring twice. What is {turn + 3} plus {turn + 4}?")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_chat(settings: Settings, turns: int, max_new: int) -> dict:
    """TTFT per turn of a chat that resends its whole history through /v1/chat/completions."""
    from openai import OpenAI

    from fm_demo.ui import build_demo, launch_kwargs, queue_kwargs

    demo = build_demo(settings).queue(**queue_kwargs(settings))
    port = _free_port()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **launch_kwargs(settings))
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        client.chat.completions.create(  # load the model first: turn 1 must not time the load
            model="tiny-instruct", messages=[{"role": "user", "content": "Hello!"}], max_tokens=2,
            extra_body={"cache_salt": "warm-up"})
        out = {"ttft_s": [], "ttft_nocache_s": [], "cached_tokens": [], "prompt_tokens": []}
        for salt, key in (("bench-chat", "ttft_s"), (None, "ttft_nocache_s")):
            messages = []
            for turn in range(turns):
                messages.append({"role": "user", "content": user_message(turn)})
                extra = {"cache_salt": salt or f"fresh-{turn}-{time.time_ns()}"}
                t0 = time.perf_counter()
                stream = client.chat.completions.create(
                    model="tiny-instruct", messages=messages, max_tokens=max_new, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body=extra)
                first, text, usage = None, "", None
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter() - t0
                        text += chunk.choices[0].delta.content
                    if chunk.usage is not None:
                        usage = chunk.usage
                out[key].append(first if first is not None else time.perf_counter() - t0)
                if salt:
                    out["cached_tokens"].append(usage.prompt_tokens_details.cached_tokens)
                    out["prompt_tokens"].append(usage.prompt_tokens)
                messages.append({"role": "assistant", "content": text})
        c, n = out["ttft_s"], out["ttft_nocache_s"]
        out.update(last_over_first=c[-1] / c[0], nocache_last_over_first=n[-1] / n[0],
                   nocache_over_cache_last=n[-1] / c[-1])
        return out
    finally:
        with contextlib.redirect_stdout(sys.stderr):
            demo.close()


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    settings = Settings(device="cpu", share_prefix_cache=True, max_upload_chars=10_000_000,
                        max_new_tokens=args.max_new_tokens)
    manager = ModelManager(settings)
    out = {"shared_doc": shared_doc(manager, settings, args.doc_tokens),
           "shared_doc_memory": shared_doc_memory(ModelManager(settings), settings, args.memory_doc_tokens,
                                                  args.conversations)}
    if not args.skip_api:  # sharing off: the no-cache contrast uses namespaces with nothing in them
        out["api_chat"] = api_chat(settings.replace(share_prefix_cache=False), args.turns, args.max_new_tokens)
    sd, mem = out["shared_doc"], out["shared_doc_memory"]
    out["targets"] = {
        "shared_doc_ttft_ratio_ge_20": sd["ratio"] >= 20,
        "shared_doc_cached_fraction_ge_0.99": sd["cached_fraction"] >= 0.99,
        "shared_doc_memory_one_copy": mem["state_copies"] == 1,
    }
    if "api_chat" in out:
        out["targets"]["api_chat_turn20_over_turn1_le_1.5"] = out["api_chat"]["last_over_first"] <= 1.5
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--doc-tokens", type=int, default=32_000)
    p.add_argument("--memory-doc-tokens", type=int, default=16_000)
    p.add_argument("--conversations", type=int, default=200)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-api", action="store_true", help="leave out the HTTP chat (no server started)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    out = run(args)
    print(json.dumps(out, indent=1 if args.json else None))


if __name__ == "__main__":
    main()

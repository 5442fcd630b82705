"""The shared prefix-state cache: a document read once for everyone, a stateless API chat that
resends its history, and one state for many conversations about one document.

    python bench/prefix.py --json
    python bench/prefix.py --quick --json     # every section smaller (seconds; the same keys)

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
- shared_system: 16 requests to /v1/chat/completions (the same server, one cache namespace) sharing a
  ~4k-token system prompt, each with a question of its own: cached_fraction, the share of the
  system prompt's tokens (the prompts' common start, template included) that requests 2..16 got
  from the cache (usage.prompt_tokens_details.cached_tokens), time to first token of the first
  request and the median of the others.
- doc_in_message: one ~16k-token document in the user message, then 8 different questions (8
  requests): cached_fraction over questions 2..8 (cached tokens over the document's tokens), the
  times to first token as above, and checkpoint_bytes, the bytes the model's prefix cache gained
  over these requests (its stats, read from the server's live ModelManager in this process).
A cache that keeps states only where whole prompts end finds nothing for the last two: every
request differs from the others before its end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fm_demo import chat  # noqa: E402
from fm_demo.conversations.sessions import Conversation  # noqa: E402
from fm_demo.engine import SamplingParams  # noqa: E402
from fm_demo.models import ModelManager  # noqa: E402
from fm_demo.settings import Settings  # noqa: E402

GREEDY = SamplingParams()
MODEL = "tiny-instruct"
QUICK = {"doc_tokens": 2_000, "memory_doc_tokens": 1_000, "conversations": 10, "turns": 4, "system_tokens": 1_000,
         "system_requests": 4, "message_doc_tokens": 2_000, "questions": 3}


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
    # sharing on: one tree for everyone, so the document's tokens lead to one node; its state is
    # the one copy, held by every conversation that keeps it
    found, node = tree.find(convs[0].token_ids()[:doc_end], convs[0].namespace)
    at_doc_end = [node] if node is not None and found == doc_end else []
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


def api_chat(client, turns: int, max_new: int) -> dict:
    """TTFT per turn of a chat that resends its whole history through /v1/chat/completions."""
    out = {"ttft_s": [], "ttft_nocache_s": [], "cached_tokens": [], "prompt_tokens": []}
    for salt, key in (("bench-chat", "ttft_s"), (None, "ttft_nocache_s")):
        messages = []
        for turn in range(turns):
            messages.append({"role": "user", "content": user_message(turn)})
            fresh = f"fresh-{turn}-{time.time_ns()}"
            first, text, usage = chat_stream(client, messages, max_new, salt or fresh)
            out[key].append(first)
            if salt:
                out["cached_tokens"].append(usage.prompt_tokens_details.cached_tokens)
                out["prompt_tokens"].append(usage.prompt_tokens)
            messages.append({"role": "assistant", "content": text})
    c, n = out["ttft_s"], out["ttft_nocache_s"]
    out.update(last_over_first=c[-1] / c[0], nocache_last_over_first=n[-1] / n[0],
               nocache_over_cache_last=n[-1] / c[-1])
    return out


@contextlib.contextmanager
def app_server(settings: Settings):
    """The app (Gradio and /v1) on 127.0.0.1 at a free port, in this process: (base URL, its context:
    the live ModelManager and session store)."""
    from fm_demo.ui import build_demo, launch_kwargs, queue_kwargs

    demo = build_demo(settings).queue(**queue_kwargs(settings))
    port = _free_port()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    **launch_kwargs(settings))
    try:
        yield f"http://127.0.0.1:{port}", demo.fm_context
    finally:
        with contextlib.redirect_stdout(sys.stderr):
            demo.close()


def chat_stream(client, messages: list[dict], max_new: int, salt: str) -> tuple[float, str, object]:
    """(time to first token, reply text, usage) of one streamed /v1/chat/completions request
    (greedy). Time to first token: to the first piece of text, or to the end when there is none."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_new, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"cache_salt": salt})
    first, text, usage = None, "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    return (first if first is not None else time.perf_counter() - t0), text, usage


def shared_prefix_tokens(tokenizer, conversations: list[list[dict]]) -> int:
    """Tokens the prompts of `conversations` have in common from the start (the server's rendering:
    chat.render with the generation prompt, then chat.encode): what a cache could serve at most."""
    fmt = chat.format_for("instruct")
    ids = [chat.encode(tokenizer, chat.render(fmt, m, add_generation_prompt=True)) for m in conversations]

    def common(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    return min(common(ids[0], other) for other in ids[1:])


def cache_bytes(ctx) -> int:
    """Bytes of states in the served model's prefix cache (its stats, as the System tab shows them)."""
    return sum(lm.prefix_cache.stats()["bytes"] for lm in ctx.manager.loaded())


def same_prefix_requests(client, ctx, requests: list[list[dict]], max_new: int, salt: str) -> dict:
    """`requests` (message lists sharing a prefix) one after another in one cache namespace: time to
    first token of each, and the share of the shared prefix served from the cache after the first."""
    tokenizer = ctx.manager.get(MODEL).tokenizer
    shared = shared_prefix_tokens(tokenizer, requests)
    bytes_before = cache_bytes(ctx)
    ttfts, cached, prompts = [], [], []
    for messages in requests:
        t, _, usage = chat_stream(client, messages, max_new, salt)
        ttfts.append(t)
        cached.append(usage.prompt_tokens_details.cached_tokens)
        prompts.append(usage.prompt_tokens)
    rest = ttfts[1:]
    return {"requests": len(requests), "shared_tokens": shared, "prompt_tokens": prompts,
            "cached_tokens": cached,
            "cached_fraction": sum(min(c, shared) for c in cached[1:]) / (shared * len(rest)),
            "ttft_first_s": ttfts[0], "ttft_rest_s": statistics.median(rest), "ttft_s": ttfts,
            "first_over_rest": ttfts[0] / statistics.median(rest),
            "cache_bytes_added": cache_bytes(ctx) - bytes_before}


def question(i: int) -> str:
    return f"Question {i + 1}: what does line {7 * i + 3} say, and what is {i + 3} plus {i + 4}?"


def shared_system(client, ctx, tokens: int, requests: int, max_new: int) -> dict:
    """`requests` requests sharing a system prompt of about `tokens` tokens, each with its own
    question; cached_fraction: the share of the system prompt's tokens (the prompts' common start)
    served from the cache over requests 2..n."""
    tokenizer = ctx.manager.get(MODEL).tokenizer
    system = "You answer questions about the log below.\n" + document(tokens, tokenizer)
    asks = [[{"role": "system", "content": system}, {"role": "user", "content": question(i)}]
            for i in range(requests)]
    out = same_prefix_requests(client, ctx, asks, max_new, f"shared-system-{time.time_ns()}")
    return {"system_tokens": out.pop("shared_tokens"), **out}


def doc_in_message(client, ctx, tokens: int, questions: int, max_new: int) -> dict:
    """One document of about `tokens` tokens in the user message, followed by a different question
    each time; cached_fraction: cached tokens over the document's tokens (the prompts' common start)
    over questions 2..n; checkpoint_bytes: what the cache gained over these requests."""
    doc = document(tokens, ctx.manager.get(MODEL).tokenizer)
    asks = [[{"role": "user", "content": f"{doc}\n\n{question(i)}"}] for i in range(questions)]
    out = same_prefix_requests(client, ctx, asks, max_new, f"doc-in-message-{time.time_ns()}")
    return {"doc_tokens": out.pop("shared_tokens"), **out, "checkpoint_bytes": out["cache_bytes_added"],
            "cache_bytes_total": cache_bytes(ctx)}


def http_sections(settings: Settings, args: argparse.Namespace) -> dict:
    """api_chat, shared_system and doc_in_message on one server started here (sharing off: each
    section's requests share a cache namespace of their own, named by cache_salt)."""
    from openai import OpenAI

    with app_server(settings) as (url, ctx):
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1800)
        client.chat.completions.create(  # load the model first: no first request may time the load
            model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=2,
            extra_body={"cache_salt": "warm-up"})
        return {"api_chat": api_chat(client, args.turns, args.max_new_tokens),
                "shared_system": shared_system(client, ctx, args.system_tokens, args.system_requests,
                                               args.max_new_tokens),
                "doc_in_message": doc_in_message(client, ctx, args.message_doc_tokens, args.questions,
                                                 args.max_new_tokens)}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    settings = Settings(device="cpu", share_prefix_cache=True, max_upload_chars=10_000_000,
                        max_new_tokens=args.max_new_tokens)
    manager = ModelManager(settings)
    out = {"shared_doc": shared_doc(manager, settings, args.doc_tokens),
           "shared_doc_memory": shared_doc_memory(ModelManager(settings), settings, args.memory_doc_tokens,
                                                  args.conversations)}
    if not args.skip_api:  # sharing off: the no-cache contrast uses namespaces with nothing in them
        out.update(http_sections(settings.replace(share_prefix_cache=False), args))
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
    p.add_argument("--system-tokens", type=int, default=4_000, help="shared_system: system prompt tokens")
    p.add_argument("--system-requests", type=int, default=16, help="shared_system: requests")
    p.add_argument("--message-doc-tokens", type=int, default=16_000, help="doc_in_message: document tokens")
    p.add_argument("--questions", type=int, default=8, help="doc_in_message: questions (one request each)")
    p.add_argument("--skip-api", action="store_true", help="leave out the HTTP sections (no server started)")
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds: " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.quick:  # quick values where the flag was left at its default
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    out = run(args)
    print(json.dumps(out, indent=1 if args.json else None))


if __name__ == "__main__":
    main()

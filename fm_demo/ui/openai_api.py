"""OpenAI-compatible endpoints on the app's own server: GET /v1/models, POST /v1/chat/completions,
POST /v1/completions.

Same process, models and schedulers as the browser: a request is one stateless completion
(serving/completion.py). The client sends the whole prompt (the chat history) every time; the
model's prefix cache finds the longest prefix it already holds a state for, so a conversation
resent turn after turn costs only its new tokens, and usage.prompt_tokens_details.cached_tokens
says how many prompt tokens were served from the cache.

Registration: Gradio builds a fresh FastAPI app in every demo.launch(); launch_kwargs() passes
`api_routes()` through launch's app_kwargs as FastAPI's `routes`, so `python app.py`,
`gradio app.py` and a Space (which runs app.py) all serve them. The routes find the app's context
through the app (`request.app.get_blocks()`), so a reload that swaps the Blocks swaps it too.

Prefix-cache namespaces (while Settings.share_prefix_cache is off) keep clients apart: the bearer
token (or none) with the request's `cache_salt`, else with its `user`, else a token with the
client's address, else the address alone; each derived by the server under its secret, in a kind
of its own (serving/namespaces.py), so a browser session never meets an API client. With sharing
on, every request shares one tree.

Threads: complete() blocks on the scheduler's queue, so model loads, tokenizing and every
next chunk run in worker threads (anyio) under a limiter of the API's own, sized like Gradio's
reply concurrency; the event loop only writes bytes. A client that disconnects mid-stream
closes its completion, which cancels its batch row.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .. import chat
from ..engine import DecodeOptions
from ..engine.sampling import SamplingError
from ..serving import RequestFailed, SchedulerBusy, SchedulerClosed
from ..serving.completion import CompletionChunk, CompletionRequest, Usage, complete
from ..serving.namespaces import API_ADDRESS, API_KEY, API_SALT, API_USER, derive
from ..serving.request import RequestRefused
from ..settings import Settings
from .openai_schema import (ApiError, ApiRequest, Json, Shape, bad, chat_logprobs, completion_logprobs, model_json,
                            parse_chat, parse_completion)

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from ..models import LoadedModel
    from .common import AppContext

log = logging.getLogger("fm_demo.api")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
BODY_SLACK = 64 * 1024  # bytes of JSON around the prompt
MAX_JSON_DEPTH = 64  # nesting of a request body (a JSON schema in response_format or tools included)


def api_routes() -> list[BaseRoute]:
    """The /v1 routes, for FastAPI(routes=...) (launch's app_kwargs)."""
    router = APIRouter(prefix="/v1")
    router.add_api_route("/models", list_models, methods=["GET"], include_in_schema=False)
    router.add_api_route("/models/{model:path}", get_model, methods=["GET"], include_in_schema=False)
    router.add_api_route("/chat/completions", chat_completions, methods=["POST"], include_in_schema=False)
    router.add_api_route("/completions", completions, methods=["POST"], include_in_schema=False)
    tokens = APIRouter()  # vLLM's paths and shapes, so clients count tokens as the server does
    tokens.add_api_route("/tokenize", tokenize, methods=["POST"], include_in_schema=False)
    tokens.add_api_route("/detokenize", detokenize, methods=["POST"], include_in_schema=False)
    return [*router.routes, *tokens.routes]


# -- endpoints -------------------------------------------------------------------------------
async def list_models(request: Request) -> Response:
    try:
        ctx = _open(request)
    except ApiError as e:
        return error_response(e)
    data = [model_json(k, p.source, p.local) for k, p in ctx.manager.presets.items()]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request, model: str) -> Response:
    try:
        ctx = _open(request)
        preset = ctx.manager.presets.get(model)
        if preset is None:
            raise _unknown_model(model, ctx)
    except ApiError as e:
        return error_response(e)
    return JSONResponse(model_json(model, preset.source, preset.local))


async def chat_completions(request: Request) -> Response:
    return await _serve(request, parse_chat)


async def completions(request: Request) -> Response:
    return await _serve(request, parse_completion)


async def tokenize(request: Request) -> Response:
    """{"model", "prompt"} or {"model", "messages", "add_generation_prompt"} -> {"count", "tokens",
    "max_model_len"}: the ids a completion of the same body would read."""
    return await _token_route(request, _tokenize)


async def detokenize(request: Request) -> Response:
    """{"model", "tokens": [ids]} -> {"prompt": text}."""
    return await _token_route(request, _detokenize)


async def _token_route(request: Request, fn: Callable[[AppContext, dict], dict]) -> Response:
    try:
        ctx = _open(request)
        body = await _read_json(request, ctx.settings)
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise bad("the body must be an object with a 'model'", "model", "missing_model")
        ctx.manager.resolve(body["model"])
        out = await anyio.to_thread.run_sync(fn, ctx, body, limiter=_threads(request, ctx))
    except Exception as e:
        return error_response(api_error(e))
    return JSONResponse(out)


def _tokenize(ctx: AppContext, body: dict) -> dict:
    lm = ctx.manager.get(body["model"])
    if body.get("messages") is not None:
        req = parse_chat({"model": body["model"], "messages": body["messages"]}, ctx.settings)
        messages = _with_tools(req.messages, None, bool(lm.chat_format.template))
        if body.get("add_generation_prompt", True) is not True:
            text = chat.render(lm.chat_format, messages, add_generation_prompt=False)
            ids = chat.encode(lm.tokenizer, text)
        else:
            ids, _ = chat.encode_messages(lm.chat_format, lm.tokenizer, messages)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad("'prompt' must be a string (or send 'messages')", "prompt")
        _check_size(ctx, len(prompt), "prompt")
        ids = chat.encode(lm.tokenizer, prompt)
    return {"count": len(ids), "max_model_len": None, "tokens": ids}


def _detokenize(ctx: AppContext, body: dict) -> dict:
    lm = ctx.manager.get(body["model"])
    ids, vocab = body.get("tokens"), lm.engine.config.vocab_size
    if not isinstance(ids, list) or len(ids) > ctx.settings.max_upload_chars or \
            not all(type(t) is int and 0 <= t < vocab for t in ids):
        raise bad(f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
    return {"prompt": lm.tokenizer.decode(ids)}


# -- one request -----------------------------------------------------------------------------
@dataclass
class _Job:
    lm: LoadedModel
    request: CompletionRequest
    shape: Shape
    lead: str  # the chat format's text between "Assistant:" and a reply, not part of the reply
    logprobs: int | None = None  # as asked: None, or the alternatives per token
    echo: str | None = None  # completions with echo: the prompt's text, before each choice's reply
    tool_call: bool = False  # the reply is a forced call (tool_choice "required" or named)

    def token_text(self, token_id: int) -> str:
        return self.lm.tokenizer.decode([token_id])

    def chat_logprobs(self, chunk: CompletionChunk) -> Json:
        return chat_logprobs([(self.token_text(t), lp, [(self.token_text(a), v) for a, v in top])
                              for t, lp, top in chunk.logprobs])

    def completion_logprobs(self, chunk: CompletionChunk, offset: int, first: bool) -> Json:
        entries = []
        if first and self.echo is not None and chunk.prompt_logprobs is not None:
            prompt = self.request.prompt_ids
            for tid, scored in zip(prompt, chunk.prompt_logprobs):
                value, top = (None, None) if scored is None else (scored[0], [(self.token_text(a), v)
                                                                             for a, v in scored[1]])
                entries.append((self.token_text(tid), value, top))
            offset -= len(self.echo)
        entries += [(self.token_text(t), lp, [(self.token_text(a), v) for a, v in top])
                    for t, lp, top in chunk.logprobs]
        return completion_logprobs(entries, offset)


async def _serve(request: Request, parse: Callable[[object, Settings], ApiRequest]) -> Response:
    reply = None
    try:
        ctx = _open(request)
        req = parse(await _read_json(request, ctx.settings), ctx.settings)
        threads = _threads(request, ctx)
        space = namespace(request, req, ctx.settings.cache_secret)
        job = await anyio.to_thread.run_sync(_prepare, ctx, req, space, limiter=threads)
        reply = _Reply(complete(job.lm, job.request), threads)
        first = await reply.next()  # a busy scheduler refuses here, before any byte is sent
    except Exception as e:
        if reply is not None:
            await reply.close()
        return error_response(api_error(e))
    if req.stream:
        return EventStream(_events(reply, first, job, req.include_usage), media_type="text/event-stream",
                           headers=SSE_HEADERS)
    return await _whole(request, reply, first, job)


def _open(request: Request) -> AppContext:
    """The app's context, once the request's key (if the server has one) checks out."""
    ctx = request.app.get_blocks().fm_context
    key = ctx.settings.api_key
    if key:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return ctx


async def _read_json(request: Request, settings: Settings) -> object:
    """The body as JSON; one larger than any allowed prompt could need is refused unread (413)."""
    limit = 6 * settings.max_upload_chars + BODY_SLACK  # \uXXXX: six bytes for a character
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise _too_long(f"the request body is over {limit:,} bytes", settings)
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    _check_json(value)
    return value


def _check_json(value: object) -> None:
    """Refuse a body nested deeper than MAX_JSON_DEPTH, or with a string that is not valid Unicode
    (JSON's \\ud800 escape writes a lone surrogate, which no tokenizer reads): a 400 each, before
    any field is read."""
    if isinstance(value, str):
        _check_unicode(value)
    stack = [(value, 1)] if isinstance(value, (list, dict)) else []
    while stack:  # containers only: a list of a million token ids stacks nothing
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(item, dict):
            for key in item:
                _check_unicode(key)
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, str):
                _check_unicode(child)
            elif isinstance(child, (list, dict)):
                stack.append((child, depth + 1))


def _check_unicode(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise bad("the request body has a string that is not valid Unicode (a lone surrogate such as "
                      "\\ud800)", None, "invalid_unicode") from None


def _too_deep() -> ApiError:
    return bad(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep", None, "invalid_json")


def namespace(request: Request, req: ApiRequest, secret: str = "") -> str:
    """The prefix-cache namespace of a request, per client: its bearer token (or none) with its
    cache_salt, else with its `user`; else its token with its address; else its address. Clients
    that share a key (FM_DEMO_API_KEY) are told apart by salt, user or address."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    address = request.client.host if request.client else "unknown"
    if req.cache_salt:
        return derive(API_SALT, token, req.cache_salt, secret=secret)
    if req.user:
        return derive(API_USER, token, req.user, secret=secret)
    if token:
        return derive(API_KEY, token, address, secret=secret)
    return derive(API_ADDRESS, address, secret=secret)


def _prepare(ctx: AppContext, req: ApiRequest, space: str) -> _Job:
    """Model, prompt ids and completion request (in a worker thread: it may load the model)."""
    ctx.manager.resolve(req.model)  # an unknown model is refused before anything loads
    param = "messages" if req.messages else "prompt"
    # characters (a message's, before the format's own text is counted), or token ids (each stands
    # for at least one character): a prompt over the limit is refused before the model loads
    text = req.prompt if not req.messages else "".join(m["content"] for m in req.messages)
    _check_size(ctx, len(text), param)
    lm = ctx.manager.get(req.model)
    fmt = lm.chat_format
    keep: tuple[int, ...] = ()  # message ends: states kept there serve requests that share them
    forced = bool(req.tools) and req.tool_choice not in ("none", "auto")
    if req.messages:
        messages = _with_tools(req.messages, req.tools if forced else None, bool(fmt.template))
        try:
            _check_size(ctx, len(chat.render(fmt, messages, add_generation_prompt=True)), param)
            ids, keep = chat.encode_messages(fmt, lm.tokenizer, messages)
        except ValueError as e:  # a role the checkpoint's chat template does not render
            raise bad(f"the messages cannot be rendered by this model's chat format: {e}", param) from None
    else:
        ids = chat.encode(lm.tokenizer, text) if isinstance(text, str) else list(text)
    if not ids:
        raise bad("the prompt is empty", param)
    vocab = lm.engine.config.vocab_size
    if not all(0 <= t < vocab for t in ids):
        raise bad(f"token ids must be in [0, {vocab})", param)
    for name, given in (("logit_bias", [t for t, _ in req.logit_bias]), ("stop_token_ids", req.stop_token_ids)):
        if any(t >= vocab for t in given):
            raise bad(f"'{name}' token ids must be in [0, {vocab})", name)
    stop_ids = () if req.ignore_eos else tuple(chat.stop_token_ids(fmt, lm.tokenizer))
    stop_ids = tuple(dict.fromkeys(stop_ids + req.stop_token_ids))
    grammar = _grammar(lm, req, stop_ids, forced) if forced or req.response_format else None
    options = DecodeOptions(req.logprobs, req.logit_bias, req.frequency_penalty, req.presence_penalty,
                            req.min_tokens, grammar)
    stops = req.stop + (fmt.stop_strings if req.messages else ())
    scored = req.logprobs if req.echo and req.logprobs is not None else None
    creq = CompletionRequest(ids, req.sampling, req.max_tokens, stop_ids, stops, space, keep, options, req.n, scored)
    kind = "chatcmpl" if req.messages else "cmpl"
    shape = Shape(req.messages is not None, f"{kind}-{secrets.token_hex(12)}", int(time.time()), req.model)
    echo = None
    if req.echo:
        echo = text if isinstance(text, str) else lm.tokenizer.decode(ids)
    return _Job(lm, creq, shape, fmt.reply_lead if req.messages else "", req.logprobs, echo, forced)


def _with_tools(messages: list[dict[str, str]], tools: list | None, template: bool) -> list[dict[str, str]]:
    """The messages as the model reads them: a forced call's functions described in the system
    message; tool results as "tool" turns where the checkpoint's template renders roles, else as
    user turns that say what they are."""
    out = [m if m["role"] != "tool" or template else {"role": "user", "content": f"Tool result: {m['content']}"}
           for m in messages]
    if tools:
        listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools if isinstance(t, dict))
        note = ("Reply with a JSON object {\"name\": ..., \"arguments\": {...}} that calls one of these "
                f"functions:\n{listing}")
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{note}"}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def _grammar(lm: LoadedModel, req: ApiRequest, stop_ids: tuple[int, ...], forced: bool):
    """The compiled grammar of a response_format or a forced tool call (a 400 when it cannot be)."""
    from ..engine.constraints import ConstraintError, compile_grammar, tool_call_schema

    param = "tools" if forced else "response_format"
    if not stop_ids:
        raise bad("structured output needs an end token: it cannot be combined with 'ignore_eos'", param)
    try:
        if forced:
            kind, schema = "json_schema", tool_call_schema(req.tools, req.tool_choice)
        else:
            kind, schema = req.response_format
        return compile_grammar(kind, schema, lm.tokenizer, lm.engine.config.vocab_size, stop_ids)
    except ConstraintError as e:
        raise bad(str(e), param, "invalid_schema") from None


def _check_size(ctx: AppContext, size: int, param: str) -> None:
    if size > ctx.settings.max_upload_chars:
        raise _too_long(f"the prompt is {size:,} characters", ctx.settings, param)


class _Reply:
    """A completion's chunks, each taken in a worker thread; close() cancels the row."""

    def __init__(self, chunks: Iterator[CompletionChunk], threads: anyio.CapacityLimiter):
        self._chunks, self._threads, self._closed = chunks, threads, False

    async def next(self) -> CompletionChunk:
        chunk = await anyio.to_thread.run_sync(next, self._chunks, None, limiter=self._threads)
        if chunk is None:  # complete() always ends with a finish_reason; this is a bug guard
            raise RuntimeError("the completion ended without a finish reason")
        return chunk

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):  # also when the stream was cancelled (client gone)
            await anyio.to_thread.run_sync(self._chunks.close, limiter=self._threads)


class _Lead:
    """Drops the format's reply lead (the base transcript's space after "Assistant:") from the
    start of a streamed reply, holding back text until it is clear."""

    def __init__(self, lead: str):
        self.lead, self.buf = lead, ""

    def push(self, text: str, final: bool) -> str:
        if not self.lead:
            return text
        self.buf += text
        if len(self.buf) < len(self.lead) and self.lead.startswith(self.buf) and not final:
            return ""
        out = self.buf.removeprefix(self.lead)
        self.lead, self.buf = "", ""
        return out


class _Choices:
    """What a response has written of each of its n choices: text (after the reply lead), finish,
    usage, and where the next token's text starts (completions' text_offset)."""

    def __init__(self, job: _Job):
        n = job.request.n
        self.job, self.leads = job, [_Lead(job.lead) for _ in range(n)]
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.logprobs: list[list[Json]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.usage: list[Usage | None] = [None] * n
        self.offsets = [len(job.echo or "") for _ in range(n)]
        self.started = [False] * n

    def take(self, chunk: CompletionChunk) -> tuple[str, Json | None]:
        """The chunk's text and log-probabilities, recorded for its choice."""
        i, job = chunk.index, self.job
        first = not self.started[i]
        self.started[i] = True
        text = self.leads[i].push(chunk.text, chunk.finish_reason is not None)
        if first and job.echo is not None:
            text = job.echo + text
        lp = None
        if job.logprobs is not None and (chunk.logprobs or (first and chunk.prompt_logprobs is not None)):
            lp = job.chat_logprobs(chunk) if job.shape.chat else job.completion_logprobs(chunk, self.offsets[i], first)
        self.offsets[i] += len(text) - (len(job.echo) if first and job.echo is not None else 0)
        self.texts[i].append(text)
        if lp is not None:
            self.logprobs[i].append(lp)
        if chunk.finish_reason:
            self.finish[i], self.usage[i] = chunk.finish_reason, chunk.usage
        return text, lp

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def total(self) -> Usage:
        first = self.usage[0] or Usage()
        return Usage(prompt_tokens=first.prompt_tokens, cached_tokens=first.cached_tokens,
                     completion_tokens=sum(u.completion_tokens for u in self.usage if u is not None))

    def tool_calls(self, i: int) -> list[Json] | None:
        """A forced call's text as OpenAI's tool_calls (None when the reply was cut before it parsed)."""
        try:
            call = json.loads("".join(self.texts[i]))
            return [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
                     "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}]
        except (ValueError, KeyError, TypeError):
            return None

    def merged_logprobs(self, i: int) -> Json | None:
        if self.job.logprobs is None:
            return None
        parts = self.logprobs[i]
        if self.job.shape.chat:
            return {"content": [e for p in parts for e in p["content"]], "refusal": None}
        return {k: [v for p in parts for v in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}

    def choice_json(self, i: int) -> Json:
        calls = self.tool_calls(i) if self.job.tool_call else None
        finish = "tool_calls" if calls else self.finish[i]
        return self.job.shape.choice(i, "".join(self.texts[i]), finish, False, self.merged_logprobs(i), calls)


async def _whole(request: Request, reply: _Reply, chunk: CompletionChunk, job: _Job) -> Response:
    choices = _Choices(job)
    try:
        while True:
            choices.take(chunk)
            if choices.done:
                break
            if await request.is_disconnected():  # nobody to answer: free the rows
                return Response(status_code=499)
            chunk = await reply.next()
    except Exception as e:
        return error_response(api_error(e))
    finally:
        await reply.close()
    return JSONResponse(job.shape.response([choices.choice_json(i) for i in range(job.request.n)], choices.total()))


async def _events(reply: _Reply, chunk: CompletionChunk, job: _Job, with_usage: bool) -> AsyncIterator[str]:
    """The SSE body: OpenAI's chunks (each choice's with its index), a usage chunk when asked, then
    [DONE]; an error mid-stream is sent as an error event (OpenAI's clients raise it), then [DONE].
    A forced tool call is sent whole when it ends, as one tool_calls delta."""
    shape, choices = job.shape, _Choices(job)
    try:
        while True:
            i = chunk.index
            if not choices.started[i] and (head := shape.first_chunk(i, with_usage)) is not None:
                yield _sse(head)
            text, lp = choices.take(chunk)
            if (text or lp) and not job.tool_call:
                yield _sse(shape.chunk(shape.choice(i, text, None, True, lp), with_usage))
            if chunk.finish_reason:
                calls = choices.tool_calls(i) if job.tool_call else None
                if job.tool_call and not calls:  # cut short: the text as it is
                    yield _sse(shape.chunk(shape.choice(i, "".join(choices.texts[i]), None, True), with_usage))
                finish = "tool_calls" if calls else chunk.finish_reason
                yield _sse(shape.chunk(shape.choice(i, None, finish, True, None, calls), with_usage))
            if choices.done:
                if with_usage:
                    yield _sse(shape.usage_chunk(choices.total()))
                break
            chunk = await reply.next()
    except Exception as e:
        yield _sse(api_error(e).body())
    finally:
        await reply.close()
    yield "data: [DONE]\n\n"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, so a client gone mid-stream
    (Starlette cancels the send loop then) still ends the completion at once, not at GC."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def _threads(request: Request, ctx: AppContext) -> anyio.CapacityLimiter:
    """The API's worker-thread limiter (one per app, made in its event loop): as many as the
    scheduler has rows and waiting places, so API streams never take the threads Gradio's own
    events run in."""
    state = request.app.state
    limiter = getattr(state, "fm_api_threads", None)
    if limiter is None:
        limiter = state.fm_api_threads = anyio.CapacityLimiter(ctx.settings.event_concurrency())
    return limiter


# -- errors ----------------------------------------------------------------------------------
def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _too_long(what: str, settings: Settings, param: str | None = None) -> ApiError:
    return ApiError(413, f"Prompt too long: {what}; this server takes up to {settings.max_upload_chars:,} "
                    "characters (FM_DEMO_MAX_UPLOAD_CHARS).", param, "prompt_too_long")


def _unknown_model(model: str, ctx: AppContext) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist; available: {', '.join(ctx.manager.presets)}.",
                    "model", "model_not_found")


def api_error(e: BaseException) -> ApiError:
    """An exception as the error a client gets; unexpected ones are logged with their trace."""
    from ..models import ModelLoadError

    if isinstance(e, ApiError):
        return e
    if isinstance(e, SamplingError):  # parsing checks these; a cluster replica checks them again
        return bad(str(e), e.field)
    if isinstance(e, RequestRefused):  # what this model's runner cannot serve (n beyond its rows...)
        return bad(str(e))
    if isinstance(e, SchedulerBusy):
        return ApiError(503, str(e), code="server_busy", headers={"Retry-After": "1"})
    if isinstance(e, SchedulerClosed):
        return ApiError(503, str(e), code="model_unloaded", headers={"Retry-After": "1"})
    if isinstance(e, RequestFailed):  # this request alone failed in the scheduler; others went on
        return ApiError(500, str(e), code="request_failed")
    if isinstance(e, ModelLoadError):
        if e.reason == "unknown_model":
            return ApiError(404, str(e), "model", "model_not_found")
        return ApiError(503, str(e), "model", f"model_{e.reason}")
    if type(e).__name__ == "OutOfMemoryError":
        return ApiError(503, "The device ran out of memory; try a shorter prompt or fewer tokens.",
                        code="out_of_memory")
    log.exception("unexpected error in the OpenAI-compatible API", exc_info=e)
    return ApiError(500, f"Something went wrong on the server ({type(e).__name__}); the details are in "
                    "the server log.", code="internal_error")

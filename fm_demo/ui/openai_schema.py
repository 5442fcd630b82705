"""The OpenAI-compatible API's wire format: request bodies checked into ApiRequest, responses and
stream chunks in OpenAI's shapes, errors in OpenAI's error shape.

Pure functions of JSON values; openai_api.py runs them against the models. Served beyond the
basic fields (each checked here, with a 400 that names the field when refused):
- n (up to Settings.max_choices): one read of the prompt, its state copied into n rows; a seeded
  request's choice i samples with seed + i, so seeded replies reproduce.
- logprobs / top_logprobs (chat, up to 20 alternatives) and logprobs (completions, up to 5):
  log_softmax of the logits each token was drawn from after penalties, logit bias and the grammar
  mask, divided by the temperature (1 when greedy), before the top-k / top-p cuts
  (engine/decode.py).
- echo (completions): the prompt's text before the reply; with logprobs, every prompt token's
  log-probability too (the first: null), computed by reading the prompt from its start in the
  usual chunks (the prefix cache holds states, not logits); max_tokens 0 then scores only.
- logit_bias, frequency_penalty, presence_penalty (OpenAI's additive formula on this reply's
  token counts), and vLLM's min_tokens, ignore_eos and stop_token_ids.
- response_format json_object / json_schema and tools with tool_choice "required" or a named
  function: a grammar's token mask (engine/constraints.py) makes the reply parse. With
  tool_choice "auto" (the default when tools are given) the model answers in text: neither model
  was trained to decide when to call a tool, so the server never guesses one from free text.
  Tool results come back as "tool" messages, rendered into the prompt.
Refused: best_of > 1, suffix, and image, audio and file content parts (the models read text).
repetition_penalty, top_k and cache_salt (vLLM's names) are accepted too.
Fields this server does not know are ignored, as OpenAI's clients send new ones over time.

max_tokens (or max_completion_tokens) above Settings.max_new_tokens_cap is clamped to the cap
(finish_reason "length" then says the reply was cut), as the browser's slider is; the default is
Settings.max_new_tokens. Sampling defaults are OpenAI's (temperature 1, top_p 1), not the UI's.
Sampling fields obey the engine's LIMITS (fm_demo/engine/sampling.py), as on every other entry
point, and temperature OpenAI's cap of 2 too; no seed (or null) draws a random one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..engine.decode import MAX_TOP_LOGPROBS
from ..engine.sampling import SamplingError, SamplingParams, checked, narrowed
from ..serving.completion import Usage
from ..stops import MAX_STOP_CHARS, MAX_STOPS
from ..settings import Settings

Json = dict[str, Any]
OPENAI_MAX_TEMPERATURE = 2.0  # OpenAI's documented range is [0, 2], within the engine's LIMITS
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "seed": None}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's cap on /v1/completions
MAX_LOGIT_BIAS = 300  # entries; OpenAI's own limit
MAX_STOP_TOKEN_IDS = 64


class ApiError(Exception):
    """A request the API refuses, with its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> Json:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class ApiRequest:
    model: str
    messages: list[dict[str, str]] | None  # chat: role and text of each message
    prompt: str | list[int] | None  # completions: text or token ids
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    cache_salt: str | None
    user: str | None
    n: int = 1
    logprobs: int | None = None  # None: none; k: each token's log-probability and k alternatives
    echo: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    response_format: tuple[str, dict | None] | None = None  # ("json_object", None) | ("json_schema", schema)
    tools: list | None = None  # with tool_choice "required" or a named function: the reply is a call
    tool_choice: str | dict = "auto"


# -- reading fields --------------------------------------------------------------------------
def _number(body: Json, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"'{name}' must be a number, got {value!r}", name)
    if not lo <= value <= hi:
        raise bad(f"'{name}' must be between {lo:g} and {hi:g}, got {value!r}", name)
    return float(value)


def _int(body: Json, name: str, default: int | None, lo: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {value!r}", name)
    if lo is not None and value < lo:
        raise bad(f"'{name}' must be >= {lo}, got {value}", name)
    return value


def _flag(body: Json, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _text(body: Json, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad(f"'{name}' must be a string, got {value!r}", name)
    return value


def _unsupported(body: Json, name: str, allowed: tuple = (None,), why: str = "") -> None:
    value = body.get(name)
    if value not in allowed and value != []:
        raise bad(f"'{name}' is not supported by this server{why}", name, "unsupported_parameter")


# -- requests --------------------------------------------------------------------------------
def parse_chat(body: Any, settings: Settings) -> ApiRequest:
    """A /v1/chat/completions body, checked."""
    body = _object(body)
    _unsupported(body, "functions", why=": send 'tools' instead")
    _unsupported(body, "function_call", (None, "none", "auto"), ": send 'tool_choice' instead")
    top = _int(body, "top_logprobs", None, 0)
    if top is not None and top > MAX_TOP_LOGPROBS:
        raise bad(f"'top_logprobs' must be from 0 to {MAX_TOP_LOGPROBS}, got {top}", "top_logprobs")
    if _flag(body, "logprobs"):
        logprobs = top or 0
    elif top:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        logprobs = None
    max_tokens = body.get("max_completion_tokens")
    key = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    tools, choice = _tools(body)
    return _request(body, settings, key, messages=_messages(body.get("messages")), logprobs=logprobs,
                    response_format=_response_format(body.get("response_format")), tools=tools, tool_choice=choice)


def parse_completion(body: Any, settings: Settings) -> ApiRequest:
    """A /v1/completions body, checked."""
    body = _object(body)
    _unsupported(body, "suffix", (None, ""))
    logprobs = _int(body, "logprobs", None, 0)
    if logprobs is not None and logprobs > MAX_COMPLETION_LOGPROBS:
        raise bad(f"'logprobs' must be from 0 to {MAX_COMPLETION_LOGPROBS}, got {logprobs}", "logprobs")
    if _int(body, "best_of", 1, 1) != 1:
        raise bad("'best_of' must be 1: n replies are sampled independently, none is ranked", "best_of",
                  "unsupported_parameter")
    echo = _flag(body, "echo")
    return _request(body, settings, "max_tokens", prompt=_prompt(body.get("prompt")), logprobs=logprobs,
                    echo=echo)


def _object(body: Any) -> Json:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    return body


def _request(body: Json, settings: Settings, max_key: str, messages=None, prompt=None, echo: bool = False,
             **extra) -> ApiRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: one of the ids GET /v1/models lists", "model", "missing_model")
    n = _int(body, "n", 1, 1)
    if n > settings.max_choices:
        raise bad(f"'n' must be from 1 to {settings.max_choices} on this server, got {n}", "n")
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    salt = _text(body, "cache_salt")
    if salt == "":
        raise bad("'cache_salt' must not be empty", "cache_salt")
    max_tokens = _max_tokens(body, max_key, settings, allow_zero=echo)
    return ApiRequest(model, messages, prompt, _sampling(body), max_tokens,
                      _stops(body.get("stop")), stream, stream and _flag(options, "include_usage"), salt,
                      _text(body, "user"), n=n, echo=echo, logit_bias=_logit_bias(body.get("logit_bias")),
                      frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                      presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
                      min_tokens=min(_int(body, "min_tokens", 0, 0), max_tokens),
                      ignore_eos=_flag(body, "ignore_eos"), stop_token_ids=_token_ids(body, "stop_token_ids"),
                      **extra)


def _sampling(body: Json) -> SamplingParams:
    """The body's sampling fields under the engine's LIMITS, temperature also under OpenAI's
    documented cap of 2; a refused value is a 400 naming its field, in the engine's words."""
    given = {name: default if body.get(name) is None else body[name]
             for name, default in SAMPLING_DEFAULTS.items()}
    if type(given["top_k"]) is int and given["top_k"] == -1:
        given["top_k"] = 0  # vLLM's -1 means off, as 0 does here
    try:
        checked("temperature", given["temperature"], narrowed("temperature", OPENAI_MAX_TEMPERATURE))
        return SamplingParams(**given)
    except SamplingError as e:
        raise bad(str(e), e.field) from None


def _max_tokens(body: Json, key: str, settings: Settings, allow_zero: bool = False) -> int:
    """The reply's length; 0 only with echo (score the prompt, write nothing)."""
    n = _int(body, key, None, 0 if allow_zero else 1)
    return 0 if n == 0 else settings.clamp_new_tokens(n)


def _logit_bias(bias: Any) -> tuple[tuple[int, float], ...]:
    """{"token id": bias from -100 to 100}; ids are checked against the model's vocabulary later."""
    if bias is None:
        return ()
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids", "logit_bias")
    out = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9):
            raise bad(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad(f"'logit_bias' values must be numbers from -100 to 100, got {value!r}", "logit_bias")
        out.append((int(key), float(value)))
    return tuple(out)


def _token_ids(body: Json, name: str) -> tuple[int, ...]:
    ids = body.get(name)
    if ids is None:
        return ()
    if not isinstance(ids, list) or len(ids) > MAX_STOP_TOKEN_IDS or not all(
            type(t) is int and 0 <= t < 2**31 for t in ids):
        raise bad(f"'{name}' must be a list of at most {MAX_STOP_TOKEN_IDS} token ids", name)
    return tuple(ids)


def _response_format(fmt: Any) -> tuple[str, dict | None] | None:
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json_object", None)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad("'response_format.json_schema' must be an object with a 'schema' object",
                      "response_format")
        return ("json_schema", spec.get("schema") or {})
    raise bad("'response_format.type' must be text, json_object or json_schema", "response_format")


def _tools(body: Json) -> tuple[list | None, str | dict]:
    """The tools and how the reply may use them: "none" or "auto" (text), "required" or a named
    function (a constrained call); their schemas are checked when they are compiled."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and (not isinstance(tools, list) or not tools):
        raise bad("'tools' must be a non-empty list of functions", "tools")
    if choice is None:
        return tools, "auto"
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise bad("'tool_choice' \"required\" needs 'tools'", "tool_choice")
        return tools, choice
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) and \
        isinstance(choice.get("function"), dict) else None
    if not isinstance(named, str) or not tools:
        raise bad("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": "
                  "{\"name\": ...}} naming one of 'tools'", "tool_choice")
    return tools, choice


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"'stop' takes at most {MAX_STOPS} strings", "stop")
    if sum(map(len, stops)) > MAX_STOP_CHARS:
        raise bad(f"'stop' strings may hold at most {MAX_STOP_CHARS} characters together", "stop")
    return tuple(stops)


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{param} must be an object", param)
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"{param}.role {role!r}: roles are system, developer, user, assistant and tool",
                      f"{param}.role")
        if m.get("function_call"):
            raise bad(f"{param}: send 'tool_calls' instead of 'function_call'", f"{param}.function_call",
                      "unsupported_parameter")
        content = "" if m.get("content") is None and (m.get("tool_calls") or role == "assistant") else \
            _content(m.get("content"), param)
        if m.get("tool_calls"):
            content += _calls_text(m["tool_calls"], param)
        out.append({"role": CHAT_ROLES[role], "content": content})
    return out


def _calls_text(calls: Any, param: str) -> str:
    """An assistant message's tool calls as the text the model would have written: one JSON object
    {"name", "arguments"} per call, as a forced call is generated."""
    if not isinstance(calls, list):
        raise bad(f"{param}.tool_calls must be a list", f"{param}.tool_calls")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                not isinstance(fn.get("arguments", "{}"), str):
            raise bad(f"{param}.tool_calls: each needs function.name and function.arguments (a JSON string)",
                      f"{param}.tool_calls")
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            raise bad(f"{param}.tool_calls: function.arguments is not JSON", f"{param}.tool_calls") from None
        out.append(json.dumps({"name": fn["name"], "arguments": arguments}, ensure_ascii=False))
    return "\n".join(out)


def _content(content: Any, param: str) -> str:
    """A message's text: a string, or text parts (joined); images and other media are refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "input_image", "image", "input_audio", "file"):
                raise bad(f"{param}.content[{j}]: {kind} content is not supported; these models read text "
                          "only", f"{param}.content", "unsupported_content")
            else:
                raise bad(f"{param}.content[{j}] must be a text part", f"{param}.content")
        return "".join(texts)
    raise bad(f"{param}.content must be a string or a list of text parts", f"{param}.content")


def _prompt(prompt: Any) -> str | list[int]:
    """Text, [text], or token ids ([int] or [[int]]); several prompts in one request are refused."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):  # bool is no token id
        return prompt
    raise bad("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")


# -- responses -------------------------------------------------------------------------------
def usage_json(u: Usage) -> Json:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


@dataclass(frozen=True)
class Shape:
    """How one response is written: chat.completion(.chunk) or text_completion."""

    chat: bool
    id: str
    created: int
    model: str

    def _head(self, chunk: bool) -> Json:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(self, index: int, text: str | None, finish: str | None, chunk: bool, logprobs: Json | None = None,
               tool_calls: list[Json] | None = None) -> Json:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        if chunk:
            delta: Json = {} if text is None else {"content": text}
            if tool_calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        message: Json = {"role": "assistant", "content": None if tool_calls else text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}

    def response(self, choices: list[Json], usage: Usage) -> Json:
        return {**self._head(False), "choices": choices, "usage": usage_json(usage)}

    def chunk(self, choice: Json, with_usage: bool = False) -> Json:
        """One stream chunk; with_usage: the stream sends a usage chunk at its end, so every
        chunk carries "usage": null, as OpenAI's do."""
        out = {**self._head(True), "choices": [choice]}
        return {**out, "usage": None} if with_usage else out

    def first_chunk(self, index: int, with_usage: bool) -> Json | None:
        """Chat streams open each choice with the assistant's role and empty content."""
        if not self.chat:
            return None
        choice = self.choice(index, "", None, True)
        choice["delta"] = {"role": "assistant", "content": ""}
        return self.chunk(choice, with_usage)

    def usage_chunk(self, usage: Usage) -> Json:
        return {**self._head(True), "choices": [], "usage": usage_json(usage)}


def chat_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> Json:
    """OpenAI's chat `logprobs`: (token text, log-probability, alternatives) per token."""
    def one(text: str, lp: float) -> Json:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", "surrogatepass"))}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, v) for a, v in top]} for t, lp, top in entries],
            "refusal": None}


def completion_logprobs(entries: list[tuple[str, float | None, list[tuple[str, float]] | None]],
                        offset: int) -> Json:
    """OpenAI's legacy completions `logprobs`; text_offset counts characters from `offset` (where
    these tokens' text starts in the choice's text)."""
    offsets = []
    for text, _, _ in entries:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if top is None else dict(top) for _, _, top in entries],
            "text_offset": offsets}


def model_json(key: str, source: str, local: bool) -> Json:
    owner = "local" if local or "/" not in source else source.split("/", 1)[0]
    return {"id": key, "object": "model", "created": 0, "owned_by": owner}

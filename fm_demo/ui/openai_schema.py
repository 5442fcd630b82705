"""The OpenAI-compatible API's wire format: request bodies checked into ApiRequest, responses and
stream chunks in OpenAI's shapes, errors in OpenAI's error shape.

Pure functions of JSON values; openai_api.py runs them against the models. What is refused, and
why (each with a 400 that names the field):
- n > 1, best_of > 1, echo, suffix, logprobs, logit_bias: one greedy or sampled reply per request
  is what the scheduler serves; these would need more rows or per-token log-probabilities.
- tools, functions, a tool_choice other than none/auto, tool and function messages, and a
  response_format other than text: the models were not trained for tool calls or JSON modes.
- image, audio and file content parts: the models read text.
- frequency_penalty and presence_penalty other than 0. They are additive (logit -= count * f +
  [count > 0] * p) while the engine's repetition_penalty is CTRL's multiplicative one (divide a
  positive logit, multiply a negative one), so no value of one gives the other. repetition_penalty
  is accepted as an extra field instead, as are top_k and cache_salt (vLLM's names).
Fields this server does not know are ignored, as OpenAI's clients send new ones over time.

max_tokens (or max_completion_tokens) above Settings.max_new_tokens_cap is clamped to the cap
(finish_reason "length" then says the reply was cut), as the browser's slider is; the default is
Settings.max_new_tokens. Sampling defaults are OpenAI's (temperature 1, top_p 1), not the UI's.
Sampling fields obey the engine's LIMITS (fm_demo/engine/sampling.py), as on every other entry
point, and temperature OpenAI's cap of 2 too; no seed (or null) draws a random one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..engine.sampling import SamplingError, SamplingParams, checked, narrowed
from ..serving.completion import Usage
from ..settings import Settings

Json = dict[str, Any]
MAX_STOPS = 16
OPENAI_MAX_TEMPERATURE = 2.0  # OpenAI's documented range is [0, 2], within the engine's LIMITS
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "seed": None}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


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
    for name in ("tools", "functions"):
        _unsupported(body, name, why=": the models were not trained for tool calls")
    _unsupported(body, "tool_choice", (None, "none", "auto"), ": no tool calls")
    _unsupported(body, "function_call", (None, "none", "auto"), ": no tool calls")
    _unsupported(body, "logprobs", (None, False), ": no log-probabilities are returned")
    _unsupported(body, "top_logprobs", (None, 0), ": no log-probabilities are returned")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("'response_format' may only be {\"type\": \"text\"}: the models have no JSON mode",
                  "response_format", "unsupported_parameter")
    max_tokens = body.get("max_completion_tokens")
    key = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    return _request(body, settings, key, messages=_messages(body.get("messages")))


def parse_completion(body: Any, settings: Settings) -> ApiRequest:
    """A /v1/completions body, checked."""
    body = _object(body)
    _unsupported(body, "echo", (None, False))
    _unsupported(body, "suffix", (None, ""))
    _unsupported(body, "logprobs", (None, 0), ": no log-probabilities are returned")
    if _int(body, "best_of", 1, 1) != 1:
        raise bad("'best_of' must be 1: one reply per request", "best_of", "unsupported_parameter")
    return _request(body, settings, "max_tokens", prompt=_prompt(body.get("prompt")))


def _object(body: Any) -> Json:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    return body


def _request(body: Json, settings: Settings, max_key: str, messages=None, prompt=None) -> ApiRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: one of the ids GET /v1/models lists", "model", "missing_model")
    if _int(body, "n", 1, 1) != 1:
        raise bad("'n' must be 1: one reply per request", "n", "unsupported_parameter")
    _unsupported(body, "logit_bias", (None, {}))
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise bad(f"'{name}' is not supported (only 0): this engine's penalty is CTRL's multiplicative "
                      "one; send 'repetition_penalty' (> 1 discourages repeats) instead", name,
                      "unsupported_parameter")
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    salt = _text(body, "cache_salt")
    if salt == "":
        raise bad("'cache_salt' must not be empty", "cache_salt")
    return ApiRequest(model, messages, prompt, _sampling(body), _max_tokens(body, max_key, settings),
                      _stops(body.get("stop")), stream, stream and _flag(options, "include_usage"), salt,
                      _text(body, "user"))


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


def _max_tokens(body: Json, key: str, settings: Settings) -> int:
    n = _int(body, key, None, 1)
    return settings.clamp_new_tokens(n)


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"'stop' takes at most {MAX_STOPS} strings", "stop")
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
            why = "tool calls are not supported" if role in ("tool", "function") else \
                "roles are system, developer, user and assistant"
            raise bad(f"{param}.role {role!r}: {why}", f"{param}.role")
        if m.get("tool_calls") or m.get("function_call"):
            raise bad(f"{param}: tool calls are not supported", f"{param}.tool_calls",
                      "unsupported_parameter")
        out.append({"role": CHAT_ROLES[role], "content": _content(m.get("content"), param)})
    return out


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

    def _choice(self, text: str | None, finish: str | None, chunk: bool) -> Json:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if chunk:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def response(self, text: str, finish: str, usage: Usage) -> Json:
        choices = [self._choice(text, finish, False)]
        return {**self._head(False), "choices": choices, "usage": usage_json(usage)}

    def chunk(self, text: str | None, finish: str | None = None, with_usage: bool = False) -> Json:
        """One stream chunk; with_usage: the stream sends a usage chunk at its end, so every
        chunk carries "usage": null, as OpenAI's do."""
        out = {**self._head(True), "choices": [self._choice(text, finish, True)]}
        return {**out, "usage": None} if with_usage else out

    def first_chunk(self, with_usage: bool) -> Json | None:
        """Chat streams open with the assistant's role and empty content."""
        if not self.chat:
            return None
        out = self.chunk("", None, with_usage)
        out["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return out

    def usage_chunk(self, usage: Usage) -> Json:
        return {**self._head(True), "choices": [], "usage": usage_json(usage)}


def model_json(key: str, source: str, local: bool) -> Json:
    owner = "local" if local or "/" not in source else source.split("/", 1)[0]
    return {"id": key, "object": "model", "created": 0, "owned_by": owner}

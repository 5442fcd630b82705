"""Grammar-constrained decoding: a JSON schema (or any JSON object) as a token mask per row.

The library is llguidance, chosen by measuring it against xgrammar and outlines-core on the bundled
tokenizer (bench/constraints.py; README, "Structured output"): it masks a step in a few
microseconds per row, compiles a schema in about a millisecond (outlines-core builds a regex
automaton over the whole vocabulary per schema, hundreds of times slower) and needs no
per-model compile cache to be fast. Its parser runs under fuel limits, so a hostile schema ends in
a clear error, never in unbounded work.

- compile_grammar(kind, schema, tokenizer, vocab_size, stop_ids) -> Grammar, or ConstraintError
  with the library's reason (the API answers 400 with it). JSON is compact: no whitespace between
  tokens, so a small model cannot wander into endless blanks.
- Grammar.matcher() -> Matcher, one per row (engine/decode.py's DecodeRow): allowed(out) fills the
  [V] bool mask of the next token, advance(tok) takes the sampled one. The stop tokens are the
  grammar's end: they are allowed exactly when the JSON is complete, and the row then ends.
- tool_call_schema(tools, choice): the schema of {"name": ..., "arguments": {...}} calling one of
  the functions (or the one named).

The tokenizer's preparation (~ms for the tiny vocabulary, ~1 s for 65k) is done once per model and
stop set and kept.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import torch
from torch import Tensor

LIBRARY = "llguidance"
COMPACT = {"whitespace_flexible": False}  # JsonCompileOptions: "," and ":" with no blanks
_TOKENIZERS: dict[tuple, tuple[object, object]] = {}  # (id, vocab, stops) -> (tokenizer, prepared)
_TOKENIZERS_MAX = 8
_lock = threading.Lock()


class ConstraintError(ValueError):
    """A schema the grammar library cannot use; the message says why."""


def _library():
    try:
        import llguidance
        import llguidance.hf
    except ImportError as e:  # pragma: no cover - llguidance is in requirements.txt
        raise ConstraintError(f"structured output needs the llguidance package ({e})") from None
    return llguidance


def _prepared(tokenizer, vocab_size: int, stop_ids: tuple[int, ...]):
    """llguidance's view of `tokenizer`, made once per (tokenizer, vocabulary size, stop tokens)."""
    key = (id(tokenizer), vocab_size, stop_ids)
    with _lock:
        hit = _TOKENIZERS.get(key)
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
    ll = _library()
    try:
        prepared = ll.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(stop_ids))
    except ValueError as e:  # a slow (Python) tokenizer
        raise ConstraintError(f"this model's tokenizer cannot be constrained: {e}") from None
    with _lock:
        if len(_TOKENIZERS) >= _TOKENIZERS_MAX:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        _TOKENIZERS[key] = (tokenizer, prepared)
    return prepared


def unpack_bits(words: Tensor, out: Tensor) -> None:
    """A packed int32 bitmask (bit j of word i: token 32 i + j) into out [V] bool."""
    bits = np.unpackbits(words.numpy().view(np.uint8), count=out.numel(), bitorder="little")
    out.numpy()[:] = bits.view(np.bool_)


class Grammar:
    """A compiled grammar; each row takes its own matcher, a copy of one made at compile time
    (a copy shares the parser's built tables: about a third less per step than a fresh one)."""

    def __init__(self, text: str, tokenizer, vocab_size: int):
        self.text, self.vocab_size = text, vocab_size
        self._template = _library().LLMatcher(tokenizer, text, log_level=0)
        self._lock = threading.Lock()

    def matcher(self) -> Matcher:
        with self._lock:
            m = self._template.deep_copy()
        return Matcher(m, self.vocab_size)


class Matcher:
    """One row's position in its grammar."""

    def __init__(self, m, vocab_size: int):
        self._m = m
        self._words = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self._check()

    def _check(self) -> None:
        if self._m.is_error():
            raise RuntimeError(f"the grammar failed: {self._m.get_error()}")

    def allowed(self, out: Tensor) -> None:
        """out [V] bool: the tokens the grammar allows next (the stop tokens once it is complete)."""
        self._m.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        self._check()
        unpack_bits(self._words, out)

    def advance(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise RuntimeError(f"the grammar refused token {token}: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete: only a stop token may follow."""
        return self._m.is_stopped() or self._m.is_accepting()


def compile_grammar(kind: str, schema: dict | None, tokenizer, vocab_size: int,
                    stop_ids: tuple[int, ...]) -> Grammar:
    """The grammar of `kind` "json_object" (any JSON object) or "json_schema" (`schema`)."""
    if not stop_ids:
        raise ConstraintError("a grammar needs a stop token to end the reply")
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind != "json_schema" or not isinstance(schema, dict):
        raise ConstraintError(f"unknown constraint {kind!r}: json_object, or json_schema with a schema object")
    ll = _library()
    try:
        text = ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=COMPACT)
    except RecursionError:
        raise ConstraintError("the JSON schema nests too deeply") from None
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConstraintError(f"the JSON schema cannot be compiled: {e}") from None
    prepared = _prepared(tokenizer, vocab_size, tuple(int(t) for t in stop_ids))
    error = ll.LLMatcher.validate_grammar(text, prepared)
    if error:
        raise ConstraintError(f"the JSON schema cannot be compiled: {error}")
    grammar = Grammar(text, prepared, vocab_size)
    try:  # the first mask runs the lexer: a schema too large for the parser's limits fails here
        grammar.matcher().allowed(torch.zeros(vocab_size, dtype=torch.bool))
    except RuntimeError as e:
        raise ConstraintError(str(e)) from None
    return grammar


def _function(tool) -> tuple[str, dict]:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise ConstraintError("each tool needs function.name")
    params = fn.get("parameters") or {"type": "object"}
    if not isinstance(params, dict):
        raise ConstraintError(f"the parameters of {name!r} must be a JSON schema object")
    return name, params


def tool_call_schema(tools: list, choice: str | dict) -> dict:
    """The schema of a call {"name": ..., "arguments": {...}} of one of `tools`, or of the function
    `choice` names ({"type": "function", "function": {"name": ...}})."""
    functions = [_function(t) for t in tools or ()]
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        functions = [f for f in functions if f[0] == wanted]
    if not functions:
        raise ConstraintError("no function to call: 'tool_choice' names none of 'tools'")
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
              "required": ["name", "arguments"], "additionalProperties": False} for name, params in functions]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}

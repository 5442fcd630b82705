"""Grammar-constrained decoding (engine/constraints.py) on the bundled tiny instruct model: every
sampled reply parses and satisfies its schema, the stop tokens are allowed exactly when the JSON
is complete, and schemas the library cannot use fail with a reason instead of failing a row."""

from __future__ import annotations

import json

import pytest
import torch

from fm_demo import chat
from fm_demo.engine import DecodeOptions, SamplingParams
from fm_demo.engine.constraints import ConstraintError, compile_grammar, tool_call_schema
from fm_demo.models import ModelManager
from fm_demo.serving import Request
from fm_demo.settings import Settings

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["city", "town"]},
        "sunny": {"type": "boolean"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["city", "kind", "sunny", "days", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def lm():
    manager = ModelManager(Settings(device="cpu"))
    lm = manager.get("tiny-instruct")
    yield lm
    manager.unload(lm.key)


def stops(lm) -> tuple[int, ...]:
    return tuple(chat.stop_token_ids(lm.chat_format, lm.tokenizer))


def satisfies(value: dict) -> bool:
    p = SCHEMA["properties"]
    return (set(value) == set(p) and isinstance(value["city"], str) and len(value["city"]) <= 12
            and value["kind"] in p["kind"]["enum"] and isinstance(value["sunny"], bool)
            and type(value["days"]) is int and 1 <= value["days"] <= 14
            and len(value["tags"]) <= 3 and set(value["tags"]) <= {"a", "b"})


def test_sampled_replies_always_parse_and_satisfy_the_schema(lm):
    grammar = compile_grammar("json_schema", SCHEMA, lm.tokenizer, lm.engine.config.vocab_size, stops(lm))
    ids, _ = chat.encode_messages(lm.chat_format, lm.tokenizer, [{"role": "user", "content": "Weather?"}])
    replies = [lm.runner.scheduler.submit(Request(ids, SamplingParams(temperature=1.5, seed=s), max_new_tokens=120,
                                                  stop_token_ids=stops(lm), cache=False,
                                                  options=DecodeOptions(grammar=grammar))) for s in range(12)]
    for r in replies:
        toks = [ev.token_id for ev in r]
        assert r.finish_reason == "stop" and toks[-1] in stops(lm)
        text = lm.tokenizer.decode(toks[:-1])
        assert satisfies(json.loads(text)), text


def test_the_stop_tokens_are_allowed_exactly_when_the_json_is_complete(lm):
    vocab = lm.engine.config.vocab_size
    grammar = compile_grammar("json_schema", SCHEMA, lm.tokenizer, vocab, stops(lm))
    reply = json.dumps({"city": "Paris", "kind": "city", "sunny": True, "days": 3, "tags": ["a"]},
                       separators=(",", ":"))
    matcher, allowed = grammar.matcher(), torch.zeros(vocab, dtype=torch.bool)
    for tok in lm.tokenizer.encode(reply, add_special_tokens=False):
        matcher.allowed(allowed)
        assert allowed[tok] and not allowed[list(stops(lm))].any()
        matcher.advance(tok)
    matcher.allowed(allowed)
    assert matcher.done and set(allowed.nonzero().flatten().tolist()) == set(stops(lm))


def test_a_token_outside_the_mask_fails_the_row_not_the_process(lm):
    grammar = compile_grammar("json_object", None, lm.tokenizer, lm.engine.config.vocab_size, stops(lm))
    matcher = grammar.matcher()
    with pytest.raises(RuntimeError, match="refused"):
        matcher.advance(lm.tokenizer.encode("x", add_special_tokens=False)[0])  # JSON starts with "{"


@pytest.mark.parametrize("schema, reason", [
    ({"type": "no-such-type"}, "cannot be compiled"),
    ({"$ref": "#/$defs/missing"}, "cannot be compiled"),
    ({"type": "string", "pattern": "(unclosed"}, "cannot be compiled"),
    (None, "schema"),
])
def test_a_schema_the_library_cannot_use_fails_with_its_reason(lm, schema, reason):
    with pytest.raises(ConstraintError, match=reason):
        compile_grammar("json_schema", schema, lm.tokenizer, lm.engine.config.vocab_size, stops(lm))


def test_a_deeply_nested_schema_is_refused_not_recursed_into(lm):
    schema: dict = {"type": "integer"}
    for _ in range(5000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(ConstraintError, match="nests too deeply"):
        compile_grammar("json_schema", schema, lm.tokenizer, lm.engine.config.vocab_size, stops(lm))


def test_a_grammar_needs_a_stop_token(lm):
    with pytest.raises(ConstraintError, match="stop token"):
        compile_grammar("json_object", None, lm.tokenizer, lm.engine.config.vocab_size, ())


def test_tool_call_schema_calls_one_of_the_tools_or_the_named_one():
    tools = [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "b"}}]
    both = tool_call_schema(tools, "required")
    assert [c["properties"]["name"]["const"] for c in both["anyOf"]] == ["a", "b"]
    named = tool_call_schema(tools, {"type": "function", "function": {"name": "b"}})
    assert named["properties"]["name"] == {"const": "b"} and named["required"] == ["name", "arguments"]
    with pytest.raises(ConstraintError, match="names none"):
        tool_call_schema(tools, {"type": "function", "function": {"name": "c"}})
    with pytest.raises(ConstraintError, match="function.name"):
        tool_call_schema([{"type": "function", "function": {}}], "required")

"""Handler inputs, declared once: bind() and the Inputs groups it spreads for Gradio.

A handler takes its context first and then its inputs, typed: Gradio reads the types and
defaults off the signature to build the API page and to inject gr.Request, gr.Progress and
event data. bind(handler, ctx) binds the context and shows Gradio the rest of the signature.

Inputs that several handlers share are one frozen dataclass deriving from Inputs (Sampling;
the chat tab's Knobs): the handler takes one parameter of that type, bind() shows Gradio one
parameter per field (nested groups too) and hands the handler the dataclass built from them,
and input_components() lists the event's components in that same order. Tests build the
dataclass by name instead of copying an argument order.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import gradio as gr

from ..engine.sampling import RANDOM_SEED, SamplingError, SamplingParams, seed_or_random
from ..settings import Settings


class Inputs:
    """Base of a frozen dataclass of event inputs that bind() spreads into one parameter a field."""


def _is_group(hint: object) -> bool:
    return isinstance(hint, type) and issubclass(hint, Inputs)


def _leaves(group: type[Inputs]) -> list[tuple[str, object]]:
    """(name, type) of every input of `group`, nested groups spread, in field order."""
    hints = typing.get_type_hints(group)
    out: list[tuple[str, object]] = []
    for f in dataclasses.fields(group):
        hint = hints[f.name]
        out += _leaves(hint) if _is_group(hint) else [(f.name, hint)]
    return out


def _gather(group: type[Inputs], values: Iterator) -> Inputs:
    """`group` built from the next values, taken in _leaves order."""
    hints = typing.get_type_hints(group)
    return group(*(_gather(hints[f.name], values) if _is_group(hints[f.name]) else next(values)
                   for f in dataclasses.fields(group)))


def input_components(group: type[Inputs], **parts: Any) -> list:
    """The components of `group`'s inputs, in the order bind() spreads them: one part a field,
    by name; a nested group's part is its own list of components (e.g. sampling_inputs())."""
    names = [f.name for f in dataclasses.fields(group)]
    if sorted(parts) != sorted(names):
        raise TypeError(f"{group.__name__} takes {names}, got {sorted(parts)}")
    return [c for name in names for c in (parts[name] if isinstance(parts[name], list) else [parts[name]])]


def bind(fn: Callable, *bound: Any) -> Callable:
    """fn with its first parameters bound, as Gradio should see it: the signature and resolved
    type hints of the remaining parameters (functools.partial hides the hints Gradio reads to
    inject gr.Request, gr.Progress and event data), each Inputs parameter spread into its fields."""
    sig, hints = inspect.signature(fn), typing.get_type_hints(fn)
    own = list(sig.parameters.values())[len(bound):]
    shown: list[inspect.Parameter] = []
    for p in own:
        hint = hints.get(p.name, p.annotation)
        if _is_group(hint):
            shown += [inspect.Parameter(name, p.kind, annotation=h) for name, h in _leaves(hint)]
        else:
            shown.append(p.replace(annotation=hint))
    signature = sig.replace(parameters=shown, return_annotation=hints.get("return", sig.return_annotation))

    def arguments(args: tuple, kwargs: dict) -> list:
        given = signature.bind(*args, **kwargs)
        given.apply_defaults()
        values = iter(given.arguments.values())
        return [_gather(hint, values) if _is_group(hint := hints.get(p.name)) else next(values) for p in own]

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def bound_fn(*args, **kwargs):
            yield from fn(*bound, *arguments(args, kwargs))
    else:

        @functools.wraps(fn)
        def bound_fn(*args, **kwargs):
            return fn(*bound, *arguments(args, kwargs))

    bound_fn.__signature__ = signature
    bound_fn.__annotations__ = {p.name: p.annotation for p in shown if p.annotation is not p.empty}
    if signature.return_annotation is not signature.empty:
        bound_fn.__annotations__["return"] = signature.return_annotation
    return bound_fn


# -- sampling ----------------------------------------------------------------------------------
def _new_tokens(value: object) -> int | None:
    """max_new_tokens as a whole number (Settings.clamp_new_tokens caps it); None: the default."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)  # a slider's 512.0; is_integer() is False for nan and inf
    raise gr.Error(f"Invalid sampling setting: max_new_tokens must be a whole number, got {value!r}")


@dataclass(frozen=True)
class Sampling(Inputs):
    """How a reply is sampled. The defaults are the UI's (the API's are its own, in api.py)."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    max_new_tokens: int | None = None  # None: the server's default (Settings.max_new_tokens)
    seed: int = RANDOM_SEED  # RANDOM_SEED (-1): a random seed

    def params(self) -> SamplingParams:
        """The engine's SamplingParams; a value outside its LIMITS is the user's to fix (gr.Error)."""
        try:
            return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                  repetition_penalty=self.repetition_penalty, seed=seed_or_random(self.seed))
        except SamplingError as e:
            raise gr.Error(f"Invalid sampling setting: {e}") from None

    def for_reply(self) -> tuple[SamplingParams, int | None]:
        """(sampling params, max new tokens): what a conversation's reply takes after its text.
        None tokens: the server's default; the conversation caps the rest."""
        return self.params(), _new_tokens(self.max_new_tokens)


def sampling_inputs(settings: Settings, defaults: Sampling = Sampling(),
                    elem_prefix: str | None = None) -> list[gr.components.Component]:
    """The sampling controls, made in the current layout, in Sampling's field order."""

    def elem(name: str) -> str | None:
        return f"{elem_prefix}-{name}" if elem_prefix else None

    d, max_new = defaults, settings.clamp_new_tokens(defaults.max_new_tokens)
    controls = {
        "temperature": gr.Slider(0, 2, d.temperature, step=0.05, label="Temperature (0 = greedy)",
                                 elem_id=elem("temperature")),
        "top_p": gr.Slider(0.05, 1, d.top_p, step=0.05, label="Top-p", elem_id=elem("top-p")),
        "top_k": gr.Slider(0, 200, d.top_k, step=1, label="Top-k (0 = off)", elem_id=elem("top-k")),
        "repetition_penalty": gr.Slider(1, 2, d.repetition_penalty, step=0.05, label="Repetition penalty",
                                        elem_id=elem("repetition-penalty")),
        "max_new_tokens": gr.Slider(1, settings.max_new_tokens_cap, max_new, step=1, label="Max new tokens",
                                    elem_id=elem("max-new")),
        "seed": gr.Number(d.seed, precision=0, label="Seed (-1 = random)", elem_id=elem("seed")),
    }
    return [controls[f.name] for f in dataclasses.fields(Sampling)]

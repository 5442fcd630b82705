"""Conversations that keep their recurrent state, and the per-session store that holds them.

A Conversation owns a token transcript (see chat.py for how turns are cut into tokens) and
states that hold exactly a prefix of it:
    live         the state after the whole transcript, on the model's device, while it is hot;
    snapshots    {position: state}: every turn boundary, plus the point just before the last
                 reply's first token (so retry reads one token), moved to CPU between replies.
Every operation starts from the nearest cached state at or before the position it needs and
prefills only the tokens after it: a new turn costs its own tokens, retry one token, undo and
edit nothing. When the store evicted that cache, the same code rebuilds it from the tokens by
chunked prefill and the reply's metrics say it was a cache miss.

Threading: one reply at a time per conversation (a second one raises ConversationBusy); the
lock is a plain Lock because Gradio may resume a generator on another thread. The store never
waits on a conversation: it skips busy ones when it offloads, evicts or expires.

API additions to the agreed interface (nothing renamed): send(..., progress=cb(done, total),
allow_long=True for uploads up to max_upload_chars); ReplyEvent.finish_reason (stop | length |
stop_string | cancelled | error); ConversationError (user-facing; ConversationBusy and
ImportRefused derive from it); SessionStore.get / put / fork / import_bytes / maintain and a
`progress` argument to SessionStore.conversation (model loading); peek_model(data).

Handlers should ask the store for the conversation on every event (`store.conversation(...)`)
rather than keep it: that is where a conversation is re-bound to a reloaded or switched model.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import chat
from .engine import SamplingParams, State, StateError
from .metrics import ReplyMetrics, device_memory
from .models import LoadedModel, ModelManager
from .settings import Settings

EXPORT_FORMAT, EXPORT_VERSION = "fm-demo-conversation", 1
ProgressFn = Callable[[int, int], None]


class ConversationError(ValueError):
    """A request a conversation cannot serve; the message is for the user."""


class ConversationBusy(ConversationError):
    pass


class ImportRefused(ConversationError):
    pass


@dataclass
class Turn:
    user: str
    prompt_ids: list[int]  # delta read before the reply (chat.prompt_ids)
    reply_ids: list[int] = field(default_factory=list)  # generated tokens, all of them in the state
    reply: str = ""  # text shown for the reply
    finish_reason: str | None = None
    metrics: ReplyMetrics | None = None


@dataclass
class ReplyEvent:
    delta: str  # text added since the previous event
    text: str  # the reply so far
    metrics: ReplyMetrics
    done: bool = False
    finish_reason: str | None = None


def _clone_to(state: State, device: torch.device | str) -> State:
    """A copy of `state` on `device` (State.to shares storage when the device does not change)."""
    return state.clone() if state.device == torch.device(device) else state.to(device)


class Conversation:
    def __init__(self, lm: LoadedModel, settings: Settings | None = None, system_prompt: str | None = None):
        self.settings = settings or Settings(device="cpu" if lm.device == "cpu" else "cuda")
        self.lm: LoadedModel | None = lm
        self.fmt = chat.format_for(lm.kind)
        self.system = self.settings.system_prompt if system_prompt is None else system_prompt
        self.turns: list[Turn] = []
        self.last_metrics: ReplyMetrics | None = None
        self.last_used = time.monotonic()
        self.on_commit: Callable[[Conversation, ReplyMetrics | None], None] | None = None  # the store's hook
        self._live: State | None = None
        self._snaps: dict[int, State] = {}
        self._lock = threading.Lock()

    # -- views -------------------------------------------------------------------------------
    @property
    def messages(self) -> list[dict[str, str]]:
        """The chat for gr.Chatbot(type="messages"), the reply in progress included."""
        out = []
        for t in self.turns:
            out.append({"role": "user", "content": t.user})
            if t.reply_ids or t.finish_reason:
                out.append({"role": "assistant", "content": t.reply})
        return out

    def token_ids(self) -> list[int]:
        return [i for t in self.turns for i in (*t.prompt_ids, *t.reply_ids)]

    @property
    def context_tokens(self) -> int:
        return sum(len(t.prompt_ids) + len(t.reply_ids) for t in self.turns)

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def cache_bytes(self) -> int:
        live = self._live.nbytes if self._live is not None else 0
        return live + sum(s.nbytes for s in self._snaps.values())

    def device_bytes(self) -> int:
        states = [*self._snaps.values()] + ([self._live] if self._live is not None else [])
        return sum(s.nbytes for s in states if s.device.type != "cpu")

    def _boundaries(self) -> list[int]:
        out, pos = [0], 0
        for t in self.turns:
            pos += len(t.prompt_ids) + len(t.reply_ids)
            out.append(pos)
        return out

    # -- replies -----------------------------------------------------------------------------
    def send(self, text: str, sampling: SamplingParams | None = None, max_new_tokens: int | None = None,
             progress: ProgressFn | None = None, allow_long: bool = False) -> Iterator[ReplyEvent]:
        """Stream the reply to a new user message; closing the iterator stops the reply."""
        self._check_text(text, allow_long)
        return self._generate(len(self.turns), text, sampling, max_new_tokens, progress)

    def retry(self, sampling: SamplingParams | None = None,
              max_new_tokens: int | None = None) -> Iterator[ReplyEvent]:
        """A new reply to the last user message (from the snapshot before its first token)."""
        if not self.turns:
            raise ConversationError("nothing to retry: the conversation is empty")
        return self._generate(len(self.turns) - 1, None, sampling, max_new_tokens, None)

    def edit(self, user_turn_index: int, text: str, sampling: SamplingParams | None = None,
             max_new_tokens: int | None = None) -> Iterator[ReplyEvent]:
        """Replace user message `user_turn_index` (0-based), drop what followed, reply again."""
        if not 0 <= user_turn_index < len(self.turns):
            raise ConversationError(f"there is no user message {user_turn_index} to edit "
                                    f"({len(self.turns)} in this conversation)")
        self._check_text(text, allow_long=False)
        return self._generate(user_turn_index, text, sampling, max_new_tokens, None)

    def _check_text(self, text: str, allow_long: bool) -> None:
        limit = self.settings.max_upload_chars if allow_long else self.settings.max_input_chars
        if not isinstance(text, str) or not text.strip():
            raise ConversationError("the message is empty")
        if len(text) > limit:
            raise ConversationError(f"the message has {len(text):,} characters; the limit is {limit:,}")

    def _generate(self, keep: int, user_text: str | None, sampling: SamplingParams | None,
                  max_new_tokens: int | None, progress: ProgressFn | None) -> Iterator[ReplyEvent]:
        if not self._lock.acquire(blocking=False):
            raise ConversationBusy("a reply is still being written in this conversation")
        before = self.last_metrics
        try:
            yield from self._generate_locked(keep, user_text, sampling or SamplingParams(),
                                             self.settings.clamp_new_tokens(max_new_tokens), progress)
        finally:
            self.last_used = time.monotonic()
            self._lock.release()
            if self.on_commit is not None:
                self.on_commit(self, self.last_metrics if self.last_metrics is not before else None)

    def _generate_locked(self, keep, user_text, sampling, max_new, progress) -> Iterator[ReplyEvent]:
        lm = self._require_model()
        t0 = time.perf_counter()
        turn, base = self._begin_turn(keep, user_text)
        pre = base + len(turn.prompt_ids) - 1  # the last prompt token goes through stream()
        m = ReplyMetrics(device=lm.device, model=f"{lm.key[0]} ({lm.key[1]})")
        raw, finish, state, stream = "", None, None, None
        try:
            state = self._provide(pre, base, m, progress)
            m.prefill_s = time.perf_counter() - t0
            stream = self._stream(lm, state, pre, sampling, max_new)
            for ev in stream:
                turn.reply_ids.append(ev.token_id)
                raw += ev.text
                if ev.index == 0:
                    m.ttft_s, t_first = time.perf_counter() - t0, time.perf_counter()
                    m.prefill_s += ev.metrics.prefill_s
                m.new_tokens, m.decode_s = ev.index + 1, time.perf_counter() - t_first
                shown, hit = chat.visible_reply(self.fmt, raw, final=ev.finish_reason is not None)
                delta, turn.reply = shown[len(turn.reply):], shown
                finish = "stop_string" if hit else ev.finish_reason
                if hit:
                    break
                yield ReplyEvent(delta, shown, m)
        except GeneratorExit:
            finish = "cancelled"  # the engine fed exactly the tokens it yielded: the state is exact
            raise
        except BaseException:
            finish, state = "error", None  # a step may have stopped half-way: rebuild later
            raise
        finally:
            if stream is not None:
                stream.close()
            if finish == "stop_string":
                state = self._cut_at_stop(turn, raw, base)
            if finish == "error" and user_text is not None and not turn.reply_ids:
                self.turns.pop()  # nothing came of this message: leave the transcript as it was
                self._truncate(self.context_tokens)
            else:
                self._commit(turn, state, finish, m)
        yield ReplyEvent("", turn.reply, m, done=True, finish_reason=finish)

    def _stream(self, lm: LoadedModel, state: State, pre: int, sampling: SamplingParams, max_new: int):
        tokens = self.token_ids()
        ctx = torch.tensor([tokens[:pre]]) if sampling.repetition_penalty != 1.0 and pre else None
        stops = chat.stop_token_ids(self.fmt, lm.tokenizer, lm.model.generation_config.eos_token_id)
        return lm.engine.stream(torch.tensor([[tokens[pre]]]), state, sampling, max_new, stops,
                                lm.tokenizer, context_ids=ctx)

    def _begin_turn(self, keep: int, user_text: str | None) -> tuple[Turn, int]:
        """Cut the transcript back for the new reply; returns the turn and where it starts."""
        if user_text is None:  # retry: keep the last prompt, drop its reply
            turn = self.turns[keep]
            del self.turns[keep + 1:]
            base = self._boundaries()[keep]
            turn.reply_ids, turn.reply, turn.finish_reason = [], "", None
            self._truncate(base + len(turn.prompt_ids) - 1)
            return turn, base
        del self.turns[keep:]
        base = self._boundaries()[keep]
        self._truncate(base)
        prev = self.turns[-1].reply_ids if self.turns else None
        prompt = chat.prompt_ids(self.fmt, self.lm.tokenizer, user_text, prev, system=self.system)
        turn = Turn(user_text, prompt)
        self.turns.append(turn)
        return turn, base

    def _cut_at_stop(self, turn: Turn, raw: str, base: int) -> State:
        """Drop the tokens from a stop string on and rebuild the state to the kept tokens.

        Starts from the snapshot before the reply, so it re-reads only the kept reply tokens.
        """
        tok, ids = self.lm.tokenizer, turn.reply_ids
        cut = min(i for s in self.fmt.stop_strings if (i := raw.find(s)) >= 0)
        lo, hi = 0, len(ids)  # largest n with decode(ids[:n]) within raw[:cut]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(tok.decode(ids[:mid], skip_special_tokens=True)) <= cut:
                lo = mid
            else:
                hi = mid - 1
        del ids[lo:]
        turn.reply = chat.visible_reply(self.fmt, tok.decode(ids, skip_special_tokens=True), final=True)[0]
        self._live = None
        return self._provide(base + sum(map(len, (turn.prompt_ids, ids))), base, ReplyMetrics(), None)

    # -- states ------------------------------------------------------------------------------
    def _truncate(self, pos: int) -> None:
        """Forget cached states beyond token position `pos`."""
        self._snaps = {p: s for p, s in self._snaps.items() if p <= pos}
        if self._live is not None and self._live.seqlen > pos:
            self._live = None

    def _provide(self, pos: int, base: int, m: ReplyMetrics, progress: ProgressFn | None) -> State:
        """A state on the model's device holding tokens[:pos], from the nearest cached one.

        Snapshots are taken at every turn boundary passed and at `pos` itself.
        """
        engine = self.lm.engine
        start, state = 0, None
        cached = [p for p in self._snaps if p <= pos]
        if self._live is not None and self._live.seqlen <= pos:
            start, state, self._live = self._live.seqlen, self._live, None
        if cached and max(cached) > start:
            start = max(cached)
            state = _clone_to(self._snaps[start], engine.device)
        state = state if state is not None else engine.new_state()
        tokens, done = self.token_ids(), start
        for cut in sorted({b for b in self._boundaries() if start < b < pos} | {pos}):
            if cut > done:
                ids = torch.tensor([tokens[done:cut]])
                offset = done - start
                engine.prefill(ids, state, progress=progress and (
                    lambda d, t, o=offset: progress(o + d, pos - start)))
                done = cut
            if cut not in self._snaps:
                self._snaps[cut] = _clone_to(state, engine.device)
        m.reused_tokens, m.rebuilt_tokens = start, max(0, base - start)
        m.prefilled_tokens, m.cache_hit = pos - start + 1, base <= start
        return state

    def _commit(self, turn: Turn, state: State | None, finish: str | None, m: ReplyMetrics) -> None:
        turn.finish_reason, turn.metrics = finish, m
        end = self.context_tokens
        if state is None or state.seqlen != end:  # an error mid-step: rebuild from snapshots later
            self._live = None
        elif state.device.type == "cpu":
            self._snaps[end], self._live = state, None
        else:
            self._snaps[end], self._live = state.to("cpu"), state
        keep = set(self._boundaries()) | {end - len(turn.reply_ids) - 1}
        self._snaps = {p: s for p, s in self._snaps.items() if p in keep and p <= end}
        self._settle()
        m.state_bytes = self.lm.engine.state_nbytes()
        m.cache_bytes, m.context_tokens = self.cache_bytes(), end
        m.device_mem_bytes, m.device_peak_bytes = device_memory(self.lm.engine.device)
        m.finish_reason = finish
        self.last_metrics = m

    def _settle(self) -> None:
        """Snapshots wait on CPU between replies; only the hot state stays on the device."""
        self._snaps = {p: s if s.device.type == "cpu" else s.to("cpu") for p, s in self._snaps.items()}

    def offload(self) -> int:
        """Move the hot state off the GPU (its copy at the end of the transcript is on CPU)."""
        if self.busy or self._live is None or self._live.device.type == "cpu":
            return 0
        if self._live.seqlen not in self._snaps:
            self._snaps[self._live.seqlen] = self._live.to("cpu")
        freed, self._live = self._live.nbytes, None
        return freed

    def trim(self, level: int) -> int:
        """Free cache memory; level 1 keeps the latest states, level 2 drops all. Returns bytes freed."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            before = self.cache_bytes()
            if level >= 2:
                self._snaps, self._live = {}, None
            else:
                end = self.context_tokens
                last = self.turns[-1] if self.turns else None
                keep = {end, end - len(last.reply_ids) - 1} if last else {end}
                self._snaps = {p: s for p, s in self._snaps.items() if p in keep}
            return before - self.cache_bytes()
        finally:
            self._lock.release()

    # -- edits -------------------------------------------------------------------------------
    def _locked(self):
        if not self._lock.acquire(blocking=False):
            raise ConversationBusy("a reply is still being written in this conversation")
        return _Release(self._lock)

    def undo(self) -> str | None:
        """Remove the last exchange; returns its user message (None when empty)."""
        with self._locked():
            if not self.turns:
                return None
            turn = self.turns.pop()
            self._truncate(self.context_tokens)
            return turn.user

    def clear(self) -> None:
        with self._locked():
            self.turns, self._snaps, self._live, self.last_metrics = [], {}, None, None

    def set_system_prompt(self, text: str) -> None:
        """Takes effect from the start of the conversation: later states are read again."""
        with self._locked():
            if text == self.system:
                return
            self.system = text
            if self.turns:
                self.turns[0].prompt_ids = chat.prompt_ids(self.fmt, self.lm.tokenizer, self.turns[0].user,
                                                           None, system=text)
                self._snaps, self._live = {}, None

    def fork(self) -> Conversation:
        """An independent copy; snapshots are shared (they are never modified in place)."""
        with self._locked():
            other = Conversation(self.lm, self.settings, self.system)
            other.turns = [Turn(t.user, list(t.prompt_ids), list(t.reply_ids), t.reply, t.finish_reason,
                                t.metrics) for t in self.turns]
            other._snaps = dict(self._snaps)
            other._live = self._live.clone() if self._live is not None else None
            return other

    def bind(self, lm: LoadedModel) -> None:
        """Continue this conversation with `lm`; another model re-reads it at the next reply."""
        with self._locked():
            old, self.lm = self.lm, lm
            if old is not None and old.key == lm.key:
                return
            self._snaps, self._live = {}, None
            if old is not None and (old.preset.source, old.kind) == (lm.preset.source, lm.kind):
                return  # same tokens, only the precision changed
            self.fmt = chat.format_for(lm.kind)
            self._retokenize()

    def detach(self) -> None:
        """Let go of an unloaded model; the store binds a fresh one on the next request."""
        if self._lock.acquire(blocking=False):
            try:
                self.offload_all()
                self.lm = None
            finally:
                self._lock.release()

    def offload_all(self) -> None:
        if self._live is not None and self._live.device.type != "cpu":
            self._snaps[self._live.seqlen] = self._live.to("cpu")
        self._live = None

    def _retokenize(self) -> None:
        tok, prev = self.lm.tokenizer, None
        for t in self.turns:
            t.prompt_ids = chat.prompt_ids(self.fmt, tok, t.user, prev, system=self.system)
            t.reply_ids = chat.encode(tok, self.fmt.reply_lead + t.reply) if t.reply else []
            prev = t.reply_ids

    def _require_model(self) -> LoadedModel:
        if self.lm is None:
            raise ConversationError("this conversation's model was unloaded; select a model to continue")
        return self.lm

    # -- export / import ---------------------------------------------------------------------
    def export(self) -> bytes:
        """Transcript + state at its end, as one safetensors file (versioned, checksummed)."""
        with self._locked():
            lm = self._require_model()
            end = self.context_tokens
            state = self._snaps.get(end) or self._live
            if state is None or state.seqlen != end:
                state = self._provide(end, end, ReplyMetrics(), None) if end else lm.engine.new_state()
                self._settle()
            return export_bytes(self, lm, state)

    @classmethod
    def import_bytes(cls, data: bytes, lm: LoadedModel, settings: Settings | None = None) -> Conversation:
        """Resume an exported conversation on `lm`; raises ImportRefused when it does not fit."""
        conv = cls(lm, settings)
        conv.system, conv.turns, state = import_parts(data, lm, conv.fmt, conv.settings.max_import_bytes)
        if state.seqlen:
            conv._snaps[state.seqlen] = state.to("cpu")
        return conv


class _Release:
    def __init__(self, lock: threading.Lock):
        self.lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.release()


# -- export / import -------------------------------------------------------------------------
def export_bytes(conv: Conversation, lm: LoadedModel, state: State) -> bytes:
    """A safetensors file: tensors conv/ssm, the transcript and model identity in its metadata.

    The sha256 covers metadata and tensors: it catches corrupted and hand-edited files (it is a
    checksum, not a signature; a state only ever affects the conversation it is loaded into).
    """
    from safetensors.torch import save

    payload = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
        "model": {"preset": lm.key[0], "precision": lm.key[1], "source": lm.preset.source,
                  "kind": lm.kind, "signature": lm.engine.signature},
        "system": conv.system,
        "turns": [{"user": t.user, "prompt_ids": t.prompt_ids, "reply_ids": t.reply_ids,
                   "finish_reason": t.finish_reason} for t in conv.turns],
        "state": state.metadata(),
    }
    tensors = {"conv": state.conv.detach().cpu().contiguous(), "ssm": state.ssm.detach().cpu().contiguous()}
    body = json.dumps(payload, sort_keys=True)
    return save(tensors, metadata={"fm_demo": body, "sha256": _digest(body, tensors)})


def peek_model(data: bytes) -> dict:
    """The model an exported conversation was saved with: {preset, precision, source, kind, signature}."""
    return _payload(data)[0]["model"]


def import_parts(data: bytes, lm: LoadedModel, fmt: chat.ChatFormat, max_bytes: int):
    """(system prompt, turns, state on CPU) from an export, or ImportRefused saying why not."""
    from safetensors.torch import load

    if len(data) > max_bytes:
        raise ImportRefused(f"the file has {len(data) / 1e6:.1f} MB; this server accepts up to "
                            f"{max_bytes / 1e6:.0f} MB")
    payload, meta = _payload(data)
    try:
        tensors = load(bytes(data))
    except Exception as e:  # safetensors raises several types for damaged files
        raise ImportRefused(f"the file's tensors cannot be read ({e})") from None
    if _digest(meta["fm_demo"], tensors) != meta.get("sha256"):
        raise ImportRefused("the file was modified or damaged (its checksum does not match)")
    model = payload.get("model") or {}
    if model.get("signature") != lm.engine.signature:
        raise ImportRefused(f"this conversation was saved with another model ({model.get('preset')}: "
                            f"{model.get('source')}); its state does not fit {lm.preset.label}")
    try:
        state = State.from_parts(tensors, payload.get("state") or {}, like=lm.engine.new_state(), device="cpu")
    except StateError as e:
        raise ImportRefused(f"the saved state does not fit this model: {e}") from None
    system = payload.get("system", "")
    turns = _turns_from(payload.get("turns"), system, lm, fmt)
    if state.seqlen != sum(len(t.prompt_ids) + len(t.reply_ids) for t in turns):
        raise ImportRefused(f"the saved state holds {state.seqlen} tokens but the transcript has a different count")
    return system, turns, state


def _payload(data: bytes) -> tuple[dict, dict]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) without the tensors."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 8:
        raise ImportRefused("not a conversation file exported by this app")
    n = int.from_bytes(bytes(data[:8]), "little")
    try:
        if n > len(data) - 8:
            raise ValueError("header longer than the file")
        meta = json.loads(bytes(data[8:8 + n])).get("__metadata__") or {}
        payload = json.loads(meta["fm_demo"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ImportRefused("not a conversation file exported by this app") from None
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ImportRefused("not a conversation file exported by this app")
    if payload.get("version") != EXPORT_VERSION:
        raise ImportRefused(f"conversation file version {payload.get('version')} is not supported "
                            f"(this server reads version {EXPORT_VERSION})")
    return payload, meta


def _digest(body: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(body.encode())
    for name in ("conv", "ssm"):
        t = tensors.get(name)
        if t is not None:
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _turns_from(rows, system: str, lm: LoadedModel, fmt: chat.ChatFormat) -> list[Turn]:
    """Rebuild turns, checking every id and that each prompt is what this model's format writes."""
    if not isinstance(rows, list) or not isinstance(system, str):
        raise ImportRefused("the transcript in the file is malformed")
    tok, vocab, turns, prev = lm.tokenizer, lm.engine.config.vocab_size, [], None
    for i, row in enumerate(rows):
        try:
            user, prompt, reply = row["user"], list(row["prompt_ids"]), list(row["reply_ids"])
            ok = isinstance(user, str) and all(isinstance(x, int) and 0 <= x < vocab for x in prompt + reply)
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise ImportRefused(f"turn {i + 1} of the transcript is malformed")
        if prompt != chat.prompt_ids(fmt, tok, user, prev, system=system):
            raise ImportRefused(f"turn {i + 1} does not match this model's prompt format (edited file or "
                                f"another tokenizer)")
        text = chat.visible_reply(fmt, tok.decode(reply, skip_special_tokens=True), final=True)[0]
        finish = row.get("finish_reason")
        turns.append(Turn(user, prompt, reply, text, finish if isinstance(finish, str) else None))
        prev = reply
    return turns


# -- the store -------------------------------------------------------------------------------
class SessionStore:
    """Conversations keyed by (browser session, slot); slots let the compare tab keep two.

    Memory policy, after every reply and on every lookup: states idle for offload_after_s, or
    beyond the hot_states most recent, leave the GPU (their copy waits on CPU); while all caches
    together exceed session_budget_bytes, the least recently used conversations first lose their
    older snapshots, then their whole cache (their tokens stay: the next reply rebuilds and
    reports a cache miss); conversations idle for session_ttl_s are dropped; beyond max_sessions
    the least recently used sessions are dropped.
    """

    def __init__(self, settings: Settings, manager: ModelManager):
        self.settings, self.manager = settings, manager
        self._lock = threading.Lock()
        self._convs: OrderedDict[tuple[str, str], Conversation] = OrderedDict()  # LRU first
        self._counts = dict(replies=0, cache_hits=0, cache_misses=0, rebuilt_tokens=0, evictions=0,
                            trims=0, offloads=0, expired=0, dropped_sessions=0)
        manager.on_unload(self._model_unloaded)

    def conversation(self, session_id: str, preset_key: str, precision: str | None = None,
                     slot: str = "chat", progress: Callable[[float, str], None] | None = None) -> Conversation:
        """The session's conversation in `slot`, bound to the requested model (loaded if needed).

        Raises ModelLoadError when the model cannot be loaded; the conversation is kept.
        """
        lm = self.manager.get(preset_key, precision, progress)
        key = (str(session_id), slot)
        with self._lock:
            conv = self._convs.get(key)
            if conv is None:
                conv = self._convs[key] = self._new(lm)
            self._convs.move_to_end(key)
            conv.last_used = time.monotonic()
        if conv.lm is not lm:
            conv.bind(lm)
        self.maintain(active=conv)
        return conv

    def get(self, session_id: str, slot: str = "chat") -> Conversation | None:
        """The conversation if there is one, without loading anything."""
        with self._lock:
            return self._convs.get((str(session_id), slot))

    def put(self, session_id: str, conv: Conversation, slot: str = "chat") -> Conversation:
        """Register a conversation (an import or a fork) under a session and slot."""
        conv.on_commit = self._after_reply
        with self._lock:
            self._convs[(str(session_id), slot)] = conv
            self._convs.move_to_end((str(session_id), slot))
        self.maintain(active=conv)
        return conv

    def fork(self, session_id: str, src_slot: str, dst_slot: str) -> Conversation:
        src = self.get(session_id, src_slot)
        if src is None:
            raise ConversationError(f"no conversation in '{src_slot}' to fork")
        return self.put(session_id, src.fork(), dst_slot)

    def import_bytes(self, session_id: str, data: bytes, slot: str = "chat", preset_key: str | None = None,
                     precision: str | None = None) -> Conversation:
        """Import an exported conversation, by default on the model it was saved with."""
        saved = peek_model(data)
        if preset_key is None:
            preset_key, precision = saved.get("preset"), precision or saved.get("precision")
            if preset_key not in self.manager.presets:
                raise ImportRefused(f"this conversation was saved with '{preset_key}', which this server "
                                    f"does not offer")
        lm = self.manager.get(preset_key, precision)
        return self.put(session_id, Conversation.import_bytes(data, lm, self.settings), slot)

    def reset(self, session_id: str, slot: str | None = None) -> None:
        with self._lock:
            for key in [k for k in self._convs if k[0] == str(session_id) and slot in (None, k[1])]:
                del self._convs[key]

    def stats(self) -> dict:
        with self._lock:
            convs = list(self._convs.values())
            sessions = {k[0] for k in self._convs}
        return {"sessions": len(sessions), "conversations": len(convs),
                "cache_bytes": sum(c.cache_bytes() for c in convs),
                "device_bytes": sum(c.device_bytes() for c in convs),
                "budget_bytes": self.settings.session_budget_bytes,
                "context_tokens": sum(c.context_tokens for c in convs), **self._counts}

    # -- memory ------------------------------------------------------------------------------
    def maintain(self, active: Conversation | None = None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._expire(now, active)
            convs = list(self._convs.values())  # least recently used first
        hot = [c for c in reversed(convs) if c.device_bytes() and c is not active]
        for rank, c in enumerate(hot):
            if rank >= self.settings.hot_states or now - c.last_used > self.settings.offload_after_s:
                if c.offload():
                    self._count("offloads")
        self._fit_budget(convs, active)

    def _fit_budget(self, convs: list[Conversation], active: Conversation | None) -> None:
        total, budget = sum(c.cache_bytes() for c in convs), self.settings.session_budget_bytes
        for level, counter in ((1, "trims"), (2, "evictions")):
            for c in convs:
                if total <= budget:
                    return
                if c is not active and (freed := c.trim(level)):
                    total -= freed
                    self._count(counter)
        if total > budget and active is not None and active.trim(1):
            self._count("trims")

    def _expire(self, now: float, active: Conversation | None) -> None:
        """Drop idle conversations and the oldest sessions beyond max_sessions (lock held)."""
        ttl = self.settings.session_ttl_s
        for key, c in list(self._convs.items()):
            if now - c.last_used > ttl and not c.busy and c is not active:
                del self._convs[key]
                self._counts["expired"] += 1
        sessions = list(dict.fromkeys(k[0] for k in self._convs))  # least recently used first
        for sid in sessions[:max(0, len(sessions) - self.settings.max_sessions)]:
            if any(c is active or c.busy for k, c in self._convs.items() if k[0] == sid):
                continue
            for key in [k for k in self._convs if k[0] == sid]:
                del self._convs[key]
            self._counts["dropped_sessions"] += 1

    def _new(self, lm: LoadedModel) -> Conversation:
        conv = Conversation(lm, self.settings)
        conv.on_commit = self._after_reply
        return conv

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _after_reply(self, conv: Conversation, m: ReplyMetrics | None) -> None:
        if m is not None:
            self._count("replies")
            self._count("cache_hits" if m.cache_hit else "cache_misses")
            self._count("rebuilt_tokens", m.rebuilt_tokens)
        if conv.lm is not None and not self.manager.is_loaded(conv.lm):
            conv.detach()
        self.maintain(active=conv)

    def _model_unloaded(self, lm: LoadedModel) -> None:
        with self._lock:
            convs = [c for c in self._convs.values() if c.lm is lm]
        for c in convs:
            c.detach()

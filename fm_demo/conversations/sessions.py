"""Conversations that keep their recurrent state (the store that holds them: store.py).

A Conversation owns a token transcript (see chat.py and templates.py for how turns are cut into
tokens: by the checkpoint's chat template, or a hand-written format). Every
reply is one Request to the model's runner with the whole transcript: the scheduler resumes from
the longest prefix the model's prefix cache holds (serving/), reads only the rest, and keeps the
states the conversation asks for (turn boundaries, a document's end, the point before the reply,
the end of the reply). The conversation holds references to those states (state_cache.py): a
new turn costs its own tokens, retry one token, undo and edit nothing. When the cache evicted a
state the conversation held, the same request reads it again and the reply's metrics say it was
a cache miss. A reply cut by a stop string or stopped early keeps only the tokens shown; the next
reply reads the few tokens after the nearest state.

The same holds on ZeroGPU and on a cluster: their runners take the same Request (the prefix
lookup then happens where the states are, around one GPU or replica call).

Threading: one reply at a time per conversation (a second one raises ConversationBusy); the
lock is a plain Lock because Gradio may resume a generator on another thread.

Beyond the basic send/retry/edit/undo: send(..., progress=cb(done, total), allow_long=True for
uploads up to max_upload_chars; an exception raised by cb ends the read between chunks and the
message is dropped, the transcript left as it was); ReplyEvent.finish_reason (stop | length | stop_string |
cancelled | error); ConversationError (user-facing; ConversationBusy and ImportRefused derive
from it); export() / import_bytes() through the file format of transfer.py.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from .. import chat
from ..engine import DecodeOptions, SamplingParams, State, TokenEvent
from ..engine.decode import PLAIN
from ..metrics import ReplyMetrics, device_memory
from ..models import LoadedModel
from ..serving import Progress, Reply, Request
from ..serving.namespaces import is_private, private_namespace
from ..settings import Settings
from ..stops import first_stop
from ..templates import REWRITE_REASON, Extension
from .state_cache import StateCache
from .transfer import export_bytes, import_parts, transcript_parts, transcript_texts
from .turns import ConversationBusy, ConversationError, ImportRefused, Turn

ProgressFn = Callable[[int, int], None]

__all__ = ["Conversation", "ConversationBusy", "ConversationError", "ImportRefused", "ReplyEvent", "Turn"]


@dataclass
class ReplyEvent:
    delta: str  # text added since the previous event
    text: str  # the reply so far
    metrics: ReplyMetrics
    done: bool = False
    finish_reason: str | None = None


def _note_reuse(m: ReplyMetrics, reply: Reply, pos: int, rewritten: int | None = None) -> None:
    """Record how a reply got its state: reused up to reply.start, and the tokens re-read because
    a state the conversation held (at reply.request.expect) was evicted, or because the chat
    template rewrote earlier turns (`rewritten`: where the history now ends)."""
    start, expect = reply.start, reply.request.expect
    m.reused_tokens, m.rebuilt_tokens = start, max(0, expect - start)
    m.prefilled_tokens, m.cache_hit = pos - start + 1, start >= expect
    if rewritten is not None and rewritten > start:
        m.rebuilt_tokens, m.rebuilt_reason = rewritten - start, REWRITE_REASON
    m.served_by = reply.served_by or m.served_by
    m.state_source = reply.state_source or m.state_source


def _check_unicode(text: str, what: str) -> None:
    """Refuse text no tokenizer can read: a lone surrogate (half of a UTF-16 pair, which a
    JSON body's \\ud800 escape can carry) is no Unicode character."""
    if isinstance(text, str) and not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConversationError(f"{what} is not valid Unicode (a lone surrogate at character "
                                    f"{e.start + 1:,})") from None


def _time_event(m: ReplyMetrics, ev: TokenEvent, t0: float) -> None:
    """Fold a token event into the reply's timing (t0: when the request came in)."""
    now = time.perf_counter()
    if ev.index == 0:
        m.ttft_s = now - t0
        m.prefill_s += ev.metrics.prefill_s
    m.new_tokens, m.decode_s = ev.index + 1, now - t0 - m.ttft_s


class Conversation:
    def __init__(self, lm: LoadedModel, settings: Settings | None = None, system_prompt: str | None = None,
                 namespace: str | None = None):
        self.settings = settings or Settings(device="cpu" if lm.device == "cpu" else "cuda")
        self.lm: LoadedModel | None = lm
        self.fmt = lm.chat_format
        self.system = self.settings.system_prompt if system_prompt is None else system_prompt
        self.turns: list[Turn] = []
        self.last_metrics: ReplyMetrics | None = None
        self.last_used = time.monotonic()
        self.on_commit: Callable[[Conversation, ReplyMetrics | None], None] | None = None  # the store's hook
        self.history_id: str | None = None  # its row in the history (history.py), where it has one
        self.browser: str | None = None  # the browser it belongs to (the history's owner of that row)
        # the prefix-cache namespace: the browser session (the store passes it), else this conversation
        self.namespace = namespace if namespace is not None else f"conversation-{id(self):x}-{time.time_ns()}"
        self.cache = StateCache(lm.prefix_cache, self.namespace, self.token_ids)
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
        out: list[int] = []
        for t in self.turns:  # list extends: C speed, several times per reply
            out += t.prompt_ids
            out += t.reply_ids
        return out

    @property
    def context_tokens(self) -> int:
        return sum(len(t.prompt_ids) + len(t.reply_ids) for t in self.turns)

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def cache_bytes(self) -> int:
        return self.cache.nbytes()

    def device_bytes(self) -> int:
        return self.cache.device_bytes()

    def _boundaries(self) -> list[int]:
        out, pos = [0], 0
        for t in self.turns:
            pos += len(t.prompt_ids) + len(t.reply_ids)
            out.append(pos)
        return out

    # -- replies -----------------------------------------------------------------------------
    def send(self, text: str, sampling: SamplingParams | None = None, max_new_tokens: int | None = None,
             progress: ProgressFn | None = None, allow_long: bool = False,
             document_chars: int | None = None, options: DecodeOptions = PLAIN) -> Iterator[ReplyEvent]:
        """Stream the reply to a new user message; closing the iterator stops the reply.

        document_chars: the message starts with a document of that many characters; the state at
        its end is kept in the prefix cache, so the same document with another question (from
        this session, or anyone's when sharing is on) is not read again. options: the reply's
        DecodeOptions (a grammar for a JSON reply, say).
        """
        self._check_text(text, allow_long)
        return self._generate(len(self.turns), text, sampling, max_new_tokens, progress, document_chars, options)

    def retry(self, sampling: SamplingParams | None = None, max_new_tokens: int | None = None,
              options: DecodeOptions = PLAIN) -> Iterator[ReplyEvent]:
        """A new reply to the last user message (from the snapshot before its first token)."""
        if not self.turns:
            raise ConversationError("nothing to retry: the conversation is empty")
        return self._generate(len(self.turns) - 1, None, sampling, max_new_tokens, None, None, options)

    def edit(self, user_turn_index: int, text: str, sampling: SamplingParams | None = None,
             max_new_tokens: int | None = None, options: DecodeOptions = PLAIN) -> Iterator[ReplyEvent]:
        """Replace user message `user_turn_index` (0-based), drop what followed, reply again."""
        if not 0 <= user_turn_index < len(self.turns):
            raise ConversationError(f"there is no user message {user_turn_index} to edit "
                                    f"({len(self.turns)} in this conversation)")
        self._check_text(text, allow_long=False)
        return self._generate(user_turn_index, text, sampling, max_new_tokens, None, None, options)

    def stop_ids(self, lm: LoadedModel | None = None) -> tuple[int, ...]:
        """The tokens that end a reply on this conversation's model."""
        lm = lm or self._require_model()
        return tuple(sorted(chat.stop_token_ids(self.fmt, lm.tokenizer, lm.model.generation_config.eos_token_id)))

    def _check_text(self, text: str, allow_long: bool) -> None:
        limit = self.settings.max_upload_chars if allow_long else self.settings.max_input_chars
        if not isinstance(text, str) or not text.strip():
            raise ConversationError("the message is empty")
        if len(text) > limit:
            raise ConversationError(f"the message has {len(text):,} characters; the limit is {limit:,}")
        _check_unicode(text, "the message")

    def _generate(self, keep: int, user_text: str | None, sampling: SamplingParams | None,
                  max_new_tokens: int | None, progress: ProgressFn | None,
                  document_chars: int | None = None, options: DecodeOptions = PLAIN) -> Iterator[ReplyEvent]:
        if not self._lock.acquire(blocking=False):
            raise ConversationBusy("a reply is still being written in this conversation")
        before = self.last_metrics
        try:
            yield from self._generate_locked(keep, user_text, sampling or SamplingParams(),
                                             self.settings.clamp_new_tokens(max_new_tokens), progress,
                                             document_chars, options)
        finally:
            self.last_used = time.monotonic()
            self._lock.release()
            if self.on_commit is not None:
                self.on_commit(self, self.last_metrics if self.last_metrics is not before else None)

    def _generate_locked(self, keep, user_text, sampling, max_new, progress,
                         document_chars=None, options: DecodeOptions = PLAIN) -> Iterator[ReplyEvent]:
        lm = self._require_model()
        t0 = time.perf_counter()
        turn, rewritten = self._begin_turn(keep, user_text)
        if document_chars:
            turn.keep_at = self._document_end(turn, document_chars)
        tokens = self.token_ids()
        pre = len(tokens) - 1  # the reply's first token comes from the last prompt token's logits
        m = ReplyMetrics(device=lm.device, model=f"{lm.key[0]} ({lm.key[1]})")
        raw, finish, reply = "", None, None
        try:
            reply = lm.runner.submit(self._request(lm, tokens, sampling, max_new, progress is not None, options))
            for item in reply:
                if isinstance(item, Progress):
                    progress(item.done, item.total)
                    continue
                if not turn.reply_ids:
                    _note_reuse(m, reply, pre, rewritten)  # admitted: where reading started is known
                turn.reply_ids.append(item.token_id)
                raw += item.text
                _time_event(m, item, t0)
                m.batch_size, m.batch_mean = item.metrics.batch_size, item.metrics.batch_mean
                shown, hit = chat.visible_reply(self.fmt, raw, final=item.finish_reason is not None)
                delta, turn.reply = shown[len(turn.reply):], shown
                finish = "stop_string" if hit else item.finish_reason
                if hit:
                    break
                yield ReplyEvent(delta, shown, m)
        except GeneratorExit:
            finish = "cancelled"  # the transcript keeps exactly the tokens shown
            raise
        except BaseException:
            finish = "error"
            raise
        finally:
            if reply is not None:
                reply.close()  # tokens fed beyond those shown stay out of the transcript
                _note_reuse(m, reply, pre, rewritten)
            if finish == "stop_string":
                self._cut_at_stop(turn, raw)
            if finish == "error" and user_text is not None and not turn.reply_ids:
                self.turns.pop()  # nothing came of this message: leave the transcript as it was
                self.cache.truncate(self.context_tokens)
            else:
                self._commit(turn, reply, finish, m)
        yield ReplyEvent("", turn.reply, m, done=True, finish_reason=finish)

    def _request(self, lm: LoadedModel, tokens: list[int], sampling: SamplingParams, max_new: int,
                 progress: bool, options: DecodeOptions = PLAIN) -> Request:
        """The reply as one request: the whole transcript, and where this conversation wants states."""
        return Request(tokens, self.namespace, sampling, max_new, self.stop_ids(lm),
                       keep_at=tuple(p for p in self._marks() if p < len(tokens)), tokenizer=lm.tokenizer,
                       progress=progress, expect=self.cache.expected(len(tokens) - 1), options=options)

    def _begin_turn(self, keep: int, user_text: str | None) -> tuple[Turn, int | None]:
        """Cut the transcript back for the new reply; returns the turn and, where the chat template
        rewrote earlier turns, where the history now ends (the reply re-reads it from the change)."""
        if user_text is None:  # retry: keep the last prompt, drop its reply
            turn = self.turns[keep]
            del self.turns[keep + 1:]
            base = self._boundaries()[keep]
            turn.reply_ids, turn.reply, turn.finish_reason = [], "", None
            self.cache.truncate(base + len(turn.prompt_ids) - 1)
            return turn, None
        del self.turns[keep:]
        self.cache.truncate(self._boundaries()[keep])
        ext = chat.next_prompt(self.fmt, self.lm.tokenizer, self.turns, user_text, system=self.system)
        rewritten = self._relayout(ext)
        turn = Turn(user_text, ext.prompt)
        self.turns.append(turn)
        return turn, rewritten

    def _relayout(self, ext: Extension) -> int | None:
        """Give the earlier turns the tokens a template rewrote them to (ext.layout); states past
        the first changed token no longer hold this transcript. Returns the history's new end."""
        if ext.layout is None:
            return None
        for t, (prompt, reply) in zip(self.turns, ext.layout):
            if (t.prompt_ids, t.reply_ids) != (prompt, reply):
                t.prompt_ids, t.reply_ids, t.keep_at = prompt, reply, None
        self.cache.truncate(ext.changed_at)
        return self.context_tokens

    def _document_end(self, turn: Turn, chars: int) -> int | None:
        """Tokens of turn.prompt_ids that hold only the first `chars` characters of the message:
        the common prefix with the prompt of the document alone (token boundaries can merge
        across the cut, so the point is where both encodings still agree)."""
        alone = chat.next_prompt(self.fmt, self.lm.tokenizer, self.turns[:-1], turn.user[:chars],
                                 system=self.system).prompt
        n = 0
        for a, b in zip(alone, turn.prompt_ids):
            if a != b:
                break
            n += 1
        return n if 0 < n < len(turn.prompt_ids) - 1 else None

    def _marks(self) -> list[int]:
        """Positions worth a state: turn boundaries and documents' ends."""
        out, pos = [0], 0
        for t in self.turns:
            if t.keep_at is not None:
                out.append(pos + t.keep_at)
            pos += len(t.prompt_ids) + len(t.reply_ids)
            out.append(pos)
        return out

    def _cut_at_stop(self, turn: Turn, raw: str) -> None:
        """Drop the reply's tokens from a stop string on (the next reply reads the kept ones)."""
        tok, ids = self.lm.tokenizer, turn.reply_ids
        cut = first_stop(raw, self.fmt.stop_strings)
        del ids[chat.tokens_within(tok, ids, cut):]
        turn.reply = chat.visible_reply(self.fmt, tok.decode(ids, skip_special_tokens=True), final=True)[0]

    def _commit(self, turn: Turn, reply: Reply | None, finish: str | None, m: ReplyMetrics) -> None:
        turn.finish_reason, turn.metrics = finish, m
        end = self.context_tokens
        keep = {p for p in set(self._marks()) | {self._retry_point()} if p <= end}
        base = end - len(turn.prompt_ids) - len(turn.reply_ids)
        whole = (reply is not None and finish not in ("error", "stop_string")
                 and len(reply.fed) == len(turn.reply_ids))
        reach = end if whole else (self._retry_point() if finish == "stop_string" else base)
        self.cache.hold(reply.kept if reply is not None else {}, keep, reach)
        m.state_bytes = self.lm.engine.state_nbytes()
        m.cache_bytes, m.context_tokens = self.cache_bytes(), end
        m.device_mem_bytes, m.device_peak_bytes = device_memory(self.lm.engine.device)
        m.finish_reason = finish
        self.last_metrics = m

    def _read(self, pos: int) -> State:
        """The state after tokens[:pos], from the nearest cached one (a read-only request)."""
        lm = self._require_model()
        tokens = self.token_ids()[:pos]
        keep = tuple(p for p in self._marks() if p <= pos)
        reply = lm.runner.submit(Request(tokens, self.namespace, keep_at=keep,
                                         expect=self.cache.expected(pos)))
        for _ in reply:
            pass
        self.cache.hold(reply.kept, {*self.cache.refs, pos})
        return reply.end_state

    def offload(self) -> int:
        """Nothing to move: every state lives in the model's prefix cache, on its device."""
        return 0

    def trim(self, level: int) -> int:
        """Free cache memory; level 1 keeps the latest states, level 2 drops all. Returns bytes freed."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            end = self.context_tokens
            return self.cache.trim(level, {end, self._retry_point()} if self.turns else {end})
        finally:
            self._lock.release()

    def _retry_point(self) -> int:
        """The position just before the last reply's first token: retry reads from there."""
        return self.context_tokens - len(self.turns[-1].reply_ids) - 1

    # -- edits -------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise ConversationBusy("a reply is still being written in this conversation")
        try:
            yield
        finally:
            self._lock.release()

    def undo(self) -> str | None:
        """Remove the last exchange; returns its user message (None when empty)."""
        with self._locked():
            if not self.turns:
                return None
            turn = self.turns.pop()
            self.cache.truncate(self.context_tokens)
            return turn.user

    def clear(self) -> None:
        with self._locked():
            self.turns, self.last_metrics = [], None
            self.cache.clear()

    def set_system_prompt(self, text: str) -> None:
        """Takes effect from the start of the conversation: later states are read again."""
        _check_unicode(text, "the system prompt")
        with self._locked():
            if text == self.system:
                return
            self.system = text
            if self.turns:
                self._reprompt(lambda t: None)
                self.cache.invalidate(self.context_tokens)

    def fork(self) -> Conversation:
        """An independent copy; snapshots are shared (they are never modified in place)."""
        with self._locked():
            other = Conversation(self.lm, self.settings, self.system, self.namespace)
            other.turns = [Turn(t.user, list(t.prompt_ids), list(t.reply_ids), t.reply, t.finish_reason,
                                t.metrics, t.keep_at) for t in self.turns]
            other.cache = self.cache.copy(other.token_ids)
            return other

    def bind(self, lm: LoadedModel) -> None:
        """Continue this conversation with `lm`; another model re-reads it at the next reply."""
        with self._locked():
            old, self.lm = self.lm, lm
            if old is not None and old.key == lm.key:
                return
            self.cache.clear()  # the old model's states
            self.cache = StateCache(lm.prefix_cache, self.namespace, self.token_ids)
            if old is None or (old.preset.source, old.kind) != (lm.preset.source, lm.kind):
                self.fmt = lm.chat_format
                self._retokenize()
            self.cache.invalidate(self.context_tokens)

    def detach(self) -> None:
        """Let go of an unloaded model; the store binds a fresh one on the next request."""
        if self._lock.acquire(blocking=False):
            try:
                self.lm = None
            finally:
                self._lock.release()

    def release_states(self) -> None:
        """Let go of every state (a conversation the store drops): the prefix cache frees what no
        one else holds. A busy conversation keeps them; the cache's budget frees them later."""
        if self._lock.acquire(blocking=False):
            try:
                self.cache.clear()
                if is_private(self.namespace):  # no one else can ever read them: they go now
                    self.cache.tree.discard_unheld(self.namespace)
            finally:
                self._lock.release()

    def _retokenize(self) -> None:
        tok = self.lm.tokenizer
        self._reprompt(lambda t: chat.encode(tok, self.fmt.reply_lead + t.reply) if t.reply else [])

    def _reprompt(self, reply_ids: Callable[[Turn], list[int] | None]) -> None:
        """Every turn's prompt again, in order (another system prompt, format or tokenizer);
        reply_ids(turn) gives a reply's new tokens, or None to keep them. A prompt that changes
        drops its turn's document mark (it was a position in the old tokens)."""
        turns, self.turns = self.turns, []
        for t in turns:
            ext = chat.next_prompt(self.fmt, self.lm.tokenizer, self.turns, t.user, system=self.system)
            self._relayout(ext)
            if ext.prompt != t.prompt_ids:
                t.prompt_ids, t.keep_at = ext.prompt, None
            new = reply_ids(t)
            if new is not None and new != t.reply_ids:
                t.reply_ids, t.keep_at = new, None
            self.turns.append(t)

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
            state = self.cache.at(end)
            if state is None:
                state = self._read(end) if end else lm.engine.new_state()
            return export_bytes(self.system, self.turns, lm, state)

    @classmethod
    def import_bytes(cls, data: bytes, lm: LoadedModel, settings: Settings | None = None) -> Conversation:
        """Resume an exported conversation on `lm`; raises ImportRefused when it does not fit.

        The file's state is not checked against its transcript (that would cost the read the
        import saves), so the conversation gets a private namespace: its state, and every state
        read on from it, serve this conversation (and its forks) alone, with sharing on too."""
        conv = cls(lm, settings, namespace=private_namespace())
        conv.system, conv.turns, state = import_parts(data, lm, conv.fmt, conv.settings)
        if state.seqlen:
            conv.cache.add(state)
        return conv

    # -- history -----------------------------------------------------------------------------
    def saved_parts(self) -> tuple[str, list[Turn], State | None] | None:
        """What the history keeps of it: (system prompt, a copy of the turns, the state at their end
        if the cache holds it, else None; nothing is read for it). None while a reply is written
        (that reply's end saves it)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            turns = [Turn(t.user, list(t.prompt_ids), list(t.reply_ids), t.reply, t.finish_reason)
                     for t in self.turns]
            return self.system, turns, self.cache.at(self.context_tokens) if turns else None
        finally:
            self._lock.release()

    @classmethod
    def restore(cls, lm: LoadedModel, transcript: str, state_file: bytes | None = None,
                settings: Settings | None = None, namespace: str | None = None) -> Conversation:
        """A conversation the history kept, on `lm`. With its state (an export file that fits `lm`)
        it resumes where it ended; else from its transcript, whose next reply reads it all by
        chunked prefill; a transcript whose tokens `lm`'s prompt format does not write (another
        tokenizer or template) is encoded again from its texts. ImportRefused: unreadable."""
        conv = cls(lm, settings, namespace=namespace)
        if state_file is not None:
            try:
                conv.system, conv.turns, state = import_parts(state_file, lm, conv.fmt, conv.settings)
                if state.seqlen:
                    conv.cache.add(state)
                return conv
            except ImportRefused:
                pass  # another model's state, or a damaged one: the transcript still holds
        try:
            conv.system, conv.turns = transcript_parts(transcript, lm, conv.fmt)
        except ImportRefused:
            conv.system, conv.turns = transcript_texts(transcript)
            conv._retokenize()
        conv.cache.invalidate(conv.context_tokens)  # its state is expected: the next reply says it re-read
        return conv

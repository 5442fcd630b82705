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
from dataclasses import dataclass, replace
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
from .transfer import export_bytes, forks_json, import_parts, transcript_parts, transcript_texts
from .turns import MAX_BRANCHES, Branch, ConversationBusy, ConversationError, Fork, ImportRefused, Turn, layout

ProgressFn = Callable[[int, int], None]

__all__ = ["Conversation", "ConversationBusy", "ConversationError", "ImportRefused", "ManyEvent", "ReplyEvent", "Turn"]


@dataclass
class ReplyEvent:
    delta: str  # text added since the previous event
    text: str  # the reply so far
    metrics: ReplyMetrics
    done: bool = False
    finish_reason: str | None = None


MAX_REPLIES = 4  # Show N replies: at most this many at once


@dataclass
class ManyEvent:
    """Show N replies: every reply so far, and the shared readout (one read, n rows)."""

    texts: list[str]
    metrics: ReplyMetrics
    done: bool = False
    finish_reasons: list[str | None] | None = None


def _metrics(lm: LoadedModel, **fields) -> ReplyMetrics:
    """A reply's metrics on `lm`, before anything is measured."""
    return ReplyMetrics(device=lm.device, model=f"{lm.key[0]} ({lm.key[1]})", **fields)


def reply_started(reply: Reply | None) -> bool:
    return reply is not None and bool(reply.fed)


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
        self.forks: dict[int, Fork] = {}  # turn index -> the versions of that turn on (turns.py)
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

    def branch_points(self) -> dict[int, tuple[int, int]]:
        """{turn index: (version shown, versions)} (both 1-based counts) where the turn has others."""
        forks, n = self.forks.copy(), len(self.turns)  # a reply may be changing them on another thread
        return {i: (f.active + 1, len(f.branches)) for i, f in sorted(forks.items())
                if i < n and len(f.branches) > 1}

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

    def send_many(self, text: str, n: int, sampling: SamplingParams | None = None,
                  max_new_tokens: int | None = None, options: DecodeOptions = PLAIN) -> Iterator[ManyEvent]:
        """n (2 to MAX_REPLIES) replies to a new user message from one read of it, decoded as n
        batched rows; the first is shown, the others are versions of the turn (switch())."""
        self._check_text(text, allow_long=False)
        if not isinstance(n, int) or not 2 <= n <= MAX_REPLIES:
            raise ConversationError(f"replies at once must be from 2 to {MAX_REPLIES}, got {n!r}")
        if not getattr(self._require_model().runner, "serves_n", True):
            raise ConversationError("several replies at once need the batched server (not ZeroGPU or a "
                                    "cluster): send one reply at a time here")
        if sampling is None or sampling.greedy:
            raise ConversationError("greedy decoding (temperature 0) writes the same reply every time: "
                                    "set a temperature above 0 to see different replies")
        return self._generate(len(self.turns), text, sampling, max_new_tokens, None, None, options, n=n)

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
                  document_chars: int | None = None, options: DecodeOptions = PLAIN, n: int = 1,
                  prefix: tuple[list[int], list] | None = None) -> Iterator:
        if not self._lock.acquire(blocking=False):
            raise ConversationBusy("a reply is still being written in this conversation")
        before = self.last_metrics
        try:
            options = self._with_alternatives(options)
            args = (keep, user_text, sampling or SamplingParams(), self.settings.clamp_new_tokens(max_new_tokens))
            if n > 1:
                yield from self._generate_many(*args, n, options)
            else:
                yield from self._generate_locked(*args, progress, document_chars, options, prefix)
        finally:
            self.last_used = time.monotonic()
            self._lock.release()
            if self.on_commit is not None:
                self.on_commit(self, self.last_metrics if self.last_metrics is not before else None)

    def _with_alternatives(self, options: DecodeOptions) -> DecodeOptions:
        """Every chat reply records each token's probability and its likeliest alternatives (the
        token view, and a rewind to any token); the same numbers as the API's logprobs."""
        k, runner = self.settings.token_alternatives, getattr(self.lm, "runner", None)
        if not k or options.logprobs is not None or not getattr(runner, "serves_options", True):
            return options  # a runner without DecodeOptions (a cluster) writes replies without them
        return replace(options, logprobs=k)

    def _generate_locked(self, keep, user_text, sampling, max_new, progress,
                         document_chars=None, options: DecodeOptions = PLAIN,
                         prefix: tuple[list[int], list] | None = None) -> Iterator[ReplyEvent]:
        lm = self._require_model()
        t0 = time.perf_counter()
        turn, rewritten = self._begin_turn(keep, user_text)
        if document_chars:
            turn.keep_at = self._document_end(turn, document_chars)
        if prefix is not None:  # a rewind: the reply so far, up to and with the chosen token
            turn.reply_ids, turn.logprobs = list(prefix[0]), list(prefix[1])
        tokens = self.token_ids()
        pre = len(tokens) - 1  # the reply's first token comes from the last prompt token's logits
        m = _metrics(lm)
        raw = lm.tokenizer.decode(turn.reply_ids, skip_special_tokens=True) if prefix else ""
        first, finish, reply = True, None, None
        try:
            reply = lm.runner.submit(self._request(lm, tokens, sampling, max_new, progress is not None, options))
            for item in reply:
                if isinstance(item, Progress):
                    progress(item.done, item.total)
                    continue
                if first:
                    _note_reuse(m, reply, pre, rewritten)  # admitted: where reading started is known
                    first = False
                turn.reply_ids.append(item.token_id)
                self._note_logprob(turn, item)
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
            elif prefix is not None:  # the text of the whole reply, not of its two pieces
                turn.reply = chat.visible_reply(self.fmt, lm.tokenizer.decode(turn.reply_ids, skip_special_tokens=True),
                                                final=True)[0]
            if finish == "error" and not reply_started(reply):
                self._drop_begun(keep, user_text)
            else:
                self._commit(turn, reply, finish, m, whole_from=len(prefix[0]) if prefix else 0)
        yield ReplyEvent("", turn.reply, m, done=True, finish_reason=finish)

    def _drop_begun(self, keep: int, user_text: str | None) -> None:
        """Nothing came of the version of turn `keep` just begun: leave the transcript as it was."""
        if user_text is not None:
            self.turns.pop()
        else:
            del self.turns[keep:]
        self.cache.truncate(self.context_tokens)
        self._unbranch(keep)

    @staticmethod
    def _note_logprob(turn: Turn, item: TokenEvent) -> None:
        if item.logprob is None:
            return
        if turn.logprobs is None or len(turn.logprobs) != len(turn.reply_ids) - 1:
            turn.logprobs = [None] * (len(turn.reply_ids) - 1)  # tokens before had none (an older reply)
        turn.logprobs.append((item.logprob, item.top_logprobs))

    def _generate_many(self, keep, user_text, sampling, max_new, n: int,
                       options: DecodeOptions) -> Iterator[ManyEvent]:
        """n replies to one prompt as n batched rows from one read of it (Request.n); the first is
        shown, the others become versions of this turn (switch() picks another)."""
        lm = self._require_model()
        t0 = time.perf_counter()
        turn, rewritten = self._begin_turn(keep, user_text)
        tokens = self.token_ids()
        pre = len(tokens) - 1
        m = _metrics(lm, replies=n)
        rows = [turn] + [Turn(turn.user, list(turn.prompt_ids)) for _ in range(n - 1)]
        raws, finishes, replies = [""] * n, [None] * n, []
        failed = False
        try:
            reply = lm.runner.submit(replace(self._request(lm, tokens, sampling, max_new, False, options), n=n))
            replies = [reply, *reply.siblings]
            live = list(range(n))
            while live:
                for i in list(live):
                    item = next(iter(replies[i]), None)
                    if item is None:
                        live.remove(i)
                        continue
                    if isinstance(item, Progress):
                        continue
                    if m.new_tokens == 0:
                        _note_reuse(m, reply, pre, rewritten)
                        m.ttft_s, m.prefill_s = time.perf_counter() - t0, item.metrics.prefill_s
                    t = rows[i]
                    t.reply_ids.append(item.token_id)
                    self._note_logprob(t, item)
                    raws[i] += item.text
                    m.new_tokens += 1
                    m.batch_size, m.batch_mean = item.metrics.batch_size, item.metrics.batch_mean
                    t.reply, hit = chat.visible_reply(self.fmt, raws[i], final=item.finish_reason is not None)
                    finishes[i] = "stop_string" if hit else item.finish_reason
                    if finishes[i] is not None:
                        live.remove(i)
                        replies[i].close()
                m.decode_s = time.perf_counter() - t0 - m.ttft_s
                yield ManyEvent([t.reply for t in rows], m)
        except GeneratorExit:
            finishes = [f or "cancelled" for f in finishes]
            raise
        except BaseException:
            failed = True
            finishes = [f or "error" for f in finishes]
            raise
        finally:
            for r in replies:
                r.close()
            if replies:
                _note_reuse(m, replies[0], pre, rewritten)
            for i, t in enumerate(rows):
                if finishes[i] == "stop_string":
                    self._cut_at_stop(t, raws[i])
            if failed and not turn.reply_ids:
                self._drop_begun(keep, user_text)
            else:
                self._commit(turn, replies[0] if replies else None, finishes[0], m)
                self._add_versions(keep, rows[1:], replies[1:], finishes[1:], m)
        yield ManyEvent([t.reply for t in rows], m, done=True, finish_reasons=finishes)

    def _add_versions(self, i: int, turns: list[Turn], replies: list[Reply], finishes: list, m: ReplyMetrics) -> None:
        """Other replies to turn i (Show N replies) become its versions, each holding its states:
        the point before the reply (shared) and the reply's end."""
        if not turns:
            return
        fork = self.forks.setdefault(i, Fork([None]))
        b = self._boundaries()[i]
        retry = self._retry_point()
        shared = {p: n for p, n in self.cache.refs.items() if b < p <= retry}
        prefix = layout(self.turns[:i])
        for t, r, finish in zip(turns, replies, finishes):
            t.finish_reason = finish
            end = b + len(t.prompt_ids) + len(t.reply_ids)
            refs = {p: self.cache.tree.hold(n) for p, n in shared.items()}
            node = r.kept.get(end)
            if node is not None and finish not in ("error", "stop_string") and len(r.fed) == len(t.reply_ids):
                refs[end] = self.cache.tree.hold(node)
            t.metrics = replace(m, new_tokens=len(t.reply_ids), finish_reason=finish, context_tokens=end)
            fork.branches.append(Branch([t], {}, refs, set(refs), t.metrics, prefix))
        self._prune(fork)

    def rewind(self, index: int, position: int, token_id: int, sampling: SamplingParams | None = None,
               max_new_tokens: int | None = None, options: DecodeOptions = PLAIN) -> Iterator[ReplyEvent]:
        """Write reply `index` (0-based turn) again from its token `position` on, with `token_id`
        there instead, as a new version of that turn. The state before the token is the nearest
        kept one plus a read of the reply's tokens up to it (the readout says how many)."""
        if not 0 <= index < len(self.turns):
            raise ConversationError(f"there is no reply {index + 1} to rewind ({len(self.turns)} turns)")
        turn = self.turns[index]
        if not 0 <= position < len(turn.reply_ids):
            raise ConversationError(f"reply {index + 1} has {len(turn.reply_ids)} tokens; there is no token "
                                    f"{position + 1}")
        lm = self._require_model()
        if not isinstance(token_id, int) or not 0 <= token_id < lm.engine.config.vocab_size:
            raise ConversationError(f"{token_id!r} is not a token of this model")
        if token_id in self.stop_ids(lm):
            raise ConversationError("that token ends the reply; choose another to continue from")
        lps = list(turn.logprobs or [None] * len(turn.reply_ids))[:position]
        alt = dict((turn.logprobs[position][1]) if turn.logprobs and turn.logprobs[position] else ())
        chosen = (alt[token_id], tuple(alt.items())) if token_id in alt else None
        prefix = (turn.reply_ids[:position] + [token_id], lps + [chosen])
        return self._generate(index, None, sampling, max_new_tokens, None, None, options, prefix=prefix)

    def _request(self, lm: LoadedModel, tokens: list[int], sampling: SamplingParams, max_new: int,
                 progress: bool, options: DecodeOptions = PLAIN) -> Request:
        """The reply as one request: the whole transcript, and where this conversation wants states."""
        return Request(tokens, self.namespace, sampling, max_new, self.stop_ids(lm),
                       keep_at=tuple(p for p in self._marks() if p < len(tokens)), tokenizer=lm.tokenizer,
                       progress=progress, expect=self.cache.expected(len(tokens) - 1), options=options)

    def _begin_turn(self, keep: int, user_text: str | None) -> tuple[Turn, int | None]:
        """Cut the transcript back for the new reply; returns the turn and, where the chat template
        rewrote earlier turns, where the history now ends (the reply re-reads it from the change)."""
        self._branch_off(keep)
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
        if turn.logprobs is not None:
            del turn.logprobs[len(ids):]
        turn.reply = chat.visible_reply(self.fmt, tok.decode(ids, skip_special_tokens=True), final=True)[0]

    def _commit(self, turn: Turn, reply: Reply | None, finish: str | None, m: ReplyMetrics,
                whole_from: int = 0) -> None:
        turn.finish_reason, turn.metrics = finish, m
        end = self.context_tokens
        keep = {p for p in set(self._marks()) | {self._retry_point()} if p <= end}
        base = end - len(turn.prompt_ids) - len(turn.reply_ids)
        whole = (reply is not None and finish not in ("error", "stop_string")
                 and len(reply.fed) == len(turn.reply_ids) - whole_from)
        reach = end if whole else (self._retry_point() if finish == "stop_string" else base)
        self.cache.hold(reply.kept if reply is not None else {}, keep, reach)
        m.state_bytes = self.lm.engine.state_nbytes()
        m.cache_bytes, m.context_tokens = self.cache_bytes(), end
        m.device_mem_bytes, m.device_peak_bytes = device_memory(self.lm.engine.device)
        m.finish_reason = finish
        self.last_metrics = m

    def _read(self, pos: int) -> State:
        """The state after tokens[:pos], from the nearest cached one (a read-only request)."""
        return self._read_reply(pos).end_state

    def _read_from(self, pos: int) -> int:
        """Read up to `pos` (keeping a state there); returns where reading started."""
        return self._read_reply(pos).start

    def _read_reply(self, pos: int) -> Reply:
        lm = self._require_model()
        tokens = self.token_ids()[:pos]
        keep = tuple(p for p in self._marks() if p <= pos)
        reply = lm.runner.submit(Request(tokens, self.namespace, keep_at=(*keep, pos),
                                         expect=self.cache.expected(pos)))
        for _ in reply:
            pass
        if reply.error is not None:
            raise reply.error
        self.cache.hold(reply.kept, {*self.cache.refs, pos}, pos)
        return reply

    def offload(self) -> int:
        """Nothing to move: every state lives in the model's prefix cache, on its device."""
        return 0

    def trim(self, level: int) -> int:
        """Free cache memory; level 1 keeps the latest states, level 2 drops all. Returns bytes freed."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            end = self.context_tokens
            if level >= 2:
                self._release_versions()
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
            self._drop_forks(len(self.turns))
            return turn.user

    def clear(self) -> None:
        with self._locked():
            self.turns, self.last_metrics = [], None
            self.cache.clear()
            self._drop_forks(0)

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

    def fork(self, upto: int | None = None) -> Conversation:
        """An independent copy of the path shown, up to turn `upto` (0-based, included; None: all):
        "branch into a new chat", and compare's panes. Its states are shared (never modified in
        place), so its next turn reads only its own tokens. Other branches stay here."""
        with self._locked():
            if upto is not None and not (isinstance(upto, int) and 0 <= upto < len(self.turns)):
                raise ConversationError(f"there is no turn {upto} to branch from ({len(self.turns)} turns)")
            n = len(self.turns) if upto is None else upto + 1
            other = Conversation(self.lm, self.settings, self.system, self.namespace)
            other.turns = [t.copy() for t in self.turns[:n]]
            other.cache = self.cache.copy(other.token_ids)
            other.cache.truncate(other.context_tokens)
            other.last_metrics = other.turns[-1].metrics if other.turns else None
            return other

    # -- branches ----------------------------------------------------------------------------
    def switch(self, index: int, version: int) -> ReplyMetrics:
        """Show version `version` (0-based) of turn `index`: its turns come back with the states
        they held, so nothing is read while the prefix cache keeps them (the readout says 0 tokens
        read); what the cache evicted is read again and said to be a cache miss."""
        with self._locked():
            fork = self.forks.get(index)
            if fork is None or index >= len(self.turns):
                raise ConversationError(f"turn {index + 1} has no other versions")
            if not 0 <= version < len(fork.branches):
                raise ConversationError(f"turn {index + 1} has {len(fork.branches)} versions, not {version + 1}")
            if version != fork.active:
                self._show(index, version)
            return self._switched_readout(index)

    def _stash(self, i: int, share: bool) -> Branch:
        """The conversation from turn i on as a Branch. share: the conversation keeps its turns
        (as copies, for the new version to write into) and the states too; else they leave it.
        The forks inside those turns go with the branch either way."""
        b = self._boundaries()[i]
        refs, known = self.cache.split(b, share)
        turns = self.turns[i:]
        forks = {j: self.forks.pop(j) for j in [j for j in self.forks if j > i]}
        prefix = layout(self.turns[:i])
        self.turns[i:] = [t.copy() for t in turns] if share else []
        return Branch(turns, forks, refs, known, self.last_metrics, prefix)

    def _branch_off(self, i: int) -> None:
        """Turn i is about to be written again: its current version becomes a branch."""
        if i >= len(self.turns):
            return
        fork = self.forks.setdefault(i, Fork([None]))
        fork.branches[fork.active] = self._stash(i, share=True)
        fork.branches.append(None)
        fork.prev, fork.active = fork.active, len(fork.branches) - 1
        self._prune(fork)

    def _prune(self, fork: Fork) -> None:
        """Beyond MAX_BRANCHES versions, the oldest one neither shown nor just left goes."""
        while len(fork.branches) > MAX_BRANCHES:
            old = next(k for k, b in enumerate(fork.branches) if b is not None and k != fork.prev)
            self._release(fork.branches.pop(old))
            fork.active -= old < fork.active
            fork.prev -= old < fork.prev

    def _unbranch(self, i: int) -> None:
        """The version of turn i just begun came to nothing (an error before any token): show the
        one it branched off again."""
        fork = self.forks.get(i)
        if fork is None or len(self.turns) > i:
            return
        fork.branches.pop(fork.active)
        fork.active = fork.prev
        target, fork.branches[fork.active] = fork.branches[fork.active], None
        self._install(i, target)
        if len(fork.branches) == 1:
            del self.forks[i]

    def _show(self, i: int, k: int) -> None:
        fork = self.forks[i]
        current = self._stash(i, share=False)
        target = fork.branches[k]
        fork.branches[fork.active], fork.branches[k], fork.active = current, None, k
        self._install(i, target)

    def _install(self, i: int, branch: Branch) -> None:
        """Make `branch` the conversation from turn i on (the turns before i as it left them: a chat
        template may have written them otherwise since)."""
        changed = None
        pos = 0
        for t, (prompt, reply) in zip(self.turns[:i], branch.prefix):
            if changed is None and (t.prompt_ids, t.reply_ids) != (prompt, reply):
                changed = pos
            pos += len(t.prompt_ids) + len(t.reply_ids)
            t.prompt_ids, t.reply_ids = prompt, reply
        if changed is not None:
            self.cache.truncate(changed)
        self.turns += branch.turns
        self.forks.update(branch.forks)
        self.cache.attach(branch.refs, branch.known)
        self.last_metrics = branch.metrics

    def _switched_readout(self, index: int) -> ReplyMetrics:
        """The readout of a switch: the tokens read to have the shown version's state (0 while it is cached)."""
        lm = self._require_model()
        end, t0 = self.context_tokens, time.perf_counter()
        start = end
        if end and self.cache.at(end) is None:
            start = self._read_from(end)
        read = end - start
        base = self.last_metrics or _metrics(lm)
        f = self.forks[index]
        m = replace(base, reused_tokens=start, prefilled_tokens=read, rebuilt_tokens=read, rebuilt_reason="",
                    cache_hit=read == 0, new_tokens=0, ttft_s=0.0, decode_s=0.0,
                    prefill_s=time.perf_counter() - t0, context_tokens=end, cache_bytes=self.cache_bytes(),
                    finish_reason=f"version {f.active + 1} of {len(f.branches)} shown")
        m.device_mem_bytes, m.device_peak_bytes = device_memory(lm.engine.device)
        self.last_metrics = m
        return m

    def _drop_forks(self, i: int) -> None:
        """Forks at turn i and beyond lose their other versions (undo, clear)."""
        self._release_forks([self.forks.pop(j) for j in [j for j in self.forks if j >= i]])

    def _release(self, branch: Branch) -> None:
        self.cache.release(branch.refs)
        branch.refs, branch.known = {}, set()
        self._release_forks(branch.forks.values())

    def _release_forks(self, forks) -> None:
        for f in forks:
            for b in f.branches:
                if b is not None:
                    self._release(b)

    def _release_versions(self) -> None:
        """Every other version lets go of its states (their turns stay: a switch reads them again)."""
        self._release_forks(self.forks.values())

    def bind(self, lm: LoadedModel) -> None:
        """Continue this conversation with `lm`; another model re-reads it at the next reply."""
        with self._locked():
            old, self.lm = self.lm, lm
            if old is not None and old.key == lm.key:
                return
            self._release_versions()  # states of the old model's cache, every version's
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
                self._release_versions()
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
        drops its turn's document mark (it was a position in the old tokens). Other branches are
        written again too, and let go of their states (they held the old tokens)."""
        self._reprompt_turns(reply_ids)
        shown = self.turns
        try:
            self._reprompt_forks(self.forks, shown, reply_ids)
        finally:
            self.turns = shown

    def _reprompt_forks(self, forks: dict[int, Fork], path: list[Turn], reply_ids) -> None:
        for i, fork in forks.items():
            for b in fork.branches:
                if b is None:
                    continue
                self.cache.release(b.refs)
                b.refs, b.known = {}, set()
                before = [t.copy() for t in path[:i]]
                self.turns = before + b.turns
                self._reprompt_turns(reply_ids)
                b.turns, b.prefix = self.turns[i:], layout(self.turns[:i])
                self._reprompt_forks(b.forks, self.turns, reply_ids)

    def _reprompt_turns(self, reply_ids: Callable[[Turn], list[int] | None]) -> None:
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
            return export_bytes(self.system, self.turns, lm, state, forks_json(self.forks))

    @classmethod
    def import_bytes(cls, data: bytes, lm: LoadedModel, settings: Settings | None = None) -> Conversation:
        """Resume an exported conversation on `lm`; raises ImportRefused when it does not fit.

        The file's state is not checked against its transcript (that would cost the read the
        import saves), so the conversation gets a private namespace: its state, and every state
        read on from it, serve this conversation (and its forks) alone, with sharing on too."""
        conv = cls(lm, settings, namespace=private_namespace())
        conv.system, conv.turns, state, conv.forks = import_parts(data, lm, conv.fmt, conv.settings)
        if state.seqlen:
            conv.cache.add(state)
        return conv

    # -- history -----------------------------------------------------------------------------
    def saved_parts(self) -> tuple[str, list[Turn], State | None, list[dict]] | None:
        """What the history keeps of it: (system prompt, a copy of the turns, the state at their end
        if the cache holds it, else None (nothing is read for it), the other versions of its turns
        as JSON rows). None while a reply is written (that reply's end saves it)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            turns = [Turn(t.user, list(t.prompt_ids), list(t.reply_ids), t.reply, t.finish_reason)
                     for t in self.turns]
            state = self.cache.at(self.context_tokens) if turns else None
            return self.system, turns, state, forks_json(self.forks)
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
                conv.system, conv.turns, state, conv.forks = import_parts(state_file, lm, conv.fmt, conv.settings)
                if state.seqlen:
                    conv.cache.add(state)
                return conv
            except ImportRefused:
                pass  # another model's state, or a damaged one: the transcript still holds
        try:
            conv.system, conv.turns, conv.forks = transcript_parts(transcript, lm, conv.fmt)
        except ImportRefused:
            conv.system, conv.turns = transcript_texts(transcript)
            conv._retokenize()
        conv.cache.invalidate(conv.context_tokens)  # its state is expected: the next reply says it re-read
        return conv

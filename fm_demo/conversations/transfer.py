"""The conversation file: a transcript and the recurrent state at its end, in one safetensors file.

Layout: tensors `conv` [L, 1, D, K-1] and `ssm` [L, 1, D, N] (the state), and in the metadata a
JSON payload (format, version, model identity, system prompt, turns with their token ids, state
metadata) plus a sha256 over payload and tensors. Reading checks, in order: size, the header's
length (read from its first 8 bytes, before any parsing: at most what a transcript within the
caps needs, `header_limit`), format and version, checksum, model signature, state shape, the
transcript's size (every user message and the system prompt within max_input_chars, as typed in
the chat box; the whole transcript within max_upload_chars characters and as many tokens, the
longest prompt the server reads), every turn's tokens against this model's prompt format (the
prompt its chat template or hand-written format gives after the turns before it), and that the
state holds exactly the transcript's tokens. The other versions of turns (branches: turns.py)
ride along as `forks`, each checked the same way after the turns it follows. Any failure is an ImportRefused whose message says
what is wrong; nothing is half-imported.
"""

from __future__ import annotations

import hashlib
import json

import torch

from .. import chat
from ..engine import State, StateError
from ..models import LoadedModel
from ..settings import Settings
from .turns import MAX_BRANCHES, Branch, Fork, ImportRefused, Turn, layout

EXPORT_FORMAT, EXPORT_VERSION = "fm-demo-conversation", 1
HEADER_SLACK = 64 * 1024  # header bytes besides the transcript: tensor entries, keys, model identity
TOKEN_BYTES = 8  # a token id in the header: up to 6 digits and ", "
CHAR_BYTES = 14  # a character in the header: \\ud83d\\ude00 (escaped once by json.dumps, once as a string)
TURN_BYTES = 160  # a turn's keys, brackets and finish reason
MAX_TURNS = 10_000  # turns of an imported transcript, every branch's counted
MAX_FORK_DEPTH = 16  # branches inside branches a file keeps (deeper ones are left out of it)


def header_limit(settings: Settings) -> int:
    """The longest safetensors header a conversation within the import caps can have: every token
    id, character and turn at its widest. Longer ones are refused before they are parsed."""
    return HEADER_SLACK + settings.max_upload_chars * (TOKEN_BYTES + CHAR_BYTES) + TURN_BYTES * MAX_TURNS


def _rows(turns: list[Turn]) -> list[dict]:
    return [{"user": t.user, "prompt_ids": t.prompt_ids, "reply_ids": t.reply_ids, "reply": t.reply,
             "finish_reason": t.finish_reason} for t in turns]


def forks_json(forks: dict[int, Fork], depth: int = 0) -> list[dict]:
    """A conversation's other versions of its turns, as JSON-ready rows (texts and token ids)."""
    if depth >= MAX_FORK_DEPTH:
        return []
    return [{"at": i, "active": f.active,
             "branches": [None if b is None else {"turns": _rows(b.turns), "forks": forks_json(b.forks, depth + 1)}
                          for b in f.branches]}
            for i, f in sorted(forks.items()) if len(f.branches) > 1]


def export_bytes(system: str, turns: list[Turn], lm: LoadedModel, state: State,
                 forks: list[dict] | None = None) -> bytes:
    """A safetensors file: tensors conv/ssm, the transcript and model identity in its metadata.

    The sha256 covers metadata and tensors: it catches corrupted files, not forged ones (it is a
    checksum, not a signature: anyone can recompute it). Nor is the state checked against the
    transcript (that would mean reading it again). So an imported state is trusted by nobody else:
    Conversation.import_bytes puts it in a private namespace, where it and every state read on
    from it serve that conversation alone, never the shared prefix tree.
    """
    from safetensors.torch import save

    payload = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
        "model": {"preset": lm.key[0], "precision": lm.key[1], "source": lm.preset.source,
                  "kind": lm.kind, "signature": lm.engine.signature},
        "system": system,
        "turns": [{"user": t.user, "prompt_ids": t.prompt_ids, "reply_ids": t.reply_ids,
                   "finish_reason": t.finish_reason} for t in turns],
        "forks": forks or [],
        "state": state.metadata(),
    }
    tensors = {"conv": state.conv.detach().cpu().contiguous(), "ssm": state.ssm.detach().cpu().contiguous()}
    body = json.dumps(payload, sort_keys=True)
    return save(tensors, metadata={"fm_demo": body, "sha256": _digest(body, tensors)})


def transcript_json(system: str, turns: list[Turn], forks: list[dict] | None = None) -> str:
    """The transcript alone (the history's copy of a conversation): the file's payload without a
    model or state, so it can be read again on any model."""
    return json.dumps({"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "system": system,
                       "turns": _rows(turns), "forks": forks or []})


def transcript_parts(text: str, lm: LoadedModel, fmt: chat.ChatFormat) -> tuple[str, list[Turn], dict[int, Fork]]:
    """(system prompt, turns, forks) of transcript_json's text, every turn checked against `lm`'s
    prompt format as an import is; ImportRefused when they do not fit (another tokenizer or template)."""
    payload = _transcript(text)
    system = payload.get("system", "")
    turns = _turns_from(payload.get("turns"), system, lm, fmt)
    return system, turns, _forks_from(payload.get("forks"), turns, system, lm, fmt)


def transcript_texts(text: str) -> tuple[str, list[Turn]]:
    """(system prompt, turns with their texts only, no token ids) of transcript_json's text: what is
    left to re-encode on a model whose prompt format the saved tokens do not fit."""
    payload = _transcript(text)
    try:
        turns = [Turn(str(r["user"]), [], [], str(r.get("reply") or ""), r.get("finish_reason"))
                 for r in payload["turns"]]
    except (KeyError, TypeError):
        raise ImportRefused("the saved transcript is malformed") from None
    return str(payload.get("system", "")), turns


def _transcript(text: str) -> dict:
    try:
        payload = json.loads(text)
    except (TypeError, ValueError):
        raise ImportRefused("the saved transcript is not JSON") from None
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ImportRefused("the saved transcript is malformed")
    return payload


def peek_model(data: bytes, settings: Settings) -> dict:
    """The model an exported conversation was saved with: {preset, precision, source, kind, signature}."""
    _check_size(data, settings)
    return _payload(data, header_limit(settings))[0]["model"]


def import_parts(data: bytes, lm: LoadedModel, fmt: chat.ChatFormat,
                 settings: Settings) -> tuple[str, list[Turn], State, dict[int, Fork]]:
    """(system prompt, turns, state on CPU, forks) from an export, or ImportRefused saying why not."""
    from safetensors.torch import load

    _check_size(data, settings)
    payload, meta = _payload(data, header_limit(settings))
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
    _check_transcript(_all_rows(payload), system, settings)
    turns = _turns_from(payload.get("turns"), system, lm, fmt)
    if state.seqlen != sum(len(t.prompt_ids) + len(t.reply_ids) for t in turns):
        raise ImportRefused(f"the saved state holds {state.seqlen} tokens but the transcript has a different count")
    return system, turns, state, _forks_from(payload.get("forks"), turns, system, lm, fmt)


def _all_rows(payload: dict) -> list:
    """Every turn row of a payload: the conversation's and its branches' (for the caps)."""
    rows = payload.get("turns")
    if not isinstance(rows, list):
        return rows
    out, stack = list(rows), [(payload.get("forks"), 0)]
    while stack:
        forks, depth = stack.pop()
        if forks in (None, []):
            continue
        if not isinstance(forks, list) or depth > MAX_FORK_DEPTH:
            raise ImportRefused("the branches in the file are malformed")
        for f in forks:
            branches = f.get("branches") if isinstance(f, dict) else None
            if not isinstance(branches, list):
                raise ImportRefused("the branches in the file are malformed")
            for b in branches:
                if isinstance(b, dict):
                    out += b.get("turns") if isinstance(b.get("turns"), list) else [None]
                    stack.append((b.get("forks"), depth + 1))
    return out


def _forks_from(raw, path: list[Turn], system: str, lm: LoadedModel, fmt: chat.ChatFormat,
                depth: int = 0) -> dict[int, Fork]:
    """The forks of a payload, each branch's turns checked after the turns they follow."""
    if raw in (None, []):
        return {}
    if not isinstance(raw, list) or depth > MAX_FORK_DEPTH:
        raise ImportRefused("the branches in the file are malformed")
    forks: dict[int, Fork] = {}
    for f in raw:
        try:
            at, active, branches = f["at"], f["active"], f["branches"]
            ok = (isinstance(at, int) and 0 <= at < len(path) and at not in forks and isinstance(branches, list)
                  and 1 < len(branches) <= MAX_BRANCHES and isinstance(active, int) and 0 <= active < len(branches)
                  and branches[active] is None
                  and all(isinstance(b, dict) for k, b in enumerate(branches) if k != active))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise ImportRefused("the branches in the file are malformed")
        before = path[:at]
        prefix = layout(before)
        out: list[Branch | None] = []
        for k, b in enumerate(branches):
            if k == active:
                out.append(None)
                continue
            turns = _turns_from(b.get("turns"), system, lm, fmt, before)
            if not turns:
                raise ImportRefused("the branches in the file are malformed")
            out.append(Branch(turns, _forks_from(b.get("forks"), before + turns, system, lm, fmt, depth + 1),
                              prefix=prefix))
        forks[at] = Fork(out, active)
    return forks


def _check_size(data: bytes, settings: Settings) -> None:
    limit = settings.max_import_bytes
    if len(data) > limit:
        raise ImportRefused(f"the file has {len(data) / 1e6:.1f} MB; this server accepts up to "
                            f"{limit / 1e6:.0f} MB")


def _payload(data: bytes, max_header: int) -> tuple[dict, dict]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) without the tensors;
    one longer than `max_header` bytes is refused unparsed."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 8:
        raise ImportRefused("not a conversation file exported by this app")
    n = int.from_bytes(bytes(data[:8]), "little")
    if n > len(data) - 8:
        raise ImportRefused("not a conversation file exported by this app")
    if n > max_header:
        raise ImportRefused(f"the file's header has {n / 1e6:.1f} MB; a conversation within this server's "
                            f"limits needs at most {max_header / 1e6:.1f} MB (FM_DEMO_MAX_UPLOAD_CHARS)")
    try:
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


def _check_transcript(rows, system, settings: Settings) -> None:
    """Refuse a transcript beyond the limits typed input has, before any of it is tokenized: the
    system prompt and every user message within max_input_chars and valid Unicode; all its text,
    and all its tokens, within max_upload_chars; at most MAX_TURNS turns."""
    if not isinstance(rows, list) or not isinstance(system, str) or not all(isinstance(r, dict) for r in rows):
        raise ImportRefused("the transcript in the file is malformed")
    if len(rows) > MAX_TURNS:
        raise ImportRefused(f"the transcript has {len(rows):,} turns; this server imports up to {MAX_TURNS:,}")
    typed, most = settings.max_input_chars, settings.max_upload_chars
    texts = [system] + [r.get("user") for r in rows]
    longest = max(len(t) if isinstance(t, str) else 0 for t in texts)
    if longest > typed:
        raise ImportRefused(f"a message in the transcript has {longest:,} characters; the limit is {typed:,}")
    if any(isinstance(t, str) and not t.isascii() and not _is_unicode(t) for t in texts):
        raise ImportRefused("the transcript has text that is not valid Unicode (a lone surrogate)")
    chars = sum(len(t) for t in texts if isinstance(t, str))
    tokens = sum(len(r.get(k)) for r in rows for k in ("prompt_ids", "reply_ids") if isinstance(r.get(k), list))
    if chars > most or tokens > most:
        raise ImportRefused(f"the transcript has {chars:,} characters and {tokens:,} tokens; this server "
                            f"imports up to {most:,} of each (FM_DEMO_MAX_UPLOAD_CHARS)")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON's \\ud800 escape can write one
        return False
    return True


def _turns_from(rows, system: str, lm: LoadedModel, fmt: chat.ChatFormat,
                before: list[Turn] = ()) -> list[Turn]:
    """Rebuild turns (after the turns `before`), checking every id and that each prompt is what
    this model's format writes."""
    if not isinstance(rows, list) or not isinstance(system, str):
        raise ImportRefused("the transcript in the file is malformed")
    tok, vocab, turns = lm.tokenizer, lm.engine.config.vocab_size, list(before)
    for i, row in enumerate(rows):
        try:
            user, prompt, reply = row["user"], list(row["prompt_ids"]), list(row["reply_ids"])
            ok = isinstance(user, str) and all(isinstance(x, int) and 0 <= x < vocab for x in prompt + reply)
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise ImportRefused(f"turn {len(before) + i + 1} of the transcript is malformed")
        ext = chat.next_prompt(fmt, tok, turns, user, system=system)
        if ext.layout is not None or prompt != ext.prompt:
            raise ImportRefused(f"turn {len(before) + i + 1} does not match this model's prompt format (edited file or "
                                f"another tokenizer)")
        text = chat.visible_reply(fmt, tok.decode(reply, skip_special_tokens=True), final=True)[0]
        finish = row.get("finish_reason")
        turns.append(Turn(user, prompt, reply, text, finish if isinstance(finish, str) else None))
    return turns[len(before):]

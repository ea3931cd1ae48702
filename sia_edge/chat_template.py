"""Chat messages -> token ids in the base model's own chat template, where only the template
writes special tokens.

Tokenising the rendered template with special-token parsing would let a message that contains
the text ``<|im_end|>\\n<|im_start|>assistant`` write real control tokens: the user would forge
the assistant's turn, exactly the opening steering is meant to resist. So the template is
rendered twice: once as it is, and once with each message's content replaced by a unique marker,
which shows where the template's own text ends and a message's content begins. Special tokens
are then found in the template's text only; the text between them, template text and message
content alike, is tokenised as plain text in one piece, so ordinary messages get exactly the
tokens that parsing the whole rendered text would give (tested in tests/test_abuse_api.py).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from typing import Any

from sia_edge.llama_backend import LlamaModel, SpecialToken

__all__ = ["ChatTemplate", "split_special_tokens"]

Messages = Sequence[dict[str, str]]
_ASCII_SPACE = " \t\n\r\f\v"  # what llama.cpp's lstrip/rstrip attributes strip (C isspace)


class ChatTemplate:
    """The chat template of one model, compiled once."""

    def __init__(self, model: LlamaModel) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = model.chat_template
        if not template:
            raise ValueError(f"{model.path.name} has no chat template: pass a plain prompt instead")
        self.model = model
        self.bos = model.token_text(model.bos) if model.bos >= 0 else ""
        eos = model.token_text(model.eos) if model.eos >= 0 else ""
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=self.bos,
                                              add_generation_prompt=True)

    def render(self, messages: Messages) -> str:
        """The template's text for ``messages`` (what the model was trained to read)."""
        return str(self._formatter(messages=list(messages)).prompt)  # type: ignore[arg-type]

    def segments(self, messages: Messages) -> list[tuple[str, bool]]:
        """The rendered text as (text, written_by_the_template) pieces, in order."""
        _check_messages(messages)
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]  # nothing else reaches the template
        text = self.render(messages)
        nonce = secrets.token_hex(6)
        marked = [dict(m, content=f"\ue000{nonce}:{i}\ue001") if m["content"] else dict(m)
                  for i, m in enumerate(messages)]
        pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", self.render(marked))
        # A template may transform content (Gemma's trims it): try the content as it is, then
        # trimmed; if neither reproduces the template's text, keep the content as it is, since a
        # small difference in whitespace is better than letting content write control tokens.
        for transform in (_as_is, str.strip):
            segments = [(p, True) if i % 2 == 0 else (transform(messages[int(p)]["content"]), False)
                        for i, p in enumerate(pieces)]
            if "".join(s for s, _ in segments) == text:
                break
        else:
            segments = [(p, True) if i % 2 == 0 else (messages[int(p)]["content"], False)
                        for i, p in enumerate(pieces)]
        return [(s, t) for s, t in segments if s]

    def tokenize(self, messages: Messages) -> list[int]:
        """Token ids ready to generate from; special tokens only where the template wrote them."""
        segments = self.segments(messages)
        # The template may already write BOS; llama.cpp would add a second one.
        add_special = not (self.bos and segments and segments[0][1] and segments[0][0].startswith(self.bos))
        model = self.model
        specials = model.special_tokens
        out: list[int] = [model.bos] if add_special and model.add_bos and model.bos >= 0 else []
        run: list[str] = []  # plain text since the last special token

        def flush() -> None:
            if run:
                out.extend(model.tokenize("".join(run), add_special=False, parse_special=False))
                run.clear()

        for text, from_template in segments:
            for part in split_special_tokens(text, specials) if from_template else [text]:
                if isinstance(part, int):
                    flush()
                    out.append(part)
                else:
                    run.append(part)
        flush()
        if add_special and model.add_eos and model.eos >= 0:
            out.append(model.eos)
        return out


def split_special_tokens(text: str, specials: Sequence[SpecialToken]) -> list[str | int]:
    """``text`` split at the special tokens' texts into plain-text pieces and token ids, as
    llama.cpp's tokenizer partitions text when it parses special tokens (longest token first,
    whitespace stripped beside tokens that carry the lstrip / rstrip attribute)."""
    frags: list[str | int] = [text]
    for tok in specials:
        if not any(isinstance(f, str) and tok.text in f for f in frags):
            continue
        out: list[str | int] = []
        for f in frags:
            if isinstance(f, int) or tok.text not in f:
                out.append(f)
                continue
            start = 0
            while (i := f.find(tok.text, start)) >= 0:
                left = f[start:i]
                if tok.lstrip:
                    left = left.rstrip(_ASCII_SPACE)
                if left:
                    out.append(left)
                out.append(tok.id)
                start = i + len(tok.text)
                if tok.rstrip:
                    while start < len(f) and f[start] in _ASCII_SPACE:
                        start += 1
            if start < len(f):
                out.append(f[start:])
        frags = out
    return frags


def _as_is(text: str) -> str:
    return text


def _check_messages(messages: Any) -> None:
    if not messages:
        raise ValueError("messages is empty")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each message needs 'role' and 'content', got {m!r}")
        if not isinstance(m["content"], str) or not isinstance(m["role"], str):
            raise ValueError(f"a message's role and content must be text, got {m!r}")  # noqa: TRY004 (callers report ValueErrors as bad input)
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,31}", m["role"]):
            # the template writes the role as it is, where special tokens are parsed: only names
            raise ValueError(f"a message's role must be a name such as user, assistant or system, got {m['role']!r}")

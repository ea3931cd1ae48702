"""Constrained decoding under steering: llama.cpp's own grammar sampler masks the base model's
logits before the gate, the value model and the sampler see them.

A ``Grammar`` is GBNF text (llama.cpp's grammar language); ``json_object()`` and
``json_schema(schema)`` build the grammars of OpenAI's ``response_format`` with
llama-cpp-python's converter. Each generation gets its own ``GrammarState`` (llama.cpp's grammar
sampler: the parse stacks of what was generated so far), which the decode loop asks at every step
to set the logits of the tokens the grammar forbids to -inf (the native kernels treat -inf as a
masked token: no probability, never a candidate that can be drawn), and tells which token was
chosen.

Why llama.cpp's sampler and not xgrammar or llguidance: it ships in the llama.cpp build we load
already (no second tokenizer to keep in step with the model's), and its cost is only paid by a
constrained request; docs/results/cost.md has what it costs per token. Masking checks the
likeliest tokens first: if at least k of them are allowed, no token outside them can be among
the top k, so the rest of the vocabulary is masked without being parsed.
"""

from __future__ import annotations

import ctypes
import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from sia_edge.llama_backend import LlamaModel

__all__ = ["MAX_GRAMMAR_BYTES", "MAX_NESTING", "Grammar", "GrammarDeadEnd", "GrammarError", "GrammarState", "check_gbnf",
           "json_object", "json_schema"]

# llama.cpp's GBNF parser recurses once per nested group and crashes the process (a stack
# overflow, not an error) some ten thousand levels deep: text is checked before it gets there.
MAX_NESTING = 256
MAX_GRAMMAR_BYTES = 256 * 1024


class GrammarError(ValueError):
    """A grammar that cannot be used: too large, too deeply nested, or not GBNF llama.cpp parses."""


class GrammarDeadEnd(ValueError):
    """The grammar allows no token at this step (it cannot be continued with this vocabulary)."""


def check_gbnf(text: str, what: str = "grammar") -> None:
    """GrammarError unless ``text`` is small enough and nests groups at most MAX_NESTING deep
    (outside quoted literals, character classes and comments, as GBNF reads it)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"{what}: longer than {MAX_GRAMMAR_BYTES // 1024} KiB")
    depth, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"[":  # a literal or a character class: skip to its end, escapes included
            end = "\"" if c == "\"" else "]"
            i += 1
            while i < n and text[i] != end:
                i += 2 if text[i] == "\\" else 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c == "(":
            depth += 1
            if depth > MAX_NESTING:
                raise GrammarError(f"{what}: groups nested more than {MAX_NESTING} deep")
        elif c == ")":
            depth -= 1
        i += 1

# llama_token_data {int32 id; float logit; float p} as a numpy record
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar (rule ``root`` first matched); ``what`` names it in errors."""

    text: str
    what: str = "grammar"

    def start(self, model: LlamaModel, k: int) -> GrammarState:
        """The grammar's state for one generation on ``model``; GrammarError if it cannot be used."""
        return GrammarState(model, self, k)


def json_object() -> Grammar:
    """Any JSON object (``response_format: {"type": "json_object"}``)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return Grammar(JSON_GBNF, "json_object")


def json_schema(schema: dict[str, Any]) -> Grammar:
    """JSON that matches ``schema`` (``response_format: {"type": "json_schema"}``); ValueError
    for a schema the converter cannot turn into a grammar."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        text = json_schema_to_gbnf(json.dumps(schema))
    except (ValueError, KeyError, TypeError, AttributeError, NotImplementedError, RecursionError) as exc:
        raise ValueError(f"the JSON schema cannot be turned into a grammar: {type(exc).__name__}: {exc}") from None
    return Grammar(text, "json_schema")


class GrammarState:
    """llama.cpp's grammar sampler for one generation: ``mask`` the logits of a step, then
    ``accept`` the token chosen. Owns one llama.cpp handle, freed by ``close`` (or by a finaliser
    if it is dropped), like every handle of llama_backend."""

    def __init__(self, model: LlamaModel, grammar: Grammar, k: int) -> None:
        self.model, self.grammar, self.k = model, grammar, k
        check_gbnf(grammar.text, grammar.what)
        with model.hold():
            ptr = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.text.encode("utf-8"), b"root")
        if not ptr:
            raise GrammarError(f"{grammar.what}: llama.cpp could not parse the grammar (GBNF; see llama.cpp's "
                             "grammars/README.md)")
        self._ptr = ptr
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _free, ptr, model)
        self._data = np.zeros(model.n_vocab, dtype=_TOKEN_DATA)
        self._data["id"] = np.arange(model.n_vocab, dtype=np.int32)
        first = max(4 * k, 64)
        self._heads = (first, max(1024, 4 * first))  # how many of the likeliest tokens are parsed first

    def close(self) -> None:
        with self._lock:  # not while another thread is inside llama.cpp with the handle
            self._finalizer()

    def _apply(self, data: npt.NDArray[Any]) -> None:
        array = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), size=data.size, selected=-1,
            sorted=False)
        with self._lock:
            if not self._finalizer.alive:
                raise ValueError("the grammar state is closed")
            llama_cpp.llama_sampler_apply(self._ptr, ctypes.byref(array))

    def mask(self, logits: npt.NDArray[np.float32]) -> int:
        """Set the logits of the tokens the grammar forbids now to -inf, in place. Returns how
        many tokens were parsed: the likeliest few first, then more, then the whole vocabulary,
        until at least k are allowed (no token outside a parsed head can then be among the k
        likeliest allowed, so the rest is masked unparsed: the k candidates are exact, while
        statistics over the whole vocabulary then cover the allowed tokens of the head).
        GrammarDeadEnd if the grammar allows no token."""
        n = logits.shape[0]
        want = min(self.k, n)
        for head in self._heads:
            if head >= n:
                break
            top = np.argpartition(logits, n - head)[n - head:]
            part = np.empty(head, dtype=_TOKEN_DATA)
            part["id"], part["logit"], part["p"] = top, logits[top], 0.0
            self._apply(part)
            allowed = np.isfinite(part["logit"])
            if int(allowed.sum()) >= want:
                kept = logits[top[allowed]]
                logits[:] = -np.inf
                logits[top[allowed]] = kept
                return int(head)
        data = self._data
        data["logit"] = logits
        self._apply(data)
        logits[:] = data["logit"]
        if not np.isfinite(logits).any():
            raise GrammarDeadEnd(f"{self.grammar.what}: no token of this model can continue the answer here; "
                                 "check the grammar (a literal the vocabulary cannot spell?)")
        return int(n)

    def accept(self, token: int) -> None:
        with self._lock:
            if not self._finalizer.alive:
                raise ValueError("the grammar state is closed")
            llama_cpp.llama_sampler_accept(self._ptr, int(token))


def _free(ptr: Any, model: LlamaModel) -> None:  # holds the model: the vocabulary outlives the sampler
    llama_cpp.llama_sampler_free(ptr)

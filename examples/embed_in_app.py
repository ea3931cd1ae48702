"""Embedding sia-edge in an application: answers stream into a UI callback from a worker thread,
and the UI can cancel them. See docs/EMBEDDING.md.

The "UI" here is a stand-in for a toolkit's event loop (Tk, Qt, GTK, ...): a queue of callables
that only the UI thread runs. With a real toolkit, replace ``UiLoop.post`` by its way of running
a function on the UI thread (Tk ``root.after(0, fn)``, Qt a queued signal, GTK ``GLib.idle_add``).

    python examples/embed_in_app.py [--model BASE.gguf] [--value-model VALUE.gguf] [--max-tokens N] [--threads N]
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

from sia_edge.engine import Generation, GenerationStats, SteeringEngine
from sia_edge.steering import SteeringConfig
from sia_edge.models import ModelNotFoundError, default_value_model


class UiLoop:
    """A minimal event loop: other threads ``post`` work, the UI thread runs it."""

    def __init__(self) -> None:
        self._calls: queue.Queue[Callable[[], None]] = queue.Queue()
        self.thread = threading.current_thread()
        self._running = True

    def post(self, fn: Callable[..., None], *args: Any) -> None:  # callable from any thread
        self._calls.put(lambda: fn(*args))

    def quit(self) -> None:
        self._running = False

    def run(self, timeout: float = 120.0) -> None:
        self._running = True
        while self._running:
            self._calls.get(timeout=timeout)()  # queue.Empty after `timeout` s: something hung


class SteeredAssistant:
    """What an app keeps: one engine (load once, it is thread-safe), one answer at a time per
    conversation, generated off the UI thread, reported back on it."""

    def __init__(self, engine: SteeringEngine, config: SteeringConfig, ui: UiLoop) -> None:
        self.engine, self.config, self.ui = engine, config, ui
        self.history: list[dict[str, str]] = []
        self._gen: Generation | None = None

    def ask(
        self,
        text: str,
        on_token: Callable[[str, bool], None],
        on_done: Callable[[str, GenerationStats], None],
        on_error: Callable[[str], None],
        *,
        max_tokens: int = 128,
        seed: int = 0,
    ) -> None:
        """Start an answer; returns at once. Callbacks run on the UI thread."""
        if self._gen is not None:
            raise RuntimeError("an answer is already running; cancel() it first")
        self.history.append({"role": "user", "content": text})
        try:  # cheap (tokenising) and raises ContextOverflowError etc. right here, on the UI thread
            gen = self.engine.generate(self.history, max_tokens=max_tokens, config=self.config, seed=seed)
        except ValueError as exc:
            self.history.pop()
            on_error(str(exc))
            return
        self._gen = gen

        def work() -> None:  # the worker thread: all native work happens here
            try:
                with gen:  # returns the generation's contexts to the engine's pool, whatever happens
                    for ev in gen:
                        self.ui.post(on_token, ev.text, ev.junction)
            except Exception as exc:  # noqa: BLE001 -- report it; never die silently in a thread
                self.ui.post(self._finish_error, f"{type(exc).__name__}: {exc}", on_error)
                return
            self.ui.post(self._finish, gen, on_done)

        threading.Thread(target=work, name="sia-answer", daemon=True).start()

    def cancel(self) -> None:
        """Stop the running answer after the current token (any thread; here: the UI's)."""
        if self._gen is not None:
            self._gen.cancel()

    def _finish(self, gen: Generation, on_done: Callable[[str, GenerationStats], None]) -> None:
        self._gen = None
        # gen.text is the whole answer, including any bytes of a multi-byte character that the
        # decoder held back until the end: use it, not the joined token texts, as the final answer.
        if gen.text.strip():
            self.history.append({"role": "assistant", "content": gen.text})
        else:
            self.history.pop()
        on_done(gen.text, gen.stats)

    def _finish_error(self, message: str, on_error: Callable[[str], None]) -> None:
        self._gen = None
        self.history.pop()
        on_error(message)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base model GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--value-model", help="value model GGUF (default: the project's, if built)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, help="CPU threads per model (default: all cores)")
    args = ap.parse_args(argv)

    value_model = args.value_model
    if value_model is None:
        try:
            value_model = default_value_model()
        except ModelNotFoundError:
            print("no value model installed: steering is off in this demo", file=sys.stderr)
    engine = SteeringEngine(args.model, value_model, n_ctx=1024, n_threads=args.threads)  # once, at app start
    # what the value model was evaluated with, as the chat steers (off without a value model);
    # an app with its own settings passes SteeringConfig(...) instead
    config = engine.recommended()

    ui = UiLoop()
    assistant = SteeredAssistant(engine, config, ui)
    transcript: list[str] = []  # the "text widget"
    tokens_seen = [0]

    def on_token(text: str, junction: bool) -> None:
        assert threading.current_thread() is ui.thread  # callbacks run on the UI thread
        transcript.append(f"[[{text}]]" if junction else text)  # a real UI would colour junctions
        tokens_seen[0] += 1
        print(transcript[-1], end="", flush=True)

    def on_done(text: str, stats: GenerationStats) -> None:
        print(f"\n-- {stats.tokens} tokens, {stats.junctions} junctions, {stats.ms_per_token:.1f} ms/token, "
              f"stop: {stats.stop_reason}")
        ui.quit()

    def on_error(message: str) -> None:
        print(f"\n-- error: {message}")
        ui.quit()

    # 1. A full answer, streamed into the "widget" while the UI thread stays free.
    print("user: What is a good name for a cat?\nassistant: ", end="")
    assistant.ask("What is a good name for a cat?", on_token, on_done, on_error, max_tokens=args.max_tokens)
    ui.run()

    # 2. The user presses "stop" after three tokens: cancel from the UI thread.
    def on_token_then_stop(text: str, junction: bool) -> None:
        on_token(text, junction)
        if tokens_seen[0] - first_answer_tokens == 3:
            assistant.cancel()

    first_answer_tokens = tokens_seen[0]
    print("user: Now write a very long poem about it.\nassistant: ", end="")
    assistant.ask("Now write a very long poem about it.", on_token_then_stop, on_done, on_error,
                  max_tokens=max(args.max_tokens, 64), seed=1)
    ui.run()
    print(f"conversation: {len(assistant.history)} messages")
    return 0


if __name__ == "__main__":
    sys.exit(main())

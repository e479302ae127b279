"""The server's text rules: the chat template and stop strings.

The chat template is plain bytes, one line per message (docs/SERVING.md)::

    System: You are terse.
    User: Hello
    Assistant:

A message's role is written capitalised, then ": ", its content, then a newline; the prompt ends with
"Assistant:" so that the model continues the assistant's turn. The shipped model is a small byte-level model
trained on plain text, not instruction-tuned: it continues the transcript, it does not follow instructions.
"""
from __future__ import annotations

ROLES = ("system", "user", "assistant")
# what ends an assistant turn in the template: a chat request stops there unless it names its own stops
CHAT_STOP = "\nUser:"


def render_messages(messages: list[tuple[str, str]]) -> str:
    """The template's lines for (role, content) pairs, without the final "Assistant:" cue."""
    return "".join(f"{role.capitalize()}: {content}\n" for role, content in messages)


def chat_prompt(messages: list[tuple[str, str]], continued: bool = False) -> tuple[str, str]:
    """(header, prompt): the prompt for ``messages`` ending with the "Assistant:" cue, and its header (every
    message but the last, a prefix of the prompt worth caching: a system prompt, a few-shot transcript).
    ``continued``: the messages follow a session's earlier turns, so they start on a new line."""
    lead = "\n" if continued else ""
    header = lead + render_messages(messages[:-1])
    return header, header + render_messages(messages[-1:]) + "Assistant:"


class StopScanner:
    """Cuts generated text before the first stop string (the one complete first; of those complete at once,
    the longest), across pieces as they stream.

    ``push`` returns the text that can be shown now: text that might still be the start of a stop string is
    held back until the next piece settles it; ``flush`` returns what is held at the end of the stream."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""       # everything generated so far
        self.shown = 0       # how much of it has been returned
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        old = len(self.text)
        self.text += piece
        # generation stops where a stop string is first complete: scan the new end positions in order
        for end in range(old + 1, len(self.text) + 1):
            starts = [end - len(s) for s in self.stops if end >= len(s) and self.text.startswith(s, end - len(s))]
            if starts:
                self.stopped = True
                return self._show(min(starts))
        return self._show(len(self.text) - self.hold)

    def flush(self) -> str:
        return "" if self.stopped else self._show(len(self.text))

    def _show(self, upto: int) -> str:
        if upto <= self.shown:
            return ""
        out = self.text[self.shown:upto]
        self.shown = upto
        return out

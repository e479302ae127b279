"""The server's text rules: the chat template (stop strings: thl_np.generation.StopScanner).

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

"""What a streaming client may see of a backtracking generation, as its ids arrive.

Streaming cannot un-send text. ``ResetStream`` turns generated ids into text events in one of two
modes (DESIGN.md, "known traps"):

* ``hold``: nothing that is later discarded is ever sent. Text is held back while a ``[RESET]`` is
  still possible; the decoder makes that a bounded time by decoding with ``reset_window`` (a reset is
  possible only within ``window`` ids of the start or the last reset) and ``max_resets``. Once neither
  allows another reset, the held text is released and the rest streams as it comes.
* ``retract``: text goes out at once. On ``[RESET]`` a ``reset`` event tells the client how many
  characters of this answer it has been sent and must drop; the new answer then streams.

In both modes the text a client keeps (everything after the last ``reset`` event, concatenated)
equals ``shown_text(tokenizer, backtrack_output(ids, ...))``, the non-streaming answer: every delta
is a prefix-extension of that same formula (control text cleaned, leading whitespace dropped), and
trailing whitespace and half-decoded characters are held until what follows them arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bt_ray.reset import BacktrackOutput, backtrack_output, clean_control_text, control_strings

StreamMode = Literal["hold", "retract"]
STREAM_MODES: tuple[str, ...] = ("hold", "retract")


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One thing to send to the client.

    Attributes:
        kind: ``text`` (append ``text``) or ``reset`` (drop the last ``retracted_chars`` characters of
            this answer that were sent: all of them since the previous reset, then go on appending).
        text: the text to append (``text`` events).
        retracted_chars: characters the client must drop (``reset`` events; 0 when nothing was sent).
        num_resets: resets so far (``reset`` events).
    """

    kind: Literal["text", "reset"]
    text: str = ""
    retracted_chars: int = 0
    num_resets: int = 0


class ResetStream:
    """Feeds on generated ids; yields the ``StreamEvent``s a client may see.

    Args:
        tokenizer: the model's tokenizer (``[RESET]`` registered).
        reset_id: the ``[RESET]`` id.
        stop_ids: ids that end the answer (not shown).
        mode: ``hold`` or ``retract`` (module docstring).
        max_resets: the decoder's ``max_resets`` (None: any number).
        window: the decoder's ``reset_window`` (None: a reset is possible anywhere). In ``hold`` mode,
            with both None, the whole answer is held to the end.
    """

    def __init__(self, tokenizer, reset_id: int, stop_ids, *, mode: StreamMode = "hold",
                 max_resets: int | None = 1, window: int | None = None):
        if mode not in STREAM_MODES:
            raise ValueError(f"mode must be one of {STREAM_MODES}; got {mode!r}")
        self.tokenizer = tokenizer
        self.reset_id = reset_id
        self.stop_ids = frozenset(stop_ids)
        self.mode = mode
        self.max_resets = max_resets
        self.window = window
        self.ids: list[int] = []  # every generated id, the stop id included
        self.num_resets = 0
        self.stopped = False
        self.unheld_resets = 0
        """Resets that came after text was released in hold mode: never, with a decoder that honours
        ``window``/``max_resets``; counted (and retracted) rather than trusted."""
        # Proper prefixes of control strings: text ending in one is held, since the rest of the
        # control string would be cleaned away (``clean_control_text``) and change what was sent.
        self._partial_control = {c[:i] for c in control_strings(tokenizer) for i in range(1, len(c))}
        self._segment: list[int] = []  # ids since the last reset
        self._sent = ""  # text of this segment the client has

    def feed(self, ids: list[int]) -> list[StreamEvent]:
        """Take newly generated ids; returns the events to send now."""
        events: list[StreamEvent] = []
        for token in ids:
            if self.stopped:
                break
            self.ids.append(token)
            if token in self.stop_ids:
                self.stopped = True
            elif token == self.reset_id:
                self.num_resets += 1
                if self._sent and self.mode == "hold":
                    self.unheld_resets += 1
                if self.mode == "retract" or self._sent:
                    events.append(StreamEvent("reset", retracted_chars=len(self._sent),
                                              num_resets=self.num_resets))
                self._segment, self._sent = [], ""
            else:
                self._segment.append(token)
        if self.mode == "retract" or not self._reset_possible():
            events += self._release(final=False)
        return events

    def finish(self) -> list[StreamEvent]:
        """The generation ended (stop id or token limit): release what is held."""
        return self._release(final=True)

    @property
    def output(self) -> BacktrackOutput:
        """The whole generation post-processed, as the non-streaming answer sees it."""
        return backtrack_output(self.ids, self.reset_id, tuple(self.stop_ids))

    def _reset_possible(self) -> bool:
        if self.stopped:
            return False
        if self.max_resets is not None and self.num_resets >= self.max_resets:
            return False
        return self.window is None or len(self._segment) < self.window

    def _text(self) -> str:
        decoded = self.tokenizer.decode(self._segment, skip_special_tokens=True)
        return clean_control_text(self.tokenizer, decoded).lstrip()

    def _hold_back(self, text: str) -> str:
        text = text.rstrip().rstrip("\ufffd")
        for start in range(max(0, len(text) - max(map(len, self._partial_control), default=0)), len(text)):
            if text[start:] in self._partial_control:
                return self._hold_back(text[:start])
        return text

    def _release(self, *, final: bool) -> list[StreamEvent]:
        text = self._text()
        # Not yet: trailing whitespace (the final answer is stripped), a half-decoded character and
        # the start of what may become a control string.
        ready = text.strip() if final else self._hold_back(text)
        if ready.startswith(self._sent):
            delta, self._sent = ready[len(self._sent):], ready
            return [StreamEvent("text", text=delta)] if delta else []
        # Decoding more ids changed text already sent (not seen with byte-level BPE): say so and resend.
        sent, self._sent = self._sent, ready
        return [StreamEvent("reset", retracted_chars=len(sent), num_resets=self.num_resets),
                StreamEvent("text", text=ready)]

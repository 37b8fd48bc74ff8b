"""A completion's text as it grows: stop strings (OpenAI's `stop`) and the deltas a stream hands out.

OpenAI's semantics: the completion ends at the first occurrence of any stop string in the *generated* text
(never the prompt's), and the returned text ends just before it; the finish reason is "stop". The scheduler
asks `StopStrings` after every token (its `stop_when` hook), so a request leaves the batch at the very token
that completes a stop string: its token count and attribution cover exactly what was generated. A stream must
not hand out text that may turn out to be the start of a stop string, so `TextStream` holds back the longest
end of the text that is a prefix of one, until the next token settles it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """Stop strings over a tokenizer's decoded text; called by the scheduler after every token."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def find(self, text: str) -> int | None:
        """Where the text must end: the first occurrence of any stop string, or None."""
        found = [index for index in (text.find(stop) for stop in self.stops) if index >= 0]
        return min(found) if found else None

    def held(self, text: str) -> int:
        """How many characters at the end of `text` could still grow into a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def __call__(self, tokens: Sequence[int]) -> bool:
        return self.find(self.decode(tokens)) is not None


class TextStream:
    """One choice's text so far, handed out as deltas. A token that ends inside a multi-byte character is held
    back until the character is complete, and so is an end that may be the start of a stop string."""

    def __init__(self, tokenizer, stops: StopStrings | None = None):
        self.tokenizer = tokenizer
        self.stops = stops
        self.tokens: list[int] = []
        self.text = ""  # what has been handed out
        self.length = 0  # of the text of all tokens so far, handed out or not: where the next token's text starts

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self._decoded()
        self.length = len(text)
        if text.endswith("\ufffd"):
            return ""
        end = len(text)
        if self.stops is not None:
            cut = self.stops.find(text)
            end = cut if cut is not None else end - self.stops.held(text)
        return self._hand_out(text, end)

    def finish(self) -> str:
        """The rest of the completion (possibly a replacement character), cut before a stop string."""
        text = self._decoded()
        cut = self.stops.find(text) if self.stops is not None else None
        return self._hand_out(text, len(text) if cut is None else cut)

    def _hand_out(self, text: str, end: int) -> str:
        if end <= len(self.text):
            return ""
        delta, self.text = text[len(self.text):end], text[:end]
        return delta

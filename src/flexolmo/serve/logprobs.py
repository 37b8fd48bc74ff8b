"""Logprobs in OpenAI's two shapes, for the tokens of one choice, handed out with the text they produced.

- `/v1/completions` (legacy, `logprobs: N`): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, one
  entry per token; each `top_logprobs` entry maps the N most likely tokens' text to their logprob, and always
  holds the chosen token's text too (so up to N + 1 entries, as OpenAI says); a text shared by several of
  them carries the highest of their logprobs. `text_offset` is where the token's text
  starts in the choice's completion text: the length of the tokens before it decoded together (0 for the first).
- `/v1/chat/completions` (`logprobs: true, top_logprobs: N`): `{"content": [{"token", "logprob", "bytes",
  "top_logprobs": [N alternatives, most likely first]}]}`.

A token's text is the tokenizer's decoding of that token alone, special tokens included; `bytes` are that
text's UTF-8 bytes (a token that ends inside a multi-byte character decodes to U+FFFD, as in vLLM). A logprob
of -inf, which JSON cannot carry, is sent as -9999.0, as OpenAI does. Every
generated token has an entry, also those of a stop string that the choice's text leaves out (they are counted
in `usage` too). In a stream, the entries ride on the chunk that carries the text their tokens produced: a
token whose text is held back (an unfinished character, a possible stop string) has its entry sent with the
text that settles it.
"""

from __future__ import annotations

from flexolmo.serve.engine import Token

LOWEST_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


class ChoiceLogprobs:
    """One choice's logprob entries, collected as its tokens arrive and taken out with the text they belong to."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer = tokenizer
        self.chat = chat
        self._pending: list[tuple[Token, int]] = []  # (token, its text's offset in the completion)

    def add(self, token: Token, offset: int) -> None:
        self._pending.append((token, offset))

    def take(self) -> dict:
        """The entries not taken yet, in the endpoint's shape (empty lists when there are none)."""
        pending, self._pending = self._pending, []
        if self.chat:
            return {"content": [self._chat_entry(token) for token, _ in pending], "refusal": None}
        tops = []
        for token, _ in pending:
            top: dict[str, float] = {}
            # Tokens can share a text (each byte of an unfinished character decodes to U+FFFD): the entry keeps
            # the most likely of them, as `token.top` is ordered most likely first, the chosen token included.
            for index, logprob in [*token.top, (token.id, token.logprob)]:
                top.setdefault(self._text(index), _finite(logprob))
            tops.append(top)
        return {"tokens": [self._text(token.id) for token, _ in pending],
                "token_logprobs": [_finite(token.logprob) for token, _ in pending],
                "top_logprobs": tops, "text_offset": [offset for _, offset in pending]}

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_entry(self, token: Token) -> dict:
        def one(token_id: int, logprob: float) -> dict:
            text = self._text(token_id)
            return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

        return {**one(token.id, token.logprob), "top_logprobs": [one(index, value) for index, value in token.top]}

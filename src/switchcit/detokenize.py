"""Incremental detokenization: the text of a growing answer that is final and can be sent now.

Decoding token by token would split multi-byte characters (a byte-level token may hold half a
character) and word pieces. As vLLM and TGI do, each step decodes a short window of the last tokens
twice, without and with the new ones, and takes what the new ones add, unless it ends in an incomplete
character (U+FFFD): then it waits for the next token. Decoding the whole answer every step would cost
time growing with its length. Of that text, it sends only what later tokens cannot change: not trailing
whitespace (the finished answer is stripped), and not a tail that could be the start of a stop string.
A stop string cuts the answer where it begins; of several, the one that begins first, as OpenAI's API
does (so a stop found complete waits while an earlier-starting one may still complete).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class IncrementalText:
    """One answer's text as its tokens arrive; `add` returns the newly final text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = ""  # the text given out so far: always a prefix of the final answer
        self.stopped = False  # a stop string was found: the answer is complete
        self._text = ""  # the decoded text of ids[:self._read]
        self._prefix = self._read = 0  # the window: ids[_prefix:_read] were decoded last time

    def add(self, token: int) -> str:
        """Take the next token (not the end token); the text it makes final ('' if none)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        if len(window) > len(before) and not window.endswith("\ufffd"):
            self._text += window[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._send(self._final(self._text.lstrip(), more=True))

    def finish(self) -> str:
        """The rest of the answer once no token follows (end token or token limit)."""
        if self.stopped:
            return ""
        return self._send(self._final(self._decode(self.ids).strip(), more=False))

    def _final(self, text: str, more: bool) -> str:
        """The part of `text` no later token can change: up to the earliest stop string, once no stop string
        that would begin before it can still complete (`more`: tokens may follow); else up to a tail that may
        begin a stop string, and short of trailing whitespace."""
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        open_at = min((len(text) - k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                      default=len(text)) if more else len(text)
        if found and min(found) <= open_at:
            self.stopped = True
            return text[:min(found)]
        return text[:min(open_at, len(text.rstrip()))]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _send(self, final: str) -> str:
        if len(final) <= len(self.sent):
            return ""
        new, self.sent = final[len(self.sent):], final
        return new

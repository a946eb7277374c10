"""Incremental detokenization: the text of a growing answer that is final and can be sent now.

Decoding token by token would split multi-byte characters (a byte-level token may hold half a
character) and word pieces. As vLLM and TGI do, each step decodes a short window of the last tokens
twice, without and with the new ones, and takes what the new ones add, unless it ends in an incomplete
character (U+FFFD): then it waits for the next token. Decoding the whole answer every step would cost
time growing with its length. Of that text, it sends only what later tokens cannot change: not trailing
whitespace (the finished answer is stripped), and not a tail that could be the start of a stop string.
The first stop string found cuts the answer there.
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
        text = self._text.lstrip()
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            self.stopped = True
            return self._send(text[:min(cuts)])
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._send(text[:min(len(text) - held, len(text.rstrip()))])

    def finish(self) -> str:
        """The rest of the answer once no token follows (end token or token limit)."""
        if self.stopped:
            return ""
        return self._send(self._decode(self.ids).strip())

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _send(self, final: str) -> str:
        if len(final) <= len(self.sent):
            return ""
        new, self.sent = final[len(self.sent):], final
        return new

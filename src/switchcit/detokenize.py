"""Incremental detokenization: the text of a growing answer that is final and can be sent now.

Decoding token by token would split multi-byte characters (a byte-level token may hold half a
character) and word pieces, so each step decodes all the answer's tokens and sends only the new text
that later tokens cannot change: not a trailing incomplete character (U+FFFD), not trailing whitespace
(the finished answer is stripped), and not a tail that could be the start of a stop string. The first
stop string found cuts the answer there, as vLLM and TGI do.
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

    def add(self, token: int) -> str:
        """Take the next token (not the end token); the text it makes final ('' if none)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            self.stopped = True
            return self._send(text[:min(cuts)])
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._send(text[:min(len(text) - held, len(text.rstrip("\ufffd").rstrip()))])

    def finish(self) -> str:
        """The rest of the answer once no token follows (end token or token limit)."""
        if self.stopped:
            return ""
        return self._send(self.tokenizer.decode(self.ids, skip_special_tokens=True).strip())

    def _send(self, final: str) -> str:
        if len(final) <= len(self.sent):
            return ""
        new, self.sent = final[len(self.sent):], final
        return new

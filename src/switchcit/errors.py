"""The one exception type users see: a message on one line that names the problem and the fix, and the
translation of the OS's and libraries' reports of a failed write (a full disk) into such a line."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

# Line breaks and other control characters: a name read from a hostile manifest may hold any of them.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# safetensors (Rust) reports an OS error as "... (os error 28)" or "Os { code: 28, ... }".
_RUST_OS_ERROR = re.compile(r"os error (\d+)|Os \{ code: (\d+)")


def one_line(text: str) -> str:
    """`text` with line breaks and control characters escaped the way `repr` writes them."""
    return _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)


class SwitchcitError(Exception):
    """A user-facing error; the CLI prints it on one line and exits non-zero."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def write_failure(exc: BaseException | None) -> str | None:
    """Why a write failed, in a few words, when `exc` or what caused it is the OS's or a library's report of
    one: an OSError, safetensors' "os error N", torch.save's PytorchStreamWriter / inline_container enforce
    fail. None for anything else. No file name: it may be a staging file that is gone by the time it is read."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, OSError):
            return exc.strerror or type(exc).__name__
        if type(exc).__name__ == "SafetensorError" and (code := _RUST_OS_ERROR.search(text)):
            return os.strerror(int(code[1] or code[2]))
        if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
            return "torch could not write a file; is the disk full?"
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def failed_writes(action: str, fix: str) -> Iterator[None]:
    """Re-raise an OS or library write failure in the block as one line: `action` stopped (why): `fix`."""
    try:
        yield
    except SwitchcitError:
        raise
    except Exception as exc:
        why = write_failure(exc)
        if why is None:
            raise
        raise SwitchcitError(f"{action} stopped ({why}): {fix}") from exc

"""Knobs declared once: a config dataclass field carries its default, its command-line flag, its help and
its valid range. The CLIs build their options from the fields (options.py), and every config checks
its ranges when it is made, so library users get the same one-line errors as the command line.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import SwitchcitError


def knob(default: Any, flag: str | None = None, help: str = "", low: float | None = None,
         high: float | None = None, open_low: bool = False, choices: tuple | None = None) -> Any:
    """A dataclass field with its CLI flag, help text and valid range (`low` excluded when `open_low`)."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help, "low": low, "high": high,
                                                        "open_low": open_low, "choices": choices})


def check_ranges(config: object) -> None:
    """Refuse a value outside its field's range, naming the parameter and its flag."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None or not meta:
            continue
        where = f"{type(config).__name__}.{f.name}" + (f" ({meta['flag']})" if meta.get("flag") else "")
        if meta.get("choices") and value not in meta["choices"]:
            raise SwitchcitError(f"{where} is {value!r}: choose one of {', '.join(map(str, meta['choices']))}")
        if meta.get("low") is None and meta.get("high") is None:
            continue
        low = -math.inf if meta["low"] is None else meta["low"]
        high = math.inf if meta["high"] is None else meta["high"]
        inside = (low < value if meta["open_low"] else low <= value) and value <= high
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not inside:
            bound = f"{'(' if meta['open_low'] else '['}{_number(low)}, {_number(high)}]"
            raise SwitchcitError(f"{where} is {value!r}: give a finite number in {bound}")


def _number(bound: float) -> str:
    return str(int(bound)) if math.isfinite(bound) and bound == int(bound) else f"{bound:g}"

"""Small state files written whole or not at all, so a killed run leaves the old version or the new one."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, data: dict) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(data, indent=1))
    os.replace(staging, path)

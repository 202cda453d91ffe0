"""Write the JSON Schemas of the public documents: ``python -m agentauth.schemas [DIR]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .protocol._schemas import json_schemas

__all__ = ["render", "write"]


def render() -> dict[str, str]:
    """File name -> exact file text, so a test can compare the committed files."""
    return {
        f"{name}.schema.json": json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for name, schema in json_schemas().items()
    }


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("schemas")
    for path in write(target):
        print(path)

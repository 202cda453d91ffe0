"""The README's code examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    # The SDK examples need a running stack (tests/test_sdk.py runs them for real); the
    # protocol example is self-contained and runs here.
    runnable = [b for b in blocks if "from agentauth.protocol import" in b]
    assert runnable, "the README has no self-contained python example"
    for block in runnable:
        namespace: dict[str, object] = {}
        exec(compile(block, str(README), "exec"), namespace)
    checked = namespace["checked"]
    assert checked.capability.resource == "calendar/*"  # type: ignore[attr-defined]

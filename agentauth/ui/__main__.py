"""``python -m agentauth.ui --registry-url URL [--host H] [--port P] [--origin O]``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ._app import run_ui
from ._settings import UISettings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agentauth.ui", description="Serve the AgentAuth passkey approval page."
    )
    parser.add_argument("--registry-url", help="e.g. http://127.0.0.1:8000/registry")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--origin",
        help="the origin browsers use (default: $AGENTAUTH_UI_ORIGIN, else http://localhost:PORT)",
    )
    parser.add_argument("--rp-id", help="WebAuthn RP id (default localhost)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {}
    if args.origin:
        overrides["origin"] = args.origin
    elif "AGENTAUTH_UI_ORIGIN" not in os.environ:
        overrides["origin"] = f"http://localhost:{args.port}"
    if args.registry_url:
        overrides["registry_url"] = args.registry_url
    if args.rp_id:
        overrides["rp_id"] = args.rp_id
    settings = UISettings.from_env(**overrides)
    run_ui(settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ray Serve deployments: the registry and the verifier.

This package's own module imports nothing, so ``SERVING_ENV`` can be applied before Ray or
Serve is imported (Serve reads its settings when it is imported and started).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

__all__ = ["SERVING_ENV", "apply_serving_env"]

# The serving configuration's environment (docs/verifier.md, "Serving configuration"),
# read by Serve and Ray when they start on a node: Serve's HAProxy ingress and throughput
# settings (about 10x the default proxy's requests/s here), without HAProxy's one metrics
# line per request to a Python actor (a tenth of a core at 800 requests/s here, and half
# the verification p99 in alternated runs; the replicas then record Serve's HTTP metrics
# themselves, so none is lost), and Ray's workers (replicas, shard actors, HAProxy) at
# normal priority instead of Ray's nice 15, under which they yield the CPU to every other
# process on the node. cluster/ spells out the same.
SERVING_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    "RAY_worker_niceness": "0",
}


def apply_serving_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set ``SERVING_ENV`` in ``environ`` where the operator has not set it already."""
    for name, value in SERVING_ENV.items():
        environ.setdefault(name, value)

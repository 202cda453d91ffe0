"""Ray actors that own per-agent mutable state (rate windows, jti windows, spend).

Arrives with the verifier service; nothing is exported yet.
"""

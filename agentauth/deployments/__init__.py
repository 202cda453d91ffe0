"""Ray Serve deployments: the registry and the verifier.

Arrives with the registry and verifier services; nothing is exported yet.
"""

"""Local stand-ins for services that cannot run here (no Vault server, no Cloud KMS emulator).

Each fake speaks the real HTTP API subset its client library uses, does real cryptography,
and can simulate failures: a stopped server, a slow answer, a wrong signature.
"""

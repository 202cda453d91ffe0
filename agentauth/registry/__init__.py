"""The registry service: agents, providers, grants, passkey approvals, tokens, audit."""

from ._http import create_app
from ._service import Agent, Registry
from ._settings import RegistrySettings, SignerSettings

__all__ = ["Agent", "Registry", "RegistrySettings", "SignerSettings", "create_app"]

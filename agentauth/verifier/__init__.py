"""The verifier service: providers ask it whether an agent's request may proceed."""

from ._http import create_app
from ._service import FAIL_CLOSED, Verifier, VerifierSettings, VerifyIn

__all__ = ["FAIL_CLOSED", "Verifier", "VerifierSettings", "VerifyIn", "create_app"]

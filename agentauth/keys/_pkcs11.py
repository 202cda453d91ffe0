"""PKCS#11 tokens (HSMs, SoftHSM2): a P-256 key pair found by label, through python-pkcs11.

Mechanism: ``CKM_ECDSA`` over a SHA-256 digest computed here. Every token that does EC
offers it; ``CKM_ECDSA_SHA256`` is optional (SoftHSM2 2.6 lacks it) and signs the very same
bytes. The token outputs r||s, already the JWS form.

PKCS#11 login state belongs to the process, not to a session: closing a logged-in session
logs out every session on that token. So all signers on one token share one session
(reference-counted, closed with its last signer), and since a session is not thread-safe,
every call on it holds that session's lock.

A token that drops the session (an HSM restarting, a network HSM failing over: every
session handle and the login are gone) is found out by the next signature on it, or by the
next open, which checks the session before joining it. That session is then never used
again, nor closed (its handle number may already belong to a new session); each signer on
it logs in afresh on a new session at its next call, with the PIN its open was given, and
checks that the key it finds under its label is still its own key.

The login is made here, through the library's function list, not by python-pkcs11's
``Token.open(user_pin=...)``: that opens a session and, when C_Login then fails (a wrong
PIN), raises without closing it, leaking one session handle per failed attempt. A session
opened without a login is one this module holds from the start, and closes on any failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import hmac
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

from cryptography.hazmat.primitives.asymmetric import ec

from ._base import (
    DEFAULT_TIMEOUT,
    RemoteSigner,
    SignerUnavailable,
    call_blocking,
    preload,
    public_key_with_kid,
)

if TYPE_CHECKING:
    from pkcs11 import Mechanism
    from pkcs11.types import Session, SignMixin

    from agentauth.protocol import PublicKey

__all__ = ["Pkcs11Signer"]

#: DER of the OID prime256v1 (1.2.840.10045.3.1.7), the EC_PARAMS of a P-256 key.
P256_EC_PARAMS = bytes.fromhex("06082a8648ce3d030107")


@dataclass(slots=True)
class _SharedSession:
    session: Session
    pin_mac: bytes  # to hold later openers to the PIN the session logged in with
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0
    lost: bool = False  # the token dropped it (see the module docstring): never used again


# Mirrors state the PKCS#11 library itself keeps per process (C_Initialize, login): one
# entry per (library, token label).
_shared: dict[tuple[str, str], _SharedSession] = {}
_shared_lock = threading.Lock()
# Keys the PIN MAC: what stays in memory is useless for guessing PINs elsewhere.
_PIN_MAC_KEY = os.urandom(32)


def _pin_mac(pin: str) -> bytes:
    return hmac.new(_PIN_MAC_KEY, pin.encode("utf-8"), hashlib.sha256).digest()


# --- C_Login and C_Logout, which python-pkcs11 offers only inside Token.open ---------------

_CKU_USER = 1
_CKR_OK = 0
_CKR_USER_NOT_LOGGED_IN = 0x101
_LOGIN = ctypes.CFUNCTYPE(
    ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong
)
_LOGOUT = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong)
# CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS: a session in which the user is logged in.
_CKS_USER = (1, 3)
# CKR_DEVICE_REMOVED, CKR_SESSION_CLOSED, CKR_SESSION_HANDLE_INVALID, CKR_TOKEN_NOT_PRESENT.
_CKR_SESSION_GONE = (0x32, 0xB0, 0xB3, 0xE0)


class _Version(ctypes.Structure):
    _fields_ = (("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte))


class _SessionInfo(ctypes.Structure):
    _pack_ = 1 if sys.platform == "win32" else 0  # see _FunctionList
    _fields_ = (
        ("slot", ctypes.c_ulong),
        ("state", ctypes.c_ulong),
        ("flags", ctypes.c_ulong),
        ("device_error", ctypes.c_ulong),
    )


_GET_SESSION_INFO = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(_SessionInfo))


class _FunctionList(ctypes.Structure):
    """The head of CK_FUNCTION_LIST, up to C_Logout: a version, then one pointer per
    function in the order the standard fixes (PKCS#11 v2.40 and 3.x alike)."""

    # Windows builds of PKCS#11 libraries pack their structures to one byte; elsewhere
    # they are laid out as the C compiler does, as ctypes does.
    _pack_ = 1 if sys.platform == "win32" else 0
    _fields_ = (
        ("version", _Version),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "C_Initialize",
                "C_Finalize",
                "C_GetInfo",
                "C_GetFunctionList",
                "C_GetSlotList",
                "C_GetSlotInfo",
                "C_GetTokenInfo",
                "C_GetMechanismList",
                "C_GetMechanismInfo",
                "C_InitToken",
                "C_InitPIN",
                "C_SetPIN",
                "C_OpenSession",
                "C_CloseSession",
                "C_CloseAllSessions",
            )
        ),
        ("C_GetSessionInfo", _GET_SESSION_INFO),
        ("C_GetOperationState", ctypes.c_void_p),
        ("C_SetOperationState", ctypes.c_void_p),
        ("C_Login", _LOGIN),
        ("C_Logout", _LOGOUT),
    )


class _HasHandle(Protocol):
    handle: int  # python-pkcs11's Session has it; its type stubs do not say so


_function_lists: dict[str, _FunctionList] = {}  # by library path, under _shared_lock


def _function_list(lib_path: str) -> _FunctionList:
    """The library's function list. Loading the same path again gives the same, already
    initialized, library that python-pkcs11 loaded (the dynamic loader keeps one copy)."""
    functions = _function_lists.get(lib_path)
    if functions is None:
        get = ctypes.CDLL(lib_path).C_GetFunctionList
        get.argtypes = (ctypes.POINTER(ctypes.POINTER(_FunctionList)),)
        get.restype = ctypes.c_ulong
        pointer = ctypes.POINTER(_FunctionList)()
        rv = get(ctypes.byref(pointer))
        if rv != _CKR_OK or not pointer:
            raise SignerUnavailable(
                f"the PKCS#11 library gave no function list (CKR 0x{rv:x})",
                reason="backend_error",
            )
        functions = _function_lists[lib_path] = pointer.contents
    return functions


def _error(rv: int, function: str) -> Exception:
    """python-pkcs11's exception for what C_Login (or C_Logout) answered, so a failed login
    reads (and is logged) as it did when python-pkcs11 logged in."""
    import pkcs11  # noqa: PLC0415  # see _acquire

    known: dict[int, type[Exception]] = {
        0xA0: pkcs11.PinIncorrect,
        0xA1: pkcs11.PinInvalid,
        0xA2: pkcs11.PinLenRange,
        0xA3: pkcs11.PinExpired,
        0xA4: pkcs11.PinLocked,
        0x100: pkcs11.UserAlreadyLoggedIn,
        0x102: pkcs11.UserPinNotInitialized,
        0x104: pkcs11.AnotherUserAlreadyLoggedIn,
    }
    error = known.get(rv)
    return error() if error else pkcs11.PKCS11Error(f"{function} failed (CKR 0x{rv:x})")


def _login(lib_path: str, session: Session, pin: str) -> None:
    pin_bytes = pin.encode("utf-8")
    handle = cast("_HasHandle", session).handle
    rv = _function_list(lib_path).C_Login(handle, _CKU_USER, pin_bytes, len(pin_bytes))
    if rv != _CKR_OK:
        raise _error(rv, "C_Login")


def _logged_in(lib_path: str, session: Session) -> bool:
    """Is ``session`` still open, with the user logged in? False only when the token says
    it is not: any other failure to answer (a busy or odd token) is no proof, and a session
    wrongly given up would cost every later open (a new login answers "already logged in").
    """
    info = _SessionInfo()
    handle = cast("_HasHandle", session).handle
    rv = _function_list(lib_path).C_GetSessionInfo(handle, ctypes.byref(info))
    if rv == _CKR_OK:
        return info.state in _CKS_USER
    return rv not in _CKR_SESSION_GONE


def _still_logged_in(lib_path: str, entry: _SharedSession) -> bool:
    """``_logged_in`` for a shared session, asked under its lock (a session serves one
    thread at a time). A signature holding the lock now finds out for itself whether the
    session is gone; the lock is not waited for (the token may be wedged, and opens of
    every token wait on _shared_lock meanwhile)."""
    if not entry.lock.acquire(timeout=0.05):
        return True
    try:
        return _logged_in(lib_path, entry.session)
    finally:
        entry.lock.release()


def _logout(lib_path: str, session: Session) -> None:
    """Log the token out (see the module docstring: for every session of this process).
    Not logged in any more (another part of the process logged out) is no failure."""
    handle = cast("_HasHandle", session).handle
    rv = _function_list(lib_path).C_Logout(handle)
    if rv not in (_CKR_OK, _CKR_USER_NOT_LOGGED_IN):
        raise _error(rv, "C_Logout")


def _acquire(lib_path: str, token_label: str, pin: str) -> _SharedSession:
    # Imported on open, so the package imports without the server extras.
    import pkcs11  # noqa: PLC0415

    with _shared_lock:
        entry = _shared.get((lib_path, token_label))
        if entry is not None and not _still_logged_in(lib_path, entry):
            # Dropped by the token: the signers on it move off at their next call, and this
            # open logs in on a new session (python-pkcs11 raises from a finalizer when it
            # looks for a key in a dropped session, so none is looked for there).
            entry.lost = True
            del _shared[(lib_path, token_label)]
            entry = None
        if entry is None:
            token = pkcs11.lib(lib_path).get_token(token_label=token_label)
            # Opened without a login and logged in here (see the module docstring), so
            # that a failed login closes it. python-pkcs11 takes it for a public session
            # and so closes it without logging out: _release logs out first.
            session = token.open()
            try:
                _login(lib_path, session, pin)
            except BaseException as exc:
                # Whatever the login did, the session goes; a failure to close it must not
                # hide why the login failed.
                with contextlib.suppress(pkcs11.PKCS11Error):
                    session.close()
                if not isinstance(exc, pkcs11.UserAlreadyLoggedIn):
                    raise
                # Other code in this process logged the token in (our own logins go through
                # _shared). Its login would cover a session of ours whatever our PIN, and
                # nothing can check the PIN now: C_Login answers "already logged in" before
                # looking at it, C_Logout would log that other code out, and C_SetPIN(pin,
                # pin) writes to the token. Signing unchecked would let a wrong (or empty)
                # PIN use the key, so refuse: the token must be ours alone.
                raise SignerUnavailable(
                    "the PKCS#11 token is already logged in by other code in this process, so"
                    " the configured PIN cannot be checked; give the signer a token (or a"
                    " process) of its own",
                    reason="backend_error",
                ) from None
            entry = _SharedSession(session, _pin_mac(pin))
            _shared[(lib_path, token_label)] = entry
        elif not hmac.compare_digest(entry.pin_mac, _pin_mac(pin)):
            # The token would not ask again (the login is shared); a wrong PIN must
            # still fail as it would for the first signer.
            raise SignerUnavailable("the PKCS#11 PIN is incorrect", reason="backend_error")
        entry.users += 1
        return entry


# What python-pkcs11 raises when the session (or its login) is gone, not just one call.
_SESSION_GONE = (
    "SessionHandleInvalid",
    "SessionClosed",
    "UserNotLoggedIn",
    "DeviceRemoved",
    "TokenNotPresent",
)


def _session_gone(exc: BaseException) -> bool:
    kind = type(exc)
    return kind.__name__ in _SESSION_GONE and kind.__module__.startswith("pkcs11")


def _lose(lib_path: str, token_label: str, entry: _SharedSession) -> None:
    """Mark ``entry`` dropped by the token: the next open makes a new session."""
    with _shared_lock:
        entry.lost = True
        if _shared.get((lib_path, token_label)) is entry:
            del _shared[(lib_path, token_label)]


def _release(lib_path: str, token_label: str, entry: _SharedSession) -> None:
    # Closing under the registry lock: closing a logged-in session logs the whole token
    # out, which must not race with a new signer logging in.
    with _shared_lock:
        entry.users -= 1
        if entry.users > 0 or entry.lost:
            # A lost session is not closed: its handle number may be a new session's now.
            return
        if _shared.get((lib_path, token_label)) is entry:
            del _shared[(lib_path, token_label)]
        with entry.lock:
            try:
                _logout(lib_path, entry.session)
            finally:
                entry.session.close()


def _point_from_attribute(value: bytes) -> bytes:
    """The uncompressed point from CKA_EC_POINT: a DER OCTET STRING, or bare on some tokens."""
    if len(value) == 67 and value[:3] == b"\x04\x41\x04":
        return value[2:]
    if len(value) == 65 and value[0] == 0x04:
        return value
    raise SignerUnavailable(
        "the token's EC point is not an uncompressed P-256 point", reason="bad_response"
    )


class Pkcs11Signer(RemoteSigner):
    """Signs with the private key labelled ``key_label`` on a PKCS#11 token."""

    _backend = "PKCS#11"

    def __init__(
        self,
        *,
        lib_path: str,
        token_label: str,
        entry: _SharedSession,
        private: SignMixin,
        mechanism: Mechanism,
        public: PublicKey,
        timeout: float,
        reopen: Callable[[], tuple[_SharedSession, SignMixin, PublicKey]],
    ) -> None:
        super().__init__(public=public, timeout=timeout)
        self._mechanism = mechanism
        self._lib_path = lib_path
        self._token_label = token_label
        self._entry = entry
        self._private = private
        # Logs in and finds the key again (it holds the PIN): for a session the token
        # dropped. Under _switch, which guards _entry and _private against the other
        # worker threads signing with this signer.
        self._reopen = reopen
        self._switch = threading.Lock()

    @classmethod
    async def open(
        cls,
        *,
        lib_path: str,
        token_label: str,
        pin: str,
        key_label: str,
        kid: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Pkcs11Signer:
        """Log in (or join this process's session on the token) and find the key pair.

        The public key comes from the token's public key object with the same label (its
        CKA_EC_PARAMS and CKA_EC_POINT); the first signature checks that the pair matches.
        """

        # The open runs in a thread that outlives a timeout: one that gets the token after
        # open() gave up would hold a share of its session (and login) nobody releases.
        # Whichever side comes second under this lock releases it: the thread, if open()
        # has given up; open(), if the thread had finished just as it timed out.
        handover = threading.Lock()
        abandoned = False
        finished: list[_SharedSession] = []

        def connect() -> tuple[_SharedSession, SignMixin, PublicKey]:
            result = find_key()
            with handover:
                if abandoned:
                    _release(lib_path, token_label, result[0])
                    raise SignerUnavailable("the open was given up", reason="timeout")
                finished.append(result[0])
            return result

        def find_key() -> tuple[_SharedSession, SignMixin, PublicKey]:
            from pkcs11 import Attribute, KeyType, ObjectClass  # noqa: PLC0415  # see _acquire

            entry = _acquire(lib_path, token_label, pin)
            try:
                with entry.lock:
                    private = entry.session.get_key(
                        ObjectClass.PRIVATE_KEY, KeyType.EC, label=key_label
                    )
                    public_obj = entry.session.get_key(
                        ObjectClass.PUBLIC_KEY, KeyType.EC, label=key_label
                    )
                    params = bytes(public_obj[Attribute.EC_PARAMS])
                    point = bytes(public_obj[Attribute.EC_POINT])
                if params != P256_EC_PARAMS:
                    raise SignerUnavailable("the token key is not P-256", reason="wrong_key_type")
                key = ec.EllipticCurvePublicKey.from_encoded_point(
                    ec.SECP256R1(), _point_from_attribute(point)
                )
                # Key objects are typed by class; a private EC key object signs.
                return entry, cast("SignMixin", private), public_key_with_kid(key, kid)
            except BaseException as exc:
                if _session_gone(exc):  # joined a session the token dropped: the next
                    _lose(lib_path, token_label, entry)  # open makes a new one
                _release(lib_path, token_label, entry)
                raise

        await preload("pkcs11")
        try:
            entry, private, public = await call_blocking(cls._backend, "open", timeout, connect)
        except BaseException:
            with handover:
                abandoned = True
                late = list(finished)
            for entry in late:  # done, but too late for the caller: released off the loop
                await asyncio.to_thread(_release, lib_path, token_label, entry)
            raise
        from pkcs11 import Mechanism  # noqa: PLC0415  # see _acquire; loaded by now

        return cls(
            lib_path=lib_path,
            token_label=token_label,
            entry=entry,
            private=private,
            # CKM_ECDSA: ECDSA over the digest computed here (see the module docstring).
            mechanism=Mechanism.ECDSA,
            public=public,
            timeout=timeout,
            reopen=find_key,
        )

    def _sign_blocking(self, data: bytes) -> bytes:
        digest = hashlib.sha256(data).digest()
        entry, private = self._current()
        try:
            with entry.lock:
                return bytes(private.sign(digest, mechanism=self._mechanism))
        except Exception as exc:
            if not _session_gone(exc):
                raise
            _lose(self._lib_path, self._token_label, entry)
        # The token dropped the session; the signature was not made, so asking again on a
        # new session cannot sign twice. A token still down fails the reopen instead.
        entry, private = self._current()
        with entry.lock:
            return bytes(private.sign(digest, mechanism=self._mechanism))

    def _current(self) -> tuple[_SharedSession, SignMixin]:
        """The session and key object to sign with: this signer's own, or new ones if the
        token dropped its session."""
        with self._switch:
            if self._closed:  # a reopen now would hold a session nobody releases
                raise SignerUnavailable("the PKCS#11 signer is closed", reason="closed")
            if self._entry.lost:
                entry, private, public = self._reopen()
                if public.thumbprint != self._public.thumbprint:
                    _release(self._lib_path, self._token_label, entry)
                    raise SignerUnavailable(
                        "the token holds another key under this label now",
                        reason="bad_response",
                    )
                lost, self._entry, self._private = self._entry, entry, private
                _release(self._lib_path, self._token_label, lost)  # counted down, not closed
            return self._entry, self._private

    def _close_blocking(self) -> None:
        with self._switch:
            _release(self._lib_path, self._token_label, self._entry)

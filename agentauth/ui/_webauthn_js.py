"""The browser side of the passkey ceremonies, injected into every page.

``window.agentauth.create(options)`` / ``get(options)`` take the registry's options JSON
(base64url fields, as py_webauthn's ``options_to_json`` writes them), turn those fields
into ArrayBuffers, call ``navigator.credentials.create/get`` and return the credential in
the JSON form the registry expects: ``{credential: {id, rawId, type, response{...},
clientExtensionResults}}``. They never throw (a thrown error would leave NiceGUI's
``run_javascript`` waiting): failures come back as ``{error, message}``.

``window.agentauth.adopt(ticket)`` exchanges a sign-in ticket for the new session cookie
(same-origin POST) and opens the requests page.
"""

from __future__ import annotations

__all__ = ["WEBAUTHN_JS"]

WEBAUTHN_JS = r"""
<script>
window.agentauth = (() => {
  const toBuffer = (value) => {
    const base64 = value.replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "===".slice((base64.length + 3) % 4);
    const binary = atob(padded);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes.buffer;
  };
  const toBase64url = (buffer) => {
    const bytes = new Uint8Array(buffer);
    let binary = "";
    for (let i = 0; i < bytes.length; i++) binary += String.fromCharCode(bytes[i]);
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  };
  const descriptors = (list) => (list || []).map((c) => ({ ...c, id: toBuffer(c.id) }));
  const failure = (error) => ({
    error: (error && error.name) || "Error",
    message: String((error && error.message) || error),
  });
  const supported = () => !!(window.PublicKeyCredential && navigator.credentials);

  async function create(options) {
    if (!supported()) return { error: "NotSupportedError", message: "no WebAuthn here" };
    try {
      const publicKey = {
        ...options,
        challenge: toBuffer(options.challenge),
        user: { ...options.user, id: toBuffer(options.user.id) },
        excludeCredentials: descriptors(options.excludeCredentials),
      };
      const credential = await navigator.credentials.create({ publicKey });
      const response = credential.response;
      return {
        credential: {
          id: credential.id,
          rawId: toBase64url(credential.rawId),
          type: credential.type,
          response: {
            clientDataJSON: toBase64url(response.clientDataJSON),
            attestationObject: toBase64url(response.attestationObject),
            transports: response.getTransports ? response.getTransports() : [],
          },
          clientExtensionResults: credential.getClientExtensionResults(),
        },
      };
    } catch (error) {
      return failure(error);
    }
  }

  async function get(options) {
    if (!supported()) return { error: "NotSupportedError", message: "no WebAuthn here" };
    try {
      const publicKey = {
        ...options,
        challenge: toBuffer(options.challenge),
        allowCredentials: descriptors(options.allowCredentials),
      };
      const credential = await navigator.credentials.get({ publicKey });
      const response = credential.response;
      const result = {
        id: credential.id,
        rawId: toBase64url(credential.rawId),
        type: credential.type,
        response: {
          clientDataJSON: toBase64url(response.clientDataJSON),
          authenticatorData: toBase64url(response.authenticatorData),
          signature: toBase64url(response.signature),
        },
        clientExtensionResults: credential.getClientExtensionResults(),
      };
      if (response.userHandle) result.response.userHandle = toBase64url(response.userHandle);
      return { credential: result };
    } catch (error) {
      return failure(error);
    }
  }

  async function adopt(ticket, next) {
    try {
      const answer = await fetch("/auth/session", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-AgentAuth": "1" },
        body: JSON.stringify({ ticket }),
      });
      if (!answer.ok) return { error: "SessionError", message: String(answer.status) };
      window.location.assign(next || "/");
      return { ok: true };
    } catch (error) {
      return failure(error);
    }
  }

  return { create, get, adopt };
})();
</script>
"""

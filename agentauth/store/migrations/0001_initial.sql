-- AgentAuth registry schema, version 1.
-- Identifiers are text (prefixed random ids such as agt_..., grq_...), times are timestamptz
-- unless they are protocol times (Unix seconds/milliseconds as bigint, exactly as signed).

CREATE TABLE principals (
    id              text PRIMARY KEY,
    display_name    text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE passkey_credentials (
    credential_id   text PRIMARY KEY,               -- base64url raw id
    principal_id    text NOT NULL REFERENCES principals (id),
    public_key      bytea NOT NULL,                 -- COSE_Key from registration
    sign_count      bigint NOT NULL DEFAULT 0,
    backed_up       boolean NOT NULL DEFAULT false,
    flagged_at      timestamptz,                    -- set on a signCount regression
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,
    removed_at      timestamptz
);
CREATE INDEX passkey_credentials_principal ON passkey_credentials (principal_id);

CREATE TABLE sessions (
    token_hash      bytea PRIMARY KEY,              -- SHA-256 of the bearer secret
    principal_id    text NOT NULL REFERENCES principals (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL
);

-- Single-use WebAuthn challenges. Consuming one is a DELETE ... RETURNING, so two
-- concurrent uses of the same challenge cannot both succeed.
CREATE TABLE webauthn_challenges (
    challenge       bytea PRIMARY KEY,
    purpose         text NOT NULL CHECK (purpose IN ('register', 'login', 'approve_grant', 'approve_step_up')),
    principal_id    text REFERENCES principals (id),
    subject_id      text,                           -- grant request or step-up id
    payload         jsonb NOT NULL DEFAULT '{}',
    expires_at      timestamptz NOT NULL
);

CREATE TABLE enrollments (
    code_hash       bytea PRIMARY KEY,
    principal_id    text NOT NULL REFERENCES principals (id),
    expires_at      timestamptz NOT NULL,
    used_at         timestamptz
);

CREATE TABLE agents (
    id              text PRIMARY KEY,
    principal_id    text NOT NULL REFERENCES principals (id),
    name            text NOT NULL,
    jkt             text NOT NULL UNIQUE,           -- RFC 7638 thumbprint of its key
    public_jwk      jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agents_principal ON agents (principal_id);

CREATE TABLE providers (
    id              text PRIMARY KEY,
    audience        text NOT NULL UNIQUE,
    display_name    text NOT NULL,
    allowed_kinds   text[] NOT NULL,
    secret_hash     bytea NOT NULL,                 -- SHA-256 of the provider credential
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE grant_requests (
    id              text PRIMARY KEY,
    agent_id        text NOT NULL REFERENCES agents (id),
    provider_id     text NOT NULL REFERENCES providers (id),
    capabilities    jsonb NOT NULL,
    envelope        jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'denied')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    decided_at      timestamptz
);
CREATE INDEX grant_requests_agent ON grant_requests (agent_id, status);

CREATE TABLE grants (
    id              text PRIMARY KEY,
    request_id      text NOT NULL UNIQUE REFERENCES grant_requests (id),
    agent_id        text NOT NULL REFERENCES agents (id),
    principal_id    text NOT NULL REFERENCES principals (id),
    provider_id     text NOT NULL REFERENCES providers (id),
    document        text NOT NULL,                  -- canonical JSON, exactly as signed
    grant_hash      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      bigint,                         -- envelope expiry, Unix seconds
    revoked_at      timestamptz
);
CREATE INDEX grants_agent ON grants (agent_id);

CREATE TABLE approval_receipts (
    grant_id        text PRIMARY KEY REFERENCES grants (id),
    credential_id   text NOT NULL REFERENCES passkey_credentials (credential_id),
    receipt         jsonb NOT NULL,
    receipt_hash    text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE signing_keys (
    kid             text PRIMARY KEY,
    alg             text NOT NULL,
    public_jwk      jsonb NOT NULL,
    backend         text NOT NULL,
    created_at      bigint NOT NULL,
    activates_at    bigint NOT NULL,
    retires_at      bigint
);

CREATE TABLE issued_tokens (
    jti             text PRIMARY KEY,
    grant_id        text NOT NULL REFERENCES grants (id),
    agent_id        text NOT NULL REFERENCES agents (id),
    kid             text NOT NULL,
    issued_at       bigint NOT NULL,
    expires_at      bigint NOT NULL
);
CREATE INDEX issued_tokens_grant ON issued_tokens (grant_id);

CREATE TABLE revocations (
    id              bigserial PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('token', 'grant', 'agent')),
    target          text NOT NULL,
    revoked_by      text NOT NULL,
    revoked_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, target)
);

CREATE TABLE step_ups (
    id              text PRIMARY KEY,
    grant_id        text NOT NULL REFERENCES grants (id),
    agent_id        text NOT NULL REFERENCES agents (id),
    document        text NOT NULL,                  -- canonical JSON of the transaction
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'denied', 'used')),
    approval_ref    text UNIQUE,                    -- one-time reference handed to the agent
    receipt         jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      bigint NOT NULL,
    decided_at      timestamptz
);

-- The audit log: several hash chains (spreading the append lock), each event's canonical
-- bytes stored verbatim so verification never depends on re-serialization.
CREATE TABLE audit_heads (
    chain           text PRIMARY KEY,
    size            bigint NOT NULL,
    head            bytea NOT NULL
);

CREATE TABLE audit_events (
    chain           text NOT NULL REFERENCES audit_heads (chain),
    seq             bigint NOT NULL,
    entry_hash      bytea NOT NULL,
    body            text NOT NULL,                  -- canonical JSON of the event
    event           text NOT NULL,
    agent_id        text,
    grant_id        text,
    time_ms         bigint NOT NULL,
    PRIMARY KEY (chain, seq)
);
CREATE INDEX audit_events_agent ON audit_events (agent_id) WHERE agent_id IS NOT NULL;
CREATE INDEX audit_events_grant ON audit_events (grant_id) WHERE grant_id IS NOT NULL;

CREATE TABLE audit_checkpoints (
    chain           text NOT NULL REFERENCES audit_heads (chain),
    size            bigint NOT NULL,
    root            bytea NOT NULL,
    frontier        bytea[] NOT NULL,               -- MerkleFrontier state at this size
    signed          text NOT NULL,                  -- the JWS
    time            bigint NOT NULL,
    PRIMARY KEY (chain, size)
);

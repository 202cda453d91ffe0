-- A provider's credential can be rotated without downtime: the previous secret keeps
-- working until previous_expires_at (the rollout's overlap, possibly none), then never
-- again, and it can be ended early (a leak). Verifiers keep the table in memory and learn
-- of changes from provider_changes: every change bumps its epoch in the changing
-- transaction, and the row lock orders those transactions, so a verifier that has read an
-- epoch has also seen every change up to it.

ALTER TABLE providers
    ADD COLUMN previous_secret_hash bytea,              -- SHA-256, like secret_hash
    ADD COLUMN previous_expires_at  timestamptz,
    ADD COLUMN credential_rotated_at timestamptz,
    ADD CONSTRAINT providers_previous_credential_whole
        CHECK ((previous_secret_hash IS NULL) = (previous_expires_at IS NULL));

CREATE TABLE provider_changes (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch       bigint NOT NULL
);

INSERT INTO provider_changes (singleton, epoch) VALUES (true, 0);

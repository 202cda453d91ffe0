-- A person who has lost every passkey cannot confirm adding a new one (0006). The admin
-- gives them a one-time recovery code instead (stored hashed, as enrollment codes are),
-- with which they register a new passkey from the sign-in page.

CREATE TABLE recoveries (
    code_hash       bytea PRIMARY KEY,
    principal_id    text NOT NULL REFERENCES principals (id),
    expires_at      timestamptz NOT NULL,
    used_at         timestamptz
);

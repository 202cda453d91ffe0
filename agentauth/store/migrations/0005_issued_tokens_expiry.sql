-- The registry deletes issued_tokens rows a day after their tokens expired (a token that
-- can no longer be used needs no revoking): this index keeps that sweep from reading the
-- whole table every minute.

CREATE INDEX issued_tokens_expiry ON issued_tokens (expires_at);

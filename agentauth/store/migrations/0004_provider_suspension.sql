-- The admin can suspend a provider (offboarding, a compromise under investigation) and
-- reinstate it later: while suspended_at is set, the registry and every verifier refuse it,
-- with its credentials, grants and tokens kept for when it comes back. A change bumps
-- provider_changes.epoch, as a credential change does, so verifiers reload within a second.

ALTER TABLE providers
    ADD COLUMN suspended_at      timestamptz,
    ADD COLUMN suspension_reason text,
    ADD CONSTRAINT providers_suspension_whole
        CHECK ((suspended_at IS NULL) = (suspension_reason IS NULL));

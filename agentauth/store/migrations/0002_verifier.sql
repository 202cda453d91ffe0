-- Verifier state that must outlive a shard actor: one-time step-up approvals consumed, and
-- the index that rebuilds a grant's usage from its decision events after a restart.

CREATE TABLE verifier_step_up_uses (
    approval_ref    text PRIMARY KEY,
    grant_id        text NOT NULL,
    used_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX audit_events_grant_decisions ON audit_events (grant_id, event, time_ms)
    WHERE grant_id IS NOT NULL;

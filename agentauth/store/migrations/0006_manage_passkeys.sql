-- Adding or removing a passkey is confirmed by one of the human's passkeys: a challenge of
-- its own purpose, so it can stand for nothing else (a sign-in, an approval).

ALTER TABLE webauthn_challenges DROP CONSTRAINT webauthn_challenges_purpose_check;
ALTER TABLE webauthn_challenges ADD CONSTRAINT webauthn_challenges_purpose_check
    CHECK (purpose IN ('register', 'login', 'approve_grant', 'approve_step_up', 'manage_passkeys'));

-- A passkey's backup flags (WebAuthn L3 §6.1.3): BE, whether it can be backed up (synced to
-- other devices), is fixed for the credential's life, so an assertion whose BE differs from
-- the stored one is refused; BS, whether it is backed up now, may change, and is recorded
-- again on every accepted assertion so the "synced" label the person sees stays true.
--
-- backed_up (0001) already holds BS as seen at registration. BE was never stored: rows
-- registered before this migration get NULL, "not seen yet", and their next accepted
-- assertion records it. Nothing here guesses it from backed_up: for a passkey that was not
-- backed up at registration BE could be either, and one rule for every old row is simpler
-- to reason about than a rule for some.

ALTER TABLE passkey_credentials ADD COLUMN backup_eligible boolean;

-- BS without BE is invalid (WebAuthn L3 §7.1 and §7.2 each check it): the registry refuses
-- it, and this keeps the table free of it whatever writes there. NULL passes, as the rows
-- from before BE was stored must.
ALTER TABLE passkey_credentials ADD CONSTRAINT passkey_credentials_backup_flags
    CHECK (backup_eligible OR NOT backed_up);

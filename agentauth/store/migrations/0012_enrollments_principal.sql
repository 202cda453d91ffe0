-- Minting an enrollment code counts the human's live codes (under that human's lock), and a
-- passkey removal or a recovery deletes their unused ones: both by principal_id, which
-- nothing indexed, so each read every human's codes of the last enrollment_ttl. The table
-- stays small (swept at expiry), so building this holds its writers back only briefly.

CREATE INDEX enrollments_principal ON enrollments (principal_id);

-- Revocations numbered in the order they commit. A revocation's id is taken when its row is
-- inserted, but the row becomes visible only when its transaction commits, after its audit
-- append (which waits for its chain's lock): ids appear out of order, and a verifier
-- polling "ids above the last one I saw" could pass over one for good. seq is given at
-- commit instead, from a counter row updated under its row lock, the way
-- provider_changes.epoch orders provider changes: the next revocation to commit waits for
-- that lock until this one has committed, so a poll that has read seq n has also seen every
-- revocation numbered below n, and "seq above the last one I saw" misses none.
--
-- The number is given by a deferred constraint trigger, which runs as its transaction
-- commits: the counter's lock is taken last and held only through the commit itself, and
-- its holder waits for nothing more (so no deadlock with the row and audit-chain locks
-- revocations take before it), and every writer of the table gets a number, whatever its path
-- (the registry, the command line, a test's INSERT). It is one row every revocation's
-- commit passes through, so revocations commit one at a time; they are rare next to
-- verifications (which only read), and a commit holds the lock for a WAL flush, not for
-- the transaction.

CREATE TABLE revocation_log (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq         bigint NOT NULL
);

-- NULL only inside the inserting transaction; committed rows always have one.
ALTER TABLE revocations ADD COLUMN seq bigint UNIQUE;

-- The rows already here are all committed: numbered as their ids (an order by id), so a
-- client that resumes GET /v1/revocations?since=<an id it read> misses none of them, and
-- every new revocation is numbered above every existing id.
UPDATE revocations SET seq = id;
INSERT INTO revocation_log (singleton, seq) SELECT true, coalesce(max(id), 0) FROM revocations;

CREATE FUNCTION revocation_numbered() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    next_seq bigint;
BEGIN
    UPDATE revocation_log SET seq = seq + 1 RETURNING seq INTO next_seq;
    UPDATE revocations SET seq = next_seq WHERE id = NEW.id;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER revocations_numbered_at_commit
    AFTER INSERT ON revocations
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION revocation_numbered();

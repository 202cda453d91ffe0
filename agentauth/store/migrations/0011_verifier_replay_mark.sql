-- A verifier shard's replay mark: the issue time of the newest DPoP proof its chain's
-- decisions have reserved, so that a restarted shard, which has lost its jti window, refuses
-- exactly the proofs a predecessor may have seen and no more.
--
-- Before this, a new incarnation refused every proof issued up to its chain's last decision
-- plus the 10 s a proof may be dated ahead (the only bound known without this), so a shard
-- that Ray restarted in a second or two still denied every agent it owns for about ten.
--
-- replay_mark_ms is in milliseconds, rounded up. Each commit of a verifier shard sets it in
-- the statement that appends its decisions and moves the head, and records the head size
-- it belongs to in replay_mark_size: it holds only while audit_heads.size still equals that.
-- A chain moved by anything that does not keep it (a shard of an older release during a
-- rolling upgrade, a registry chain) has a stale or NULL mark, and a shard reading it falls
-- back to the last decision plus the skew. NULL on every chain this migration finds.

ALTER TABLE audit_heads ADD COLUMN replay_mark_ms bigint, ADD COLUMN replay_mark_size bigint;

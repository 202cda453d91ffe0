-- Stored subtree hashes of each audit chain's Merkle tree, so that an inclusion or
-- consistency proof reads O(log n) rows instead of every leaf hash of the chain. Row
-- (chain, level, idx) holds the RFC 6962 hash of events [idx * 2^level, (idx + 1) * 2^level)
-- of the chain, for the complete subtrees of level 8 and up (proofs read leaf hashes below
-- that). The checkpointer writes them in the transaction that stores the checkpoint; a chain
-- checkpointed before this table existed gets its rows from the first proof that needs them.
-- A cache only: nothing signed is read from here, and a wrong row makes proofs that fail
-- against the signed checkpoint.
CREATE TABLE audit_nodes (
    chain           text NOT NULL REFERENCES audit_heads (chain),
    level           smallint NOT NULL,
    idx             bigint NOT NULL,
    hash            bytea NOT NULL,
    PRIMARY KEY (chain, level, idx)
);

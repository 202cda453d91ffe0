"""Which audit chains the database holds."""

from __future__ import annotations

__all__ = ["STORED_CHAINS"]

# Every chain anything is stored for, not only those with a head row: an insider who drops
# the foreign keys and deletes a head must not hide its events and checkpoints. A skip scan
# per table reads one index entry per chain, not every event. One statement, one snapshot.
# Rows: (chain, headless), sorted by chain; headless is true when audit_heads has no row.
STORED_CHAINS = (
    "WITH RECURSIVE e(chain) AS (SELECT min(chain) FROM audit_events UNION ALL"
    " SELECT (SELECT min(chain) FROM audit_events t WHERE t.chain > e.chain)"
    " FROM e WHERE e.chain IS NOT NULL),"
    " c(chain) AS (SELECT min(chain) FROM audit_checkpoints UNION ALL"
    " SELECT (SELECT min(chain) FROM audit_checkpoints t WHERE t.chain > c.chain)"
    " FROM c WHERE c.chain IS NOT NULL),"
    " n(chain) AS (SELECT min(chain) FROM audit_nodes UNION ALL"
    " SELECT (SELECT min(chain) FROM audit_nodes t WHERE t.chain > n.chain)"
    " FROM n WHERE n.chain IS NOT NULL),"
    " stored(chain) AS (SELECT chain FROM audit_heads UNION SELECT chain FROM e"
    " WHERE chain IS NOT NULL UNION SELECT chain FROM c WHERE chain IS NOT NULL"
    " UNION SELECT chain FROM n WHERE chain IS NOT NULL)"
    " SELECT s.chain, NOT EXISTS (SELECT 1 FROM audit_heads h WHERE h.chain = s.chain)"
    " AS headless FROM stored s ORDER BY s.chain"
)

-- agentauth:no-transaction
-- 0014's indexes lead with agent_id and grant_id: every query the single-column indexes
-- served (an agent's or a grant's events), they serve too. Kept, these would be two more
-- index entries for every event written, on the table every verifier decision writes to.
-- Dropped concurrently: writers and readers go on, the drop waiting for the transactions
-- using the table to end.

DROP INDEX CONCURRENTLY audit_events_agent;
DROP INDEX CONCURRENTLY audit_events_grant;

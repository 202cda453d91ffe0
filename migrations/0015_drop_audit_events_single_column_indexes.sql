-- 0014's indexes lead with agent_id and grant_id: every query the single-column indexes
-- served (an agent's or a grant's events), they serve too. Kept, these would be two more
-- index entries for every event written, on the table every verifier decision writes to.
-- Dropping takes an exclusive lock on audit_events, held only while the catalog changes.

DROP INDEX audit_events_agent;
DROP INDEX audit_events_grant;

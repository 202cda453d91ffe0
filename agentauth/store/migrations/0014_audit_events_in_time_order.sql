-- agentauth:no-transaction
-- GET /v1/audit/events pages through an agent's or a grant's events in (time_ms, chain, seq)
-- order, each page starting after the last row of the one before. The indexes on agent_id
-- and grant_id alone found every event of that agent or grant for every page, then sorted
-- them: reading a busy agent's history cost its size once per page. These hold each
-- agent's and grant's events in time order, so a page reads its own rows and the one after:
-- the page's position bounds the scan on time_ms, and the planner orders the events of one
-- millisecond by (chain, seq) as it reads them (an Incremental Sort of a few rows). Adding
-- chain and seq as columns would spare that sort, and it would cost about 75 bytes more an
-- event on the table every decision writes to (docs/capacity-planning.md).
--
-- Built concurrently, outside a transaction (the first line): shards keep committing
-- decisions while the table is read, twice (docs/runbook.md). A build that stops midway
-- leaves an invalid index, which the next run drops and builds again. 0015 drops the two
-- indexes these replace.

CREATE INDEX CONCURRENTLY audit_events_agent_in_order ON audit_events (agent_id, time_ms)
    WHERE agent_id IS NOT NULL;
CREATE INDEX CONCURRENTLY audit_events_grant_in_order ON audit_events (grant_id, time_ms)
    WHERE grant_id IS NOT NULL;

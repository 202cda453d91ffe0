-- agentauth:no-transaction
-- GET /v1/step-ups and GET /v1/grant-requests page through a human's (or an agent's) rows
-- in (created_at, id) order, each page starting after the last row of the one before.
-- These hold each agent's step-ups and grant requests in time order, so a page after the
-- first reads, for each of the caller's agents, the rows from its position on, where
-- step_ups_agent (0013) and grant_requests_agent (0001) found every row of the agent for
-- every page. The page's position bounds the scan on created_at; rows of one instant are
-- ordered by id as they are read, as 0014 leaves chain and seq out. About 60 bytes a row,
-- on tables written at a person's or an agent's pace (at most max_pending_* pending at
-- once) and swept (rows left unanswered go 30 days past their expiry).
--
-- Built concurrently, outside a transaction (the first line), as 0014's are: agents keep
-- asking for step-ups and grants while the tables are read.

CREATE INDEX CONCURRENTLY step_ups_agent_in_order ON step_ups (agent_id, created_at);
CREATE INDEX CONCURRENTLY grant_requests_agent_in_order
    ON grant_requests (agent_id, created_at);

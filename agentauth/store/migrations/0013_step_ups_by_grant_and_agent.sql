-- A step-up request reads the grant's pending step-ups (by grant_id and agent_id, under the
-- grant's lock) and a human's listing reaches step-ups through their agents (by agent_id):
-- neither column was indexed, so each read every step-up of every agent. The table is
-- swept (unanswered ones 30 days past expiry), and a step-up is asked for at a person's
-- pace, so building these holds its writers back only briefly.

CREATE INDEX step_ups_grant ON step_ups (grant_id);
CREATE INDEX step_ups_agent ON step_ups (agent_id);

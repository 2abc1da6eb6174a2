-- 004: clock changes made on the serving side (issue 10): every clock the instance clock loop,
-- the power guard or a plan set, with why. Loaded per interval from the agents' event files.

CREATE TABLE IF NOT EXISTS clock_changes (
    instance_id  text        NOT NULL,
    changed_at   timestamptz NOT NULL,
    node         text        NOT NULL,
    from_mhz     integer     CHECK (from_mhz > 0),  -- null: unknown (first event after a start)
    to_mhz       integer     NOT NULL CHECK (to_mhz > 0),
    reason       text        NOT NULL,               -- lower, raise, deadline, guard-level-2, ...
    controller   text        NOT NULL,               -- clock-loop, power-guard, plan, restore
    source       text        NOT NULL,               -- event file
    PRIMARY KEY (instance_id, changed_at)
);
CREATE INDEX IF NOT EXISTS clock_changes_changed_at ON clock_changes (changed_at);

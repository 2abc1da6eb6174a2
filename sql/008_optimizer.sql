-- 008: the layout optimizer (issue 7).
-- * profiles: the contract's gang shape and power curve. The statements repeat those of
--   migration 005 (issue 4) word for word with IF NOT EXISTS, so either order is harmless.
-- * plans: degraded flag (demand beyond capacity: never auto-approved), the per-instance clock
--   policy / power guard / placement, the diff against the applied layout, and re-shard and
--   clock-change counts.
-- * plan_items: the gang shape of each item.
-- Re-runnable: every statement is IF NOT EXISTS.

ALTER TABLE profiles ADD COLUMN IF NOT EXISTS spp integer NOT NULL DEFAULT 1 CHECK (spp > 0);
ALTER TABLE profiles ADD COLUMN IF NOT EXISTS kvp integer NOT NULL DEFAULT 1 CHECK (kvp > 0);
-- [[rate_rps, instance watts], ...]: rate 0 first (loaded idle), capacity last.
ALTER TABLE profiles ADD COLUMN IF NOT EXISTS power_curve jsonb;
ALTER TABLE profiles ADD COLUMN IF NOT EXISTS ttft_p50_s double precision;
ALTER TABLE profiles ADD COLUMN IF NOT EXISTS tbt_p50_s double precision;

ALTER TABLE plans ADD COLUMN IF NOT EXISTS degraded boolean NOT NULL DEFAULT false;
ALTER TABLE plans ADD COLUMN IF NOT EXISTS policy jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE plans ADD COLUMN IF NOT EXISTS diff jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE plans ADD COLUMN IF NOT EXISTS instances_resharded integer NOT NULL DEFAULT 0;
ALTER TABLE plans ADD COLUMN IF NOT EXISTS clock_changes integer NOT NULL DEFAULT 0;

ALTER TABLE plan_items ADD COLUMN IF NOT EXISTS spp integer NOT NULL DEFAULT 1 CHECK (spp > 0);
ALTER TABLE plan_items ADD COLUMN IF NOT EXISTS kvp integer NOT NULL DEFAULT 1 CHECK (kvp > 0);

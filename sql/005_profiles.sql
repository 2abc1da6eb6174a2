-- 005: energy-performance profiles (issue 4).
-- * profiles gains the long-context gang shape (spp, kvp), the power-vs-load curve and the
--   latency percentiles at every load point, P50s at capacity, energy per request, and its
--   provenance per row (method: calibrated from public data, measured by the profiler, or
--   entered by hand; source: what it was derived from). idle_power_w and
--   power_at_capacity_w stay: the first and last points of the curve.
-- * profile_versions describes each version as a whole (where it came from, its file digest).
-- Re-runnable: every statement is IF NOT EXISTS.

ALTER TABLE profiles ADD COLUMN IF NOT EXISTS spp integer NOT NULL DEFAULT 1 CHECK (spp > 0);
ALTER TABLE profiles ADD COLUMN IF NOT EXISTS kvp integer NOT NULL DEFAULT 1 CHECK (kvp > 0);
-- [[rate_rps, instance watts], ...]: rate 0 first (loaded idle), capacity last.
ALTER TABLE profiles ADD COLUMN IF NOT EXISTS power_curve jsonb;
-- [{"rate_rps", "power_w", "ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s"}, ...]
ALTER TABLE profiles ADD COLUMN IF NOT EXISTS load_points jsonb;
ALTER TABLE profiles ADD COLUMN IF NOT EXISTS ttft_p50_s double precision;
ALTER TABLE profiles ADD COLUMN IF NOT EXISTS tbt_p50_s double precision;
ALTER TABLE profiles ADD COLUMN IF NOT EXISTS energy_per_request_j double precision;
ALTER TABLE profiles ADD COLUMN IF NOT EXISTS method text NOT NULL DEFAULT 'calibrated'
    CHECK (method IN ('calibrated', 'measured', 'manual'));

CREATE TABLE IF NOT EXISTS profile_versions (
    version        text    PRIMARY KEY,
    description    text    NOT NULL,
    source_file    text    NOT NULL,  -- file name the rows were loaded from
    source_sha256  text    NOT NULL,  -- digest of that file
    row_count      integer NOT NULL CHECK (row_count >= 0)
);

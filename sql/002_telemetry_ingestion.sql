-- 002: production telemetry ingestion (issue 3).
-- * gpu_telemetry becomes a table partitioned by day on sampled_at (loaders create the daily
--   partitions they need and drop those older than the retention setting); rows keep the file
--   and line they came from.
-- * request_logs gains the serving-engine fields of the JSONL request-log format.
-- * request_type_windows gains latency percentiles; instance_windows holds per-instance
--   energy and power per window; workload_rates holds ServeGen-style per-client rates.
-- * ingest_runs accounts for every run: rows read = rows loaded + rows rejected.

ALTER TABLE gpu_telemetry RENAME TO gpu_telemetry_unpartitioned;
ALTER TABLE gpu_telemetry_unpartitioned RENAME CONSTRAINT gpu_telemetry_pkey
    TO gpu_telemetry_unpartitioned_pkey;

CREATE TABLE gpu_telemetry (
    gpu_uuid               text        NOT NULL,
    sampled_at             timestamptz NOT NULL,
    node                   text        NOT NULL,
    gpu_index              integer     NOT NULL,
    instance_id            text,
    energy_mj              bigint,            -- NVML total-energy counter since driver load, mJ
    power_w                double precision,
    sm_clock_mhz           integer,
    memory_clock_mhz       integer,
    applied_sm_clock_mhz   integer,           -- applications / locked clock where readable
    power_limit_w          double precision,
    utilization_pct        double precision,
    memory_used_bytes      bigint,
    temperature_c          double precision,
    unsupported_fields     text[]      NOT NULL DEFAULT '{}',  -- NVMLError_NotSupported
    source                 text        NOT NULL DEFAULT '',    -- file the row came from
    line_no                integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (gpu_uuid, sampled_at)
) PARTITION BY RANGE (sampled_at);

-- Rows of the unpartitioned table (if any) move into one catch-all partition per day range.
DO $$
DECLARE
    day date;
BEGIN
    FOR day IN SELECT DISTINCT (sampled_at AT TIME ZONE 'UTC')::date
               FROM gpu_telemetry_unpartitioned LOOP
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF gpu_telemetry FOR VALUES FROM (%L) TO (%L)',
            'gpu_telemetry_p' || to_char(day, 'YYYYMMDD'),
            (day::timestamp AT TIME ZONE 'UTC'),
            ((day + 1)::timestamp AT TIME ZONE 'UTC'));
    END LOOP;
END $$;
INSERT INTO gpu_telemetry (gpu_uuid, sampled_at, node, gpu_index, instance_id, energy_mj, power_w,
    sm_clock_mhz, memory_clock_mhz, power_limit_w, utilization_pct, memory_used_bytes,
    temperature_c)
SELECT gpu_uuid, sampled_at, node, gpu_index, instance_id, energy_mj, power_w, sm_clock_mhz,
    memory_clock_mhz, power_limit_w, utilization_pct, memory_used_bytes, temperature_c
FROM gpu_telemetry_unpartitioned;
DROP TABLE gpu_telemetry_unpartitioned;
-- BRIN, not B-tree: samples arrive in time order, and a B-tree on (node, sampled_at) cost
-- about 0.7 s of server CPU per million COPYed rows (measured with wattplan bench ingest).
CREATE INDEX IF NOT EXISTS gpu_telemetry_sampled_brin ON gpu_telemetry USING brin (sampled_at);

ALTER TABLE request_logs
    ADD COLUMN IF NOT EXISTS model        text,
    ADD COLUMN IF NOT EXISTS pool         text,
    ADD COLUMN IF NOT EXISTS instance_id  text,
    ADD COLUMN IF NOT EXISTS ttft_s       double precision,
    ADD COLUMN IF NOT EXISTS tbt_s        double precision,  -- mean time between tokens
    ADD COLUMN IF NOT EXISTS e2e_s        double precision,
    ADD COLUMN IF NOT EXISTS outcome      text;

ALTER TABLE request_type_windows
    ADD COLUMN IF NOT EXISTS ttft_p50_s  double precision,
    ADD COLUMN IF NOT EXISTS ttft_p99_s  double precision,
    ADD COLUMN IF NOT EXISTS tbt_p50_s   double precision,
    ADD COLUMN IF NOT EXISTS tbt_p99_s   double precision;

CREATE TABLE IF NOT EXISTS instance_windows (
    instance_id       text        NOT NULL,
    window_start_at   timestamptz NOT NULL,
    window_s          integer     NOT NULL CHECK (window_s > 0),
    node              text        NOT NULL,
    gpus              integer     NOT NULL,
    samples           integer     NOT NULL,
    energy_j          double precision NOT NULL,  -- from energy-counter deltas
    mean_power_w      double precision,
    peak_power_w      double precision,
    counter_resets    integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (instance_id, window_start_at, window_s)
);

CREATE TABLE IF NOT EXISTS workload_rates (
    workload          text        NOT NULL,  -- e.g. servegen-m-large
    client            text        NOT NULL,
    window_start_at   timestamptz NOT NULL,
    window_s          integer     NOT NULL CHECK (window_s > 0),
    rate_rps          double precision NOT NULL CHECK (rate_rps >= 0),
    cv                double precision,
    pattern           text,
    mean_input_tokens double precision,
    mean_output_tokens double precision,
    PRIMARY KEY (workload, client, window_start_at, window_s)
);

CREATE TABLE IF NOT EXISTS ingest_runs (
    source_kind        text        NOT NULL,  -- gpu_telemetry, request_logs, ...
    interval_start_at  timestamptz NOT NULL,
    interval_end_at    timestamptz NOT NULL,
    rows_read          bigint      NOT NULL,
    rows_loaded        bigint      NOT NULL,
    rows_rejected      bigint      NOT NULL,
    files              jsonb       NOT NULL DEFAULT '[]'::jsonb,
    PRIMARY KEY (source_kind, interval_start_at, interval_end_at),
    CHECK (rows_read = rows_loaded + rows_rejected)
);

ALTER TABLE rejected_rows ADD COLUMN IF NOT EXISTS source_kind text;

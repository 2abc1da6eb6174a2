-- 001: first schema. Later migrations extend it; never edit this file once applied
-- (the runner stores its checksum and refuses an edited file).
-- Units live in column names; times are timestamptz named *_at.

CREATE TABLE IF NOT EXISTS request_logs (
    source          text        NOT NULL,  -- file or stream the row came from
    line_no         integer     NOT NULL,  -- 1-based data line within the source
    service         text        NOT NULL,
    arrived_at      timestamptz NOT NULL,
    input_tokens    integer     NOT NULL CHECK (input_tokens >= 0),
    output_tokens   integer     NOT NULL CHECK (output_tokens >= 0),
    request_type    text        NOT NULL,
    PRIMARY KEY (source, line_no)
);
CREATE INDEX IF NOT EXISTS request_logs_service_arrived_idx
    ON request_logs (service, arrived_at);

CREATE TABLE IF NOT EXISTS request_type_windows (
    service          text        NOT NULL,
    request_type     text        NOT NULL,
    window_start_at  timestamptz NOT NULL,
    window_s         integer     NOT NULL CHECK (window_s > 0),
    request_count    integer     NOT NULL CHECK (request_count >= 0),
    input_tokens     bigint      NOT NULL,
    output_tokens    bigint      NOT NULL,
    peak_rate_rps    double precision NOT NULL,  -- highest 1-minute rate in the window
    mean_rate_rps    double precision NOT NULL,
    PRIMARY KEY (service, request_type, window_start_at, window_s)
);

CREATE TABLE IF NOT EXISTS gpu_telemetry (
    gpu_uuid             text        NOT NULL,
    sampled_at           timestamptz NOT NULL,
    node                 text        NOT NULL,
    gpu_index            integer     NOT NULL,
    instance_id          text,
    energy_mj            bigint,            -- NVML total-energy counter, millijoules
    power_w              double precision,
    sm_clock_mhz         integer,
    memory_clock_mhz     integer,
    power_limit_w        double precision,
    utilization_pct      double precision,
    memory_used_bytes    bigint,
    temperature_c        double precision,
    PRIMARY KEY (gpu_uuid, sampled_at)
);

CREATE TABLE IF NOT EXISTS load_forecasts (
    cluster            text        NOT NULL,
    service            text        NOT NULL,
    request_type       text        NOT NULL,
    window_start_at    timestamptz NOT NULL,
    window_s           integer     NOT NULL,
    method             text        NOT NULL,
    made_at            timestamptz NOT NULL,  -- the run's data-interval end, not wall clock
    mean_rate_rps      double precision NOT NULL,
    peak_rate_rps      double precision NOT NULL,
    planned_rate_rps   double precision NOT NULL,
    quantile           double precision NOT NULL,
    PRIMARY KEY (cluster, service, request_type, window_start_at, window_s, method)
);

CREATE TABLE IF NOT EXISTS profiles (
    version              text    NOT NULL,
    config_key           text    NOT NULL,
    request_type         text    NOT NULL,
    model                text    NOT NULL,
    gpu_type             text    NOT NULL,
    tp                   integer NOT NULL CHECK (tp > 0),
    power_cap_w          integer NOT NULL CHECK (power_cap_w > 0),
    clock_mhz            integer,            -- NULL: clock not locked
    capacity_rps         double precision NOT NULL CHECK (capacity_rps > 0),
    idle_power_w         double precision NOT NULL CHECK (idle_power_w >= 0),
    power_at_capacity_w  double precision NOT NULL,
    ttft_p99_s           double precision NOT NULL,
    tbt_p99_s            double precision NOT NULL,
    ttft_slo_s           double precision NOT NULL,
    tbt_slo_s            double precision NOT NULL,
    source               text    NOT NULL,
    PRIMARY KEY (version, config_key, request_type)
);

CREATE TABLE IF NOT EXISTS plans (
    plan_id               text        PRIMARY KEY,
    cluster               text        NOT NULL,
    window_start_at       timestamptz NOT NULL,
    window_s              integer     NOT NULL,
    status                text        NOT NULL CHECK (status IN
        ('proposed', 'approved', 'rejected', 'applied', 'failed', 'superseded')),
    status_reason         text,
    created_at            timestamptz NOT NULL,  -- the run's data-interval end
    status_changed_at     timestamptz NOT NULL,
    predicted_energy_kwh  double precision NOT NULL,
    predicted_carbon_g    double precision NOT NULL,
    predicted_cost_usd    double precision NOT NULL,
    gpus                  integer     NOT NULL,
    peak_power_w          double precision NOT NULL,
    min_slo_headroom      double precision NOT NULL,
    instances_started     integer     NOT NULL DEFAULT 0,
    instances_stopped     integer     NOT NULL DEFAULT 0,
    solver                jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS plans_cluster_window_idx ON plans (cluster, window_start_at);

CREATE TABLE IF NOT EXISTS plan_items (
    plan_id       text    NOT NULL REFERENCES plans (plan_id) ON DELETE CASCADE,
    service       text    NOT NULL,
    request_type  text    NOT NULL,
    config_key    text    NOT NULL,
    model         text    NOT NULL,
    gpu_type      text    NOT NULL,
    tp            integer NOT NULL,
    power_cap_w   integer NOT NULL,
    clock_mhz     integer,
    instances     integer NOT NULL CHECK (instances >= 0),
    load_rps      double precision NOT NULL,
    PRIMARY KEY (plan_id, service, request_type, config_key)
);

CREATE TABLE IF NOT EXISTS plan_approvals (
    plan_id      text        NOT NULL REFERENCES plans (plan_id) ON DELETE CASCADE,
    decided_at   timestamptz NOT NULL,
    decided_by   text        NOT NULL,
    decision     text        NOT NULL CHECK (decision IN ('approved', 'rejected')),
    comment      text,
    PRIMARY KEY (plan_id, decided_at)
);

CREATE TABLE IF NOT EXISTS applied_cluster_states (
    cluster      text        NOT NULL,
    observed_at  timestamptz NOT NULL,
    plan_id      text,
    gpus         integer     NOT NULL,
    layout       jsonb       NOT NULL,
    PRIMARY KEY (cluster, observed_at)
);

CREATE TABLE IF NOT EXISTS reconfiguration_events (
    cluster        text        NOT NULL,
    plan_id        text        NOT NULL,
    service        text        NOT NULL,
    request_type   text        NOT NULL,
    config_key     text        NOT NULL,
    action         text        NOT NULL CHECK (action IN ('start', 'stop', 'reshard', 'clock')),
    instances      integer     NOT NULL,
    occurred_at    timestamptz NOT NULL,
    overhead_s     double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (plan_id, service, request_type, config_key, action)
);

CREATE TABLE IF NOT EXISTS grid_carbon_intensities (
    zone                        text        NOT NULL,
    hour_at                     timestamptz NOT NULL,
    carbon_intensity_g_per_kwh  double precision NOT NULL,  -- direct (operational)
    lifecycle_g_per_kwh         double precision,
    PRIMARY KEY (zone, hour_at)
);

CREATE TABLE IF NOT EXISTS electricity_prices (
    zone               text        NOT NULL,
    hour_at            timestamptz NOT NULL,
    price_usd_per_mwh  double precision NOT NULL,
    PRIMARY KEY (zone, hour_at)
);

CREATE TABLE IF NOT EXISTS gpu_prices (
    gpu_type                 text NOT NULL,
    provider                 text NOT NULL,
    offer                    text NOT NULL,
    price_usd_per_gpu_hour   double precision NOT NULL CHECK (price_usd_per_gpu_hour >= 0),
    PRIMARY KEY (gpu_type, provider, offer)
);

CREATE TABLE IF NOT EXISTS rejected_rows (
    source       text        NOT NULL,
    line_no      integer     NOT NULL,
    raw          text        NOT NULL,
    reason       text        NOT NULL,
    PRIMARY KEY (source, line_no)
);

-- 007: reports (issue 9). Views named report_* answer what the cluster used, emitted and cost,
-- per cluster, model, pool (service x request type) and GPU type; how the plans compared with
-- what happened; what the planner saved against a SinglePool baseline; who approved what and
-- what the changes cost. docs/reports.md explains every rule below; the tests in
-- tests/wattplan/test_report_views.py check them against numbers computed independently.
--
-- * cluster_sites: per cluster, the grid zone (carbon intensity and electricity prices), the
--   telemetry window length, which nodes are the cluster's (a LIKE pattern) and the profile
--   version. wattplan writes its own cluster's row from Settings (report refresh).
-- * Two materialized views hold the per-window work (refreshed by the report_daily DAG or
--   `wattplan report refresh`): report_slot_windows (energy, GPUs, load per window and layout
--   slot) and report_pool_windows (load, capacity and SLO per window and pool). Every other
--   report_* view is a plain view over them and the base tables, so it is always consistent
--   with the last refresh.
-- * Views name their columns (no SELECT *) and read optional columns of later migrations
--   (profiles.power_curve, spp, kvp) through to_jsonb(row), so additive columns never break
--   them.
-- * Times: hours are bins of one hour from a UTC origin, days are UTC dates; neither depends
--   on the session's TimeZone.
-- Re-runnable: IF NOT EXISTS / OR REPLACE throughout.

CREATE TABLE IF NOT EXISTS cluster_sites (
    cluster          text    PRIMARY KEY,
    zone             text    NOT NULL,                -- grid_carbon_intensities / electricity_prices zone
    window_s         integer NOT NULL DEFAULT 300     -- telemetry window (WATTPLAN_INGEST_WINDOW_S)
        CHECK (window_s > 0 AND 3600 % window_s = 0),
    node_pattern     text    NOT NULL DEFAULT '%',    -- LIKE pattern: the nodes whose telemetry is this cluster's
    profile_version  text    NOT NULL DEFAULT 'v0'    -- profiles for modelled energy and the baseline
);

-- Instance power (W) of a profile row (given as to_jsonb(profiles row)) at a request rate:
-- piecewise linear along power_curve [[rate_rps, watts], ...] when the row has one (a later
-- migration adds it), else the line from (0, idle_power_w) to (capacity_rps,
-- power_at_capacity_w); the rate is clamped to [0, the curve's last rate]. Same rule as
-- wattplan.domain.Profile.power_w.
CREATE OR REPLACE FUNCTION wattplan_profile_power_w(profile jsonb, rate_rps double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE STRICT
AS $$
    WITH points AS (
        SELECT (point ->> 0)::double precision AS rate, (point ->> 1)::double precision AS watts
        FROM jsonb_array_elements(
            CASE WHEN jsonb_typeof(profile -> 'power_curve') = 'array'
                      AND jsonb_array_length(profile -> 'power_curve') >= 2
                 THEN profile -> 'power_curve'
                 ELSE jsonb_build_array(
                     jsonb_build_array(0, profile -> 'idle_power_w'),
                     jsonb_build_array(profile -> 'capacity_rps', profile -> 'power_at_capacity_w'))
            END) AS point
    ),
    segments AS (
        SELECT rate, watts,
               lead(rate) OVER (ORDER BY rate) AS next_rate,
               lead(watts) OVER (ORDER BY rate) AS next_watts
        FROM points
    ),
    clamped AS (
        SELECT greatest(0.0, least(rate_rps, (SELECT max(rate) FROM points))) AS x
    )
    SELECT CASE WHEN s.next_rate IS NULL OR s.next_rate = s.rate THEN s.watts
                ELSE s.watts + (c.x - s.rate) / (s.next_rate - s.rate) * (s.next_watts - s.watts)
           END
    FROM segments s, clamped c
    WHERE s.rate <= c.x
    ORDER BY s.rate DESC
    LIMIT 1
$$;

-- The layout in force: each applied state of a cluster holds from its observed_at until the
-- cluster's next applied state. One row per slot (service, request type, serving config).
CREATE OR REPLACE VIEW report_layout_slots AS
WITH states AS (
    SELECT s.cluster, s.plan_id, s.observed_at AS valid_from,
           lead(s.observed_at) OVER (PARTITION BY s.cluster ORDER BY s.observed_at) AS valid_until,
           s.layout
    FROM applied_cluster_states s
),
items AS (
    SELECT st.cluster, st.plan_id, st.valid_from, st.valid_until,
           item ->> 'service' AS service,
           item ->> 'request_type' AS request_type,
           item ->> 'model' AS model,
           item ->> 'gpu_type' AS gpu_type,
           (item ->> 'tp')::integer AS tp,
           coalesce((item ->> 'spp')::integer, 1) AS spp,
           coalesce((item ->> 'kvp')::integer, 1) AS kvp,
           (item ->> 'power_cap_w')::integer AS power_cap_w,
           (item ->> 'clock_mhz')::integer AS clock_mhz,
           (item ->> 'instances')::integer AS instances
    FROM states st
    CROSS JOIN LATERAL jsonb_array_elements(st.layout) AS item
)
SELECT cluster, plan_id, valid_from, valid_until, service, request_type, model, gpu_type, tp,
       spp, kvp, power_cap_w, clock_mhz,
       -- same text as wattplan.domain.ServingConfig.key
       model || '/' || gpu_type || '/tp' || tp
           || CASE WHEN spp > 1 OR kvp > 1 THEN '/spp' || spp || 'kvp' || kvp ELSE '' END
           || '/cap' || power_cap_w
           || CASE WHEN clock_mhz IS NOT NULL THEN '/' || clock_mhz || 'mhz' ELSE '' END
           AS config_key,
       sum(instances)::integer AS instances,
       sum(instances * tp * spp * kvp)::integer AS gpus
FROM items
WHERE instances > 0
GROUP BY cluster, plan_id, valid_from, valid_until, service, request_type, model, gpu_type, tp,
         spp, kvp, power_cap_w, clock_mhz;

-- Per telemetry window of each cluster and per layout slot in force at the window's start:
-- GPUs, load, modelled and measured energy, carbon and cost. Three kinds of row:
--   slot          a slot of the layout in force (service, request type and config set);
--   unserved      a pool (service, request type) with requests but no slot: no energy;
--   unattributed  telemetry energy of a window in which no layout was in force.
-- Attribution: measured energy (instance_windows of the cluster's nodes) carries no pool, so a
-- window's measured energy is split over its slots in proportion to their modelled energy
-- (by GPUs where a slot has no profile). Modelled energy: a pool's arrivals (mean rate) are
-- shared by its slots in proportion to capacity (instances x profile capacity), all at the
-- same utilisation u = min(1, rate / pool capacity); a slot draws instances x power(u x
-- capacity) for the window. energy_j is the measured value where the cluster has telemetry
-- for the window (energy_basis 'measured'), else the modelled one ('modelled').
CREATE MATERIALIZED VIEW IF NOT EXISTS report_slot_windows AS
WITH sites AS (
    SELECT cluster, zone, window_s, node_pattern, profile_version,
           make_interval(secs => window_s) AS step
    FROM cluster_sites
),
node_clusters AS (  -- a node belongs to the cluster whose matching pattern is the longest
    SELECT DISTINCT ON (n.node) n.node, s.cluster
    FROM (SELECT DISTINCT node FROM instance_windows) n
    JOIN sites s ON n.node LIKE s.node_pattern
    ORDER BY n.node, length(s.node_pattern) DESC, s.cluster
),
telemetry AS (
    SELECT nc.cluster, iw.window_start_at, sum(iw.energy_j) AS energy_j,
           sum(iw.gpus) AS gpus
    FROM instance_windows iw
    JOIN node_clusters nc ON nc.node = iw.node
    JOIN sites s ON s.cluster = nc.cluster AND s.window_s = iw.window_s
    GROUP BY nc.cluster, iw.window_start_at
),
served_services AS (
    SELECT DISTINCT cluster, service FROM report_layout_slots
),
requests AS (
    SELECT ss.cluster, r.service, r.request_type, r.window_start_at, r.request_count,
           r.input_tokens, r.output_tokens, r.mean_rate_rps, r.peak_rate_rps
    FROM request_type_windows r
    JOIN served_services ss ON ss.service = r.service
    JOIN sites s ON s.cluster = ss.cluster AND s.window_s = r.window_s
),
bounds AS (  -- from the first layout (or telemetry) to the last window with data
    SELECT s.cluster, s.step,
           least((SELECT min(l.valid_from) FROM report_layout_slots l WHERE l.cluster = s.cluster),
                 (SELECT min(t.window_start_at) FROM telemetry t WHERE t.cluster = s.cluster))
               AS first_at,
           greatest((SELECT max(t.window_start_at) FROM telemetry t WHERE t.cluster = s.cluster),
                    (SELECT max(q.window_start_at) FROM requests q WHERE q.cluster = s.cluster))
               AS last_at
    FROM sites s
),
grid AS (
    SELECT b.cluster, g.window_start_at
    FROM bounds b
    CROSS JOIN LATERAL generate_series(
        date_bin(b.step, b.first_at, TIMESTAMPTZ '2000-01-01 00:00:00+00'), b.last_at, b.step
    ) AS g(window_start_at)
    WHERE b.first_at IS NOT NULL AND b.last_at IS NOT NULL
),
in_force AS (
    SELECT g.cluster, g.window_start_at, l.plan_id, l.service, l.request_type, l.model,
           l.gpu_type, l.tp, l.spp, l.kvp, l.power_cap_w, l.clock_mhz, l.config_key,
           l.instances, l.gpus
    FROM grid g
    JOIN report_layout_slots l
      ON l.cluster = g.cluster AND l.valid_from <= g.window_start_at
     AND (l.valid_until IS NULL OR g.window_start_at < l.valid_until)
),
profiled AS (
    SELECT f.*, pr.profile
    FROM in_force f
    JOIN sites s ON s.cluster = f.cluster
    LEFT JOIN plans pl ON pl.plan_id = f.plan_id
    LEFT JOIN LATERAL (
        SELECT to_jsonb(p) AS profile
        FROM profiles p
        WHERE p.version = coalesce(pl.solver ->> 'profile_version', s.profile_version)
          AND p.model = f.model AND p.gpu_type = f.gpu_type AND p.tp = f.tp
          AND p.power_cap_w = f.power_cap_w AND p.clock_mhz IS NOT DISTINCT FROM f.clock_mhz
          AND p.request_type = f.request_type
          AND coalesce((to_jsonb(p) ->> 'spp')::integer, 1) = f.spp
          AND coalesce((to_jsonb(p) ->> 'kvp')::integer, 1) = f.kvp
        ORDER BY p.config_key
        LIMIT 1
    ) pr ON true
),
pools AS (
    SELECT cluster, window_start_at, service, request_type,
           sum(instances * (profile ->> 'capacity_rps')::double precision) AS capacity_rps,
           bool_and(profile IS NOT NULL) AS all_profiled,
           sum(instances) AS instances
    FROM profiled
    GROUP BY cluster, window_start_at, service, request_type
),
slots AS (
    SELECT f.cluster, f.window_start_at, 'slot'::text AS row_kind, f.plan_id, f.service,
           f.request_type, f.model, f.gpu_type, f.tp, f.spp, f.kvp, f.power_cap_w,
           f.clock_mhz, f.config_key, f.instances, f.gpus,
           (f.profile ->> 'ttft_slo_s')::double precision AS ttft_slo_s,
           (f.profile ->> 'tbt_slo_s')::double precision AS tbt_slo_s,
           pl.capacity_rps AS pool_capacity_rps,
           q.mean_rate_rps AS pool_load_rps, q.peak_rate_rps AS pool_peak_rps,
           CASE WHEN pl.all_profiled AND pl.capacity_rps > 0
                THEN f.instances * (f.profile ->> 'capacity_rps')::double precision / pl.capacity_rps
                ELSE f.instances::double precision / pl.instances
           END AS pool_share,
           CASE WHEN pl.all_profiled AND pl.capacity_rps > 0
                THEN least(1.0, coalesce(q.mean_rate_rps, 0.0) / pl.capacity_rps)
           END AS utilisation,
           (f.profile ->> 'capacity_rps')::double precision AS capacity_rps,
           f.profile,
           q.request_count, q.input_tokens, q.output_tokens
    FROM profiled f
    JOIN pools pl USING (cluster, window_start_at, service, request_type)
    LEFT JOIN requests q
      ON q.cluster = f.cluster AND q.service = f.service AND q.request_type = f.request_type
     AND q.window_start_at = f.window_start_at
),
slot_energy AS (
    SELECT s.*,
           s.utilisation * s.instances * s.capacity_rps AS served_rps,
           s.pool_share * least(coalesce(s.pool_peak_rps, 0.0), s.pool_capacity_rps)
               AS served_peak_rps,
           s.instances * wattplan_profile_power_w(s.profile, s.utilisation * s.capacity_rps)
               AS modelled_power_w
    FROM slots s
),
window_totals AS (
    SELECT cluster, window_start_at,
           sum(modelled_power_w) AS modelled_power_w,
           bool_and(modelled_power_w IS NOT NULL) AS all_modelled,
           sum(gpus) AS gpus
    FROM slot_energy
    GROUP BY cluster, window_start_at
),
unserved AS (  -- pools with requests in a window of the grid but no slot in force
    SELECT q.cluster, q.window_start_at, q.service, q.request_type, q.request_count,
           q.input_tokens, q.output_tokens, q.mean_rate_rps, q.peak_rate_rps
    FROM requests q
    JOIN grid g ON g.cluster = q.cluster AND g.window_start_at = q.window_start_at
    WHERE q.request_count > 0
      AND NOT EXISTS (
          SELECT 1 FROM in_force f
          WHERE f.cluster = q.cluster AND f.window_start_at = q.window_start_at
            AND f.service = q.service AND f.request_type = q.request_type)
),
rows AS (
    SELECT e.cluster, e.window_start_at, e.row_kind, e.plan_id, e.service, e.request_type,
           e.model, e.gpu_type, e.tp, e.spp, e.kvp, e.power_cap_w, e.clock_mhz, e.config_key,
           e.instances, e.gpus, e.ttft_slo_s, e.tbt_slo_s, e.pool_capacity_rps,
           e.pool_load_rps, e.pool_peak_rps, e.pool_share, e.utilisation, e.served_rps,
           e.served_peak_rps,
           e.pool_share * e.request_count AS requests,
           e.pool_share * e.input_tokens AS input_tokens,
           e.pool_share * e.output_tokens AS output_tokens,
           e.modelled_power_w,
           t.energy_j * CASE WHEN wt.all_modelled AND wt.modelled_power_w > 0
                             THEN e.modelled_power_w / wt.modelled_power_w
                             ELSE e.gpus::double precision / nullif(wt.gpus, 0)
                        END AS measured_energy_j,
           t.energy_j IS NOT NULL AS has_telemetry
    FROM slot_energy e
    JOIN window_totals wt USING (cluster, window_start_at)
    LEFT JOIN telemetry t USING (cluster, window_start_at)
    UNION ALL
    SELECT u.cluster, u.window_start_at, 'unserved', NULL, u.service, u.request_type, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL, 0, 0, NULL, NULL, 0.0, u.mean_rate_rps,
           u.peak_rate_rps, 1.0, NULL, 0.0, 0.0, u.request_count, u.input_tokens,
           u.output_tokens, 0.0, 0.0, t.energy_j IS NOT NULL
    FROM unserved u
    LEFT JOIN telemetry t USING (cluster, window_start_at)
    UNION ALL
    SELECT t.cluster, t.window_start_at, 'unattributed', NULL, NULL, NULL, NULL, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, 0, t.gpus, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           NULL, NULL, 0, 0, 0, NULL, t.energy_j, true
    FROM telemetry t
    WHERE NOT EXISTS (
        SELECT 1 FROM slot_energy e
        WHERE e.cluster = t.cluster AND e.window_start_at = t.window_start_at)
),
carbon_medians AS (
    SELECT zone, percentile_cont(0.5) WITHIN GROUP (ORDER BY carbon_intensity_g_per_kwh) AS value
    FROM grid_carbon_intensities GROUP BY zone
),
price_medians AS (
    SELECT zone, percentile_cont(0.5) WITHIN GROUP (ORDER BY price_usd_per_mwh) AS value
    FROM electricity_prices GROUP BY zone
),
gpu_price_medians AS (  -- same rule as wattplan.store.read_gpu_price: median over offers
    SELECT gpu_type,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY price_usd_per_gpu_hour) AS value
    FROM gpu_prices GROUP BY gpu_type
),
priced AS (
    SELECT r.*, s.window_s, s.zone,
           date_bin(INTERVAL '1 hour', r.window_start_at, TIMESTAMPTZ '2000-01-01 00:00:00+00')
               AS hour_at,
           (r.window_start_at AT TIME ZONE 'UTC')::date AS day,
           r.gpus * s.window_s / 3600.0::double precision AS gpu_hours,
           r.modelled_power_w * s.window_s AS modelled_energy_j,
           CASE WHEN r.has_telemetry THEN r.measured_energy_j
                ELSE r.modelled_power_w * s.window_s END AS energy_j,
           CASE WHEN r.has_telemetry THEN 'measured' ELSE 'modelled' END AS energy_basis,
           gp.value AS gpu_usd_per_hour
    FROM rows r
    JOIN sites s ON s.cluster = r.cluster
    LEFT JOIN gpu_price_medians gp ON gp.gpu_type = r.gpu_type
)
SELECT p.cluster, p.window_start_at, p.window_s, p.hour_at, p.day, p.row_kind,
       CASE p.row_kind
           WHEN 'slot' THEN p.service || '/' || p.request_type || '/' || p.config_key
           WHEN 'unserved' THEN 'unserved/' || p.service || '/' || p.request_type
           ELSE 'unattributed'
       END AS slot_key,
       p.plan_id, p.service, p.request_type, p.model, p.gpu_type, p.tp, p.spp, p.kvp,
       p.power_cap_w, p.clock_mhz, p.config_key, p.instances, p.gpus, p.gpu_hours,
       p.ttft_slo_s, p.tbt_slo_s, p.pool_capacity_rps, p.pool_load_rps, p.pool_peak_rps,
       p.pool_share, p.utilisation, p.served_rps, p.served_peak_rps, p.requests,
       p.input_tokens, p.output_tokens, p.modelled_power_w, p.modelled_energy_j,
       p.measured_energy_j, p.energy_j, p.energy_basis,
       coalesce(ci.carbon_intensity_g_per_kwh, cm.value) AS carbon_g_per_kwh,
       CASE WHEN ci.zone IS NOT NULL THEN 'hourly'
            WHEN cm.value IS NOT NULL THEN 'zone median' END AS carbon_basis,
       coalesce(ep.price_usd_per_mwh, pm.value) AS electricity_usd_per_mwh,
       CASE WHEN ep.zone IS NOT NULL THEN 'hourly'
            WHEN pm.value IS NOT NULL THEN 'zone median' END AS price_basis,
       p.gpu_usd_per_hour,
       p.energy_j / 3.6e6 * coalesce(ci.carbon_intensity_g_per_kwh, cm.value) AS carbon_g,
       p.energy_j / 3.6e9 * coalesce(ep.price_usd_per_mwh, pm.value) AS energy_cost_usd,
       p.gpu_hours * p.gpu_usd_per_hour AS gpu_cost_usd
FROM priced p
LEFT JOIN grid_carbon_intensities ci ON ci.zone = p.zone AND ci.hour_at = p.hour_at
LEFT JOIN carbon_medians cm ON cm.zone = p.zone
LEFT JOIN electricity_prices ep ON ep.zone = p.zone AND ep.hour_at = p.hour_at
LEFT JOIN price_medians pm ON pm.zone = p.zone;

CREATE UNIQUE INDEX IF NOT EXISTS report_slot_windows_key
    ON report_slot_windows (cluster, window_start_at, slot_key);
CREATE INDEX IF NOT EXISTS report_slot_windows_day ON report_slot_windows (day, cluster);

-- Per telemetry window and pool: load, capacity, GPUs, energy and SLO attainment.
-- requests_within_slo counts logged requests (request_logs) of the pool in the window that
-- carry a TTFT, succeeded (outcome ok or none) and met the pool's TTFT and TBT SLO (the
-- tightest of its slots' profiles); requests_with_latency counts those with a TTFT or that
-- failed (error, timeout). requests_within_capacity is the estimate without latencies: all
-- the window's requests when the pool's peak 1-minute rate stayed within its capacity, none
-- otherwise. Requests of an unserved pool count as missed in both.
CREATE MATERIALIZED VIEW IF NOT EXISTS report_pool_windows AS
WITH pools AS (
    SELECT cluster, window_start_at, window_s, hour_at, day, service, request_type,
           bool_or(row_kind = 'slot') AS served,
           min(model) AS model,
           sum(instances)::integer AS instances, sum(gpus)::integer AS gpus,
           sum(gpu_hours) AS gpu_hours,
           coalesce(max(pool_capacity_rps), 0.0) AS capacity_rps,
           max(pool_load_rps) AS load_rps, max(pool_peak_rps) AS peak_rps,
           sum(served_rps) AS served_rps,
           -- slot rows hold capacity shares of the pool's counts; their sum is the count
           round(sum(requests))::bigint AS requests,
           round(sum(input_tokens))::bigint AS input_tokens,
           round(sum(output_tokens))::bigint AS output_tokens,
           min(ttft_slo_s) AS ttft_slo_s, min(tbt_slo_s) AS tbt_slo_s,
           sum(energy_j) AS energy_j, sum(modelled_energy_j) AS modelled_energy_j
    FROM report_slot_windows
    WHERE row_kind IN ('slot', 'unserved')
    GROUP BY cluster, window_start_at, window_s, hour_at, day, service, request_type
)
SELECT p.cluster, p.window_start_at, p.window_s, p.hour_at, p.day, p.service, p.request_type,
       p.model, p.served, p.instances, p.gpus, p.gpu_hours, p.capacity_rps, p.load_rps,
       p.peak_rps, p.served_rps, p.requests, p.input_tokens, p.output_tokens, p.ttft_slo_s,
       p.tbt_slo_s, p.energy_j, p.modelled_energy_j,
       CASE WHEN p.served AND coalesce(p.peak_rps, 0.0) <= p.capacity_rps + 1e-9
            THEN p.requests ELSE 0 END AS requests_within_capacity,
       coalesce(l.requests_with_latency, 0) AS requests_with_latency,
       coalesce(l.requests_within_slo, 0) AS requests_within_slo
FROM pools p
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE r.ttft_s IS NOT NULL OR r.outcome IN ('error', 'timeout'))
               AS requests_with_latency,
           count(*) FILTER (WHERE p.served AND r.ttft_s IS NOT NULL
                              AND coalesce(r.outcome, 'ok') = 'ok'
                              AND r.ttft_s <= p.ttft_slo_s
                              AND (r.tbt_s IS NULL OR r.tbt_s <= p.tbt_slo_s))
               AS requests_within_slo
    FROM request_logs r
    WHERE r.service = p.service AND r.request_type = p.request_type
      AND r.arrived_at >= p.window_start_at
      AND r.arrived_at < p.window_start_at + make_interval(secs => p.window_s)
) l ON true;

CREATE UNIQUE INDEX IF NOT EXISTS report_pool_windows_key
    ON report_pool_windows (cluster, window_start_at, service, request_type);

-- Hourly and daily energy (kWh), carbon (kg CO2eq) and cost ($) per cluster, pool, model and
-- GPU type. Unattributed telemetry has NULL pool, model and GPU type; unserved pools show
-- their requests with no energy. energy_basis: measured, modelled, or mixed over the period.
CREATE OR REPLACE VIEW report_energy_hourly AS
SELECT cluster, hour_at, day, service, request_type, model, gpu_type,
       sum(gpu_hours) AS gpu_hours,
       sum(energy_j) / 3.6e6 AS energy_kwh,
       sum(measured_energy_j) / 3.6e6 AS measured_energy_kwh,
       sum(modelled_energy_j) / 3.6e6 AS modelled_energy_kwh,
       CASE WHEN bool_and(energy_basis = 'measured') THEN 'measured'
            WHEN bool_and(energy_basis = 'modelled') THEN 'modelled'
            ELSE 'mixed' END AS energy_basis,
       sum(carbon_g) / 1000.0 AS carbon_kg,
       sum(gpu_cost_usd) AS gpu_cost_usd,
       sum(energy_cost_usd) AS energy_cost_usd,
       coalesce(sum(gpu_cost_usd), 0) + coalesce(sum(energy_cost_usd), 0) AS cost_usd,
       sum(requests) AS requests,
       sum(input_tokens + output_tokens) AS tokens,
       max(carbon_basis) AS carbon_basis,
       max(price_basis) AS price_basis
FROM report_slot_windows
GROUP BY cluster, hour_at, day, service, request_type, model, gpu_type;

CREATE OR REPLACE VIEW report_energy_daily AS
SELECT cluster, day, service, request_type, model, gpu_type,
       sum(gpu_hours) AS gpu_hours,
       sum(energy_j) / 3.6e6 AS energy_kwh,
       sum(measured_energy_j) / 3.6e6 AS measured_energy_kwh,
       sum(modelled_energy_j) / 3.6e6 AS modelled_energy_kwh,
       CASE WHEN bool_and(energy_basis = 'measured') THEN 'measured'
            WHEN bool_and(energy_basis = 'modelled') THEN 'modelled'
            ELSE 'mixed' END AS energy_basis,
       sum(carbon_g) / 1000.0 AS carbon_kg,
       sum(gpu_cost_usd) AS gpu_cost_usd,
       sum(energy_cost_usd) AS energy_cost_usd,
       coalesce(sum(gpu_cost_usd), 0) + coalesce(sum(energy_cost_usd), 0) AS cost_usd,
       sum(requests) AS requests,
       sum(input_tokens + output_tokens) AS tokens,
       count(DISTINCT hour_at) FILTER (WHERE carbon_basis <> 'hourly') AS carbon_fallback_hours,
       count(DISTINCT hour_at) FILTER (WHERE price_basis <> 'hourly') AS price_fallback_hours
FROM report_slot_windows
GROUP BY cluster, day, service, request_type, model, gpu_type;

-- Efficiency per pool and day. Tokens are input + output tokens of the pool's requests
-- (request_type_windows); energy, carbon and cost are the pool's share as above.
CREATE OR REPLACE VIEW report_efficiency_daily AS
WITH pools AS (
    SELECT cluster, day, service, request_type,
           sum(energy_j) AS energy_j, sum(carbon_g) AS carbon_g,
           coalesce(sum(gpu_cost_usd), 0) + coalesce(sum(energy_cost_usd), 0) AS cost_usd,
           sum(requests) AS requests, sum(input_tokens) AS input_tokens,
           sum(output_tokens) AS output_tokens,
           CASE WHEN bool_and(energy_basis = 'measured') THEN 'measured'
                WHEN bool_and(energy_basis = 'modelled') THEN 'modelled'
                ELSE 'mixed' END AS energy_basis
    FROM report_slot_windows
    WHERE row_kind IN ('slot', 'unserved')
    GROUP BY cluster, day, service, request_type
)
SELECT cluster, day, service, request_type, requests, input_tokens, output_tokens,
       input_tokens + output_tokens AS tokens,
       energy_j / 3.6e6 AS energy_kwh, carbon_g / 1000.0 AS carbon_kg, cost_usd, energy_basis,
       energy_j / nullif(input_tokens + output_tokens, 0) AS j_per_token,
       carbon_g / nullif(input_tokens + output_tokens, 0) * 1000.0 AS g_co2_per_1k_tokens,
       cost_usd / nullif(input_tokens + output_tokens, 0) * 1e6 AS usd_per_million_tokens
FROM pools;

-- Forecast against actual load per pool and forecast window: the actual mean is the
-- window's requests over its length, the actual peak the highest 1-minute rate of its
-- telemetry windows; coverage is the share of the window with request windows stored.
CREATE OR REPLACE VIEW report_forecast_accuracy AS
SELECT f.cluster, f.service, f.request_type, f.window_start_at, f.window_s, f.method, f.made_at,
       f.quantile, f.mean_rate_rps AS forecast_mean_rps, f.peak_rate_rps AS forecast_peak_rps,
       f.planned_rate_rps,
       a.requests::double precision / f.window_s AS actual_mean_rps,
       a.peak_rps AS actual_peak_rps,
       a.requests,
       coalesce(a.covered_s, 0)::double precision / f.window_s AS actual_coverage,
       f.peak_rate_rps - a.peak_rps AS peak_error_rps,
       (f.peak_rate_rps - a.peak_rps) / nullif(a.peak_rps, 0) AS peak_error_ratio,
       f.mean_rate_rps - a.requests::double precision / f.window_s AS mean_error_rps,
       f.planned_rate_rps + 1e-9 >= a.peak_rps AS planned_covers_peak
FROM load_forecasts f
JOIN cluster_sites s ON s.cluster = f.cluster
LEFT JOIN LATERAL (
    SELECT sum(r.request_count) AS requests, max(r.peak_rate_rps) AS peak_rps,
           sum(r.window_s) AS covered_s
    FROM request_type_windows r
    WHERE r.service = f.service AND r.request_type = f.request_type AND r.window_s = s.window_s
      AND r.window_start_at >= f.window_start_at
      AND r.window_start_at < f.window_start_at + make_interval(secs => f.window_s)
    HAVING count(*) > 0
) a ON true;

-- Plan against actual, one row per plan that reached the cluster (applied, or named by an
-- applied state): predicted energy, carbon, cost and GPUs against the window's (measured
-- where telemetry covers it, else modelled), and SLO attainment. data_coverage is the share
-- of the plan's window inside the report grid (a window still running, or past the last
-- data, has less), telemetry_coverage the share with GPU telemetry.
CREATE OR REPLACE VIEW report_plan_vs_actual AS
WITH applied AS (
    SELECT p.plan_id, p.cluster, p.window_start_at, p.window_s, p.status,
           p.predicted_energy_kwh, p.predicted_carbon_g, p.predicted_cost_usd, p.gpus,
           p.peak_power_w, p.min_slo_headroom
    FROM plans p
    WHERE p.status = 'applied'
       OR EXISTS (SELECT 1 FROM applied_cluster_states a WHERE a.plan_id = p.plan_id)
),
energy AS (
    SELECT a.plan_id,
           sum(w.energy_j) AS energy_j,
           sum(w.measured_energy_j) AS measured_energy_j,
           sum(w.modelled_energy_j) AS modelled_energy_j,
           sum(w.carbon_g) AS carbon_g,
           coalesce(sum(w.gpu_cost_usd), 0) + coalesce(sum(w.energy_cost_usd), 0) AS cost_usd,
           count(DISTINCT w.window_start_at) AS windows,
           count(DISTINCT w.window_start_at) FILTER (WHERE w.energy_basis = 'measured')
               AS measured_windows,
           max(w.window_s) AS telemetry_window_s
    FROM applied a
    JOIN report_slot_windows w
      ON w.cluster = a.cluster AND w.window_start_at >= a.window_start_at
     AND w.window_start_at < a.window_start_at + make_interval(secs => a.window_s)
    GROUP BY a.plan_id
),
gpus AS (
    SELECT a.plan_id, max(t.gpus) AS max_gpus
    FROM applied a
    JOIN (SELECT cluster, window_start_at, sum(gpus)::integer AS gpus
          FROM report_slot_windows WHERE row_kind = 'slot'
          GROUP BY cluster, window_start_at) t
      ON t.cluster = a.cluster AND t.window_start_at >= a.window_start_at
     AND t.window_start_at < a.window_start_at + make_interval(secs => a.window_s)
    GROUP BY a.plan_id
),
slo AS (
    SELECT a.plan_id, sum(w.requests)::bigint AS requests,
           sum(w.requests_with_latency)::bigint AS requests_with_latency,
           sum(w.requests_within_slo)::bigint AS requests_within_slo,
           sum(w.requests_within_capacity)::bigint AS requests_within_capacity
    FROM applied a
    JOIN report_pool_windows w
      ON w.cluster = a.cluster AND w.window_start_at >= a.window_start_at
     AND w.window_start_at < a.window_start_at + make_interval(secs => a.window_s)
    GROUP BY a.plan_id
)
SELECT a.plan_id, a.cluster, a.window_start_at, a.window_s, a.status,
       a.predicted_energy_kwh,
       e.energy_j / 3.6e6 AS actual_energy_kwh,
       CASE WHEN e.measured_windows = 0 THEN 'modelled'
            WHEN e.measured_windows = e.windows THEN 'measured'
            ELSE 'mixed' END AS actual_energy_basis,
       e.measured_energy_j / 3.6e6 AS measured_energy_kwh,
       e.modelled_energy_j / 3.6e6 AS modelled_energy_kwh,
       e.windows::double precision * e.telemetry_window_s / a.window_s AS data_coverage,
       e.measured_windows::double precision * e.telemetry_window_s / a.window_s
           AS telemetry_coverage,
       (e.energy_j / 3.6e6 - a.predicted_energy_kwh) / nullif(a.predicted_energy_kwh, 0)
           AS energy_error_ratio,
       a.predicted_carbon_g / 1000.0 AS predicted_carbon_kg,
       e.carbon_g / 1000.0 AS actual_carbon_kg,
       a.predicted_cost_usd,
       e.cost_usd AS actual_cost_usd,
       a.gpus AS predicted_gpus,
       g.max_gpus AS actual_max_gpus,
       a.min_slo_headroom AS predicted_min_slo_headroom,
       s.requests,
       s.requests_with_latency,
       s.requests_within_slo::double precision / nullif(s.requests_with_latency, 0)
           AS measured_slo_attainment,
       s.requests_within_capacity::double precision / nullif(s.requests, 0)
           AS capacity_slo_estimate
FROM applied a
LEFT JOIN energy e USING (plan_id)
LEFT JOIN gpus g USING (plan_id)
LEFT JOIN slo s USING (plan_id);

-- SinglePool baseline per telemetry window, model and GPU type (DynamoLLM's SinglePool: one
-- pool of the largest TP at the highest clock and power cap, sized for the peak). For the
-- load the cluster served (served_rps and served_peak_rps of its slots, per request type):
--   work_w      = sum over types t of served_rps_t / capacity_t        (instance-equivalents)
--   peak_work_w = sum over t of served_peak_rps_t / capacity_t
--   instances   = max(1, ceil(max over the day's windows of peak_work_w))  (sized for the peak)
--   u_w         = work_w / instances   (each instance's utilisation; <= 1 since mean <= peak)
--   power_w     = instances x sum over t of (x_t / u_w) x power_t(u_w x capacity_t), with
--                 x_t = served_rps_t / (instances x capacity_t); idle power when u_w = 0
--   energy_j    = power_w x window_s; GPU-hours = instances x GPUs per instance x window_s/3600
-- with capacity_t and power_t from the baseline config's profile for type t. For linear
-- profiles power_w = instances x idle + sum_t served_rps_t / capacity_t x (full_t - idle_t).
-- Carbon and cost at the window's intensity and prices. NULL when a served type has no
-- profile in the baseline config.
CREATE OR REPLACE VIEW report_baseline_windows AS
WITH served AS (
    SELECT w.cluster, w.window_start_at, w.window_s, w.hour_at, w.day, w.model, w.gpu_type,
           w.request_type,
           sum(coalesce(w.served_rps, 0.0)) AS served_rps,
           sum(w.served_peak_rps) AS served_peak_rps,
           max(w.carbon_g_per_kwh) AS carbon_g_per_kwh,
           max(w.electricity_usd_per_mwh) AS electricity_usd_per_mwh,
           max(w.gpu_usd_per_hour) AS gpu_usd_per_hour
    FROM report_slot_windows w
    WHERE w.row_kind = 'slot'
    GROUP BY w.cluster, w.window_start_at, w.window_s, w.hour_at, w.day, w.model, w.gpu_type,
             w.request_type
),
configs AS (
    SELECT DISTINCT ON (m.cluster, m.model, m.gpu_type)
           m.cluster, m.model, m.gpu_type, p.version, p.config_key,
           p.tp * coalesce((to_jsonb(p) ->> 'spp')::integer, 1)
               * coalesce((to_jsonb(p) ->> 'kvp')::integer, 1) AS gpus_per_instance
    FROM (SELECT DISTINCT cluster, model, gpu_type FROM served) m
    JOIN cluster_sites s ON s.cluster = m.cluster
    JOIN profiles p ON p.version = s.profile_version AND p.model = m.model
                   AND p.gpu_type = m.gpu_type
                   AND coalesce((to_jsonb(p) ->> 'spp')::integer, 1) = 1
                   AND coalesce((to_jsonb(p) ->> 'kvp')::integer, 1) = 1
    ORDER BY m.cluster, m.model, m.gpu_type, p.tp DESC, p.clock_mhz DESC NULLS FIRST,
             p.power_cap_w DESC, p.config_key
),
typed AS (
    SELECT sv.*, c.config_key, c.gpus_per_instance, to_jsonb(p) AS profile,
           p.capacity_rps, p.idle_power_w
    FROM served sv
    JOIN configs c USING (cluster, model, gpu_type)
    LEFT JOIN profiles p ON p.version = c.version AND p.config_key = c.config_key
                        AND p.request_type = sv.request_type
),
work AS (
    SELECT cluster, window_start_at, window_s, hour_at, day, model, gpu_type, config_key,
           gpus_per_instance,
           sum(served_rps / capacity_rps) AS work,
           sum(served_peak_rps / capacity_rps) AS peak_work,
           avg(idle_power_w) AS idle_power_w,
           bool_and(capacity_rps IS NOT NULL) AS complete,
           max(carbon_g_per_kwh) AS carbon_g_per_kwh,
           max(electricity_usd_per_mwh) AS electricity_usd_per_mwh,
           max(gpu_usd_per_hour) AS gpu_usd_per_hour
    FROM typed
    GROUP BY cluster, window_start_at, window_s, hour_at, day, model, gpu_type, config_key,
             gpus_per_instance
),
sized AS (
    SELECT cluster, day, model, gpu_type,
           CASE WHEN bool_and(complete)
                THEN greatest(1, ceil(max(peak_work) - 1e-9))::integer END AS instances
    FROM work
    GROUP BY cluster, day, model, gpu_type
),
powered AS (
    SELECT w.cluster, w.window_start_at,  w.model, w.gpu_type,
           sum(CASE WHEN w.work > 0
                    THEN (t.served_rps / t.capacity_rps) / w.work
                         * wattplan_profile_power_w(t.profile,
                                                    w.work / z.instances * t.capacity_rps)
                    ELSE 0.0 END) AS instance_power_w
    FROM work w
    JOIN sized z USING (cluster, day, model, gpu_type)
    JOIN typed t USING (cluster, window_start_at, model, gpu_type)
    GROUP BY w.cluster, w.window_start_at, w.model, w.gpu_type
)
SELECT w.cluster, w.window_start_at, w.window_s, w.hour_at, w.day, w.model, w.gpu_type,
       w.config_key AS baseline_config_key, z.instances AS baseline_instances,
       z.instances * w.gpus_per_instance AS baseline_gpus,
       w.work AS served_work, w.peak_work AS served_peak_work,
       w.work / z.instances AS baseline_utilisation,
       z.instances * CASE WHEN w.work > 0 THEN p.instance_power_w ELSE w.idle_power_w END
           AS baseline_power_w,
       z.instances * CASE WHEN w.work > 0 THEN p.instance_power_w ELSE w.idle_power_w END
           * w.window_s AS baseline_energy_j,
       z.instances * w.gpus_per_instance * w.window_s / 3600.0::double precision AS baseline_gpu_hours,
       z.instances * CASE WHEN w.work > 0 THEN p.instance_power_w ELSE w.idle_power_w END
           * w.window_s / 3.6e6 * w.carbon_g_per_kwh AS baseline_carbon_g,
       z.instances * CASE WHEN w.work > 0 THEN p.instance_power_w ELSE w.idle_power_w END
           * w.window_s / 3.6e9 * w.electricity_usd_per_mwh
           + z.instances * w.gpus_per_instance * w.window_s / 3600.0
             * coalesce(w.gpu_usd_per_hour, 0.0) AS baseline_cost_usd
FROM work w
JOIN sized z USING (cluster, day, model, gpu_type)
JOIN powered p USING (cluster, window_start_at, model, gpu_type);

-- Savings per cluster, day, model and GPU type: the SinglePool baseline for the same served
-- load against what ran (energy_kwh: measured where telemetry covers it, else modelled) and
-- against the modelled energy of what ran (both sides from the profiles).
CREATE OR REPLACE VIEW report_savings_daily AS
WITH actual AS (
    SELECT cluster, day, model, gpu_type,
           sum(energy_j) AS energy_j, sum(modelled_energy_j) AS modelled_energy_j,
           sum(carbon_g) AS carbon_g,
           coalesce(sum(gpu_cost_usd), 0) + coalesce(sum(energy_cost_usd), 0) AS cost_usd,
           sum(gpu_hours) AS gpu_hours,
           CASE WHEN bool_and(energy_basis = 'measured') THEN 'measured'
                WHEN bool_and(energy_basis = 'modelled') THEN 'modelled'
                ELSE 'mixed' END AS energy_basis
    FROM report_slot_windows
    WHERE row_kind = 'slot'
    GROUP BY cluster, day, model, gpu_type
),
baseline AS (
    SELECT cluster, day, model, gpu_type,
           max(baseline_config_key) AS baseline_config_key,
           max(baseline_instances) AS baseline_instances,
           sum(baseline_energy_j) AS energy_j, sum(baseline_carbon_g) AS carbon_g,
           sum(baseline_cost_usd) AS cost_usd, sum(baseline_gpu_hours) AS gpu_hours
    FROM report_baseline_windows
    GROUP BY cluster, day, model, gpu_type
)
SELECT a.cluster, a.day, a.model, a.gpu_type,
       a.energy_j / 3.6e6 AS energy_kwh, a.energy_basis,
       a.modelled_energy_j / 3.6e6 AS modelled_energy_kwh,
       b.energy_j / 3.6e6 AS baseline_energy_kwh,
       (b.energy_j - a.energy_j) / 3.6e6 AS energy_saving_kwh,
       1.0 - a.energy_j / nullif(b.energy_j, 0) AS energy_saving_ratio,
       1.0 - a.modelled_energy_j / nullif(b.energy_j, 0) AS modelled_energy_saving_ratio,
       a.carbon_g / 1000.0 AS carbon_kg, b.carbon_g / 1000.0 AS baseline_carbon_kg,
       (b.carbon_g - a.carbon_g) / 1000.0 AS carbon_saving_kg,
       a.cost_usd, b.cost_usd AS baseline_cost_usd, b.cost_usd - a.cost_usd AS cost_saving_usd,
       a.gpu_hours, b.gpu_hours AS baseline_gpu_hours,
       b.baseline_config_key, b.baseline_instances
FROM actual a
LEFT JOIN baseline b USING (cluster, day, model, gpu_type);

-- Who decided what about each plan, and how long after it was proposed. Plans nobody
-- decided have one row with NULL decision.
CREATE OR REPLACE VIEW report_plan_decisions AS
SELECT p.plan_id, p.cluster, p.window_start_at, p.window_s, p.status, p.status_reason,
       p.created_at, d.decided_at, d.decided_by, d.decision, d.comment,
       extract(epoch FROM d.decided_at - p.created_at)::double precision AS decision_delay_s,
       d.decided_by LIKE 'policy:%' AS automatic,
       p.gpus, p.predicted_energy_kwh, p.predicted_carbon_g / 1000.0 AS predicted_carbon_kg,
       p.predicted_cost_usd
FROM plans p
LEFT JOIN plan_approvals d ON d.plan_id = p.plan_id;

-- Reconfigurations per plan: actions, instances started and stopped, and their overhead.
-- overhead_s of an event is per instance (how store.write_reconfiguration_events records a
-- cold start), so an event costs instances x overhead_s instance-seconds, x GPUs per
-- instance GPU-seconds, and (estimate) x the config's loaded-idle power in energy.
CREATE OR REPLACE VIEW report_reconfigurations AS
WITH events AS (
    SELECT e.cluster, e.plan_id, e.service, e.request_type, e.config_key, e.action,
           e.instances, e.occurred_at, e.overhead_s,
           substring(e.config_key FROM '/tp([0-9]+)')::integer
               * coalesce(substring(e.config_key FROM '/spp([0-9]+)kvp')::integer, 1)
               * coalesce(substring(e.config_key FROM 'kvp([0-9]+)/')::integer, 1)
               AS gpus_per_instance,
           (SELECT avg(p.idle_power_w) FROM profiles p
             WHERE p.config_key = e.config_key
               AND p.version = coalesce(
                   (SELECT s.profile_version FROM cluster_sites s WHERE s.cluster = e.cluster),
                   p.version)) AS idle_power_w
    FROM reconfiguration_events e
)
SELECT e.cluster, e.plan_id, pl.window_start_at, min(e.occurred_at) AS occurred_at,
       count(*) AS events,
       coalesce(sum(e.instances) FILTER (WHERE e.action = 'start'), 0) AS instances_started,
       coalesce(sum(e.instances) FILTER (WHERE e.action = 'stop'), 0) AS instances_stopped,
       coalesce(sum(e.instances) FILTER (WHERE e.action = 'reshard'), 0) AS instances_resharded,
       coalesce(sum(e.instances) FILTER (WHERE e.action = 'clock'), 0) AS instances_reclocked,
       coalesce(sum(e.instances * e.gpus_per_instance) FILTER (WHERE e.action = 'start'), 0)
           AS gpus_started,
       coalesce(sum(e.instances * e.gpus_per_instance) FILTER (WHERE e.action = 'stop'), 0)
           AS gpus_stopped,
       sum(e.instances * e.overhead_s) AS overhead_instance_s,
       sum(e.instances * e.gpus_per_instance * e.overhead_s) / 3600.0 AS overhead_gpu_hours,
       sum(e.instances * e.overhead_s * e.idle_power_w) / 3.6e6 AS overhead_energy_kwh,
       (SELECT string_agg(DISTINCT d.decided_by, ', ' ORDER BY d.decided_by)
          FROM plan_approvals d WHERE d.plan_id = e.plan_id AND d.decision = 'approved')
           AS approved_by
FROM events e
LEFT JOIN plans pl ON pl.plan_id = e.plan_id
GROUP BY e.cluster, e.plan_id, pl.window_start_at;

-- Approvals and reconfigurations per cluster and day (UTC day of the plan's window).
CREATE OR REPLACE VIEW report_changes_daily AS
WITH decisions AS (
    SELECT cluster, (window_start_at AT TIME ZONE 'UTC')::date AS day,
           count(DISTINCT plan_id) AS plans,
           count(*) FILTER (WHERE decision = 'approved') AS approvals,
           count(*) FILTER (WHERE decision = 'rejected') AS rejections,
           count(*) FILTER (WHERE decision IS NOT NULL AND automatic) AS automatic_decisions,
           count(*) FILTER (WHERE decision IS NOT NULL AND NOT automatic) AS human_decisions,
           avg(decision_delay_s) FILTER (WHERE NOT automatic) AS mean_human_decision_delay_s
    FROM report_plan_decisions
    GROUP BY cluster, (window_start_at AT TIME ZONE 'UTC')::date
),
changes AS (
    SELECT cluster, (window_start_at AT TIME ZONE 'UTC')::date AS day,
           count(*) AS plans_with_changes, sum(events)::bigint AS events,
           sum(instances_started)::bigint AS instances_started,
           sum(instances_stopped)::bigint AS instances_stopped,
           sum(overhead_gpu_hours) AS overhead_gpu_hours,
           sum(overhead_energy_kwh) AS overhead_energy_kwh
    FROM report_reconfigurations
    GROUP BY cluster, (window_start_at AT TIME ZONE 'UTC')::date
)
SELECT d.cluster, d.day, d.plans, d.approvals, d.rejections, d.automatic_decisions,
       d.human_decisions, d.mean_human_decision_delay_s,
       coalesce(c.plans_with_changes, 0) AS plans_with_changes,
       coalesce(c.events, 0) AS events,
       coalesce(c.instances_started, 0) AS instances_started,
       coalesce(c.instances_stopped, 0) AS instances_stopped,
       coalesce(c.overhead_gpu_hours, 0) AS overhead_gpu_hours,
       coalesce(c.overhead_energy_kwh, 0) AS overhead_energy_kwh
FROM decisions d
LEFT JOIN changes c USING (cluster, day);

-- GPU clock distribution per cluster and day: 'planned' from the layouts in force (GPU-hours
-- per locked clock; NULL clock = not locked), 'measured' from GPU telemetry of assigned GPUs
-- (samples per SM clock). share is the fraction of the day's GPU-hours or samples. The
-- measured part scans gpu_telemetry: filter on day and cluster.
CREATE OR REPLACE VIEW report_clock_distribution AS
WITH node_clusters AS (
    SELECT DISTINCT ON (n.node) n.node, s.cluster
    FROM (SELECT DISTINCT node FROM gpu_telemetry) n
    JOIN cluster_sites s ON n.node LIKE s.node_pattern
    ORDER BY n.node, length(s.node_pattern) DESC, s.cluster
),
counted AS (
    SELECT cluster, day, 'planned'::text AS source, clock_mhz,
           sum(gpu_hours) AS gpu_hours, NULL::bigint AS samples
    FROM report_slot_windows
    WHERE row_kind = 'slot'
    GROUP BY cluster, day, clock_mhz
    UNION ALL
    SELECT nc.cluster, (g.sampled_at AT TIME ZONE 'UTC')::date, 'measured', g.sm_clock_mhz,
           NULL::double precision, count(*)
    FROM gpu_telemetry g
    JOIN node_clusters nc ON nc.node = g.node
    WHERE g.instance_id IS NOT NULL AND g.sm_clock_mhz IS NOT NULL
    GROUP BY nc.cluster, (g.sampled_at AT TIME ZONE 'UTC')::date, g.sm_clock_mhz
)
SELECT cluster, day, source, clock_mhz, gpu_hours, samples,
       coalesce(gpu_hours, samples::double precision)
           / nullif(sum(coalesce(gpu_hours, samples::double precision))
                    OVER (PARTITION BY cluster, day, source), 0) AS share
FROM counted;

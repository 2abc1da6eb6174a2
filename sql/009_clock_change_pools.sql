-- 009: clock changes per pool and plan window (issue 10). The cluster agent now writes each
-- changed instance's pool (service, request type) with the event; the view counts the changes
-- of every plan window per pool, by controller, for the reports and the demo.

ALTER TABLE clock_changes ADD COLUMN IF NOT EXISTS service text;
ALTER TABLE clock_changes ADD COLUMN IF NOT EXISTS request_type text;

-- Events carry no cluster: a change is attributed to every plan whose window holds it (one
-- cluster per agent spool in the reference setup).
CREATE OR REPLACE VIEW report_clock_windows AS
SELECT p.plan_id,
       p.cluster,
       p.window_start_at,
       p.window_s,
       coalesce(c.service, '?')                               AS service,
       coalesce(c.request_type, '?')                          AS request_type,
       count(*)                                               AS clock_changes,
       count(DISTINCT c.instance_id)                          AS instances_changed,
       count(*) FILTER (WHERE c.controller = 'clock-loop')    AS by_clock_loop,
       count(*) FILTER (WHERE c.controller = 'power-guard')   AS by_power_guard,
       count(*) FILTER (WHERE c.to_mhz < c.from_mhz)          AS lowered,
       count(*) FILTER (WHERE c.to_mhz > c.from_mhz)          AS raised,
       min(c.to_mhz)                                          AS lowest_mhz,
       max(c.to_mhz)                                          AS highest_mhz
FROM plans p
JOIN clock_changes c
  ON c.changed_at >= p.window_start_at
 AND c.changed_at < p.window_start_at + make_interval(secs => p.window_s)
GROUP BY p.plan_id, p.cluster, p.window_start_at, p.window_s,
         coalesce(c.service, '?'), coalesce(c.request_type, '?');

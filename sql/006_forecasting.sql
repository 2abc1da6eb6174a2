-- 006: statsmodels forecasting. Each forecast carries its intervals, the model that made it,
-- that model's backtest figures and, when it is a fallback, why; the fitted candidates of
-- every series (pool x target) are kept so that planning runs between refits only filter
-- the newest windows through stored parameters.

ALTER TABLE load_forecasts
    ADD COLUMN IF NOT EXISTS horizon_steps    integer NOT NULL DEFAULT 1,  -- windows ahead of made_at
    ADD COLUMN IF NOT EXISTS mean_quantiles   jsonb,   -- {"0.05": rps, "0.5": rps, "0.95": rps}
    ADD COLUMN IF NOT EXISTS peak_quantiles   jsonb,
    ADD COLUMN IF NOT EXISTS model_spec       jsonb,   -- {"mean": {...}, "peak": {...}}: kind, options, parameters, fitted span
    ADD COLUMN IF NOT EXISTS backtest         jsonb,   -- {"mean": {kind: metrics}, "peak": {...}}
    ADD COLUMN IF NOT EXISTS calibration      text,    -- how the intervals were made
    ADD COLUMN IF NOT EXISTS fallback_reason  text;    -- NULL unless the forecast is a fallback

CREATE TABLE IF NOT EXISTS forecast_models (
    cluster            text        NOT NULL,
    service            text        NOT NULL,
    request_type       text        NOT NULL,
    target             text        NOT NULL CHECK (target IN ('mean', 'peak')),
    model              text        NOT NULL,  -- candidate kind, e.g. ets
    window_s           integer     NOT NULL CHECK (window_s > 0),
    refreshed_at       timestamptz NOT NULL,  -- the run's window start, not wall clock
    fitted             jsonb,                 -- spec + parameters; NULL when the fit failed
    fit_error          text,
    train_start_at     timestamptz,
    train_end_at       timestamptz,           -- exclusive: no window at or after it was fitted
    residuals          jsonb       NOT NULL DEFAULT '[]'::jsonb,  -- out-of-sample log residuals
    residuals_end_at   timestamptz NOT NULL,
    level_shift        double precision NOT NULL DEFAULT 0,  -- adaptive conformal correction
    selected           boolean     NOT NULL DEFAULT false,
    selection_reason   text,
    metrics            jsonb       NOT NULL DEFAULT '{}'::jsonb,  -- backtest figures
    PRIMARY KEY (cluster, service, request_type, target, model)
);
CREATE INDEX IF NOT EXISTS forecast_models_selected_idx
    ON forecast_models (cluster, service, request_type, target) WHERE selected;

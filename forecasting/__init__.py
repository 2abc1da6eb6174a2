"""Load forecasting per request type (pure functions over domain types)."""

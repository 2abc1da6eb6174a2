"""Settings from the environment."""

from __future__ import annotations

import pytest

from wattplan.errors import ConfigError
from wattplan.settings import Settings


def test_defaults_use_the_embedded_database_and_bundled_traces() -> None:
    settings = Settings.from_env({})
    assert settings.database_url is None
    services = [name for name, _ in settings.request_sources]
    assert services == ["conversation", "code"]
    assert all(path.endswith(".csv") for _, path in settings.request_sources)


def test_environment_overrides_are_read() -> None:
    settings = Settings.from_env(
        {
            "WATTPLAN_DATABASE_URL": "postgresql://u@h/db",
            "WATTPLAN_WINDOW_S": "600",
            "WATTPLAN_INGEST_WINDOW_S": "120",
            "WATTPLAN_AUTO_APPROVE": "yes",
        }
    )
    assert settings.database_url == "postgresql://u@h/db"
    assert (settings.window_s, settings.ingest_window_s, settings.auto_approve) == (600, 120, True)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WATTPLAN_WINDOW_S": "abc"}, "WATTPLAN_WINDOW_S='abc' is not an integer"),
        ({"WATTPLAN_INGEST_WINDOW_S": "700"}, "must be positive and divide"),
        ({"WATTPLAN_FORECAST_QUANTILE": "1.5"}, "WATTPLAN_FORECAST_QUANTILE"),
        ({"WATTPLAN_AUTO_APPROVE": "maybe"}, "not a boolean"),
        ({"WATTPLAN_REQUEST_SOURCES": "chat"}, "is not name=value"),
        ({"WATTPLAN_REQUEST_SOURCES": "chat=/x.csv"}, "have no model"),
    ],
)
def test_bad_values_are_named_in_the_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)

"""Energy-performance profiles: the default table, its CSV format and how it is derived.

``load_profiles`` reads a profile table; ``profiles.calibrate`` rebuilds the default one
(``data/profiles/v1.csv``) from the bundled public datasets (see ``docs/profiles.md``);
``profiles.profiler`` measures a real serving endpoint into the same format.
"""

from profiles.table import (
    PROFILE_COLUMNS,
    LoadPoint,
    ProfileRecord,
    load_profile_records,
    load_profiles,
    write_profiles_csv,
)

__all__ = [
    "PROFILE_COLUMNS",
    "LoadPoint",
    "ProfileRecord",
    "load_profile_records",
    "load_profiles",
    "write_profiles_csv",
]

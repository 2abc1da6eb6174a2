"""Energy-performance profiles: the default table, its CSV format and how it is derived.

``load_profiles`` reads a profile table; ``profiles.calibrate`` rebuilds the default one
(``data/profiles/v0.csv``) from the bundled public datasets (see ``docs/profiles.md``).
"""

from profiles.table import PROFILE_COLUMNS, load_profiles, write_profiles_csv

__all__ = ["PROFILE_COLUMNS", "load_profiles", "write_profiles_csv"]

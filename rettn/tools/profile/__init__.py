"""``rettn profile``: where the time of a generation goes, dense vs rettn."""

"""`thl-np` commands (filled in by its owner)."""

COMMANDS = []

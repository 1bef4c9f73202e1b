"""Hostile inputs for the trust tests: a pickle whose loading would run a shell command."""

from __future__ import annotations

import os


class RunsCommand:
    """Unpickling this calls ``os.system(command)`` (here: creating a marker file the tests look for)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)

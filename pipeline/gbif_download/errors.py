"""What can end a GBIF download step, as one line and an exit code.

Every failure of the request, the wait or the zip transfer becomes a
`GbifError` raised in the launcher before anything reads the output folder,
so LATEST and every snapshot stay as they were. Exit codes: 2 for what the
user must fix in the command or the environment (a bad key, a missing
account variable, an unreadable predicate file), 3 for what GBIF or the
network answered (a download that failed, bad credentials, a transfer cut
short, a size that does not match, an API that stays unreachable).
"""
from __future__ import annotations

USAGE = 2
GBIF = 3


class GbifError(Exception):
    """One line saying what happened and what to do; `exit_code` for the shell."""

    def __init__(self, message: str, exit_code: int = GBIF):
        super().__init__(message)
        self.exit_code = exit_code

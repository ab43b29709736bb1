"""Errors caused by the user's input (recipe, data, run folder): shown as one line, never as a traceback.

The command line's error boundary (`finetune.cli.run_entry_point`) prints a `UserError` as `error: <message>` and
exits 2, and an `Interrupted` as its message and exits 130; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem the user can fix; its message is one line naming the file / key / sample concerned."""

    exit_code = 2


class RecipeError(UserError):
    """A recipe that cannot be used; the message is one line naming the file, line and key path."""


class Interrupted(Exception):
    """The user stopped the run (Ctrl-C) and it stopped cleanly; `message` says what was saved and how to resume.

    Not a `UserError`: nothing is wrong, and `except UserError` in library code must not swallow a stop."""

    exit_code = 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

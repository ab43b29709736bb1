"""Errors caused by the user's input (recipe, data, run folder): shown as one line, never as a traceback."""


class UserError(ValueError):
    """A problem the user can fix; its message is one line naming the file / key / sample concerned."""

"""The one exception type for mistakes a user can fix (config, paths, data, checkpoints).

The CLI turns it into a single line on stderr and exit code 2; everything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """An error caused by the user's input; its message names the thing and the fix."""

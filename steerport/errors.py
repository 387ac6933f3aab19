"""The one exception type steerport raises for bad input.

The CLI turns a ``SteerportError`` into a single line on stderr and exit code 1;
anything else is a bug and keeps its traceback.
"""


class SteerportError(Exception):
    """A problem with the user's input (file, model spec, data), stated in one line."""

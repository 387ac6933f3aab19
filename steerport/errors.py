"""The one exception type steerport raises for bad input, and how it is printed.

The CLI turns a ``SteerportError`` into a single plain-text line on stderr and exit code 1;
anything else is a bug and keeps its traceback.
"""


class SteerportError(Exception):
    """A problem with the user's input (file, model spec, data), stated in one line."""


def one_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none.

    Example::

        raise SteerportError(f"{path}: damaged safetensors data ({one_line(e)})") from None
    """
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

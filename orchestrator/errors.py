"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """Bad input the user can fix: the message names the thing and the fix, on one line."""


def one_line(e: BaseException) -> str:
    """The innermost error's message, on one line (Ray wraps worker errors several levels deep)."""
    seen = e
    while True:
        nxt = getattr(seen, "cause", None) or seen.__cause__
        if nxt is None or nxt is seen:
            break
        seen = nxt
    text = str(seen).strip().splitlines()
    last = next((line for line in reversed(text) if line.strip()), "") if text else ""
    return f"{type(seen).__name__}: {last}" if last else type(seen).__name__

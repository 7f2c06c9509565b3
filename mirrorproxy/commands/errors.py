"""The CLI's exit codes and the one error type a verb raises to stop with a message.

``mirrorproxy.cli.main`` turns a ``CliError`` into one line on stderr and its exit
code. Only the verbs in ``mirrorproxy.commands`` raise it: library code raises its
own errors, which the verb translates.
"""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2  # the caller's mistake: bad flags, bad config, bad input lines


class CliError(Exception):
    """A failure to report as one line with an exit code.

    It owns the message and the code; it must not carry a traceback to the user
    (``cli.main`` prints ``mirrorproxy: <message>`` and nothing else).
    """

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def warn(line: str) -> None:
    """Tell the user about something that did not stop the command."""
    print(f"mirrorproxy: warning: {line}", file=sys.stderr)

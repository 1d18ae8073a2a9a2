"""The one base class of qcrash's harness errors: bad input named by file, field, value and rule, never a bare traceback."""

from __future__ import annotations


class QcrashError(ValueError):
    """A harness error whose message names where the bad input is, the value and the rule it breaks.

    It derives from ValueError because every harness error is a bad value (a configuration,
    an operation, a reproducer, a command line), and callers that already catch ValueError
    keep working.
    """

"""The one exception type for every data problem.

A :class:`DataError` is a :class:`bench.errors.UserError`: the CLI prints its single line and
exits with code 2. Messages say what is wrong, which file or category, and what to do.
"""

from __future__ import annotations

from bench.errors import UserError


class DataError(UserError):
    """A missing, unreadable or inconsistent dataset file, or an impossible split request."""

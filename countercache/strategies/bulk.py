"""``bulk``: one aggregated UPDATE per parent table, in ``after_flush``.

Deltas of every child row in the flush are summed per parent; parents whose
deltas cancel out are left alone. The UPDATE runs on the flush's own
connection, inside its transaction, after all of the flush's statements, so
a flush of 10,000 children over 100 parents costs one statement (see
:mod:`countercache.writer` for its form on each backend).
"""

from __future__ import annotations

from ._base import Strategy


class BulkStrategy(Strategy):
    name = "bulk"

    def flush_done(self) -> None:
        self.write(self.flush.connection_for)

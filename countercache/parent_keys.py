"""A parent's primary key changed where no foreign key holds its counted rows (private).

The ORM strategies keep a re-keyed parent's counters with its row (its deltas,
held deltas and shard rows follow the new key: :func:`countercache.parents.parent_updated`),
which is its count where the database's foreign key moves its rows along (``ON UPDATE
CASCADE``) or refuses the change while it has any. Without a foreign key its rows stay
under the old key (unless SQLAlchemy re-points them: ``passive_updates=False``) and
others may wait under the new one: refused in ``before_flush``, before anything is
written (the triggers of ``trigger`` / ``sharded_trigger`` recount it).
"""

from __future__ import annotations

from typing import Any

from . import _registry, config, database_kept
from .errors import CounterCacheError
from .kinds import follows_key_changes
from .through import rekeyed

#: strategies whose counters stay with a re-keyed parent row
_KEPT_WITH_THE_ROW = ("bulk", "per_row", "deferred", "sharded")
#: (configuration generation and counters, parent mapper -> its counters no foreign key holds)
_loose: list[Any] = [None, {}]


def _loose_parents() -> dict[Any, list[Any]]:
    # (before every flush: computed again when the configuration changes or a counter is resolved,
    # as database_kept's own list of counters is)
    database_kept.counters()
    key = (config._config.generation, database_kept._cache[3])
    if _loose[0] != key:
        counters = _registry.known()
        found: dict[Any, list[Any]] = {}
        for c in counters:
            if c.mapper is not None and c.kind is not None and c.strategy() in _KEPT_WITH_THE_ROW \
                    and not follows_key_changes(c):
                found.setdefault(c.mapper, []).append(c)
        _loose[:] = [key, found]
    return _loose[1]  # type: ignore[no-any-return]


def refuse_loose_rekey(session: Any) -> None:
    """``before_flush``: a parent whose counted rows no foreign key holds given a new key."""
    loose = _loose_parents()
    if not loose:
        return
    for state, attr in rekeyed(session, loose):
        counters = [c for m, cs in loose.items() if state.mapper.isa(m) for c in cs]
        raise CounterCacheError(
            f"{', '.join(c.name for c in counters)}: {state.mapper.class_.__name__}.{attr} changed, "
            "and no foreign key in the database holds the counted rows (they stay under the old key; "
            "others may wait under the new one): the counters cannot follow; change it inside "
            "countercache.suspended(session) and run countercache.reconcile(), or declare the foreign key")

"""countercache: denormalized counter columns kept exact by SQLAlchemy 2.x.

Declare a counter on the parent class; the library keeps it equal to the
number of children as the application inserts, deletes and re-parents rows::

    from countercache import counter_cache

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        questions: Mapped[list["Question"]] = relationship(back_populates="user")
        question_count: Mapped[int] = counter_cache("questions")

How updates reach the database is chosen per counter or in configuration:
``"bulk"`` (one aggregated UPDATE after each flush, the default),
``"per_row"`` (an UPDATE per changed child row), ``"deferred"`` (one
UPDATE per transaction, right before COMMIT) or ``"sharded"`` (for hot
parents: at commit, into one of N shard rows of a side table, which
``fold()`` moves into the column; ``exact()`` reads the exact value).
``check()`` and ``reconcile()`` find and repair counters changed behind the
ORM's back.
"""

from __future__ import annotations

from . import _registry, config
from .config import configured_strategy as configured_strategy
from .declaration import CounterCache as CounterCache
from .errors import AssignmentError as AssignmentError
from .errors import CounterCacheWarning as CounterCacheWarning
from .errors import ConfigurationError as ConfigurationError
from .errors import CounterCacheError as CounterCacheError
from .suspension import suspended as suspended
from .installation import counter_cache as counter_cache
from .installation import uninstall as uninstall
from .repair import Drift as Drift
from .repair import check as check
from .repair import reconcile as reconcile
from .settings import configure as configure
from .settings import configure_from_file as configure_from_file
from .sidetable import shard_table as shard_table
from .shards import exact as exact
from .shards import exact_expression as exact_expression
from .shards import fold as fold

__all__ = [
    "counter_cache",
    "CounterCache",
    "configure",
    "configure_from_file",
    "configured_strategy",
    "suspended",
    "check",
    "reconcile",
    "Drift",
    "exact",
    "exact_expression",
    "fold",
    "shard_table",
    "uninstall",
    "CounterCacheError",
    "ConfigurationError",
    "AssignmentError",
    "CounterCacheWarning",
]

__version__ = "0.1.0"


def _reset_for_tests() -> None:
    """Forget configuration, counters and listeners (tests only: each test declares its models)."""
    config._reset()
    _registry.restore(([], {}, set()))
    uninstall()

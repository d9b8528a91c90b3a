"""Alembic support: ``op.backfill_counter()`` and counters in autogenerate.

Why: adding a counter column to a table that already has rows needs the
column *and* its initial values; autogenerate writes both::

    def upgrade():
        op.add_column("users", sa.Column("question_count", sa.Integer(),
                      server_default="0", nullable=False))
        op.backfill_counter("users", "question_count", "questions", "user_id",
                            parent_key="id")

Switch it on in ``env.py``::

    import countercache.alembic  # noqa: F401  (any Alembic version)

    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # Alembic 1.18+: the same through the plugin system; name Alembic's
        # own comparators too, the list replaces the default
        autogenerate_plugins=["alembic.autogenerate.*", "countercache"],
    )

Either is enough and both give one backfill. Generated migrations start
with ``import countercache.alembic`` so that ``op.backfill_counter`` exists
when they run. ``op.backfill_counter(table, column, child_table, child_fk,
*, where=None, sum=None, parent_key=None)`` is one set-based UPDATE
(printed by ``alembic upgrade --sql`` as well).

Downgrades restore the previous values: a migration that changes a
counter's ``where=``/``sum=`` ends its ``downgrade()`` with a backfill
using the previous ones; one that adds a counter drops its column; one that
removes a counter re-adds the column and ends with the backfill its last
``op.backfill_counter()`` call made.
See :mod:`countercache.alembic.operations` and
:mod:`countercache.alembic.autogenerate`.

.. warning:: Importing this module registers the operation and the
   comparator globally (in Alembic's registries), for every migration
   environment in the process. With the package installed, Alembic 1.18+
   imports it itself when it loads its plugins; ``autogenerate_plugins=[...,
   "~countercache"]`` turns the comparator off for one environment.
"""

from __future__ import annotations

import sys

__all__ = [
    "BackfillCounterOp", "BackfillError", "CreateCounterTriggerOp", "DropCounterTriggerOp", "NoOpBackfillOp",
    "RestoreCounterOp", "autogenerate", "operations", "trigger_ops",
]


def _alembic_half_imported() -> bool:
    """True while Alembic is importing itself and loads its plugins' entry points."""
    alembic = sys.modules.get("alembic")
    compare = sys.modules.get("alembic.autogenerate.compare")
    return (alembic is not None and not hasattr(alembic, "__version__")) or (
        compare is not None and not hasattr(compare, "comparators")
    )


#: True when this import registered nothing: Alembic's plugin loader imported
#: the entry point (``countercache.alembic.autogenerate``) before Alembic's own
#: registries existed. ``autogenerate.setup()`` then drops this half-made
#: package from ``sys.modules``, and the next ``import countercache.alembic``
#: (env.py, a migration file) runs the registrations below.
_deferred = _alembic_half_imported()

if not _deferred:
    from . import autogenerate as autogenerate
    from . import operations as operations
    from . import trigger_ops as trigger_ops
    from .operations import BackfillCounterOp as BackfillCounterOp
    from .operations import BackfillError as BackfillError
    from .operations import NoOpBackfillOp as NoOpBackfillOp
    from .operations import RestoreCounterOp as RestoreCounterOp
    from .trigger_ops import CreateCounterTriggerOp as CreateCounterTriggerOp
    from .trigger_ops import DropCounterTriggerOp as DropCounterTriggerOp

    autogenerate.install()
    autogenerate._register_plugin_without_entry_point()

"""``countercache bench``: the cost of keeping ``parent.child_count`` exact, measured
in one run against the alternatives a user has.

Modules, one concern each:

* :mod:`bench.schema` - the tables (parents, children with an indexed foreign
  key, and an uncounted table) declared afresh per contender run;
* :mod:`bench.contenders` - the ways of keeping the counter: none (the floor),
  each countercache strategy, a hand-written mapper listener, PostgreSQL row
  and statement triggers, SQLAlchemy-Utils ``aggregated``;
* :mod:`bench.workloads` - what is timed (batch, txn, delete, move, noop),
  with its untimed set-up; and ``hot`` (run only when named): worker processes (or threads)
  committing small transactions against one parent, in transactions per second;
* :mod:`bench.runner` - repetitions, contenders interleaved, drift checks;
* :mod:`bench.report` - the rich table, the JSON document, the plot and the
  project's targets;
* :mod:`bench.main` - the command line (``main(argv) -> int``), reached as
  ``countercache bench`` or ``python -m bench``.

``bench/batch_flush.py`` and ``bench/statement_forms.py`` are standalone
scripts kept next to it.
"""

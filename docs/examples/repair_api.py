"""check() and reconcile() from Python, on the forum of ``forum.py``."""

from __future__ import annotations

from sqlalchemy import create_engine

import countercache
from forum import Forum, build

build("sqlite:///forum.db")
engine = create_engine("sqlite:///forum.db")

drifts = countercache.check(engine)  # every registered counter
for d in drifts:
    print(f"drift: {d.counter.key} pk={d.pk} stored={d.stored} actual={d.actual}")

# Only one counter, in batches of 100 parents; with an Engine each batch
# commits by itself.
fixed = countercache.reconcile(engine, Forum.post_count, batch_size=100)
print("fixed:", [(d.pk, d.stored, d.actual) for d in fixed])

print("left:", [(d.counter.key, d.pk) for d in countercache.check(engine)])
countercache.reconcile(engine)
assert countercache.check(engine) == []
print("clean")

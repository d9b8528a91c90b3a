"""The counter model: the :class:`CounterCache` that :func:`~countercache.counter_cache` builds.

A counter is a column on the parent class whose value the library keeps
equal to the number of children on a one-to-many relationship::

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        questions: Mapped[list["Question"]] = relationship(back_populates="user")
        question_count: Mapped[int] = counter_cache("questions")

The definition travels with the column in ``Column.info["countercache"]``.
It is bound to its class when the class's mapper is constructed and resolved
(relationship looked up, child mapper instrumented) when mappers are
configured; every misuse raises :class:`~countercache.CounterCacheError`
naming the counter at that moment. This module only describes counters: the
listeners that bind, resolve and then maintain them are registered by
:mod:`countercache.installation` (which also holds :func:`counter_cache`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import and_
from sqlalchemy.orm import Mapper, MapperProperty, RelationshipProperty
from sqlalchemy.orm.interfaces import MANYTOMANY, MANYTOONE

from . import _registry, config
from .errors import ConfigurationError
from .expressions import Unevaluable, columns_read, compile_evaluator, resolve, sql_text
from .kinds import Count, Filtered, Kind, ManyToMany, MultiLevel, rows_of_class

if TYPE_CHECKING:
    from sqlalchemy import Column

    from .writer import ParentTable

__all__ = ["CounterCache", "MiddleView"]


class CounterCache:
    """The definition of one counter, carried by its column's ``info``.

    Built by :func:`counter_cache`; application code reads it through
    ``User.question_count.property.columns[0].info["countercache"]`` or
    :func:`countercache.configured_strategy`.
    """

    def __init__(self, relationship: str, strategy: str | None, where: Any = None, sum: Any = None,
                 shards: int | None = None) -> None:
        self.relationship = relationship
        self.declared_strategy = strategy
        #: ``shards=`` as declared (None: the configuration's, else 16).
        self.declared_shards = shards
        self._where_arg = where
        self._sum_arg = sum
        #: What it counts (:mod:`countercache.kinds`), once mappers are configured.
        self.kind: Kind | None = None
        #: ``where=`` / ``sum=`` as SQL text over the child table's columns
        #: (what migrations record and ``backfill_counter`` runs; None when not given).
        self.where_sql: str | None = None
        self.sum_sql: str | None = None
        #: the same as SQL expressions, for migrations to render in their database's dialect
        self.where_clause: Any = None
        self.sum_clause: Any = None
        self.cls: type | None = None
        self.key: str | None = None
        self.column: Column[Any] | None = None
        self.mapper: Mapper[Any] | None = None
        self.parent: ParentTable | None = None
        #: The rows that feed it, once resolved (the kind itself, or a multi-level
        #: counter's leaves; None for many-to-many, fed by the association rows):
        #: their mapper, foreign key attributes, the attributes whose values decide
        #: it, whether every row weighs 1, and what a row weighs (read per row).
        self.child_mapper: Mapper[Any] | None = None
        self.fk_keys: tuple[str, ...] = ()
        self.value_keys: tuple[str, ...] = ()
        self.simple = True
        self.weight: Any = None
        #: Index of this counter among its table's counters (see ParentTable).
        self.slot = -1
        #: where=/sum= that only SQL can evaluate (kept by ``trigger`` alone), else None
        self.unevaluable: Any = None
        #: (configuration generation, strategy, shards) as resolved for that generation
        self._resolved: tuple[int, str, int] = (-1, "", 0)

    def copy(self) -> CounterCache:
        """The same declaration, not bound to any class yet (for another class's copy of the column)."""
        return CounterCache(self.relationship, self.declared_strategy, self._where_arg, self._sum_arg,
                            self.declared_shards)

    @property
    def name(self) -> str:
        """``"User.question_count"``: how configuration and errors name it."""
        if self.cls is None:
            return f"<unbound counter over {self.relationship!r}>"
        return f"{self.cls.__name__}.{self.key}"

    def _settings(self) -> tuple[int, str, int]:
        """Strategy and shard count for the configuration in force (resolved once per change)."""
        resolved = self._resolved
        if resolved[0] != config._config.generation:
            resolved = self._resolved = (config._config.generation, config.resolve(self),
                                         config.resolve_shards(self))
        return resolved

    def strategy(self) -> str:
        """The strategy in force now (configuration included)."""
        return self._settings()[1]

    def shards(self) -> int:
        """How many shard rows per parent a ``sharded`` counter spreads over now."""
        return self._settings()[2]

    def __repr__(self) -> str:
        return f"<CounterCache {self.name} over {self.relationship!r}>"

    # -- binding and resolution -------------------------------------------

    def _bind(self, mapper: Mapper[Any], column: Column[Any]) -> None:
        self.cls = mapper.class_
        self.mapper = mapper
        self.column = column
        self.key = mapper.get_property_by_column(column).key
        if self.declared_strategy is not None:
            config.check_strategy(self.declared_strategy, self.name)
        _registry.add(self)

    def _resolve(self, mapper: Mapper[Any]) -> None:
        """Look up the relationship and the child's keys and expressions (raising
        on any misuse); :func:`countercache.installation._start` then starts it."""
        path = self.relationship.split(".")
        if len(path) > 2:
            raise ConfigurationError(
                f"{self.name}: {self.relationship!r} goes through {len(path)} relationships; "
                "a counter goes through at most two (\"middles.children\", unsupported construct)"
            )
        prop = self._relationship_property(mapper, path[0])
        if prop.secondary is not None:
            if len(path) > 1:
                raise ConfigurationError(
                    f"{self.name}: a multi-level counter cannot go through the many-to-many "
                    f"{path[0]!r} (unsupported construct)"
                )
            self._resolve_many_to_many(mapper, prop)
            return
        child_mapper, fk_keys = self._foreign_keys(mapper, prop, path[0])
        if len(path) == 1:
            self._feed(self._rows(child_mapper, fk_keys))
            return
        # "questions.answers": the leaf's rows, through the middle's
        leaf_prop = self._relationship_property(child_mapper, path[1])
        if leaf_prop.secondary is not None:
            raise ConfigurationError(
                f"{self.name}: a multi-level counter cannot go through the many-to-many "
                f"{path[1]!r} (unsupported construct)"
            )
        middle_mapper, middle_fk_keys = child_mapper, fk_keys
        leaf_mapper, leaf_fk_keys = self._foreign_keys(middle_mapper, leaf_prop, path[1])
        if len(leaf_fk_keys) != 1 or len(middle_fk_keys) != 1:
            raise ConfigurationError(
                f"{self.name}: a multi-level counter needs one-column primary keys on "
                f"{mapper.class_.__name__} and {middle_mapper.class_.__name__} "
                "(unsupported construct)"
            )
        tables = [m.get_property(k).columns[0].table  # type: ignore[attr-defined]
                  for m, k in ((middle_mapper, middle_fk_keys[0]), (leaf_mapper, leaf_fk_keys[0]))]
        if len({mapper.local_table, *tables}) < 3:
            raise ConfigurationError(
                f"{self.name}: a multi-level counter through a self-referential relationship "
                f"({self.relationship!r}: one table at two levels) is not supported (unsupported construct)"
            )
        leaf = self._rows(leaf_mapper, leaf_fk_keys)
        self.kind = MultiLevel(middle_mapper, middle_fk_keys, leaf)
        self._feed(leaf)

    def _feed(self, rows: Count) -> None:
        """The counter is fed by these rows (see the attributes in ``__init__``)."""
        if self.kind is None:
            self.kind = rows
        self.child_mapper, self.fk_keys, self.value_keys = rows.child_mapper, rows.fk_keys, rows.value_keys
        self.simple, self.weight = rows.simple, rows.weight

    def _foreign_keys(self, mapper: Mapper[Any], prop: RelationshipProperty[Any],
                      name: str) -> tuple[Mapper[Any], tuple[str, ...]]:
        """``(child mapper, child attribute keys referring to mapper's key, in key order)``."""
        plain = and_(*(local == remote for local, remote in prop.local_remote_pairs))
        if not (prop.primaryjoin.compare(plain) or prop.primaryjoin.compare(
                and_(*(remote == local for local, remote in prop.local_remote_pairs)))):
            raise ConfigurationError(
                f"{self.name}: {name!r} has a custom primaryjoin with more than the "
                "foreign key; declare the extra condition with where= on a plain relationship "
                "(unsupported construct)"
            )
        # the parent's key attributes: a joined-inheritance subclass maps its own
        # table's key column and its base's to one attribute (admins.id, users.id)
        def attribute_of(col: Any) -> str | None:
            try:
                return mapper.get_property_by_column(col).key
            except Exception:  # noqa: BLE001 - not a column of the parent class
                return None

        pk_keys = [attribute_of(col) for col in mapper.primary_key]
        remote_by_key = {attribute_of(local): remote for local, remote in prop.local_remote_pairs}
        if None in remote_by_key or set(remote_by_key) != set(pk_keys) \
                or len(prop.local_remote_pairs) != len(pk_keys):
            raise ConfigurationError(
                f"{self.name}: relationship {name!r} must join on "
                f"{mapper.class_.__name__}'s primary key; joins on other columns are not supported"
            )
        for local, remote in prop.local_remote_pairs:
            _same_collation(self.name, local, remote)
        child_mapper = prop.mapper
        fk_keys = []
        for key in pk_keys:
            remote = remote_by_key[key]
            try:
                fk_keys.append(child_mapper.get_property_by_column(remote).key)
            except Exception:
                raise ConfigurationError(
                    f"{self.name}: column {remote} is not mapped on {child_mapper.class_.__name__}"
                ) from None
        return child_mapper, tuple(fk_keys)

    def check_association_class(self) -> None:
        """Refuse a many-to-many counter whose association table a class also
        maps (``class Enrolment: __table__ = enrolment``): rows that class
        writes are links no relationship event reports."""
        kind = self.kind
        if not isinstance(kind, ManyToMany):
            return
        for registry in {self.mapper.registry, kind.child_mapper.registry}:  # type: ignore[union-attr]
            for mapper in registry.mappers:
                if kind.secondary in mapper.tables:
                    raise ConfigurationError(
                        f"{self.name}: its association table {kind.secondary.name} is also mapped by "
                        f"{mapper.class_.__name__}, whose rows are links the counter could not follow; count "
                        f"them with counter_cache over a one-to-many relationship to {mapper.class_.__name__} "
                        "(unsupported construct)"
                    )

    def check_post_update(self) -> None:
        """Once every mapper is configured: no relationship writes a counted foreign
        key with ``post_update=True`` (a second UPDATE that no row event reports)."""
        kind = self.kind
        if isinstance(kind, MultiLevel):
            sides = [(kind.leaf.child_mapper, kind.leaf.key_columns()), (kind.middle_mapper, kind.key_columns())]
        elif isinstance(kind, Count):
            sides = [(kind.child_mapper, kind.key_columns())]
        else:
            return
        for mapper, fk_cols in sides:
            relationships = list(mapper.relationships)
            for parent_side in self.mapper.relationships if self.mapper is not None else ():
                relationships.append(parent_side)
            for rel in relationships:
                if rel.post_update and set(fk_cols) & {col for pair in rel.local_remote_pairs for col in pair}:
                    raise ConfigurationError(
                        f"{self.name}: {rel} has post_update=True, so the flush writes the foreign key "
                        "in a second UPDATE that no row event reports and the counter could not follow; "
                        "drop post_update on it (unsupported construct)"
                    )

    def _resolve_many_to_many(self, mapper: Mapper[Any], prop: RelationshipProperty[Any]) -> None:
        """``Tag.post_count`` over ``secondary``: counts the association rows."""
        if self._where_arg is not None or self._sum_arg is not None:
            raise ConfigurationError(
                f"{self.name}: where= and sum= are not supported on a many-to-many relationship yet"
            )
        pk = list(mapper.primary_key)
        by_parent = {id(local): remote for local, remote in prop.synchronize_pairs}
        if sorted(by_parent) != sorted(map(id, pk)):
            raise ConfigurationError(
                f"{self.name}: {self.relationship!r} must join {prop.secondary.name} on "  # type: ignore[union-attr]
                f"{mapper.class_.__name__}'s primary key"
            )
        backref = prop.backref[0] if isinstance(prop.backref, tuple) else prop.backref
        self.kind = ManyToMany(prop.mapper, prop.secondary, tuple(by_parent[id(c)] for c in pk), prop.key,
                               prop.back_populates or backref or None)
        self.child_mapper = prop.mapper

    def _rows(self, child: Mapper[Any], fk_keys: tuple[str, ...]) -> Count:
        rows = self._rows_of(child, fk_keys)
        of_class = rows_of_class(child, child.get_property(fk_keys[0]).columns[0].table)  # type: ignore[attr-defined]
        if of_class is not None:  # the migration's backfill counts this class's rows only
            self.where_sql = sql_text(of_class) + ("" if self.where_sql is None else f" AND ({self.where_sql})")
            self.where_clause = of_class if self.where_clause is None else and_(of_class, self.where_clause)
        return rows

    def _rows_of(self, child: Mapper[Any], fk_keys: tuple[str, ...]) -> Count:
        """The child rows over ``fk_keys``: a plain :class:`Count`, or :class:`Filtered`
        with ``where=`` / ``sum=`` (resolved, compiled for Python and rendered as SQL text)."""
        if self._where_arg is None and self._sum_arg is None:
            return Count(child, fk_keys, fk_keys)
        keys = list(fk_keys)
        found: dict[str, Any] = {}
        for what, arg in (("where", self._where_arg), ("sum", self._sum_arg)):
            if arg is None:
                continue
            expression = resolve(arg, child, what, self.name)
            try:
                fn, used = compile_evaluator(expression, child, what, self.name)
            except ConfigurationError as error:
                # the database evaluates it (trigger): kept in SQL only, and refused
                # when configure() hands the counter to an ORM strategy
                if self.strategy() not in config.DATABASE_STRATEGIES or not isinstance(error, Unevaluable):
                    raise
                fn, used = error.raiser(), columns_read(expression, child)
                self.unevaluable = error
            found[what], found[f"{what}_fn"] = expression, fn
            setattr(self, f"{what}_sql", sql_text(expression))
            setattr(self, f"{what}_clause", expression)
            keys.extend(k for k in used if k not in keys)
        tables = {child.get_property(k).columns[0].table for k in keys}  # type: ignore[attr-defined]
        if len(tables) > 1:
            raise ConfigurationError(
                f"{self.name}: where=/sum= read columns of {', '.join(sorted(t.name for t in tables))}; "
                "a counter's columns must live in the child's own table (unsupported construct)"
            )
        return Filtered(child, fk_keys, tuple(keys), **found)

    def _relationship_property(self, mapper: Mapper[Any], name: str) -> RelationshipProperty[Any]:
        prop: MapperProperty[Any] | None = mapper.attrs.get(name)
        if prop is None:
            raise ConfigurationError(
                f"{self.name}: {mapper.class_.__name__} has no relationship {name!r}"
            )
        if not isinstance(prop, RelationshipProperty):
            raise ConfigurationError(
                f"{self.name}: {name!r} is not a relationship() "
                f"but a {type(prop).__name__}"
            )
        if prop.direction is MANYTOONE:
            raise ConfigurationError(
                f"{self.name}: {name!r} is many-to-one; a counter counts the "
                "children of a one-to-many relationship (declare it on the other class)"
            )
        if prop.secondary is not None and prop.direction is not MANYTOMANY:
            raise ConfigurationError(
                f"{self.name}: {name!r} goes through {prop.secondary} but is not "
                "many-to-many (unsupported construct)"
            )
        return prop


class MiddleView:
    """A multi-level counter as its middle rows see it (:mod:`countercache.through`)."""

    simple = False

    def __init__(self, counter: CounterCache) -> None:
        assert isinstance(counter.kind, MultiLevel)
        self.counter = counter
        self.fk_keys = counter.kind.middle_fk_keys
        self.value_keys = counter.kind.middle_fk_keys
        #: Where a middle row's value dict keeps its number of counted leaves.
        self.count_key = f"countercache leaves of {counter.name}"

    @property
    def parent(self) -> Any:
        return self.counter.parent

    @property
    def slot(self) -> int:
        return self.counter.slot

    @property
    def name(self) -> str:
        return self.counter.name

    def strategy(self) -> str:
        return self.counter.strategy()

    def weight(self, values: dict[str, Any]) -> Any:
        return values.get(self.count_key, 0)

    def __repr__(self) -> str:
        return f"<MiddleView of {self.counter.name}>"


#: Collations (SQLite's) under which strings that differ compare equal.
_LOOSE = {"NOCASE", "RTRIM"}


def _same_collation(name: str, parent_col: Any, child_col: Any) -> None:
    """Refuse a parent key and a foreign key that compare strings differently:
    the parent's UPDATE would match a row under one collation that the
    relationship and the recount (``child.fk = parent.pk``) do not match
    under the other (SQLite's ``NOCASE`` on the parent key only, say)."""
    declared = [getattr(c.type, "collation", None) for c in (parent_col, child_col)]
    if declared[0] == declared[1] or not any(d and d.upper() in _LOOSE for d in declared):
        return
    raise ConfigurationError(
        f"{name}: {parent_col.table.name}.{parent_col.name} (collation {declared[0] or 'default'}) and "
        f"{child_col.table.name}.{child_col.name} (collation {declared[1] or 'default'}) compare keys "
        "differently; declare the same collation on both"
    )

"""Configuration (SPEC §3): precedence, replacement, files and the errors they name."""

from __future__ import annotations

import textwrap
import warnings

import pytest
from sqlalchemy import ForeignKey
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, configure_mappers, mapped_column, relationship

import countercache
from countercache import CounterCacheError, configure, configured_strategy
from helpers import assert_counts
from models import qa


def test_precedence():
    declared = qa("per_row")
    plain = qa(None)
    configure_mappers()
    assert configured_strategy(plain.User.question_count) == "bulk"
    assert configured_strategy(declared.User.question_count) == "per_row"
    configure(default_strategy="per_row")
    assert configured_strategy(plain.User.question_count) == "per_row"
    configure(default_strategy="per_row", overrides={"User.question_count": "bulk"})
    assert configured_strategy(declared.User.question_count) == "bulk"
    assert configured_strategy(plain.User.question_count) == "bulk"
    configure()  # restores the defaults
    assert configured_strategy(declared.User.question_count) == "per_row"
    assert configured_strategy(plain.User.question_count) == "bulk"


def test_configure_replaces_everything():
    m = qa(None)
    configure_mappers()
    configure(default_strategy="per_row", overrides={"User.question_count": "per_row"})
    configure(overrides={})
    assert configured_strategy(m.User.question_count) == "bulk"


def test_unknown_strategy_fails_at_once_and_changes_nothing():
    m = qa(None)
    configure_mappers()
    configure(default_strategy="per_row")
    with pytest.raises(CounterCacheError, match=r"default_strategy: unknown strategy 'fast'.*'bulk', 'per_row'"):
        configure(default_strategy="fast")
    with pytest.raises(CounterCacheError, match=r"override User\.question_count: unknown strategy 'x'.*'bulk'"):
        configure(overrides={"User.question_count": "x"})
    assert configured_strategy(m.User.question_count) == "per_row"


def test_override_naming_no_counter_of_declared_class_fails_at_configure():
    qa(None)
    with pytest.raises(CounterCacheError, match=r"override User\.answer_count: .*no counter.*question_count"):
        configure(overrides={"User.answer_count": "bulk"})


def test_an_override_naming_a_subclass_that_inherits_the_counter_names_the_declaring_class():
    class Base(DeclarativeBase):
        pass

    class Post(Base):
        __tablename__ = "inh_posts"
        id: Mapped[int] = mapped_column(primary_key=True)
        kind: Mapped[str] = mapped_column(default="p")
        like_count: Mapped[int] = countercache.counter_cache("likes")
        likes = relationship("Like")
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "p"}

    class Sub(Post):
        __mapper_args__ = {"polymorphic_identity": "s"}

    class Like(Base):
        __tablename__ = "inh_likes"
        id: Mapped[int] = mapped_column(primary_key=True)
        post_id: Mapped[int] = mapped_column(ForeignKey("inh_posts.id"))

    configure_mappers()
    with pytest.raises(CounterCacheError, match=r"override Sub\.like_count: Sub inherits the counter 'like_count' "
                       r"of Post .*name the class that declares it, Post\.like_count"):
        configure(overrides={"Sub.like_count": "deferred"})
    assert configured_strategy(Post.like_count) == "bulk"


def test_override_for_class_declared_later_fails_at_mapping():
    configure(overrides={"Later.nothing": "bulk"})  # class unknown yet: accepted for now

    class Base(DeclarativeBase):
        pass

    with pytest.raises(CounterCacheError, match=r"override Later\.nothing"):
        class Later(Base):
            __tablename__ = "later"
            id: Mapped[int] = mapped_column(primary_key=True)


def test_an_override_naming_no_mapped_class_is_warned_of_once_the_mappers_are_configured():
    """A misspelt class name ("Usr") is never declared: not an error (the class may be
    imported later), but warned of, once per configuration, naming the classes there are."""
    configure(overrides={"Usr.question_count": "deferred", "User.question_count": "per_row"})
    m = qa(None)
    with pytest.warns(countercache.CounterCacheWarning, match=r"override Usr\.question_count: no mapped class "
                      r"is named 'Usr' \(classes with counters: .*User"):
        configure_mappers()
    assert configured_strategy(m.User.question_count) == "per_row"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        configure_mappers()  # (warned once)
    # configured after the mappers: at configure()
    with pytest.warns(countercache.CounterCacheWarning, match=r"override Usr\.answer_count"):
        configure(overrides={"Usr.answer_count": "bulk"})
    # a mixin's or base's name is not warned of
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        configure(overrides={"User.question_count": "bulk", "DeclarativeBase.question_count": "bulk"})


def test_override_applies_at_next_flush(engine, statements):
    m = qa(None)
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        user = m.User()
        s.add(user)
        s.commit()
        configure(overrides={"User.question_count": "per_row"})
        with statements.record() as rec:
            s.add_all([m.Question(user=user) for _ in range(3)])
            s.flush()
        assert len(rec.updates_to("users")) == 3
        configure()
        with statements.record() as rec:
            s.add_all([m.Question(user=user) for _ in range(3)])
            s.flush()
        assert len(rec.updates_to("users")) == 1
        s.commit()
        user_id = user.id
    assert assert_counts(engine)[user_id] == 6


def test_configure_from_file(tmp_path):
    m = qa(None)
    configure_mappers()
    path = tmp_path / "setup.cfg"
    path.write_text(textwrap.dedent("""
        [metadata]
        name = app

        [countercache]
        default_strategy = per_row
        User.question_count = bulk
    """))
    countercache.configure_from_file(path)
    assert configured_strategy(m.User.question_count) == "bulk"
    assert countercache.config._config.default_strategy == "per_row"
    (tmp_path / "bad.ini").write_text("[countercache]\nUser.question_count = sometimes\n")
    with pytest.raises(CounterCacheError, match="User.question_count: unknown strategy 'sometimes'"):
        countercache.configure_from_file(tmp_path / "bad.ini")
    with pytest.raises(CounterCacheError, match="no \\[countercache\\] section"):
        (tmp_path / "empty.ini").write_text("[other]\n")
        countercache.configure_from_file(tmp_path / "empty.ini")


def test_configured_strategy_of_non_counter():
    m = qa(None)
    configure_mappers()
    with pytest.raises(CounterCacheError, match="not a counter"):
        configured_strategy(m.User.name)


def test_an_override_on_the_abstract_base_or_mixin_that_declares_the_counter(engine):
    """``Abstract.task_count`` / ``Owned.note_count`` apply to every class that
    inherits the counter; a class's own override wins (outside tester: they were
    accepted and did nothing)."""
    from sqlalchemy import ForeignKey
    from sqlalchemy.orm import relationship

    class Base(DeclarativeBase):
        pass

    class Task(Base):
        __tablename__ = "cfg_tasks"
        id: Mapped[int] = mapped_column(primary_key=True)
        project_id: Mapped[int | None] = mapped_column(ForeignKey("cfg_projects.id"))
        team_id: Mapped[int | None] = mapped_column(ForeignKey("cfg_teams.id"))

    class Abstract(Base):
        __abstract__ = True
        task_count: Mapped[int] = countercache.counter_cache("tasks")

    class Project(Abstract):
        __tablename__ = "cfg_projects"
        id: Mapped[int] = mapped_column(primary_key=True)
        tasks = relationship(Task, foreign_keys=[Task.project_id])

    class Team(Abstract):
        __tablename__ = "cfg_teams"
        id: Mapped[int] = mapped_column(primary_key=True)
        tasks = relationship(Task, foreign_keys=[Task.team_id])

    configure_mappers()
    configure(overrides={"Abstract.task_count": "per_row"})
    assert configured_strategy(Project.task_count) == configured_strategy(Team.task_count) == "per_row"
    with pytest.raises(countercache.ConfigurationError,
                       match=r"override Abstract\.nope: the classes that inherit from Abstract have no counter 'nope'"):
        configure(overrides={"Abstract.nope": "bulk"})
    assert configured_strategy(Project.task_count) == "per_row"  # (nothing changed)
    configure(overrides={"Abstract.task_count": "per_row", "Team.task_count": "deferred"})
    assert (configured_strategy(Project.task_count), configured_strategy(Team.task_count)) == ("per_row", "deferred")
    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            p, t = Project(id=1), Team(id=1)
            s.add_all([p, t, Task(project_id=1, team_id=1), Task(project_id=1)])
            s.commit()
            assert (p.task_count, t.task_count) == (2, 1)
    finally:
        Base.metadata.drop_all(engine)


@pytest.mark.parametrize("text, message", [
    ("this is not ini\n", "File contains no section headers"),
    ("[countercache]\nUser.question_count = bulk\nUser.question_count = deferred\n", "already exists"),
])
def test_an_unreadable_ini_file_is_a_configuration_error(tmp_path, text, message):
    path = tmp_path / "cc.ini"
    path.write_text(text)
    with pytest.raises(countercache.ConfigurationError, match=rf"cc\.ini: .*{message}"):
        countercache.configure_from_file(path)


def test_overrides_must_be_a_mapping():
    with pytest.raises(countercache.ConfigurationError, match="overrides must be a mapping"):
        configure(overrides=[("User.question_count", "bulk")])

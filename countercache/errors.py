"""The exceptions countercache raises.

Every error is a :class:`CounterCacheError`; the subclasses say at which
moment it was found, so that callers who care can tell them apart.
"""

from __future__ import annotations

__all__ = ["CounterCacheError", "ConfigurationError", "AssignmentError", "CounterCacheWarning"]


class CounterCacheError(Exception):
    """Base class of every error raised by countercache.

    The message always names the counter (``User.question_count``) or the
    configuration key it is about, and says what is wrong.
    """


class ConfigurationError(CounterCacheError):
    """A counter declaration or a configuration value cannot be used."""


class AssignmentError(CounterCacheError, AttributeError):
    """Application code tried to write a counter directly: by assigning the
    attribute (the constructor's keyword included), or by an ORM statement or
    a legacy bulk method giving its column a value."""


class CounterCacheWarning(UserWarning):
    """A change countercache sees but cannot count, and cannot refuse either
    (it learns of it only after the database made it): the counters it
    touches may now differ from their recount. Each case is in the
    documentation's list of what is not maintained, with its remedy
    (usually :func:`countercache.reconcile`). Turn it into an error with
    ``warnings.simplefilter("error", countercache.CounterCacheWarning)``.
    """

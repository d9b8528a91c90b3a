"""The exceptions countercache raises.

Every error is a :class:`CounterCacheError`; the subclasses say at which
moment it was found, so that callers who care can tell them apart.
"""

from __future__ import annotations

__all__ = ["CounterCacheError", "ConfigurationError", "AssignmentError"]


class CounterCacheError(Exception):
    """Base class of every error raised by countercache.

    The message always names the counter (``User.question_count``) or the
    configuration key it is about, and says what is wrong.
    """


class ConfigurationError(CounterCacheError):
    """A counter declaration or a configuration value cannot be used."""


class AssignmentError(CounterCacheError, AttributeError):
    """Application code tried to write a counter attribute directly."""

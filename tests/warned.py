"""Reading what ``pytest.warns`` caught: only the warnings of the category a test is about.

``pytest.warns`` records every warning raised inside its block, whatever the filters. A
coroutine that Orbax's asyncio code left unawaited warns (a ``RuntimeWarning``) when the
garbage collector finalises it, which can be inside any block; seen once in CI beside the
one warning a test expected. Tests that require exactly N of ours count ours only.
"""

import warnings


def of(caught: list[warnings.WarningMessage], category: type[Warning]) -> list[Warning]:
    """The caught warnings of ``category`` (or a subclass), in order."""
    return [w.message for w in caught if issubclass(w.category, category)]


def messages(caught: list[warnings.WarningMessage], category: type[Warning]) -> list[str]:
    """The texts of :func:`of`."""
    return [str(w) for w in of(caught, category)]

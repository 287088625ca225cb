"""What a compiled program really branches on: skipping's ``lax.cond`` survives to the
compiled program only where its gate is an argument. Gates made inside the jitted function
from constants (a NumPy array, ``jnp.array([...])`` closed over) are constants to XLA, which
folds each conditional into the branch the gate picks: "skipping" is then straight-line code,
and a test comparing it with masking compares two programs without a conditional."""
import re


def count(compiled, op):
    """How many ``op`` instructions (``'conditional'``, ``'while'``) a compiled program has
    (its optimised HLO, after XLA's folding)."""
    return len(re.findall(rf"\b{op}\(", compiled.as_text()))


def with_conditionals(jitted, *args, at_least=1):
    """``jitted`` compiled for ``args``, after asserting that the compiled program keeps at
    least ``at_least`` conditionals (e.g. one per skipping block forward and one backward).
    Call the result without ``jitted``'s static arguments."""
    compiled = jitted.lower(*args).compile()
    found = count(compiled, "conditional")
    assert found >= at_least, (
        f"the compiled program has {found} conditionals, fewer than the {at_least} expected: "
        "skipping was folded into straight-line code (gates made from constants inside jit? "
        "pass them as an argument)")
    return compiled

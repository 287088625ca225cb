"""What the tests of the command-line tools share: reading their one-line errors."""

import pytest


def one_line_error(capsys, main, argv) -> str:
    """Runs ``main(argv)``, asserts it exits with status 1 and no traceback, and returns its
    single ``error:`` line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    return line

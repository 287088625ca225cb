"""sweep.py's input, as a user types it: the override form train.py reads, and the grids it
refuses in one line before anything trains (an empty list, a point listed twice, two p_L
values that would share a run directory, a --root that is a file)."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` and the scripts live at the repository root.

import sweep as sweep_cli  # noqa: E402
import train as train_cli  # noqa: E402
from cli_output import one_line_error  # noqa: E402
from configs import load_config  # noqa: E402
from stochastic_depth_jax import errors  # noqa: E402
from stochastic_depth_jax.training import sweep  # noqa: E402


def _sweep_argv(root, *extra, depths="8", p_last="0.5"):
    return ["--config", "cifar10:smoke", "--depths", depths, "--p-last", p_last,
            "--root", str(root), *extra]


@pytest.mark.parametrize("rest, overrides", [
    (["--config.num_epochs", "1"], ["--config.num_epochs=1"]),
    (["--config.seed", "-1"], ["--config.seed=-1"]),
    (["--config.data_dir=/a/b=c"], ["--config.data_dir=/a/b=c"]),
    # The next flag is not the value: the override is left without one (refused on load).
    (["--config.data_dir", "--config.seed=1"], ["--config.data_dir", "--config.seed=1"]),
])
def test_train_and_sweep_read_the_same_overrides(tmp_path, rest, overrides):
    _, from_sweep = sweep_cli.parse_args(_sweep_argv(tmp_path, *rest))
    _, from_train = train_cli.parse_args(["--config", "cifar10:smoke", *rest])
    assert from_sweep == from_train == overrides


@pytest.mark.parametrize("rest, expected", [
    # The space form names the swept field as --config.model.depth=20 does.
    (["--config.model.depth", "20"], "sets model.depth from --depths"),
    (["--config.model.depth"], "Override '--config.model.depth' must look like --config.field"),
    (["--config.model.final_survival_prb=0.3"], "Did you mean 'model.final_survival_prob'?"),
])
def test_sweep_reports_an_override_as_train_does(capsys, tmp_path, rest, expected):
    line = one_line_error(capsys, sweep_cli.main, _sweep_argv(tmp_path, *rest))
    assert expected in line
    assert not os.path.exists(tmp_path / "depth8_pL0.5")


@pytest.mark.parametrize("grid, expected", [
    ({"depths": ""}, "--depths lists no values"),
    ({"p_last": ","}, "--p-last lists no values"),
    ({"depths": "8,8"}, "depth 8, p_L 0.5 is listed twice"),
    ({"p_last": "0.1,0.10000001"}, "(8, 0.1) and (8, 0.10000001) would share the run "
                                   "depth8_pL0.1"),
])
def test_sweep_refuses_a_grid_without_distinct_points(capsys, tmp_path, grid, expected):
    """A duplicate point was trained once and reported again as 'skipped (finished)', its
    row repeated in the training-time table: the second point's results were the first's."""
    line = one_line_error(capsys, sweep_cli.main, _sweep_argv(tmp_path, **grid))
    assert expected in line
    assert os.listdir(tmp_path) == []


def test_sweep_refuses_a_root_that_is_a_file(tmp_path):
    root = tmp_path / "root"
    root.write_text("not a sweep")
    [(name, extra)] = sweep.plan([8], [0.5])

    def must_not_train(config, workdir):
        raise AssertionError(f"trained {workdir}")

    with pytest.raises(errors.ConfigError, match="is a file, not a directory"):
        sweep.run_sweep([(name, load_config("cifar10:smoke", extra))], str(root),
                        train=must_not_train)
    assert root.read_text() == "not a sweep"

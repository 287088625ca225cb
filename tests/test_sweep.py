"""sweep.py's input, as a user types it: the override form train.py reads, and the grids it
refuses in one line before anything trains (an empty list, a point listed twice, two p_L
values that would share a run directory, a --root that is a file), and what --collect
draws of an interrupted sweep."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import ml_collections
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` and the scripts live at the repository root.

import evaluate as evaluate_cli  # noqa: E402
import sweep as sweep_cli  # noqa: E402
import train as train_cli  # noqa: E402
import warned  # noqa: E402
from cli_output import one_line_error  # noqa: E402
from configs import load_config  # noqa: E402
from stochastic_depth_jax import errors, logs  # noqa: E402
from stochastic_depth_jax.training import evaluate as evaluate_lib  # noqa: E402
from stochastic_depth_jax.training import config as config_lib, stopping, sweep  # noqa: E402
from stochastic_depth_jax.training import figures, loop  # noqa: E402
from stochastic_depth_jax.training import workdir as workdir_lib  # noqa: E402


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


@pytest.mark.parametrize("spec, model, flags", [
    ("cifar10:smoke", "vit", "--config cifar10_vit:smoke"),
    ("cifar10:smoke", "convnext", "--config cifar10_convnext:smoke"),
    ("svhn:smoke", "vit", "--config cifar10_vit:smoke --config.dataset=svhn "
     "--config.fake_data.num_extra=64"),
    ("cifar100", "convnext", "--config cifar10_convnext --config.dataset=cifar100"),
])
def test_a_sweep_switched_to_a_model_without_p_last_names_train_py(capsys, tmp_path, spec,
                                                                    model, flags):
    """--config.model.name=vit in a sweep was refused as not fitting cifar10's model block,
    advising --config cifar10_vit: which the sweep refuses too. It names train.py, with the
    flags that train that model on the data asked for: it named the model's config alone,
    dropping the dataset and ':smoke' (a full-sized run on CIFAR-10 for svhn:smoke)."""
    argv = _sweep_argv(tmp_path, f"--config.model.name={model}")
    argv[1] = spec
    line = one_line_error(capsys, sweep_cli.main, argv)
    assert line == (
        f"error: --config.model.name={model}: the sweep is over model.depth and p_L "
        "(model.final_survival_prob) of the block-wise ResNets ['cifar_resnet', "
        f"'wide_resnet'], and {model!r} has no p_L. Train it with train.py {flags}, "
        "its drop path set by --config.model.drop_path_rate.")
    assert not os.path.exists(tmp_path / "depth8_pL0.5")
    # What it says to write: train.py takes it, that model on the data the sweep was given.
    _, name, *overrides = flags.split()
    advised, asked = load_config(name, overrides), load_config(spec)
    assert (advised.model.name, advised.dataset) == (model, asked.dataset)
    assert advised.fake_data.to_dict() == asked.fake_data.to_dict()
    load_config(name, overrides + ["--config.model.drop_path_rate=0.1"])


def test_a_sweep_of_a_config_without_p_last_names_the_train_py_command_to_run(capsys,
                                                                            tmp_path):
    """``sweep.py --config cifar10_vit:smoke`` said "Train it with train.py": it names the
    config and the overrides given, as train.py takes them."""
    argv = _sweep_argv(tmp_path, "--config.num_epochs=3")
    argv[1] = "cifar10_vit:smoke"
    line = one_line_error(capsys, sweep_cli.main, argv)
    assert "Train it with train.py --config cifar10_vit:smoke --config.num_epochs=3, " in line


@pytest.mark.parametrize("code, fix", [
    (errno.EROFS, "remount the filesystem writable"), (errno.ENOSPC, "free some space")])
def test_figures_that_cannot_be_written_say_how_to_draw_them_again(capsys, tmp_path,
                                                                   monkeypatch, code, fix):
    """A read-only or full --root failed the figures with train.py's words: 'remount it
    writable to resume the run there, or use another --workdir' (sweep.py has no --workdir;
    another --root has none of the runs)."""
    root = str(tmp_path)
    _finished_run(root, 8, 0.5, 0.4)
    figures_dir = os.path.join(root, sweep.FIGURES_DIR)

    def refused(runs, out_dir, *args, **kwargs):
        raise OSError(code, os.strerror(code), out_dir)

    monkeypatch.setattr(sweep, "write_figures", refused)
    line = one_line_error(capsys, sweep_cli.main, ["--root", root, "--collect"])
    assert line == (f"error: Cannot write {figures_dir} ({os.strerror(code)}): the runs are "
                    f"kept; {fix}, then draw the figures with sweep.py --root {root} "
                    "--collect.")


def test_a_misspelt_model_name_in_a_sweep_lists_the_models_it_sweeps(capsys, tmp_path):
    """A misspelt --config.model.name listed every model, the ViT and ConvNeXt included,
    which the sweep refuses: it lists the block-wise ResNets only."""
    line = one_line_error(capsys, sweep_cli.main,
                          _sweep_argv(tmp_path, "--config.model.name=resnt"))
    assert line.startswith("error: Invalid config: model.name='resnt'; valid in a sweep: "
                           "['cifar_resnet', 'wide_resnet']"), line
    assert "vit" not in line and "convnext" not in line
    assert not os.path.exists(tmp_path / "depth8_pL0.5")


@pytest.mark.parametrize("script, flag, hint", [
    ("train", "--work_dir=/tmp/x", "; did you mean --workdir?"),
    ("sweep", "--p_last", "; did you mean --p-last?"),
    ("train", "--confg.seed=1", "; did you mean --config.seed=1?"),
    ("sweep", "--configs.num_epochs", "; did you mean --config.num_epochs?"),
    ("sweep", "--no-such-flag", ""),
    # An override without its '--config.' prefix: said as for a misspelt prefix.
    ("train", "--seed=1", "; did you mean --config.seed=1?"),
    ("train", "--batch-size", "; did you mean --config.batch_size?"),
    ("train", "--seed 1", "; did you mean --config.seed=1?"),
    ("sweep", "--model.width=4", "; did you mean --config.model.width=4?"),
])
def test_a_misspelt_flag_names_the_flag_meant(capsys, tmp_path, script, flag, hint):
    """A misspelt flag was 'unrecognised argument ... (overrides look like --config.<field>=
    <value>)', whatever it was close to."""
    flag, *value = flag.split(" ")  # '--seed 1': the flag, then its value
    main, argv = ((train_cli.main, ["--config", "cifar10:smoke", flag, *value])
                  if script == "train" else (sweep_cli.main, _sweep_argv(tmp_path, flag)))
    with pytest.raises(SystemExit) as info:
        main(argv)
    [line] = [x for x in capsys.readouterr().err.splitlines() if ": error: " in x]
    assert info.value.code == 2
    assert line.endswith(f"unrecognised argument {flag!r} (overrides look like "
                         f"--config.<field>=<value>){hint}")


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


def test_the_same_image_folder_named_otherwise_is_the_same_config(tmp_path, monkeypatch):
    """run.json records an image folder's absolute path: the same sweep command run again
    with a ``file://`` URL or a relative path was refused as 'a different config'."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "my pets"
    [(name, extra)] = sweep.plan([8], [0.5])
    workdir = str(tmp_path / name)
    os.makedirs(workdir)
    config = load_config("cifar10:smoke", extra + [f"--config.dataset=image_folder:{folder}"])
    with open(os.path.join(workdir, "run.json"), "w") as f:
        json.dump({"config": json.loads(config.to_json())}, f)  # as training records it
    for named in (f"file://{str(folder).replace(' ', '%20')}", "my pets", "./my pets/"):
        sweep.check_same_config(workdir, load_config(
            "cifar10:smoke", extra + [f"--config.dataset=image_folder:{named}"]))
    other = load_config("cifar10:smoke", extra + ["--config.dataset=image_folder:file:///pets"])
    with pytest.raises(errors.ConfigError, match="holds a run trained with a different config "
                       r"\(dataset: 'image_folder:.*my pets' -> 'image_folder:/pets'\)"):
        sweep.check_same_config(workdir, other)


def test_sweep_collect_refuses_the_flags_it_would_ignore_in_one_line(capsys, tmp_path):
    """As train.py and evaluate.py refuse an ignored flag: ``error:``, status 1 (it was
    argparse's usage text and status 2); an unknown flag stays argparse's usage error."""
    argv = ["--root", str(tmp_path), "--collect", "--depths", "14", "--config.num_epochs=9"]
    line = one_line_error(capsys, sweep_cli.main, argv)
    assert line == ("error: --collect draws every run under --root as it was trained; drop "
                    "--depths, --config.num_epochs=9 (or drop --collect to train them).")
    with pytest.raises(SystemExit) as info:
        sweep_cli.main(["--root", str(tmp_path), "--collect", "--no-such-flag"])
    assert info.value.code == 2 and "unrecognised argument '--no-such-flag'" in \
        capsys.readouterr().err


def test_sweep_collect_on_one_run_s_workdir_says_so(capsys, tmp_path):
    """--root pointing at one run (not the sweep's root) said 'No runs to plot: the sweep
    directory holds no run.json', though it holds one: now it names the mistake."""
    _finished_run(str(tmp_path), 8, 0.5, 0.3)
    [run] = os.listdir(tmp_path)
    line = one_line_error(capsys, sweep_cli.main, ["--root", str(tmp_path / run), "--collect"])
    assert line == (f"error: --root {str(tmp_path / run)!r} is one run's workdir (it holds "
                    f"run.json), not a sweep's root, whose runs are its subdirectories: pass "
                    f"the directory that holds the runs (here perhaps {tmp_path}); 'python "
                    f"evaluate.py --workdir {tmp_path / run}' evaluates this run.")


def test_a_sweep_into_one_run_s_workdir_is_refused_before_it_trains(capsys, tmp_path):
    """A sweep whose --root was one run's workdir trained every run inside it, then refused
    to draw them ('is one run's workdir ... pass the directory that holds the runs', which
    was the root given); a sweep trained there earlier is still drawn."""
    run = tmp_path / _finished_run(str(tmp_path), 8, 0.5, 0.3)
    trained = []
    runs = [(n, load_config("cifar10:smoke", extra)) for n, extra in sweep.plan([8], [1.0])]
    with pytest.raises(errors.ConfigError, match=re.escape(
            f"--root {str(run)!r} is one run's workdir (it holds run.json), not a sweep's "
            "root: the sweep would train its runs inside that run's directory; give the "
            "sweep a directory of its own (new or of an earlier sweep).")):
        sweep.run_sweep(runs, str(run), train=lambda c, w: trained.append(w))
    assert trained == []
    _finished_run(str(run), 8, 1.0, 0.4)  # a sweep trained there before this version
    assert [r["name"] for r in sweep.collect(str(run))] == ["depth8_pL1"]


def test_a_run_is_not_trained_into_a_sweep_s_root(capsys, tmp_path):
    """`train.py --workdir <sweep root>` (to add one run to the sweep) trained there, its
    files among the sweep's runs, and the sweep then refused its own root as 'one run's
    workdir ... give the sweep a directory of its own'."""
    _finished_run(str(tmp_path), 8, 0.5, 0.3)
    line = one_line_error(capsys, train_cli.main, ["--config", "cifar10:smoke",
                                                   "--workdir", str(tmp_path)])
    assert line == (f"error: The workdir {tmp_path} holds runs in its subdirectories "
                    "(depth8_pL0.5; a sweep's root?), not one run: a run there would mix its "
                    "files with theirs, and the sweep could not be continued; give this run a "
                    f"directory of its own (e.g. {tmp_path / '<name>'}).")
    assert os.listdir(tmp_path) == ["depth8_pL0.5"]
    # A run's own workdir whose damaged run.json was moved aside into a subdirectory (as
    # the damaged-run.json error suggests) is a run, not a sweep's root: not refused here.
    run = tmp_path / "depth8_pL0.5"
    os.makedirs(run / "aside")
    os.makedirs(run / "checkpoints")
    os.rename(run / "run.json", run / "aside" / "run.json")
    loop._refuse_a_sweep_root(str(run))
    os.rename(run / "aside" / "run.json", run / "run.json")
    os.rmdir(run / "aside")
    os.rmdir(run / "checkpoints")
    # A root where that happened before: the sweep says what is in the way.
    (tmp_path / "run.json").write_text("{}")
    line = one_line_error(capsys, sweep_cli.main, _sweep_argv(tmp_path))
    assert line == (f"error: --root {str(tmp_path)!r} holds the files of a run trained there "
                    "(run.json, checkpoints, ...) besides the sweep's runs: move them into a "
                    "directory of their own to continue the sweep.")


def test_a_run_busy_in_another_sweep_is_said_in_the_sweep_s_words(tmp_path):
    """Two sweeps of one root: the second stopped with the lock's advice, 'or use another
    --workdir', a flag sweep.py does not have."""
    runs = [(n, load_config("cifar10:smoke", extra)) for n, extra in sweep.plan([8], [0.5])]
    lock = workdir_lib.WorkdirLock(str(tmp_path / "depth8_pL0.5"))
    os.makedirs(tmp_path / "depth8_pL0.5")
    lock.acquire()
    try:
        with pytest.raises(errors.WorkdirBusyError) as info:
            sweep.run_sweep(runs, str(tmp_path))
    finally:
        lock.release()
    message = str(info.value)
    assert message.startswith(f"depth8_pL0.5: The workdir {tmp_path / 'depth8_pL0.5'} is in use "
                              f"by another run: pid {os.getpid()}")
    assert message.endswith(" (another sweep of this --root?). Wait for it to finish or stop "
                            "it, then run this sweep again (it skips the finished runs), or "
                            "give it another --root.")
    assert "--workdir" not in message and "). (" not in message


def _finished_run(root, depth, p_last, test_error, *overrides):
    """Writes the records of a finished smoke run (run.json, summary.json, metrics.jsonl) as
    training leaves them, in ``<root>/depth<d>_pL<p>``, without training."""
    [(name, extra)] = sweep.plan([depth], [p_last])
    config = load_config("cifar10:smoke", list(overrides) + extra)
    workdir = os.path.join(root, name)
    os.makedirs(workdir)
    steps_per_epoch = 4
    held_out = config.validation_size  # the smoke data's split, as run.json records it
    with open(os.path.join(workdir, "run.json"), "w") as f:
        json.dump({"config": json.loads(config.to_json()),
                   "data": {"num_train": config.fake_data.num_train - held_out,
                            "num_validation": held_out}}, f)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({"steps": config.num_epochs * steps_per_epoch,
                   "steps_per_epoch": steps_per_epoch,
                   "best": {"test_error": test_error, "val_error": test_error}}, f)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for epoch in range(1, config.num_epochs + 1):
            seconds = depth * p_last
            f.write(json.dumps({"epoch": epoch, "step": epoch * steps_per_epoch,
                                "epoch_time_s": seconds,
                                "images_per_s": steps_per_epoch * config.batch_size / seconds,
                                "grad_first_conv_mean_abs": 0.01 * epoch}) + "\n")
    return name


def _sidecar(root, figure):
    with open(os.path.join(root, "figures", figure + ".json")) as f:
        return json.load(f)


def test_a_rerun_with_fewer_depths_redraws_every_finished_run(capsys, tmp_path):
    """`--depths 8,14` then `--depths 8`: the second command's figures were drawn from its
    own two runs only, overwriting figures that showed the depth-14 results."""
    root = str(tmp_path)
    names = [_finished_run(root, d, p, 0.5 + d / 100 - p / 10)
             for d in (8, 14) for p in (0.5, 1.0)]
    sweep_cli.main(_sweep_argv(root, depths="8", p_last="0.5,1.0"))  # all finished: skipped
    out = capsys.readouterr().err  # stdout holds the JSON alone
    fig8 = _sidecar(root, "fig8_error_vs_p_last")
    assert sorted(fig8["data"]) == ["14", "8"] and fig8["left_out"] == {}
    assert [os.path.basename(s) for s in fig8["sources"]] == names
    assert fig8["data"]["14"] == [[0.5, 0.59], [1.0, 0.54]]
    # What the runs trained on: 32 of the 160 smoke images are held out for validation.
    assert fig8["trained_on"] == ("cifar10, FAKE random-label data (128 training images, 32 "
                                  "held out for validation; errors at chance); cifar_resnet, "
                                  "width 4; 2 epochs")
    assert "figures: fig8_error_vs_p_last.png: 4 runs (depths 8, 14 x p_L 0.5, 1)\n" in out
    assert ("figures: fig7_first_conv_grad.png: 2 runs (depth 14 x p_L 0.5, 1); left out "
            "(not the deepest depth): depth 8 x p_L 0.5, 1\n") in out
    assert ("figures: fig3_error_curves.png: 2 runs (depth 14 x p_L 0.5, 1); left out "
            "(not the deepest depth): depth 8 x p_L 0.5, 1\n") in out


def test_the_subtitle_says_how_many_fake_images_were_generated_where_runs_disagree():
    """Runs whose records differ (another validation_size) or lack the split share only the
    number of fake images generated: the subtitle says that, not that all trained on it."""
    config = json.loads(load_config("cifar10:smoke").to_json())
    runs = [{"config": config, "num_train": 128, "num_validation": 32},
            {"config": config, "num_train": 144, "num_validation": 16}]
    for drawn in (runs, [{"config": config}]):
        assert sweep.describe_data(drawn).startswith(
            "cifar10, FAKE random-label data (160 images generated; errors at chance);")
    assert sweep.describe_data([{"config": config, "num_train": 160, "num_validation": 0}]
                               ).startswith("cifar10, FAKE random-label data (160 training "
                                            "images; errors at chance);")


def test_the_subtitle_counts_fake_svhn_extra_images_as_generated():
    """Fake SVHN generates num_train + num_extra training images (160 + 64): the subtitle
    said 160."""
    config = json.loads(load_config("svhn:smoke").to_json())
    assert sweep.describe_data([{"config": config}]).startswith(
        "svhn, FAKE random-label data (224 images generated; errors at chance);")


def test_the_subtitle_says_fake_data_where_runs_generated_different_numbers():
    """Fake runs of different sizes lost the 'FAKE' label: only a size all runs share kept
    it. A mix of fake and real runs says that some ran on fake data."""
    small = json.loads(load_config("cifar10:smoke").to_json())
    large = json.loads(load_config("cifar10:smoke", ["--config.fake_data.num_train=320"]
                                   ).to_json())
    runs = [{"config": small, "num_train": 128, "num_validation": 32},
            {"config": large, "num_train": 288, "num_validation": 32}]
    assert sweep.describe_data(runs).startswith(
        "cifar10, FAKE random-label data (160, 320 images generated, by run; errors at chance);")
    real = json.loads(load_config("cifar10", []).to_json())
    assert sweep.describe_data([runs[0], {"config": real}]).startswith(
        "cifar10, some runs on FAKE random-label data")


def test_a_run_recorded_before_a_field_existed_has_the_config_it_was_trained_with(
        capsys, tmp_path):
    """Runs whose run.json predates model.scan_unroll (and name, widen_factor, dropout_rate,
    eval_every_steps) were drawn as another series ('model.scan_unroll=(absent)') than new runs of the same
    config, and the same sweep command run again refused them as a different config."""
    root = str(tmp_path)
    old = _finished_run(root, 8, 0.5, 0.5)
    with open(os.path.join(root, old, "run.json")) as f:
        recorded = json.load(f)
    for field in ("name", "widen_factor", "dropout_rate", "scan_unroll"):
        del recorded["config"]["model"][field]
    del recorded["config"]["eval_every_steps"]  # evaluated once an epoch, as 0 does
    with open(os.path.join(root, old, "run.json"), "w") as f:
        json.dump(recorded, f)
    _finished_run(root, 14, 0.5, 0.4)
    sweep.write_figures(sweep.collect(root), os.path.join(root, "figures"))
    assert "separate series" not in capsys.readouterr().out
    assert "series" not in _sidecar(root, "fig8_error_vs_p_last")
    [(name, extra)] = sweep.plan([8], [0.5])
    sweep.check_same_config(os.path.join(root, old), load_config("cifar10:smoke", extra))
    with pytest.raises(errors.ConfigError, match=r"model.scan_unroll: False -> True"):
        sweep.check_same_config(os.path.join(root, old), load_config(
            "cifar10:smoke", extra + ["--config.model.scan_unroll=true"]))


def test_a_sweep_recorded_with_subsampling_shortcuts_is_continued_with_them(tmp_path):
    """A sweep run before 'A-avg' became the default records model.shortcut='A': the same
    command is refused, naming the override that continues it as it was trained."""
    old = _finished_run(str(tmp_path), 8, 0.5, 0.5, "--config.model.shortcut=A")
    [(name, extra)] = sweep.plan([8], [0.5])
    with pytest.raises(errors.ConfigError, match=(
            r"\(model.shortcut: 'A' -> 'A-avg'\) \(recorded before 'A-avg' became the "
            r"default: add --config.model.shortcut=A to continue it\); use a new --root")):
        sweep.check_same_config(os.path.join(str(tmp_path), old),
                                load_config("cifar10:smoke", extra))
    sweep.check_same_config(os.path.join(str(tmp_path), old), load_config(
        "cifar10:smoke", extra + ["--config.model.shortcut=A"]))


def _missing(field):
    """What a run.json lacking ``field`` (another version's) is refused with."""
    return ("{run_json} records a config without the field '" + field + "', which this "
            "version of stochastic_depth_jax needs: it was written by another version "
            "(code_version 0.0.1, git abc1234); use that version for this run.")


def _edit_run_json(run_json, field, value):
    """Sets the dotted config ``field`` of ``run_json`` to ``value``, or (None) removes it
    and records another code version, as a run.json another version wrote."""
    with open(run_json) as f:
        recorded = json.load(f)
    *parents, leaf = field.split(".")
    node = recorded["config"]
    for name in parents:
        node = node[name]
    if value is None:
        del node[leaf]
        recorded["code_version"] = {"package": "0.0.1", "git": "abc1234", "jax": "0.4"}
    else:
        node[leaf] = value
    with open(run_json, "w") as f:
        json.dump(recorded, f)


@pytest.mark.parametrize("field, value, why", [
    ("model.mode", "layer", "(Invalid config: model.mode='layer'"),
    # Another version's run.json without a field this one reads: an AttributeError
    # traceback from validate, in evaluate.py too; then a line naming the leaf only
    # ('mode'), or for some top-level fields a did-you-mean text ('\\').
    ("model.mode", None, "(" + _missing("model.mode")),
    ("batch_size", None, "(" + _missing("batch_size")),
])
def test_a_run_json_this_version_refuses_is_left_out_naming_it(capsys, tmp_path, field,
                                                                 value, why):
    """The figures read every run under --root: one whose run.json no longer validates (an
    older version's, edited) ended the command, training included, with an 'Invalid config'
    line that named neither the file nor the run, as if this command's config were wrong."""
    root = str(tmp_path)
    _finished_run(root, 8, 0.5, 0.5)
    other = _finished_run(root, 14, 0.5, 0.4)
    run_json = os.path.join(root, other, "run.json")
    _edit_run_json(run_json, field, value)
    with pytest.warns(logs.RunWarning) as caught:
        sweep_cli.main(["--root", root, "--collect"])
    [warning] = warned.messages(caught, logs.RunWarning)
    assert warning.startswith(f"{run_json} records a config this version refuses "
                              + why.format(run_json=run_json))
    assert warning.endswith("): left out of the sweep's figures.")
    assert "figures: fig8_error_vs_p_last.png: 1 run (depth 8 x p_L 0.5)\n" in \
        capsys.readouterr().err


@pytest.mark.parametrize("field, moved", [
    ("model.depth", False), ("weight_decay", False), ("model", False),
    # Read once the config is validated (and copied for the moved data): a traceback.
    ("fake_data.num_train", True),
])
def test_evaluate_names_the_field_a_run_json_lacks_by_its_dotted_name(capsys, tmp_path,
                                                                       field, moved):
    """evaluate.py on another version's run.json without a field this one reads named the
    leaf only ('depth': of which part of the config?) or, for some top-level fields, a
    did-you-mean text cut to a backslash ('\\'); a field read after the config was
    validated was an AttributeError traceback."""
    workdir = os.path.join(str(tmp_path), _finished_run(str(tmp_path), 8, 0.5, 0.5))
    run_json = os.path.join(workdir, "run.json")
    _edit_run_json(run_json, field, None)
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", workdir] + (
        ["--data-dir", str(tmp_path)] if moved else []))
    assert line == "error: " + _missing(field).format(run_json=run_json)


@pytest.mark.parametrize("model", ["cifar_resnet", "vit"])
def test_a_field_no_version_had_is_not_blamed_on_another_version(model):
    """A misspelt field in the code that reads run.json's config came out as "run.json
    records a config without the field ... written by another version": the run.json was
    blamed for a typo in this version's code."""
    spec = "cifar10:smoke" if model == "cifar_resnet" else "cifar10_vit:smoke"
    recorded = json.loads(load_config(spec).to_json())
    meta = {"config": recorded, "code_version": {"package": "0.0.1", "git": "abc1234"}}
    config = ml_collections.ConfigDict(recorded)
    # No version's config has it (for a ViT: a ResNet field, read by mistake).
    typo = "depht" if model == "cifar_resnet" else "shortcut"
    with pytest.raises(AttributeError, match=typo):
        with evaluate_lib.recorded_fields("run", meta, config):
            getattr(config.model, typo)
    with pytest.raises(KeyError, match="batch_sise"):
        with evaluate_lib.recorded_fields("run", meta, config):
            config["batch_sise"]  # noqa: B018
    # A field this version's configs have, missing from the recorded one: another version.
    del recorded["weight_decay"]
    config = ml_collections.ConfigDict(recorded)
    with pytest.raises(errors.ConfigError, match="^" + re.escape(_missing("weight_decay").format(
            run_json=os.path.join("run", "run.json"))) + "$"):
        with evaluate_lib.recorded_fields("run", meta, config):
            config.weight_decay  # noqa: B018


def test_a_config_that_fails_to_build_does_not_replace_the_error_reported(monkeypatch):
    """Telling another version's run.json from a misspelt field builds every config of the
    repository: one raising there replaced the one-line "written by another version" with
    its own traceback, unrelated to the run."""
    import configs.svhn

    def broken(arg=None):
        raise RuntimeError("a config's own bug")

    recorded = json.loads(load_config("cifar10:smoke").to_json())
    del recorded["weight_decay"]
    meta = {"config": recorded, "code_version": {"package": "0.0.1", "git": "abc1234"}}
    config = ml_collections.ConfigDict(recorded)
    monkeypatch.setattr(configs.svhn, "get_config", broken)
    evaluate_lib._config_fields.cache_clear()
    try:
        with pytest.raises(errors.ConfigError, match=re.escape(_missing("weight_decay").format(
                run_json=os.path.join("run", "run.json")))):
            with evaluate_lib.recorded_fields("run", meta, config):
                config.weight_decay  # noqa: B018
    finally:
        evaluate_lib._config_fields.cache_clear()  # not this test's configs for the next


def test_a_metrics_line_without_an_epoch_is_left_off_the_figures(tmp_path):
    """A line appended to a run's metrics.jsonl by hand or another tool, without an epoch,
    stopped --collect (and a sweep, after training) with a KeyError traceback."""
    root = str(tmp_path)
    name = _finished_run(root, 8, 0.5, 0.5)
    with open(os.path.join(root, name, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"note": "resubmitted", "test_error": 0.1, "epoch_time_s": 99.0,
                            "grad_first_conv_mean_abs": 1.0}) + "\n")
    sweep.write_figures(sweep.collect(root), os.path.join(root, "figures"), report=None)
    epochs = [[e, 0.01 * e] for e in (1, 2)]
    assert _sidecar(root, "fig7_first_conv_grad")["data"] == {name: epochs}
    # The table counts the 2 epochs and their time (the run's 2nd epoch: 8 x 0.5 = 4 s).
    with open(os.path.join(root, "figures", "training_time.md")) as f:
        assert f"| {name} | 8 | 0.5 | 2 | 4.000 |" in f.read()


def test_an_epoch_resumed_midway_counts_as_the_steps_it_timed(tmp_path):
    """The table averaged epoch times as if every record were a whole epoch: a run stopped
    and resumed in its 2nd epoch (its session timed 1 of the 4 steps, in 1 s) came out at
    (1 + 4) / 2 = 2.5 s an epoch instead of 4 s."""
    root = str(tmp_path)
    name = _finished_run(root, 8, 0.5, 0.5, "--config.num_epochs=3")
    path = os.path.join(root, name, "metrics.jsonl")
    records = [json.loads(line) for line in open(path)]
    records[1].update(epoch_time_s=1.0, images_per_s=32 / 1.0)  # 1 step of batch 32 timed
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    sweep.write_figures(sweep.collect(root), os.path.join(root, "figures"), report=None)
    with open(os.path.join(root, "figures", "training_time.md")) as f:
        assert f"| {name} | 8 | 0.5 | 3 | 4.000 | 32 |" in f.read()


def test_runs_of_another_config_are_drawn_as_separate_series(capsys, tmp_path):
    """A root holding runs of two configs (a later command gave depth 14 more epochs):
    --collect drew them as one curve per depth, and compared their epoch times. A ViT run
    in the root (no p_L) stopped it with a traceback."""
    root = str(tmp_path)
    _finished_run(root, 8, 1.0, 0.5)
    _finished_run(root, 14, 1.0, 0.6)
    _finished_run(root, 14, 0.5, 0.4, "--config.num_epochs=3", "--config.write_plots=false")
    os.makedirs(os.path.join(root, "vit"))  # a train.py run in the root: no p_L to draw
    with open(os.path.join(root, "vit", "run.json"), "w") as f:
        json.dump({"config": json.loads(load_config("cifar10_vit:smoke").to_json())}, f)
    with pytest.warns(logs.RunWarning, match="vit is a 'vit' run, which has no p_L: left out"):
        sweep_cli.main(["--root", root, "--collect"])
    out = capsys.readouterr().err
    fig8 = _sidecar(root, "fig8_error_vs_p_last")
    assert fig8["data"] == {"8 (num_epochs=2)": [[1.0, 0.5]], "14 (num_epochs=2)": [[1.0, 0.6]],
                            "14 (num_epochs=3)": [[0.5, 0.4]]}
    assert fig8["series"]["depth14_pL0.5"] == "num_epochs=3"
    assert ("figures: runs of different configs are drawn as separate series: num_epochs=2: "
            "depths 8, 14 x p_L 1 | num_epochs=3: depth 14 x p_L 0.5\n") in out
    with open(os.path.join(root, "figures", "training_time.md")) as f:
        rows = {line.split(" | ")[0][2:]: line for line in f if line.startswith("| depth")}
    # No constant-depth run of its config: no ratio to a run trained otherwise.
    assert rows["depth14_pL0.5"].startswith("| depth14_pL0.5 | num_epochs=3 | 14 | 0.5 | 3 |")
    assert rows["depth14_pL0.5"].endswith("| n/a |\n")


def _run(tmp_path, name, p_last, finished):
    records = [{"epoch": e, "epoch_time_s": 0.5, "images_per_s": 100.0,
                "grad_first_conv_mean_abs": 0.1} for e in (1, 2)]
    return {"name": name, "workdir": str(tmp_path / name), "depth": 8, "p_last": p_last,
            "finished": finished, "test_error": 0.9 if finished else None,
            "val_error": None, "final_test_error": None, "records": records}


def test_sweep_figures_name_the_unfinished_runs_without_warnings(tmp_path):
    """``--collect`` on an interrupted sweep: the table says which rows are partial, and a
    figure with nothing finished to plot is drawn without matplotlib's legend warning."""
    runs = [_run(tmp_path, "depth8_pL0.5", 0.5, finished=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Not a deprecation inside matplotlib (3.8.4 to 3.10.3 with pyparsing 3.3 warn
        # on import; hidden from users by Python's default filters).
        warnings.simplefilter("ignore", DeprecationWarning)
        outputs = sweep.write_figures(runs, str(tmp_path / "figures"))
    with open(outputs["training_time"]) as f:
        assert "Unfinished (interrupted, or extended and not done yet; their rows count the " \
               "epochs so far): depth8_pL0.5." in f.read()
    runs.append(_run(tmp_path, "depth8_pL1", 1.0, finished=True))
    runs[0]["test_error"] = 0.5  # an extended run's summary, of its earlier, shorter session
    with open(sweep.write_figures(runs, str(tmp_path / "figures"))["training_time"]) as f:
        text = f.read()
    assert "Unfinished" in text and "): depth8_pL0.5." in text and "depth8_pL1." not in text
    # Fig. 8 draws the finished run alone; its sidecar names the unfinished one it leaves out.
    fig8 = _sidecar(str(tmp_path), "fig8_error_vs_p_last")
    assert fig8["left_out"] == {"depth8_pL0.5": "unfinished"}
    assert fig8["data"] == {"8": [[1.0, 0.9]]}


def test_the_figures_lines_name_a_point_with_runs_of_several_series_once(tmp_path):
    """A second seed trained into the root (runs of two series at each point) was reported
    as 'depth 8 x p_L 0.5, 0.5, 1, 1', a grid of four values."""
    runs = [_run(tmp_path, f"depth8_pL{p:g}{seed}", p, finished=True)
            for p in (0.5, 1.0) for seed in ("", "_seed2")]
    for r in runs:
        seed = 2 if r["name"].endswith("_seed2") else 0
        r["config"] = json.loads(load_config("cifar10:smoke", [f"--config.seed={seed}"]).to_json())
    lines = []
    sweep.write_figures(runs, str(tmp_path / "figures"), report=lines.append)
    assert lines[0] == "figures: fig8_error_vs_p_last.png: 4 runs (depth 8 x p_L 0.5, 1)"
    assert lines[-1] == ("figures: runs of different configs are drawn as separate series: "
                         "seed=0: depth 8 x p_L 0.5, 1 | seed=2: depth 8 x p_L 0.5, 1")


def test_a_figure_that_fails_to_draw_does_not_cost_the_sweeps_table(tmp_path, monkeypatch):
    """The table was written after the figures: a drawing that raised (a bug, an odd
    matplotlib) once the runs had trained left no training_time.md."""
    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(figures, "plot_error_vs_p_last", broken)
    runs = [_run(tmp_path, "depth8_pL1", 1.0, finished=True)]
    with pytest.raises(RuntimeError, match="drawing failed"):
        sweep.write_figures(runs, str(tmp_path / "figures"), report=None)
    assert os.listdir(tmp_path / "figures") == ["training_time.md"]


def _saved_axes(monkeypatch):
    """file name -> the first axes of each figure saved from now on (read when saved)."""
    axes = {}
    save = figures.save_figure

    def saved(fig, path, *args, **kwargs):
        axes[os.path.basename(path)] = fig.axes[0]
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(figures, "save_figure", saved)
    return axes


def test_fig8_of_a_sweep_in_progress_names_its_unfinished_runs_under_the_title(
        tmp_path, monkeypatch):
    """Fig. 8 leaves the unfinished runs out: the PNG looked like the whole sweep's (only
    its sidecar named them), also where it replaced the figure of a finished grid."""
    axes = _saved_axes(monkeypatch)
    runs = [_run(tmp_path, "depth8_pL1", 1.0, finished=True)]
    sweep.write_figures(runs, str(tmp_path / "figures"), report=None)
    assert "unfinished" not in axes["fig8_error_vs_p_last.png"].get_title()
    runs.append(_run(tmp_path, "depth8_pL0.5", 0.5, finished=False))
    sweep.write_figures(runs, str(tmp_path / "figures"), report=None)
    assert axes["fig8_error_vs_p_last.png"].get_title().endswith(
        "\nnot drawn, unfinished: depth 8 x p_L 0.5")


@pytest.mark.parametrize("select, label", [
    ("validation", "test error at the best-validation epoch (%)"),
    ("test", "lowest test error of the evaluated epochs (%; chosen on the test set)"),
])
def test_fig8_s_axis_says_a_best_chosen_on_the_test_set(tmp_path, monkeypatch, select,
                                                          label):
    """Runs of select_best_by='test' (no validation split) were drawn as 'test error at
    the best-test epoch', which read as the paper's held-out figure: it is the lowest test
    error the run reached."""
    axes = _saved_axes(monkeypatch)
    runs = [_run(tmp_path, "depth8_pL1", 1.0, finished=True)]
    runs[0]["config"] = json.loads(load_config(
        "cifar10:smoke", [f"--config.select_best_by={select}"]).to_json())
    sweep.write_figures(runs, str(tmp_path / "figures"), report=None)
    assert axes["fig8_error_vs_p_last.png"].get_ylabel() == label


def test_figs_7_and_3_draw_the_deepest_depth_with_an_epoch(tmp_path):
    """A sweep that has just started its next depth (no epoch finished there yet): Figs. 7
    and 3 drew that depth's runs, which have no curve, and came out empty, replacing the
    figures of the depths finished before."""
    runs = [_run(tmp_path, "depth8_pL0.5", 0.5, finished=True),
            _run(tmp_path, "depth8_pL1", 1.0, finished=True),
            {**_run(tmp_path, "depth14_pL0.5", 0.5, finished=False), "depth": 14,
             "records": []}]
    for record in runs[0]["records"] + runs[1]["records"]:
        record.update(test_error=0.9, train_loss=2.3)
    sweep.write_figures(runs, str(tmp_path / "figures"), report=None)
    for figure in ("fig7_first_conv_grad", "fig3_error_curves"):
        drawn = _sidecar(str(tmp_path), figure)
        assert sorted(drawn["data"]) == ["depth8_pL0.5", "depth8_pL1"]
        assert drawn["left_out"] == {"depth14_pL0.5": "no finished epoch yet"}
    runs[2]["records"] = runs[0]["records"]  # its first epoch done: the deepest is drawn
    sweep.write_figures(runs, str(tmp_path / "figures"), report=None)
    assert list(_sidecar(str(tmp_path), "fig7_first_conv_grad")["data"]) == ["depth14_pL0.5"]


def test_fig_3_draws_the_papers_pair_where_a_sweep_has_more_p_lasts(tmp_path):
    """The paper's Fig. 3 sets constant depth beside p_L 0.5: a sweep of ten p_L values drew
    twenty overlapping curves there. Fig. 7 keeps every p_L; a sweep of only other values
    keeps all of them in Fig. 3 too."""
    runs = [_run(tmp_path, f"depth8_pL{p:g}", p, finished=True) for p in (0.2, 0.5, 0.8, 1.0)]
    for run in runs:
        for record in run["records"]:
            record.update(test_error=0.9, train_loss=2.3)
    lines = []
    sweep.write_figures(runs, str(tmp_path / "figures"), report=lines.append)
    fig3 = _sidecar(str(tmp_path), "fig3_error_curves")
    assert sorted(fig3["data"]) == ["depth8_pL0.5", "depth8_pL1"]
    why = "Fig. 3 compares constant depth with p_L 0.5, as the paper's"
    assert fig3["left_out"] == {"depth8_pL0.2": why, "depth8_pL0.8": why}
    assert len(_sidecar(str(tmp_path), "fig7_first_conv_grad")["data"]) == 4
    assert (f"figures: fig3_error_curves.png: 2 runs (depth 8 x p_L 0.5, 1); left out ({why}): "
            "depth 8 x p_L 0.2, 0.8") in lines
    sweep.write_figures(runs[:3], str(tmp_path / "figures"), report=None)  # no constant depth
    assert len(_sidecar(str(tmp_path), "fig3_error_curves")["data"]) == 3


def test_fig_3_draws_every_p_last_where_the_pair_has_no_curve_yet(tmp_path):
    """An interrupted sweep (``--collect``) whose constant-depth run has no finished epoch
    (it was stopped, or diverged, in its first): Fig. 3 drew p_L 0.5 alone and named the
    other p_L values, curves and all, as left out for a comparison it did not show."""
    runs = [_run(tmp_path, f"depth8_pL{p:g}", p, finished=True) for p in (0.2, 0.5, 0.8)]
    for run in runs:
        for record in run["records"]:
            record.update(test_error=0.9, train_loss=2.3)
    runs.append({**_run(tmp_path, "depth8_pL1", 1.0, finished=False), "records": []})
    lines = []
    sweep.write_figures(runs, str(tmp_path / "figures"), report=lines.append)
    fig3 = _sidecar(str(tmp_path), "fig3_error_curves")
    assert sorted(fig3["data"]) == ["depth8_pL0.2", "depth8_pL0.5", "depth8_pL0.8"]
    assert fig3["left_out"] == {}
    assert "figures: fig3_error_curves.png: 4 runs (depth 8 x p_L 0.2, 0.5, 0.8, 1)" in lines
    runs[3]["records"] = runs[0]["records"]  # its first epoch done: the pair only
    sweep.write_figures(runs, str(tmp_path / "figures"), report=None)
    assert sorted(_sidecar(str(tmp_path), "fig3_error_curves")["data"]) == [
        "depth8_pL0.5", "depth8_pL1"]


def test_a_one_epoch_sweep_is_described_as_one_epoch():
    config = load_config("cifar10", ["--config.num_epochs=1"]).to_dict()
    assert sweep.describe_data([{"config": config}]).endswith("; 1 epoch")  # not '1 epochs'


def test_the_training_time_table_counts_the_epochs_a_run_reached():
    """A run stopped at epoch 0.5 and resumed keeps that record before its whole epochs: its
    row read 3 epochs for 2."""
    def run(name, epochs):
        records = [{"epoch": e, "step": 4 * e, "epoch_time_s": 0.5, "images_per_s": 100.0}
                   for e in epochs]
        return {"name": name, "depth": 8, "p_last": 1.0, "records": records,
                "config": {"batch_size": 10}}

    table = sweep.figures.training_time_table([run("a", [0.5, 1, 2]), run("b", [1, 1.5])])
    rows = [line.split(" | ")[:4] for line in table.splitlines()[2:]]
    assert rows == [["| a", "8", "1", "2"], ["| b", "8", "1", "1.5"]]


def test_the_training_time_table_compares_each_run_with_constant_depth_of_its_depth():
    """The paper's Sec. 4 number (25% less time at p_L = 0.5) is the ratio of a run's mean
    epoch time to the constant-depth run of the same depth, its first epoch (warm-up) left
    out of the mean."""
    def run(depth, p_last, seconds):  # a 4-step epoch of batch 10: 40 images in `seconds`
        records = [{"epoch": e, "step": 4 * e, "epoch_time_s": t, "images_per_s": 40 / t}
                   for e, t in enumerate(seconds, 1)]
        return {"name": f"depth{depth}_pL{p_last:g}", "depth": depth, "p_last": p_last,
                "records": records, "config": {"batch_size": 10}}

    table = sweep.figures.training_time_table([
        run(8, 0.5, [30.0, 3.0, 3.0]), run(8, 1.0, [20.0, 4.0, 4.0]),
        run(14, 0.5, [9.0, 4.0, 4.0]), run(14, 1.0, [9.0, 8.0, 8.0])])
    rows = {cells[0]: cells[4:] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:])}
    assert rows == {"depth8_pL1": ["4.000", "10", "1.00"], "depth8_pL0.5": ["3.000", "13", "0.75"],
                    "depth14_pL1": ["8.000", "5", "1.00"],
                    "depth14_pL0.5": ["4.000", "10", "0.50"]}


def test_a_run_that_reached_its_max_steps_is_finished(tmp_path):
    """A sweep capped by --config.max_steps (a smoke sweep) ends each run at the cap, before
    its epochs: such a run is finished (skipped by a rerun, drawn in Fig. 8), and a higher
    cap extends it."""
    root = str(tmp_path)
    name = _finished_run(root, 8, 0.5, 0.5, "--config.max_steps=3")
    summary = os.path.join(root, name, "summary.json")
    with open(summary) as f:
        record = json.load(f)
    assert record["steps"] > 3  # the epochs' steps: the cap ends the run first
    with open(summary, "w") as f:
        json.dump(dict(record, steps=3), f)
    [(_, extra)] = sweep.plan([8], [0.5])
    config = load_config("cifar10:smoke", ["--config.max_steps=3"] + extra)
    status = sweep.run_sweep([(name, config)], root, train=lambda c, w: pytest.fail(w))
    assert status == {name: "skipped (finished)"}
    assert [r["finished"] for r in sweep.collect(root)] == [True]
    longer = load_config("cifar10:smoke", ["--config.max_steps=5"] + extra)
    assert not sweep.is_finished(os.path.join(root, name), longer)


@pytest.mark.parametrize("override, change", [
    ("--config.seed=1", "seed: 0 -> 1"),
    ("--config.validation_size=8", "validation_size: 32 -> 8"),
])
def test_a_sweep_repeated_with_another_seed_or_split_is_refused_its_runs(tmp_path, override,
                                                                       change):
    """A second seed of a sweep (or another validation split) given the first one's root
    would find its runs finished and report their results as its own."""
    root = str(tmp_path)
    name = _finished_run(root, 8, 0.5, 0.5)
    [(_, extra)] = sweep.plan([8], [0.5])
    config = load_config("cifar10:smoke", [override] + extra)
    with pytest.raises(errors.ConfigError, match=re.escape(change)):
        sweep.run_sweep([(name, config)], root, train=lambda c, w: pytest.fail(w))


def test_sweep_figures_without_matplotlib_write_the_table_and_say_so(tmp_path, monkeypatch):
    """Without matplotlib a sweep's runs trained, then it ended in a traceback, its table
    not written: now the table is, and one warning names the figures and how to draw them."""
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # its import fails
    runs = [_run(tmp_path / "sweep", "depth8_pL1", 1.0, finished=True)]
    out = tmp_path / "sweep" / "figures"
    with pytest.warns(logs.RunWarning) as caught:
        outputs = sweep.write_figures(runs, str(out), report=None)
    [message] = warned.messages(caught, logs.RunWarning)
    assert message.startswith("fig8_error_vs_p_last.png, fig7_first_conv_grad.png and "
                              "fig3_error_curves.png not drawn: matplotlib cannot be imported")
    assert message.endswith(f"then 'python sweep.py --root {tmp_path / 'sweep'} --collect' "
                            "draws them.")
    assert outputs == {"training_time": str(out / "training_time.md")}
    assert os.listdir(out) == ["training_time.md"]
    # A Python caller's own directory: sweep.py --collect would draw into <root>/figures.
    with pytest.warns(logs.RunWarning) as caught:
        sweep.write_figures(runs, str(tmp_path / "mine"), report=None)
    [message] = warned.messages(caught, logs.RunWarning)
    assert message.endswith(f"then sweep.write_figures(..., '{tmp_path / 'mine'}') called "
                            "again draws them.")


def test_stop_signals_nested_never_lose_a_request(capsys):
    """A request the inner object did not act on reaches the enclosing one, and one pending
    in the enclosing object is the inner one's from its start."""
    before = signal.getsignal(signal.SIGTERM)
    with stopping.StopSignals(when="before the next run") as outer:
        os.kill(os.getpid(), signal.SIGINT)  # between runs: the enclosing one says what follows
        assert outer.signum == signal.SIGINT
        assert "SIGINT received: stopping before the next run (Ctrl-C" in capsys.readouterr().out
    with stopping.StopSignals() as outer:
        with stopping.StopSignals() as inner:
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. during a run's last evaluation
            assert inner.signum == signal.SIGTERM and outer.signum is None
        assert outer.signum == signal.SIGTERM
        with stopping.StopSignals() as next_inner:
            assert next_inner.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_after_a_runs_last_stop_point_stops_the_sweep_before_the_next_run(tmp_path):
    """SIGTERM during the first run's final evaluation (after its last stop point): the
    sweep does not start the second run; it raises Stopped, saying how to go on."""
    trained = []

    def train(config, workdir):  # a run that finishes despite the signal, as the loop does
        with stopping.StopSignals():
            trained.append(os.path.basename(workdir))
            if len(trained) == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    runs = [(name, load_config("cifar10:smoke", extra))
            for name, extra in sweep.plan([8], [0.5, 1.0])]
    with pytest.raises(stopping.Stopped) as stopped:
        sweep.run_sweep(runs, str(tmp_path / "runs"), train=train)
    assert trained == [runs[0][0]]
    assert stopped.value.exit_status == 128 + signal.SIGTERM
    assert "1 of 2 runs finished" in str(stopped.value)
    assert str(stopped.value).endswith("call run_sweep again with the same runs and root to resume.")
    assert stopped.value.command_line.endswith("run the same command to resume.")


def test_a_signal_while_a_run_sets_up_says_the_run_stops_at_its_first_stop_point(
        tmp_path, capsys):
    """Ctrl-C while a run of the sweep loads its data and compiles (before its own handler
    is installed) is pending for the run, which stops at its first stop point with a
    checkpoint: the line printed said 'before the next run of the sweep starts'."""
    seen = []

    def train(config, workdir):
        os.kill(os.getpid(), signal.SIGINT)  # setting up: the sweep's handler gets it
        with stopping.StopSignals() as own:  # the run's, as the loop installs it
            seen.append(own.signum)

    runs = [(name, load_config("cifar10:smoke", extra))
            for name, extra in sweep.plan([8], [0.5, 1.0])]
    with pytest.raises(stopping.Stopped):
        sweep.run_sweep(runs, str(tmp_path / "runs"), train=train)
    assert seen == [signal.SIGINT]  # pending for the run from its start, and only one ran
    out = capsys.readouterr().out
    assert (f"SIGINT received: stopping {runs[0][0]} once it has set up and saved a checkpoint "
            "at its first stop point") in out
    assert "before the next run" not in out


def test_an_interrupted_table_leaves_the_earlier_one(tmp_path, monkeypatch):
    """Ctrl-C while training_time.md was being made (the table is computed after the file
    is opened) left it empty: the earlier table was lost, as the figures' never are."""
    root = str(tmp_path)
    _finished_run(root, 8, 0.5, 0.5)
    out = os.path.join(root, "figures")
    table = sweep.write_figures(sweep.collect(root), out, report=None)["training_time"]
    with open(table) as f:
        before = f.read()

    def interrupted(runs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep.figures, "training_time_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep.write_figures(sweep.collect(root), out, report=None)
    with open(table) as f:
        assert f.read() == before
    assert sorted(os.listdir(out)) == sorted(  # no temporary file left beside it
        f"{n}{e}" for n in ("fig8_error_vs_p_last", "fig7_first_conv_grad", "fig3_error_curves")
        for e in (".png", ".json")) + ["training_time.md"]


@pytest.mark.parametrize("damage", ['{"steps": 8, "steps_per', "[]", '{"steps": 8}',
                                    '{"steps": "8", "steps_per_epoch": 4}'])
def test_a_damaged_summary_is_an_unfinished_run_named_in_a_warning(capsys, tmp_path, damage):
    """A run's summary.json cut short (a copy interrupted), not an object, or without a
    step count stopped --collect, and a sweep, with a JSONDecodeError (AttributeError,
    KeyError, TypeError) traceback; it is a run to finish, as train.py reads it."""
    root = str(tmp_path)
    name = _finished_run(root, 8, 0.5, 0.5)
    _finished_run(root, 8, 1.0, 0.6)
    path = os.path.join(root, name, "summary.json")
    with open(path, "w") as f:
        f.write(damage)
    with pytest.warns(logs.RunWarning, match=re.escape(f"{path} is damaged (")):
        sweep_cli.main(["--root", root, "--collect"])
    assert _sidecar(root, "fig8_error_vs_p_last")["left_out"] == {name: "unfinished"}
    trained = []
    runs = [(n, load_config("cifar10:smoke", extra)) for n, extra in sweep.plan([8], [0.5, 1.0])]
    with pytest.warns(logs.RunWarning, match="the run counts as unfinished"):
        status = sweep.run_sweep(runs, root, train=lambda c, w: trained.append(w))
    assert trained == [os.path.join(root, name)]
    assert status == {name: "started", "depth8_pL1": "skipped (finished)"}  # no checkpoints


def test_a_damaged_run_json_is_left_out_of_the_figures_and_named(capsys, tmp_path):
    """One run's run.json cut short stopped --collect for every run ('restore it from a
    copy or rerun'); a sweep over it said 'or rerun', and rerunning it said the same."""
    root = str(tmp_path)
    name = _finished_run(root, 8, 0.5, 0.5)
    _finished_run(root, 8, 1.0, 0.6)
    path = os.path.join(root, name, "run.json")
    with open(path, "w") as f:
        f.write('{"config": {')
    with pytest.warns(logs.RunWarning, match=re.escape(
            f"{path} is damaged (JSONDecodeError: ") + r".*\); it is left out of the sweep's "
            r"figures \(restore it from a copy, or remove the run to retrain it\)\.$"):
        sweep_cli.main(["--root", root, "--collect"])
    assert _sidecar(root, "fig8_error_vs_p_last")["sources"] == [
        os.path.join(root, "depth8_pL1")]
    line = one_line_error(capsys, sweep_cli.main, _sweep_argv(root, p_last="0.5,1.0"))
    assert line.endswith(f"; restore it from a copy, or remove {os.path.join(root, name)} to "
                         "retrain it.")


def test_the_subtitle_names_an_augmentation_that_is_not_the_datasets():
    """A sweep of un-augmented CIFAR-10 was subtitled as the paper's CIFAR-10+ ('cifar10,
    ...'), though each run's curves say 'cifar10 (no augmentation)'."""
    none = json.loads(load_config("cifar10:smoke", ["--config.augment=none"]).to_json())
    own = json.loads(load_config("cifar10:smoke", ["--config.augment=flip_translate"]).to_json())
    assert sweep.describe_data([{"config": none}] * 2).startswith(
        "cifar10 (no augmentation), FAKE random-label data (160 images generated;")
    assert sweep.describe_data([{"config": own}]).startswith("cifar10, FAKE random-label")
    assert sweep.describe_data([{"config": none}, {"config": own}]).startswith(
        "cifar10, FAKE random-label")  # two series, labelled by augment


def test_the_datasets_own_augmentation_named_is_the_same_config_as_auto(tmp_path):
    """'auto' and the dataset's own augmentation named train identically, yet a sweep
    rerun naming it was refused as another config, and the two drawn as two series."""
    root = str(tmp_path)
    auto = _finished_run(root, 8, 0.5, 0.5)
    named = _finished_run(root, 8, 1.0, 0.6, "--config.augment=flip_translate")
    runs = [(n, load_config("cifar10:smoke", ["--config.augment=flip_translate", *extra]))
            for n, extra in sweep.plan([8], [0.5, 1.0])]
    status = sweep.run_sweep(runs, root, train=lambda c, w: pytest.fail(f"trained {w}"))
    assert status == {auto: "skipped (finished)", named: "skipped (finished)"}
    assert set(sweep.label_series(sweep.collect(root)).values()) == {""}  # one series
    # Another augmentation, or 'auto' on a dataset whose own is another, is a change.
    change = config_lib.config_changes({"dataset": "svhn", "augment": "auto"},
                                       {"dataset": "svhn", "augment": "flip_translate"})
    assert change == {"augment": {"old": "auto", "new": "flip_translate"}}
    with pytest.raises(errors.ConfigError, match=r"augment: 'auto' -> 'none'"):
        sweep.run_sweep([(auto, load_config("cifar10:smoke", [
            "--config.augment=none", *sweep.plan([8], [0.5])[0][1]]))], root,
            train=lambda c, w: pytest.fail(f"trained {w}"))


def _training(root, trained, diverge=()):
    """A ``train(config, workdir)`` that prints a line as training does and leaves the
    records of a finished run, or, for the runs named in ``diverge``, those of a run whose
    loss became NaN in its second epoch (no summary; the loop's error)."""
    def train(config, workdir):
        name = os.path.basename(workdir)
        trained.append(name)
        print(f"epoch 1/2: train loss 2.3 ({name})", flush=True)  # the loop prints on stdout
        _finished_run(root, config.model.depth, config.model.final_survival_prob, 0.4)
        if name in diverge:
            os.remove(os.path.join(workdir, "summary.json"))
            error = loop.NonFiniteLossError(
                "Non-finite training loss at step 5 (epoch 2); stopping without saving the "
                "broken state; no checkpoint had been saved yet. Try a lower "
                "--config.learning_rate or another --config.seed.")
            error.step, error.epoch = 5, 2
            raise error
    return train


def _json_objects(text):
    """The JSON values ``text`` holds one after another (``jq`` reads such a stream);
    fails on anything else in it."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        value, at = decoder.raw_decode(text, at)
        values.append(value)
    return values


def test_sweep_s_stdout_is_its_json_alone(capsys, tmp_path, monkeypatch):
    """`sweep.py ... | jq` failed: stdout mixed the runs' training lines, 'sweep: starting'
    and the figures' report with the two JSON objects the README says it prints."""
    root, trained = str(tmp_path), []
    monkeypatch.setattr(loop, "train_and_evaluate", _training(root, trained))
    sweep_cli.main(_sweep_argv(root, p_last="0.5,1.0"))
    out, err = capsys.readouterr()
    status, outputs = _json_objects(out)
    assert status == {"depth8_pL0.5": "started", "depth8_pL1": "started"}
    assert sorted(outputs) == ["fig3", "fig7", "fig8", "training_time"]
    for line in ("sweep: starting depth8_pL0.5 (1 of 2)",
                 "epoch 1/2: train loss 2.3 (depth8_pL1)",
                 "figures: fig8_error_vs_p_last.png: 2 runs (depth 8 x p_L 0.5, 1)"):
        assert line + "\n" in err
    sweep_cli.main(["--root", root, "--collect"])
    out, err = capsys.readouterr()
    assert _json_objects(out) == [outputs] and "figures: fig8" in err


def _unmeasure_best(root, name):
    """Gives a finished run's summary.json an earlier version's best: chosen by training
    error among epochs no evaluation measured, without a test error."""
    path = os.path.join(root, name, "summary.json")
    with open(path) as f:
        summary = json.load(f)
    summary["best"] = {"metric": "train_error", "epoch": 1, "step": 4, "value": 0.3}
    with open(path, "w") as f:
        json.dump(summary, f)
    return summary["steps"]


def _keep_checkpoint(root, name, steps, kind="checkpoints"):
    """A checkpoint of a finished run (its last step's, or ``kind='checkpoints_best'``), as
    training leaves it: a directory named by the step is what the sweep lists."""
    os.makedirs(os.path.join(root, name, kind, str(steps)))


@pytest.mark.parametrize("measures", [True, False])
def test_a_finished_run_s_unmeasured_best_is_measured_by_the_sweep_or_named(
        capsys, tmp_path, monkeypatch, measures):
    """A finished run whose best an earlier version never measured on the test set: the
    sweep skipped it (only train.py run on it measured it), and Fig. 8 counted it among
    its runs with no point drawn and nothing said. Its command now runs it again (training
    measures the 'best' checkpoint: 'Nothing to train'); where that fails, and with
    --collect, Fig. 8 names it as not drawn and what measures it."""
    root, called = str(tmp_path), []
    names = [_finished_run(root, 8, p, 0.5) for p in (0.5, 1.0)]
    _keep_checkpoint(root, names[0], _unmeasure_best(root, names[0]))
    _keep_checkpoint(root, names[0], 4, "checkpoints_best")

    def train(config, workdir):  # a finished run run again: its best measured, or not
        called.append(os.path.basename(workdir))
        if measures:
            with open(os.path.join(workdir, "summary.json")) as f:
                summary = json.load(f)
            summary["best"].update(test_error=0.25, val_error=0.3)
            with open(os.path.join(workdir, "summary.json"), "w") as f:
                json.dump(summary, f)

    sweep_cli.main(["--root", root, "--collect"])
    err = capsys.readouterr().err
    fig8 = _sidecar(root, "fig8_error_vs_p_last")
    assert fig8["left_out"] == {names[0]: sweep.UNMEASURED_BEST}
    assert fig8["data"] == {"8": [[1.0, 0.5]]}
    assert (f"figures: fig8_error_vs_p_last.png: 1 run (depth 8 x p_L 1); left out "
            f"({sweep.UNMEASURED_BEST}): depth 8 x p_L 0.5\n") in err
    monkeypatch.setattr(loop, "train_and_evaluate", train)
    sweep_cli.main(_sweep_argv(root, p_last="0.5,1.0"))
    out, err = capsys.readouterr()
    status, _ = _json_objects(out)
    assert called == [names[0]]  # the measured run is skipped, as before
    assert (f"sweep: measuring {names[0]}'s best on the test set (1 of 2; finished, its best "
            "never measured by an earlier version)\n") in err
    fig8 = _sidecar(root, "fig8_error_vs_p_last")
    if measures:
        assert status == {names[0]: "skipped (finished; its best measured now)",
                          names[1]: "skipped (finished)"}
        assert fig8["left_out"] == {} and fig8["data"] == {"8": [[0.5, 0.25], [1.0, 0.5]]}
    else:
        assert status[names[0]] == "skipped (finished; its best could not be measured)"
        assert fig8["left_out"] == {names[0]: sweep.UNMEASURED_BEST}


@pytest.mark.parametrize("kept, best, holder, why", [
    ([], 4, None, "its last checkpoint (step 8) is not in {dir} (it has none), and run again "
                  "without it the run would train instead; python evaluate.py --workdir {run} "
                  "measures its 'best' checkpoint"),
    ([4], 4, None, "its last checkpoint (step 8) is not in {dir} (its newest: step 4)"),
    ([4, 12], 4, None, "its last checkpoint (step 8) is not in {dir} (its newest: step 12)"),
    ([8], 4, "pid 12 on host 'gpu1' (started 2026-01-02 03:04:05)",
     "pid 12 on host 'gpu1' (started 2026-01-02 03:04:05) is training it; run the sweep's "
     "command again once that is done"),
    ([8], None, None, "its 'best' checkpoint (step 4) is not in {run}/checkpoints_best."),
])
def test_a_finished_run_s_unmeasured_best_is_left_where_running_it_would_train_it(
        capsys, tmp_path, monkeypatch, kept, best, holder, why):
    """The sweep runs a finished run again to measure its best: without the checkpoint of
    its last step (checkpoints/ removed to save space, keeping checkpoints_best), training
    started afresh from step 0 (or trained on from an older or newer one) and replaced
    the finished run's records; while another process trained it (extending it), the sweep
    stopped, the workdir busy; without its 'best' checkpoint, each command loaded the data
    to find it gone. It is left as it is, the warning saying why."""
    root, called = str(tmp_path), []
    name = _finished_run(root, 8, 0.5, 0.5)
    _unmeasure_best(root, name)
    for step in kept:
        _keep_checkpoint(root, name, step)
    if best is not None:
        _keep_checkpoint(root, name, best, "checkpoints_best")
    summary = os.path.join(root, name, "summary.json")
    with open(summary, "rb") as f:
        before = f.read()
    monkeypatch.setattr(loop, "train_and_evaluate",
                        lambda config, workdir: called.append(workdir))
    monkeypatch.setattr(workdir_lib, "training_holder", lambda workdir: holder)
    with pytest.warns(logs.RunWarning) as caught:
        sweep_cli.main(_sweep_argv(root))
    out, err = capsys.readouterr()
    assert called == [] and "sweep: measuring" not in err
    assert _json_objects(out)[0] == {name: "skipped (finished; its best could not be measured)"}
    workdir = os.path.join(root, name)
    expected = why.format(dir=os.path.join(workdir, "checkpoints"), run=workdir)
    [message] = [str(w.message) for w in caught if "never measured" in str(w.message)]
    assert message.startswith(f"{name}: its best was never measured on the test set (an "
                              "earlier version's) and is not measured now: " + expected)
    with open(summary, "rb") as f:
        assert f.read() == before
    assert _sidecar(root, "fig8_error_vs_p_last")["left_out"] == {name: sweep.UNMEASURED_BEST}


def test_fig8_names_a_finished_run_whose_test_error_is_not_finite(tmp_path):
    """A NaN test error was drawn as a gap in its depth's line, the run counted as drawn."""
    runs = [_run(tmp_path, "depth8_pL1", 1.0, finished=True),
            {**_run(tmp_path, "depth8_pL0.5", 0.5, finished=True), "test_error": float("nan")}]
    lines = []
    sweep.write_figures(runs, str(tmp_path / "figures"), report=lines.append)
    fig8 = _sidecar(str(tmp_path), "fig8_error_vs_p_last")
    assert fig8["left_out"] == {"depth8_pL0.5": "the test error of its best is nan in its "
                                                "summary.json"}
    assert fig8["data"] == {"8": [[1.0, 0.9]]}
    assert lines[0].startswith("figures: fig8_error_vs_p_last.png: 1 run (depth 8 x p_L 1)")


def test_each_run_s_line_says_its_place_and_once_timed_the_time_left(capsys, tmp_path,
                                                                     monkeypatch):
    """'sweep: starting <run>' said neither where the run stood in the sweep nor how long
    the rest would take. The estimate comes once a run has finished training, for the runs
    left to train (not the finished ones, skipped), by the steps each has left (a resumed
    run's from its checkpoint) and the blocks a step is expected to compute (the survival
    probabilities' sum: fewer at a lower p_L). It was in proportion to depth and counted a
    resumed run as a whole one: 9 and 5 min here, where the runs take 11 and 8."""
    root = str(tmp_path)
    _finished_run(root, 8, 1.0, 0.4)  # skipped
    os.makedirs(os.path.join(root, "depth14_pL0.5", "checkpoints", "4"))  # resumed at step 4
    clock = [0.0]
    monkeypatch.setattr(sweep, "_now", lambda: clock[0])
    # Blocks a step computes, p_l = 1 - l/L (1 - p_L): ResNet-8 has 3 blocks, ResNet-14 6.
    expected = {(8, 0.5): 5 / 6 + 4 / 6 + 3 / 6, (14, 0.5): sum(1 - l / 12 for l in range(1, 7)),
                (14, 1.0): 6.0}

    def train(config, workdir):  # 10 s a block a step, for the steps the run has left
        name = os.path.basename(workdir)
        start = 4 if name == "depth14_pL0.5" else 0
        steps = config.num_epochs * 4  # 4 steps an epoch
        clock[0] += 10 * (steps - start) * expected[(config.model.depth,
                                                     config.model.final_survival_prob)]
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({"steps": steps, "steps_per_epoch": 4}, f)

    runs = [(name, load_config("cifar10:smoke", extra))
            for name, extra in sweep.plan([8, 14], [0.5, 1.0])]
    status = sweep.run_sweep(runs, root, train=train)
    assert list(status.values()) == ["started", "skipped (finished)", "resumed", "started"]
    left = "left for the {} to train, this one included (estimated from the {} trained so " \
           "far, by the steps left and the blocks a step is expected to compute, the " \
           "evaluations left and the model's blocks, plus each run's set-up)"
    # After depth8_pL0.5: 4 steps x 4.25 blocks + 8 x 6 = 65 block-steps, 650 s; after the
    # resumed run, 8 x 6, 480 s.
    assert [x for x in capsys.readouterr().out.splitlines() if x.startswith("sweep:")] == [
        "sweep: starting depth8_pL0.5 (1 of 4)",
        "sweep: resuming depth14_pL0.5 (3 of 4); about 11 min " + left.format("2 runs", "1 run"),
        "sweep: starting depth14_pL1 (4 of 4); about 8 min " + left.format("1 run", "2 runs")]
    masked = load_config("cifar10:smoke", ["--config.model.implementation=mask"])
    assert sweep._step_blocks(masked) == 3.0  # computed and masked: every block


def test_the_time_left_counts_a_short_resumed_run_s_set_up_once_per_run_not_as_training(
        capsys, tmp_path, monkeypatch):
    """A resumed run with 1 step of 100 left took its minute of set-up and compilation for
    training: 31 s a block-step where training took 1, so the next line said 8.8 h for the
    runs that take 19 min (and 13 min for the last, not 11). The rate now comes from the seconds
    the runs record training (summary.json's train_time_s_this_session), and the rest of
    a run's time (set-up, compilation, evaluation) is added once for each run left."""
    root, epochs = str(tmp_path), "--config.num_epochs=25"  # 100 steps of 4 an epoch
    _finished_run(root, 8, 1.0, 0.4, epochs)  # skipped
    os.makedirs(os.path.join(root, "depth8_pL0.5", "checkpoints", "99"))  # 1 step left
    clock = [0.0]
    monkeypatch.setattr(sweep, "_now", lambda: clock[0])
    blocks = {(8, 0.5): 5 / 6 + 4 / 6 + 3 / 6, (14, 0.5): sum(1 - l / 12 for l in range(1, 7)),
              (14, 1.0): 6.0}

    def train(config, workdir):  # 60 s of set-up, then 1 s a block a step
        start = 99 if os.path.basename(workdir) == "depth8_pL0.5" else 0
        training = (100 - start) * blocks[(config.model.depth, config.model.final_survival_prob)]
        clock[0] += 60 + training
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({"steps": 100, "steps_per_epoch": 4,
                       "train_time_s_this_session": training}, f)

    runs = [(name, load_config("cifar10:smoke", [epochs] + extra))
            for name, extra in sweep.plan([8, 14], [0.5, 1.0])]
    status = sweep.run_sweep(runs, root, train=train)
    assert list(status.values()) == ["resumed", "skipped (finished)", "started", "started"]
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("sweep:")]
    # 100 x 4.25 + 100 x 6 block-steps at 1 s, + 2 x 60 s: 1145 s; then 600 + 60 s.
    assert [x.split("; about ")[-1].split(" left")[0] for x in lines] == [
        "sweep: resuming depth8_pL0.5 (1 of 4)", "19 min", "11 min"]
    assert lines[1].endswith("by the steps left and the blocks a step is expected to compute, "
                             "the evaluations left and the model's blocks, plus each run's "
                             "set-up)")


def test_the_time_left_counts_the_evaluations_each_run_has_left_at_its_depth(
        capsys, tmp_path, monkeypatch):
    """The runs' evaluating time was part of the time added once for each run left: a run
    resumed for its last epoch (one evaluation) was counted a whole run's 25, and a deeper
    run's evaluations (every block, none dropped) those of the shallow run timed. Here 28
    and 22 min were said where the runs take 30 and 29; the evaluations are now counted by
    those each run has left (metrics.jsonl's eval_time_s giving the rate), times its
    blocks."""
    root, epochs = str(tmp_path), "--config.num_epochs=25"  # 100 steps of 4 an epoch
    os.makedirs(os.path.join(root, "depth8_pL1", "checkpoints", "96"))  # 1 epoch left
    clock = [0.0]
    monkeypatch.setattr(sweep, "_now", lambda: clock[0])
    blocks = {(8, 0.5): 5 / 6 + 4 / 6 + 3 / 6, (8, 1.0): 3.0,
              (14, 0.5): sum(1 - l / 12 for l in range(1, 7)), (14, 1.0): 6.0}

    def train(config, workdir):  # 60 s of set-up, 1 s a block a step, 2 s a block evaluated
        model = config.model
        start = 96 if os.path.basename(workdir) == "depth8_pL1" else 0
        training = (100 - start) * blocks[(model.depth, model.final_survival_prob)]
        evaluation = 2 * (model.depth - 2) // 2  # an epoch's: ResNet-8 3 blocks, ResNet-14 6
        clock[0] += 60 + training + evaluation * (100 - start) // 4
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({"steps": 100, "steps_per_epoch": 4,
                       "train_time_s_this_session": training}, f)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            for epoch in range(1, 26):  # an earlier session's records too: not counted
                f.write(json.dumps({"epoch": epoch, "step": 4 * epoch,
                                    "eval_time_s": evaluation}) + "\n")

    runs = [(name, load_config("cifar10:smoke", [epochs] + extra))
            for name, extra in sweep.plan([8, 14], [0.5, 1.0])]
    status = sweep.run_sweep(runs, root, train=train)
    assert list(status.values()) == ["started", "resumed", "started", "started"]
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("sweep:")]
    # Left after the first run: 4 x 3 + 6 + 60 s; 100 x 4.25 + 25 x 12 + 60; 600 + 300 + 60:
    # 1823 s. After the second: 1745 s.
    assert [x.split("; about ")[-1].split(" left")[0] for x in lines] == [
        "sweep: starting depth8_pL0.5 (1 of 4)", "30 min", "29 min", "16 min"]
    # The evaluations left: every eval_every_epochs-th epoch's end, every eval_every_steps
    # steps, the last step; each step once.
    for extra, start in ((["--config.eval_every_epochs=2"], 0),
                         (["--config.eval_every_epochs=3", "--config.eval_every_steps=6"], 0),
                         (["--config.eval_every_steps=6"], 50), ([], 100)):
        config = load_config("cifar10:smoke", [epochs] + extra)
        every, n = 4 * config.eval_every_epochs, config.eval_every_steps
        assert sweep._evaluations(config, 4, start) == sum(
            1 for s in range(start + 1, 101) if s % every == 0 or s == 100 or n and s % n == 0)


def test_the_blocks_a_step_computes_count_compact_mode_s_padding_and_the_masked_blocks():
    """The estimate took the survival probabilities' sum for compact mode and 'loop' too,
    which compute each stage's first block (and an unscanned stage) in full, and compact
    mode rounds a stage's kept count up to its multiple."""
    def config(*extra):
        return load_config("cifar10:smoke", ["--config.model.depth=20", "--config.model.scan=True",
                                             "--config.model.final_survival_prob=0.5", *extra])
    p = [1 - l / 18 for l in range(1, 10)]  # ResNet-20: 3 stages of 3 blocks
    rest = [p[1:3], p[4:6], p[7:9]]  # each stage's scanned blocks, after its first
    assert sweep._step_blocks(config()) == pytest.approx(sum(p))  # lax.cond: what survives
    assert sweep._step_blocks(config("--config.model.implementation=loop")) == pytest.approx(
        sum(1 + a + b for a, b in rest))
    # Multiple 4, capped at the stage's 2 scanned blocks: a scan of 1 with none kept, else 2.
    assert sweep._step_blocks(config("--config.model.compact_multiple=4")) == pytest.approx(
        sum(1 + 2 - (1 - a) * (1 - b) for a, b in rest))
    assert sweep._step_blocks(config("--config.model.compact_multiple=4",
                                     "--config.model.scan=False")) == 9.0  # all masked


def test_the_up_front_read_of_the_runs_leaves_each_damaged_record_warned_once_at_its_run(
        tmp_path):
    """The time left needs the runs to train, read before the first one trains: that read
    must neither say a damaged summary.json or diverged.json early (above the runs before
    it) nor a second time, nor change which runs train."""
    root = str(tmp_path)
    runs = [(name, load_config("cifar10:smoke", extra))
            for name, extra in sweep.plan([8, 14], [1.0])]
    damaged = [os.path.join(root, runs[0][0], "summary.json"),
               os.path.join(root, runs[1][0], sweep.DIVERGED_FILE)]
    for path in damaged:
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write("{")
    said_before = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = sweep.run_sweep(runs, root, train=lambda config, workdir: said_before.setdefault(
            os.path.basename(workdir), [str(w.message).split(" is damaged")[0] for w in caught]))
    assert status == {name: "started" for name, _ in runs}
    assert said_before == {runs[0][0]: damaged[:1], runs[1][0]: damaged}
    assert [str(w.message).split(" is damaged")[0] for w in caught] == damaged


def test_a_diverged_run_is_recorded_and_the_sweep_goes_on(capsys, tmp_path, monkeypatch):
    """A run whose loss became NaN stopped the sweep, and every rerun diverged again at
    the same step: the rest of the grid never trained. Now it is recorded as diverged, the
    others train and are drawn, and the command ends with status 1 naming it; a rerun skips
    it (trained again, it diverges again) and says so again."""
    root, trained = str(tmp_path), []
    monkeypatch.setattr(loop, "train_and_evaluate",
                        _training(root, trained, diverge={"depth8_pL0.5"}))
    argv = _sweep_argv(root, p_last="0.5,1.0")
    for attempt, was in enumerate(("diverged at epoch 2", "skipped (diverged at epoch 2)")):
        with pytest.warns(logs.RunWarning) if not attempt else warnings.catch_warnings():
            with pytest.raises(SystemExit) as info:
                sweep_cli.main(argv)
        assert info.value.code == 1
        out, err = capsys.readouterr()
        status, _ = _json_objects(out)
        finished = "skipped (finished)" if attempt else "started"
        assert status == {"depth8_pL0.5": was, "depth8_pL1": finished}
        assert trained == ["depth8_pL0.5", "depth8_pL1"]  # the diverged run is not retried
        assert "Traceback" not in err
        [line] = [x for x in err.splitlines() if x.startswith("error:")]
        assert line == (
            "error: 1 of 2 runs diverged (non-finite loss): depth8_pL0.5 at epoch 2; Fig. 8 "
            "leaves them out, the other figures and the table mark them, and a rerun skips "
            f"them. To train one again, remove its directory (e.g. rm -r {root}/depth8_pL0.5)"
            ", then run the same command (the same config may diverge again: a sweep with a "
            "lower --config.learning_rate or another --config.seed needs a new --root).")
        fig8 = _sidecar(root, "fig8_error_vs_p_last")
        assert fig8["data"] == {"8": [[1.0, 0.4]]}
        assert fig8["left_out"] == {"depth8_pL0.5": "diverged at epoch 2"}
        assert ("figures: fig8_error_vs_p_last.png: 1 run (depth 8 x p_L 1); left out "
                "(diverged at epoch 2): depth 8 x p_L 0.5\n") in err
        with open(os.path.join(root, "figures", "training_time.md")) as f:
            table = f.read()
        assert ("Diverged (non-finite training loss or parameters; their rows count the "
                "epochs before it): depth8_pL0.5 at epoch 2.") in table
        assert "Unfinished" not in table
    with open(os.path.join(root, "depth8_pL0.5", sweep.DIVERGED_FILE)) as f:
        record = json.load(f)
    assert (record["step"], record["epoch"], record["kept_step"]) == (5, 2, 0)
    assert record["error"].startswith("Non-finite training loss at step 5 (epoch 2)")
    # --collect only draws: the diverged run marked, no error.
    sweep_cli.main(["--root", root, "--collect"])
    [run] = [r for r in sweep.collect(root) if r["name"] == "depth8_pL0.5"]
    assert not run["finished"] and run["diverged"]["epoch"] == 2
    assert figures._run_label({**run, "series": ""}).endswith(" (diverged at epoch 2)")


@pytest.mark.parametrize("newest, expected", [(4, "skipped (diverged at epoch 2)"),
                                              (8, "resumed")])
def test_a_diverged_run_trained_past_it_since_is_resumed(tmp_path, newest, expected):
    """A run recorded as diverged is skipped while its newest checkpoint is the one kept
    when it diverged; one with a newer checkpoint (trained past it since, e.g. by train.py)
    resumes."""
    root, trained = str(tmp_path), []
    name = _finished_run(root, 8, 0.5, 0.4)
    os.remove(os.path.join(root, name, "summary.json"))
    with open(os.path.join(root, name, sweep.DIVERGED_FILE), "w") as f:
        json.dump({"step": 5, "epoch": 2, "kept_step": 4}, f)
    os.makedirs(os.path.join(root, name, "checkpoints", str(newest)))
    runs = [(n, load_config("cifar10:smoke", extra)) for n, extra in sweep.plan([8], [0.5])]
    status = sweep.run_sweep(runs, root, train=lambda c, w: trained.append(w))
    assert status == {name: expected}
    assert len(trained) == (expected == "resumed")


# A failed checkpoint save's error: its command line differs from its message.
_SAVE_FAILED = errors.run_again(
    workdir_lib.describe_os_error(OSError(errno.ENOSPC, "No space left on device"),
                                  "/d/checkpoints") + " The checkpoints saved before are kept",
    "the function with the same arguments", "again to resume")


@pytest.mark.parametrize("error, expected", [
    (errors.DataError("The data is bad: fix it."), "The data is bad: fix it."),
    # A write's own OSError (not wrapped): the command line described it with '--workdir'.
    (OSError(errno.ENOSPC, "No space left on device", "/d/metrics.jsonl"),
     "Cannot write /d/metrics.jsonl (No space left on device): free some space or give the "
     "sweep another --root."),
    (errors.WorkdirError(workdir_lib.describe_os_error(
        OSError(errno.EROFS, "Read-only file system"), "/d")),
     "Cannot write /d (Read-only file system): the filesystem is read-only; remount it "
     "writable to resume the run there, or give the sweep another --root."),
    # TensorStore's error (a checkpoint's array write) carries the OS error in its text: it
    # went out unnamed, as it was raised.
    (ValueError("UNKNOWN: Error writing local file \"/d/checkpoints/4/x\": [OS error: No space "
                "left on device] [os_error_code='28']"),
     "Cannot write a file (No space left on device): free some space or give the sweep "
     "another --root."),
    (errors.WorkdirError(_SAVE_FAILED[0], command_line=_SAVE_FAILED[1]),
     "Cannot write /d/checkpoints (No space left on device): free some space or give the "
     "sweep another --root. The checkpoints saved before are kept: run the same command "
     "again to resume."),
])
def test_a_run_s_error_names_the_run_in_the_sweep_s_words(capsys, tmp_path, monkeypatch,
                                                          error, expected):
    """An error while a run of the sweep trained named neither the run (only the 'sweep:
    starting' line, perhaps far above, did) nor a fix the sweep has: a full or read-only
    disk said 'use another --workdir', a flag sweep.py does not have."""
    def train(config, workdir):
        raise error

    monkeypatch.setattr(loop, "train_and_evaluate", train)
    line = one_line_error(capsys, sweep_cli.main, _sweep_argv(tmp_path, p_last="0.5,1.0"))
    assert line == f"error: depth8_pL0.5: {expected}"
    assert "--workdir" not in line


def test_a_sweep_stopped_after_a_diverged_run_does_not_count_it_finished(tmp_path):
    """The stop line counts the runs finished; a diverged one is not."""
    def train(config, workdir):
        os.kill(os.getpid(), signal.SIGTERM)  # the sweep's handler: it stops before the next
        raise loop.NonFiniteLossError("Non-finite training loss at step 1 (epoch 1).")

    runs = [(name, load_config("cifar10:smoke", extra))
            for name, extra in sweep.plan([8], [0.5, 1.0])]
    with pytest.warns(logs.RunWarning, match="depth8_pL0.5 diverged: "):
        with pytest.raises(stopping.Stopped) as stopped:
            sweep.run_sweep(runs, str(tmp_path / "runs"), train=train)
    assert "with 0 of 2 runs finished and 1 diverged; the rest have not started" in \
        str(stopped.value)


def test_figs_7_and_3_say_a_deeper_run_diverged_not_that_it_has_no_epoch_yet(tmp_path):
    """A deeper run that diverged in its first epoch was left out of Figs. 7 and 3 as 'no
    finished epoch yet', as if a rerun of the sweep would finish it (the rerun skips it)."""
    runs = [_run(tmp_path, "depth8_pL0.5", 0.5, finished=True),
            {**_run(tmp_path, "depth14_pL0.5", 0.5, finished=False), "depth": 14,
             "records": [], "diverged": {"step": 2, "epoch": 1, "kept_step": 0}}]
    for record in runs[0]["records"]:
        record.update(test_error=0.9, train_loss=2.3)
    sweep.write_figures(runs, str(tmp_path / "figures"), report=None)
    for figure in ("fig7_first_conv_grad", "fig3_error_curves"):
        assert _sidecar(str(tmp_path), figure)["left_out"] == {
            "depth14_pL0.5": "diverged at epoch 1"}


def test_a_sweep_removes_the_temporary_files_its_killed_writes_left(tmp_path):
    """A sweep killed while writing a run's diverged.json, or its figures, left
    'diverged.json.tmp-<12 hex>' (never removed: a diverged run is skipped, never started
    again) and '<figure>.tmp-<12 hex>'. The next sweep removes them; a finished file and
    other names stay."""
    root = str(tmp_path)
    name = _finished_run(root, 8, 0.5, 0.4)
    old = time.time() - 10 * workdir_lib.ABANDONED_AFTER_S
    made = {os.path.join(root, name): ["diverged.json.tmp-0123456789ab",
                                      "notes.json.tmp-0123456789ab"],
            os.path.join(root, "figures"): ["fig8_error_vs_p_last.png.tmp-0123456789ab",
                                            "fig8_error_vs_p_last.json.tmp-0123456789ab",
                                            "training_time.md.tmp-0123456789ab",
                                            "mine.png.tmp-0123456789ab"]}
    for directory, names in made.items():
        os.makedirs(directory, exist_ok=True)
        for entry in names:
            path = os.path.join(directory, entry)
            with open(path, "w") as f:
                f.write("{")
            os.utime(path, (old, old))
    runs = [(n, load_config("cifar10:smoke", extra)) for n, extra in sweep.plan([8], [0.5])]
    assert sweep.run_sweep(runs, root, train=lambda c, w: pytest.fail("trained")) == {
        name: "skipped (finished)"}
    assert "diverged.json.tmp-0123456789ab" not in os.listdir(os.path.join(root, name))
    assert "notes.json.tmp-0123456789ab" in os.listdir(os.path.join(root, name))
    sweep.write_figures(sweep.collect(root), os.path.join(root, "figures"), report=None)
    assert sorted(n for n in os.listdir(os.path.join(root, "figures")) if ".tmp-" in n) == [
        "mine.png.tmp-0123456789ab"]


def _diverged_run(root):
    """A sweep's run that diverged in epoch 2 (its record, no summary), as the sweep leaves
    it; returns its workdir."""
    workdir = os.path.join(root, _finished_run(root, 8, 0.5, 0.4))
    os.remove(os.path.join(workdir, "summary.json"))
    with open(os.path.join(workdir, sweep.DIVERGED_FILE), "w") as f:
        json.dump({"step": 5, "epoch": 2, "kept_step": 4, "error": "Non-finite"}, f)
    return workdir


def test_train_py_refuses_to_take_a_diverged_run_out_of_its_sweep(capsys, tmp_path):
    """The divergence's error says 'Try a lower --config.learning_rate': train.py resumed
    the sweep's run in place with it, and every later command of the sweep then stopped on
    that run (another config). Refused before anything is written, saying to train a copy;
    the sweep's own config (logging fields aside) still resumes it."""
    root = str(tmp_path)
    workdir = _diverged_run(root)
    before = {n: open(os.path.join(workdir, n)).read() for n in os.listdir(workdir)}
    [(_, extra)] = sweep.plan([8], [0.5])
    argv = ["--config", "cifar10:smoke", "--workdir", workdir, *extra,
            "--config.learning_rate=0.01"]
    line = one_line_error(capsys, train_cli.main, argv)
    copy = str(tmp_path.parent / f"{tmp_path.name}_{os.path.basename(workdir)}_retry")
    assert line == (
        f"error: {workdir} is a sweep's run that diverged (diverged.json); resumed with "
        "another config (learning_rate: 0.1 -> 0.01) it would no longer match its sweep, "
        "which would then refuse its --root. Train a copy outside the sweep instead (cp -r "
        f"{workdir} {copy} && rm {copy}/diverged.json, then --workdir {copy}), or sweep this "
        "config in a new --root.")
    assert {n: open(os.path.join(workdir, n)).read() for n in os.listdir(workdir)} == before
    # The advice, followed: the copy is no run of the sweep, and takes the new config.
    command = line.split("(cp -r ", 1)[1].split(", then", 1)[0]
    subprocess.run("cp -r " + command, shell=True, check=True)
    assert [r["name"] for r in sweep.collect(root)] == [os.path.basename(workdir)]
    loop._refuse_to_leave_its_sweep(load_config("cifar10:smoke", extra + argv[-1:]), copy)
    # A second retry is named anew: cp -r into the first one's directory would nest the run.
    assert one_line_error(capsys, train_cli.main, argv) == line.replace(copy, copy + "2")
    for same in ([], ["--config.log_every_steps=1"]):
        loop._refuse_to_leave_its_sweep(load_config("cifar10:smoke", extra + same), workdir)


def test_a_diverged_run_resumed_by_hand_that_diverges_again_is_recorded_anew(
        tmp_path, monkeypatch):
    """A sweep's diverged run resumed by train.py that diverged again kept the record of
    the first divergence: the sweep then named the wrong epoch and checkpoint."""
    workdir = _diverged_run(str(tmp_path))
    os.makedirs(os.path.join(workdir, "checkpoints", "8"))

    def diverges(config, workdir):
        error = loop.NonFiniteLossError("Non-finite training loss at step 11 (epoch 3).")
        error.step, error.epoch = 11, 3
        raise error

    monkeypatch.setattr(loop, "_run_locked", diverges)
    [(_, extra)] = sweep.plan([8], [0.5])
    with pytest.raises(loop.NonFiniteLossError):
        loop.train_and_evaluate(load_config("cifar10:smoke", extra), workdir)
    with open(os.path.join(workdir, sweep.DIVERGED_FILE)) as f:
        record = json.load(f)
    assert record == {"step": 11, "epoch": 3, "kept_step": 8,
                      "error": "Non-finite training loss at step 11 (epoch 3)."}
    assert sweep.collect(str(tmp_path))[0]["diverged"]["epoch"] == 3
    elsewhere = str(tmp_path / "alone")  # a run of no sweep gets no record
    with pytest.raises(loop.NonFiniteLossError):
        loop.train_and_evaluate(load_config("cifar10:smoke"), elsewhere)
    assert not os.path.exists(os.path.join(elsewhere, sweep.DIVERGED_FILE))


# Texts naming --workdir that a sweep's run never raises: evaluate.py's, the sweep's own
# hint for evaluate.py, and train.py's refusal to take a run out of its sweep.
_NOT_A_SWEEP_RUNS_ERROR = ("the --workdir of a training run", "'python evaluate.py --workdir ",
                           ", then --workdir ")


def _package_texts():
    """``(file, text)`` of every string in the package's code (f-strings with '{}' for
    their fields; docstrings left out: they are not messages)."""
    import ast

    package = os.path.dirname(os.path.dirname(sweep.__file__))
    for directory, _, names in os.walk(package):
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(directory, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            docs = {id(n.body[0].value) for n in ast.walk(tree)
                    if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                      ast.AsyncFunctionDef))
                    and n.body and isinstance(n.body[0], ast.Expr)}
            parts = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.JoinedStr):
                    parts.update(id(v) for v in node.values)
                    yield path, "".join(v.value if isinstance(v, ast.Constant) else "{}"
                                        for v in node.values)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and id(node) not in docs | parts):
                    yield path, node.value


def test_every_fix_naming_workdir_is_said_in_the_sweep_s_words():
    """The sweep rewords its runs' errors by phrase ('use another --workdir' -> 'give the
    sweep another --root'): a message added or reworded since, with a phrase the table
    lacks, told the sweep's user about a flag sweep.py does not have. Every text of the
    package naming --workdir is reworded, or listed here as never a sweep run's error."""
    checked = 0
    for path, text in _package_texts():
        if "--workdir" not in text or path == sweep.__file__:
            continue
        checked += 1
        left = sweep._in_sweep_words("run", text)
        for allowed in _NOT_A_SWEEP_RUNS_ERROR:
            left = left.replace(allowed, "")
        assert "--workdir" not in left, (path, text)
    assert checked >= 15  # the texts were found


def test_a_sweep_warns_about_its_read_only_cache_once(tmp_path, monkeypatch):
    """Every run of a sweep repeated the warning that the compilation cache they share is
    read-only (or off): once per run, between each run's own lines. Now once per sweep."""
    from test_compilation import _unwritable_dir

    def announce_only(config, workdir, announce=lambda: None):  # the run's own steps, bare
        announce()
        return {}, False

    monkeypatch.setattr(loop, "_train_and_evaluate", announce_only)
    cache = _unwritable_dir(tmp_path)
    runs = [(name, load_config("cifar10:smoke", extra + [
        f"--config.compilation_cache_dir={cache}"])) for name, extra in sweep.plan([8], [0.5, 1])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sweep.run_sweep(runs, str(tmp_path / "runs"))
    said = [str(w.message) for w in caught if "compilation cache" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("Persistent compilation cache read-only")
    with warnings.catch_warnings(record=True) as caught:  # a sweep's, not the session's
        warnings.simplefilter("always")
        loop.train_and_evaluate(runs[0][1], str(tmp_path / "alone"))
    assert [str(w.message) for w in caught if "compilation cache" in str(w.message)] == said

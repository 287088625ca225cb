"""evaluate.py's depth flags and sweep.py on tiny smoke runs: what they refuse (one
``error:`` line, exit status 1, nothing written), the files they name, and what an export
records. One ResNet run (made as a sweep run) and one ViT run serve every test."""

import itertools
import json
import os
import shutil
import sys
import warnings

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` and the scripts live at the repository root.

import evaluate as evaluate_cli  # noqa: E402
import stochastic_depth_jax as sdj  # noqa: E402
import sweep as sweep_cli  # noqa: E402
from cli_output import one_line_error  # noqa: E402
from configs import load_config  # noqa: E402
from stochastic_depth_jax import errors, logs, pruning, training  # noqa: E402
from stochastic_depth_jax.training import loop, sweep  # noqa: E402

TINY = ["--config.progress_bar=false", "--config.write_tensorboard=false",
        "--config.write_plots=false", "--config.fake_data.num_train=48",
        "--config.fake_data.num_test=16", "--config.validation_size=16",
        "--config.batch_size=16", "--config.eval_batch_size=16", "--config.num_epochs=2"]
NAME = "depth8_pL0.5"


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """``(sweep root, workdir)``: a finished 2-epoch ResNet-8 run, trained by the sweep."""
    root = str(tmp_path_factory.mktemp("sweep"))
    [(name, extra)] = sweep.plan([8], [0.5])
    assert name == NAME
    status = sweep.run_sweep([(name, load_config("cifar10:smoke", TINY + extra))], root)
    assert status == {NAME: "started"}
    return root, os.path.join(root, NAME)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A finished 1-epoch ViT smoke run."""
    workdir = str(tmp_path_factory.mktemp("vit") / "run")
    overrides = TINY + ["--config.num_epochs=1", "--config.warmup_epochs=0"]
    loop.train_and_evaluate(load_config("cifar10_vit:smoke", overrides), workdir)
    return workdir


def _json(path):
    with open(path) as f:
        return json.load(f)


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _files(path):
    return sorted(os.path.relpath(os.path.join(d, f), path)
                  for d, _, files in os.walk(path) for f in files)


# ---- evaluate.py ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--depth-curve"], ["--export", "OUT", "--remove", "1"],
                                   ["--mc-samples", "2"]])
def test_depth_flags_refuse_a_vit_run(capsys, vit, tmp_path, flags):
    flags = [str(tmp_path / "out") if f == "OUT" else f for f in flags]
    before = _files(vit)
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", vit, *flags])
    assert "need a run of a CIFAR ResNet or WideResNet" in line and "model 'vit'" in line
    assert "without these flags" in line
    assert _files(vit) == before and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("flags, analysis", [(["--seed", "3"], "--mc-samples"),
                                            (["--remove", "1"], "--export")])
def test_a_flag_of_an_analysis_a_vit_run_lacks_is_not_fixed_by_adding_it(
        capsys, vit, resnet, flags, analysis):
    """A ViT run told to "drop --seed or add --mc-samples" was refused again with the second
    fix; a ResNet run still gets both."""
    refused = f"{flags[0]} applies only to {analysis}, not to a plain evaluation; drop {flags[0]}"
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", vit, *flags])
    assert line.endswith(refused + ".")
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", resnet[1], *flags])
    assert line.endswith(f"{refused} or add {analysis}.")


def test_from_python_the_depth_functions_name_themselves_not_flags(vit):
    """A notebook calling depth_curve_run on a ViT run was told to drop CLI flags."""
    from stochastic_depth_jax.training import depth

    with pytest.raises(errors.ConfigError) as refused:
        depth.depth_curve_run(vit)
    assert str(refused.value).startswith("depth_curve_run, export_pruned_run and "
                                         "mc_evaluate_run need a run of a CIFAR ResNet")
    assert "--" not in str(refused.value) and "evaluate_checkpoint" in str(refused.value)
    with pytest.raises(errors.ConfigError, match="^samples must be >= 1"):
        depth.mc_evaluate_run(vit, samples=0)


def test_pruning_refuses_a_vit_model():
    model = sdj.ViT(depth=2, width=8, num_heads=2, patch_size=4, num_classes=3)
    with pytest.raises(errors.ConfigError, match="block-wise stochastic depth.*got a ViT"):
        pruning.survival_order(model)
    with pytest.raises(errors.ConfigError, match="got a ViT"):
        pruning.mc_evaluate(model, {}, lambda: [], samples=2, key=jax.random.key(0))


@pytest.mark.parametrize("flags, expected", [
    (["--remove", "1"], "--remove applies only to --export, not to a plain evaluation"),
    (["--blocks", "1"], "--blocks applies only to --depth-curve or --export"),
    (["--order", "greedy"], "--order applies only to --depth-curve or --export"),
    (["--seed", "3"], "--seed applies only to --mc-samples"),
    (["--depth-curve", "--mc-samples", "2"],
     "--depth-curve and --mc-samples are separate analyses; give one per command"),
    (["--depth-curve", "--split", "validation"], "--split applies only to"),
    (["--mc-samples", "2", "--repeats", "3"], "--repeats applies only to --depth-curve or"),
    (["--mc-samples", "0"], "--mc-samples must be >= 1 (sampled sub-networks), got 0"),
    (["--mc-samples", "-1"], "--mc-samples must be >= 1 (sampled sub-networks), got -1"),
    (["--depth-curve", "--blocks", "1", "--order", "greedy"],
     "--blocks is the removal order itself (--order list); drop --order greedy or --blocks"),
    (["--depth-curve", "--order", "list"], "--order list needs --blocks"),
    (["--export", "OUT"], "--export needs --remove N"),
])
def test_evaluate_flags_that_would_be_ignored_are_refused(capsys, resnet, tmp_path, flags,
                                                          expected):
    _, workdir = resnet
    flags = [str(tmp_path / "out") if f == "OUT" else f for f in flags]
    before = _files(workdir)
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", workdir, *flags])
    assert expected in line
    assert _files(workdir) == before and not os.path.exists(tmp_path / "out")


def test_numeric_checkpoint_writes_eval_step_file_with_int_epoch(resnet):
    _, workdir = resnet
    step = _json(os.path.join(workdir, "summary.json"))["steps"]
    evaluate_cli.main(["--workdir", workdir, "--checkpoint", str(step), "--split", "validation"])
    assert not os.path.exists(os.path.join(workdir, f"eval_{step}_validation.json"))
    saved = _json(os.path.join(workdir, f"eval_step{step}_validation.json"))
    assert saved["evaluated_step"] == step and saved["requested"] == str(step)
    assert saved["epoch"] == 2 and isinstance(saved["epoch"], int)
    # A step is a step: it said "latest" (or "best", wherever that step was stored).
    assert saved["checkpoint"] == "step"
    evaluate_cli.main(["--workdir", workdir, "--split", "validation"])
    assert _json(os.path.join(workdir, "eval_best_validation.json"))["checkpoint"] == "best"


@pytest.mark.parametrize("earlier", [
    {"checkpoint": "best", "step": 4, "epoch": 2, "split": "test", "loss": 2.3, "error": 0.9,
     "count": 16},
    {"source": "w (checkpoint best, step 4, epoch 2)", "split": "test", "seed": 0,  # --mc-samples
     "deterministic": {"error": 0.9, "loss": 2.3}, "mc": {"error": 0.9, "loss": 2.3},
     "member_mean_error": 0.9, "samples": 2, "count": 16}], ids=["plain", "mc"])
def test_an_earlier_versions_result_may_be_replaced(resnet, tmp_path, earlier):
    """A result written before 'evaluated_step' existed was refused as "not a result of
    evaluate.py"."""
    _, workdir = resnet
    out = str(tmp_path / "old.json")
    with open(out, "w") as f:
        json.dump(earlier, f)
    evaluate_cli.main(["--workdir", workdir, "--output", out])
    assert _json(out)["evaluated_step"] > 0


def test_only_process_0_prints_and_writes(monkeypatch, capsys, resnet, tmp_path):
    """Every process of a multi-process evaluation printed the whole JSON."""
    from stochastic_depth_jax.training import distributed

    _, workdir = resnet
    out = str(tmp_path / "other.json")
    monkeypatch.setattr(distributed, "is_primary", lambda: False)
    result = evaluate_cli.run(evaluate_cli.parse_args(["--workdir", workdir, "--output", out]))
    assert result["count"] == 16  # computed, as every process takes part
    assert capsys.readouterr() == ("", "") and not os.path.exists(out)


def _evaluate_under_jaxs_cache_setting(monkeypatch, workdir, setting, out):
    """evaluate.py's main with JAX_COMPILATION_CACHE_DIR at ``setting`` (uncreated; JAX's own
    setting likewise, as JAX reads the variable), which a run recorded with
    compilation_cache_dir='auto' uses: ``(the setting while it evaluated, every warning it
    raised)``, the session's setting restored afterwards."""
    from stochastic_depth_jax.training import compilation, evaluate

    seen, evaluate_checkpoint = [], evaluate.evaluate_checkpoint

    def recording(*args, **kwargs):
        seen.append(jax.config.jax_compilation_cache_dir)
        return evaluate_checkpoint(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", recording)
    before = jax.config.jax_compilation_cache_dir or ""
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # every program
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", setting)
    jax.config.update("jax_compilation_cache_dir", setting)  # not created, as the variable
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluate_cli.main(["--workdir", workdir, "--output", out])
        assert jax.config.jax_compilation_cache_dir == setting  # the session's, restored
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        compilation.use_cache_dir(before)
    assert _json(out)["count"] == 16
    return seen, [str(w.message) for w in caught if "compilation cache" in str(w.message)]


def test_a_cache_hazard_turns_jaxs_own_cache_setting_off(monkeypatch, capsys, resnet, tmp_path):
    """A job that must not use the persistent cache (compilation.cache_hazard) evaluates
    without it, also where JAX's own setting (JAX_COMPILATION_CACHE_DIR) turned it on. It
    says so on stderr: its line on stdout broke `evaluate.py ... | jq`."""
    from stochastic_depth_jax.training import compilation

    _, workdir = resnet
    monkeypatch.setattr(compilation, "cache_hazard", lambda platform, processes: "a known hang")
    seen, said = _evaluate_under_jaxs_cache_setting(
        monkeypatch, workdir, str(tmp_path / "cache"), str(tmp_path / "result.json"))
    assert seen == [None] and said == [] and not (tmp_path / "cache").exists()
    out, err = capsys.readouterr()
    assert json.loads(out)["count"] == 16  # the JSON alone
    assert "Persistent compilation cache off: a known hang.\n" in err


def test_a_read_only_jax_cache_setting_is_said_once(monkeypatch, resnet, tmp_path):
    """JAX_COMPILATION_CACHE_DIR at a directory this user cannot write: evaluate.py printed
    JAX's warning, with its source line, for every program it could not store there
    (train.py said it once); now one line, as train.py's, and the cache still loads."""
    from test_compilation import _unwritable_dir

    cache = _unwritable_dir(tmp_path)
    seen, said = _evaluate_under_jaxs_cache_setting(monkeypatch, resnet[1], cache,
                                                    str(tmp_path / "result.json"))
    assert seen == [cache]
    assert [m.split(" (", 1)[0] for m in said] == [
        f"Persistent compilation cache read-only: cannot write to {cache}"]
    assert said[0].endswith("; programs found there are loaded, the others compiled and not "
                            "kept; set JAX_COMPILATION_CACHE_DIR to a directory this user can "
                            "write to keep compiled programs.")


def test_a_jax_cache_setting_that_cannot_be_created_is_off_and_said_once(monkeypatch, resnet,
                                                                        tmp_path):
    """JAX_COMPILATION_CACHE_DIR under a file (or a read-only home): JAX's warning with its
    source line; now one line, and the evaluation runs without the cache."""
    (tmp_path / "file").write_text("")
    cache = str(tmp_path / "file" / "cache")
    seen, said = _evaluate_under_jaxs_cache_setting(monkeypatch, resnet[1], cache,
                                                    str(tmp_path / "result.json"))
    assert seen == [None]
    assert said == [
        "Persistent compilation cache off: JAX_COMPILATION_CACHE_DIR (which "
        f"compilation_cache_dir='auto' uses): cannot create {cache} (Not a directory); set "
        "JAX_COMPILATION_CACHE_DIR to a directory this user can write to keep compiled "
        "programs."]


def _copy_recording(workdir, tmp_path, setting):
    """A copy of the run ``workdir`` whose run.json records compilation_cache_dir=``setting``."""
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    meta = _json(os.path.join(copy, "run.json"))
    meta["config"]["compilation_cache_dir"] = setting
    with open(os.path.join(copy, "run.json"), "w") as f:
        json.dump(meta, f)
    return copy


@pytest.mark.parametrize("flags", [[], ["--depth-curve", "--order", "survival"]],
                         ids=["plain", "depth-curve"])
def test_an_evaluation_uses_the_cache_the_run_used(monkeypatch, resnet, tmp_path, flags):
    """A run trained with compilation_cache_dir=<path> was evaluated under JAX's own setting
    (JAX_COMPILATION_CACHE_DIR, else no cache): every call, a depth curve's too, compiled
    its programs again. It uses the run's cache now, and leaves JAX's setting as it was."""
    from stochastic_depth_jax.training import compilation

    cache = str(tmp_path / "runs_cache")
    workdir = _copy_recording(resnet[1], tmp_path, cache)
    seen = []
    use = compilation.use_cache_dir
    monkeypatch.setattr(compilation, "use_cache_dir",
                        lambda path: (seen.append(path), use(path))[1])
    before = jax.config.jax_compilation_cache_dir
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate_cli.main(["--workdir", workdir, "--output", str(tmp_path / "r.json"), *flags])
    assert seen[0] == cache and os.path.isdir(cache)
    assert jax.config.jax_compilation_cache_dir == before
    assert not [w for w in caught if "compilation cache" in str(w.message)]


def test_a_recorded_relative_cache_path_is_not_made_where_the_evaluation_runs(
        monkeypatch, resnet, tmp_path):
    """A run trained with compilation_cache_dir=<relative path> names a directory relative
    to where it started, which run.json does not say: evaluated from elsewhere, it is not
    made there (JAX's own setting applies, as for a run that recorded none)."""
    workdir = _copy_recording(resnet[1], tmp_path, "rel_cache")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    seen, said = _evaluate_under_jaxs_cache_setting(monkeypatch, workdir,
                                                    str(tmp_path / "jax_cache"),
                                                    str(tmp_path / "result.json"))
    assert seen == [str(tmp_path / "jax_cache")] and said == []
    assert os.listdir(tmp_path / "elsewhere") == []


def test_a_recorded_cache_that_cannot_be_created_is_off_with_one_warning(resnet, tmp_path,
                                                                        capsys):
    """The run's cache path, now under a file (a moved or unmounted disk): the evaluation
    runs without the cache and says why in one line on stderr (a path given to train.py is
    an error there; here no flag can change the run's record)."""
    (tmp_path / "file").write_text("")
    cache = str(tmp_path / "file" / "cache")
    workdir = _copy_recording(resnet[1], tmp_path, cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate_cli.main(["--workdir", workdir, "--output", str(tmp_path / "r.json")])
    assert json.loads(capsys.readouterr().out)["count"] == 16
    assert [str(w.message) for w in caught if "compilation cache" in str(w.message)] == [
        f"Persistent compilation cache off: compilation_cache_dir={cache!r} (the run's "
        f"setting): cannot create {cache} (Not a directory); make it a directory this user "
        "can write to keep compiled programs."]


def test_mc_samples_writes_its_file_named_by_its_seed(resnet):
    """Another --seed samples other sub-networks: its result replaced the first seed's in
    eval_mc2_best_test.json, which the seed's name did not say."""
    _, workdir = resnet
    evaluate_cli.main(["--workdir", workdir, "--mc-samples", "2"])
    evaluate_cli.main(["--workdir", workdir, "--mc-samples", "2", "--seed", "1"])
    first = _json(os.path.join(workdir, "eval_mc2_best_test.json"))
    saved = _json(os.path.join(workdir, "eval_mc2_seed1_best_test.json"))
    assert first["seed"] == 0 and first["samples"] == 2 and first["fake_data"] is True
    assert saved["samples"] == 2 and saved["seed"] == 1 and saved["count"] == 16


def test_export_records_normalisation_and_never_overwrites(capsys, resnet, tmp_path):
    _, workdir = resnet
    out = str(tmp_path / "pruned")
    args = ["--workdir", workdir, "--remove", "1", "--repeats", "1", "--throughput-batch", "4"]
    copy = str(tmp_path / "export_copy.json")
    evaluate_cli.main([*args, "--export", out, "--output", copy])
    # --output is a copy of the record: the export's own export.json is written too.
    assert capsys.readouterr().err.endswith(f"Written: {out}/export.json and {copy}\n")
    assert _json(copy) == _json(os.path.join(out, "export.json"))
    data = _json(os.path.join(workdir, "run.json"))["data"]
    model, variables, meta = sdj.load_pruned(out)
    np.testing.assert_allclose(meta["input"]["mean"], data["mean"], rtol=1e-6)
    np.testing.assert_allclose(meta["input"]["std"], data["std"], rtol=1e-6)
    assert meta["removed"] == [2] and model.kept_blocks().tolist() == [True, True, False]
    assert meta["fake_data"] is True  # the exported model's recorded errors are at chance
    # The recorded normalisation reproduces the export's own test error, without the run.
    from stochastic_depth_jax.training import evaluate

    run = evaluate.restore_run(workdir, "best")
    pixels = np.asarray(run.ds.test.images, np.float32)
    x = (pixels - np.float32(meta["input"]["mean"])) / np.float32(meta["input"]["std"])
    logits = model.apply(variables, x, train=False)
    error = float(np.mean(np.argmax(logits, -1) != np.asarray(run.ds.test.labels)))
    assert error == pytest.approx(meta["error"]["test"]["pruned"], abs=1e-6)

    # A second export into the same directory, or into the run's checkpoints: refused.
    before = {p: _bytes(os.path.join(out, p)) for p in _files(out)}
    line = one_line_error(capsys, evaluate_cli.main, [*args, "--export", out, "--remove", "2"])
    assert f"Export directory {out} is not empty" in line
    assert "choose a new or empty directory" in line
    assert {p: _bytes(os.path.join(out, p)) for p in _files(out)} == before
    ckpts = os.path.join(workdir, "checkpoints")
    listed = _files(ckpts)
    line = one_line_error(capsys, evaluate_cli.main, [*args, "--export", ckpts])
    assert f"Export directory {ckpts} is {os.path.realpath(ckpts)}/, a folder of the run" in line
    assert _files(ckpts) == listed

    # An export saved before the normalisation was recorded still loads.
    record = _json(os.path.join(out, "model.json"))
    del record["input"]
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump(record, f)
    old_model, _, old_meta = sdj.load_pruned(out)
    assert old_model == model and "input" not in old_meta and old_meta["removed"] == [2]


# ---- what a user meets: another checkpoint's curve, progress, devices, a live run ----------

FAST = ["--repeats", "1", "--throughput-batch", "4"]


def _drawn(monkeypatch, capsys):
    """Replaces the depth curve's drawing by a record of its path and title, and of what
    was printed before it was drawn (the rows are printed as they are computed)."""
    from stochastic_depth_jax.training import depth

    drawn = []

    def draw(points, png, sources, *, sidecar, title, chosen_on):
        drawn.append({"png": png, "title": title, "printed": capsys.readouterr().out})

    monkeypatch.setattr(depth.figures, "plot_depth_curve", draw)
    return drawn


def test_a_depth_curve_of_latest_gets_its_own_file_and_says_so(monkeypatch, capsys, resnet):
    """--checkpoint latest wrote depth_curve_survival.png over the best checkpoint's curve
    with nothing in the title saying which; --measure-every 2 ended in a KeyError traceback
    after the work (the table's unmeasured rows); the table came only at the end."""
    _, workdir = resnet
    drawn = _drawn(monkeypatch, capsys)
    step = _json(os.path.join(workdir, "summary.json"))["steps"]
    evaluate_cli.main(["--workdir", workdir, "--depth-curve", "--checkpoint", "latest",
                       "--measure-every", "2", *FAST])
    [curve] = drawn
    assert curve["png"] == os.path.join(workdir, "depth_curve_survival_latest.png")
    assert curve["title"].endswith(f"order 'survival', checkpoint latest, step {step}, epoch 2")
    rows = [line for line in curve["printed"].splitlines() if line[:2] == "| "]
    assert len(rows) == 4 + 1  # printed before the figure was drawn (progress), header too
    assert rows[2].endswith("| - | - |") and not rows[1].endswith("| - | - |")
    assert capsys.readouterr().out.startswith("Written: ")  # then only where it went


def test_a_step_is_never_called_the_latest_or_best_checkpoint(monkeypatch, capsys, resnet,
                                                                tmp_path):
    """--checkpoint <an earlier step> was titled and summarised 'checkpoint latest, step 2'
    while the latest checkpoint was at step 4 (the step's series, not the checkpoint)."""
    _, workdir = resnet
    drawn = _drawn(monkeypatch, capsys)
    latest = _json(os.path.join(workdir, "summary.json"))["steps"]
    evaluate_cli.main(["--workdir", workdir, "--depth-curve", "--checkpoint", "2", *FAST])
    [curve] = drawn
    assert latest != 2 and curve["png"] == os.path.join(workdir, "depth_curve_survival_step2.png")
    assert curve["title"].endswith("order 'survival', step 2, epoch 1")
    assert f"{workdir} (step 2, epoch 1), measured on" in curve["printed"]
    out = str(tmp_path / "eval.json")
    evaluate_cli.main(["--workdir", workdir, "--checkpoint", "2", "--output", out])
    assert " images, step 2, epoch 1. Written: " in capsys.readouterr().err
    mid = {**_json(out), "epoch": 4 / 3}  # saved within an epoch (checkpoint_every_steps)
    assert evaluate_cli.summary_line(mid).endswith(", step 2, epoch 1.33. ")  # not 16 digits


def test_a_depth_curve_of_other_blocks_is_not_replaced(monkeypatch, capsys, resnet):
    _, workdir = resnet
    drawn = _drawn(monkeypatch, capsys)
    earlier = os.path.join(workdir, "depth_curve_list.json")
    with open(earlier, "w") as f:
        json.dump({"order": [0]}, f)
    try:
        line = one_line_error(capsys, evaluate_cli.main,
                              ["--workdir", workdir, "--depth-curve", "--blocks", "2", *FAST])
        assert f"{earlier} holds the depth curve of another removal order ([0])" in line
        assert _json(earlier) == {"order": [0]} and not drawn
    finally:
        os.remove(earlier)


def test_another_device_count_than_the_runs_evaluates_on_the_devices_it_divides(
        capsys, monkeypatch, resnet, tmp_path):
    """A run trained with batches of 12 (on 1, 2, 3, 4 or 6 devices), evaluated on this
    machine's 8, was refused: 'batch_size=12 does not divide by the 8 devices ... use
    --config.batch_size=8', a flag evaluate.py does not have."""
    import shutil

    from stochastic_depth_jax.training import evaluate

    _, workdir = resnet
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    meta = _json(os.path.join(copy, "run.json"))
    meta["config"].update(batch_size=12, eval_batch_size=12)
    with open(os.path.join(copy, "run.json"), "w") as f:
        json.dump(meta, f)
    out = str(tmp_path / "eval.json")
    evaluate_cli.main(["--workdir", copy, "--output", out])
    err = capsys.readouterr().err  # the figures in one line, and where they went
    assert err.startswith("Test error ") and err.endswith(f"Written: {out}\n")
    # A fake-data run's figures say so, in the line and the JSON (they sit at chance).
    assert " on 16 FAKE random-label images, checkpoint best, " in err
    assert _json(out)["fake_data"] is True
    assert evaluate.fake_data_fields(load_config("cifar10")) == {}
    assert evaluate.evaluation_mesh(evaluate.load_run_config(copy)[0]).size == 6
    here, there = _json(out), evaluate.evaluate_checkpoint(workdir)
    assert here["error"] == there["error"] and here["count"] == there["count"]
    assert here["loss"] == pytest.approx(there["loss"], rel=1e-5)
    # A multi-process job keeps every device: it said '... use --config.batch_size=8', a
    # flag evaluate.py does not have.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(errors.ConfigError, match="The run's batch_size=12 and eval_batch_size"
                       "=12 do not divide over the 8 devices of this 2-process job; evaluate "
                       "it in one process"):
        evaluate.evaluation_mesh(evaluate.load_run_config(copy)[0])


def test_a_best_chosen_by_its_own_test_error_is_said_to_be_optimistic(capsys, resnet,
                                                                       tmp_path):
    """A run of select_best_by='test' (no validation split): its 'best' checkpoint is the
    one of the lowest test error, and evaluate.py reported that error as 'Test error X%,
    checkpoint best', a figure that passed for a held-out one. The result names the metric
    that chose the best, and where it is of the split evaluated says it is optimistic."""
    import shutil

    _, workdir = resnet
    out = str(tmp_path / "by_validation.json")
    evaluate_cli.main(["--workdir", workdir, "--output", out])
    err = capsys.readouterr().err
    assert _json(out)["selected_by"] == "val_error" and "selected_on_split" not in _json(out)
    assert "optimistic" not in err
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    for step in os.listdir(os.path.join(copy, "checkpoints_best")):
        path = os.path.join(copy, "checkpoints_best", step, "meta", "metadata")
        meta = _json(path)
        meta["best"]["metric"] = "test_error"
        with open(path, "w") as f:
            json.dump(meta, f)
    evaluate_cli.main(["--workdir", copy])
    err = capsys.readouterr().err
    result = _json(os.path.join(copy, "eval_best_test.json"))
    assert (result["selected_by"], result["selected_on_split"]) == ("test_error", True)
    assert (" images, checkpoint best (chosen by its own test error: optimistic, not a "
            "held-out figure), step ") in err
    evaluate_cli.main(["--workdir", copy, "--mc-samples", "1"])  # Monte-Carlo depth too
    assert _json(os.path.join(copy, "eval_mc1_best_test.json"))["selected_on_split"] is True
    err = capsys.readouterr().err
    assert err.startswith("Monte-Carlo depth, 1 sub-networks: test error ")
    assert " images (chosen by its own test error: optimistic, not a held-out figure). " in err
    evaluate_cli.main(["--workdir", copy, "--split", "validation"])  # chosen on another split
    result = _json(os.path.join(copy, "eval_best_validation.json"))
    assert result["selected_by"] == "test_error" and "selected_on_split" not in result
    assert "optimistic" not in capsys.readouterr().err
    evaluate_cli.main(["--workdir", copy, "--checkpoint", "latest"])
    assert "selected_by" not in _json(os.path.join(copy, "eval_latest_test.json"))


def test_a_run_trained_in_float16_is_still_evaluated_and_collected(capsys, resnet, tmp_path):
    """Once the trainer refused model.dtype='float16', evaluate.py and sweep --collect
    refused a run an earlier version had trained in it ("needs loss scaling ... use
    'bfloat16'", which a recorded run cannot do); the sweep left it out of its figures."""
    import shutil

    _, workdir = resnet
    root = tmp_path / "root"
    copy = str(root / NAME)
    shutil.copytree(workdir, copy)
    meta = _json(os.path.join(copy, "run.json"))
    meta["config"]["model"]["dtype"] = "float16"  # as an earlier version recorded it
    with open(os.path.join(copy, "run.json"), "w") as f:
        json.dump(meta, f)
    out = str(tmp_path / "eval.json")
    evaluate_cli.main(["--workdir", copy, "--output", out])
    assert capsys.readouterr().err.startswith("Test error ") and _json(out)["count"] == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [run] = sweep.collect(str(root))
    assert run["name"] == NAME and run["config"]["model"]["dtype"] == "float16"


def test_a_drop_path_run_is_evaluated_on_the_devices_its_groups_divide(capsys, vit, tmp_path):
    """A ViT trained on 4 devices (model.groups=4), evaluated on this machine's 8, was
    refused: 'model.groups=4 is not a multiple of the 8 devices ... Set
    --config.model.groups', a flag evaluate.py does not have."""
    import shutil

    from stochastic_depth_jax.training import evaluate

    copy = str(tmp_path / "run")
    shutil.copytree(vit, copy)
    meta = _json(os.path.join(copy, "run.json"))
    assert meta["config"]["model"]["groups"] % 4 == 0  # the 8 devices' run, made a 4's
    meta["config"]["model"]["groups"] = 4
    with open(os.path.join(copy, "run.json"), "w") as f:
        json.dump(meta, f)
    assert evaluate.evaluation_mesh(evaluate.load_run_config(copy)[0]).size == 4
    out = str(tmp_path / "eval.json")
    evaluate_cli.main(["--workdir", copy, "--output", out])
    assert capsys.readouterr().err.startswith("Test error ")
    assert _json(out)["error"] == evaluate.evaluate_checkpoint(vit)["error"]


def test_a_run_still_training_is_said_once_for_a_job(monkeypatch, tmp_path):
    """evaluate.py --multihost on a run still training: every process warned that its
    checkpoint was only the one so far, the same line once per process."""
    from stochastic_depth_jax.training import evaluate, workdir as workdir_lib

    monkeypatch.setattr(workdir_lib, "training_holder", lambda workdir: "pid 7 on host0")
    for process, said in ((1, 0), (0, 1)):
        monkeypatch.setattr(jax, "process_index", lambda: process)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluate._warn_if_training(str(tmp_path), "best", {"step": 8})
        assert sum("is still training, by pid 7" in str(w.message) for w in caught) == said


def test_a_run_still_training_is_evaluated_with_a_warning(resnet):
    """'best' of a run still training was labelled best with no word that it was only the
    best so far."""
    from stochastic_depth_jax import logs
    from stochastic_depth_jax.training import evaluate, workdir as workdir_lib

    _, workdir = resnet
    step = _json(os.path.join(workdir, "summary.json"))["steps"]
    with workdir_lib.WorkdirLock(workdir):  # as train.py holds it while it runs
        with pytest.warns(logs.RunWarning, match="is still training, by pid .*: its latest "
                          f"checkpoint so far, step {step}, is evaluated"):
            evaluate.evaluate_checkpoint(workdir, "latest")
        with warnings.catch_warnings():
            warnings.simplefilter("error", logs.RunWarning)
            evaluate.evaluate_checkpoint(workdir, step)  # a step is what it is
    with warnings.catch_warnings():
        warnings.simplefilter("error", logs.RunWarning)
        evaluate.evaluate_checkpoint(workdir, "latest")  # finished: nothing to say


def test_an_evaluation_testing_the_lock_never_refuses_a_run_starting(tmp_path):
    """An evaluation tests the lock by holding a shared one for a moment: a run taking the
    lock at that moment was refused as if the workdir were busy."""
    import fcntl
    import threading

    from stochastic_depth_jax.training import workdir as workdir_lib

    workdir_lib.WorkdirLock(str(tmp_path)).acquire().release()  # the lock file exists
    fd = os.open(os.path.join(str(tmp_path), workdir_lib.LOCK_FILE), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # the evaluation's probe, held...
    threading.Timer(0.02, os.close, [fd]).start()  # ...and dropped 20 ms later
    workdir_lib.WorkdirLock(str(tmp_path)).acquire().release()


def test_a_sweep_root_given_as_workdir_names_its_runs(capsys, resnet):
    root, workdir = resnet
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", root, "--depth-curve"])
    assert line.endswith(f"It holds runs (a sweep's root?): {workdir}; give one of them.")


def test_an_export_given_as_workdir_says_what_it_is(capsys, tmp_path):
    """The directory of --export given back to evaluate.py was 'not the --workdir of a
    training run?', with nothing on what it holds or how to use it."""
    (tmp_path / "model.json").write_text("{}")
    (tmp_path / "export.json").write_text("{}")
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", str(tmp_path)])
    assert line.endswith(
        "It holds a pruned model (evaluate.py --export), not a run: load it with "
        "stochastic_depth_jax.load_pruned; its errors, and the run it came from, are in "
        f"{tmp_path / 'export.json'}.")


def test_output_never_replaces_a_runs_own_file(capsys, resnet, tmp_path):
    """--output <workdir>/run.json replaced the run's record with the evaluation's JSON
    (the run could then no longer be evaluated or resumed); one the run has not written yet
    (validation.jsonl without eval_every_steps) was written under the run's name, which the
    run would then take for its own (or remove as a temporary of its own)."""
    _, workdir = resnet
    assert not os.path.exists(os.path.join(workdir, "validation.jsonl"))
    for name in ("run.json", "metrics.jsonl", "validation.jsonl"):
        path = os.path.join(workdir, name)
        before = _bytes(path) if os.path.exists(path) else None
        line = one_line_error(capsys, evaluate_cli.main, ["--workdir", workdir, "--output", path])
        assert line.startswith(f"error: --output {path} is the name of one of the run's own")
        assert (_bytes(path) if os.path.exists(path) else None) == before
    elsewhere = tmp_path / "other"  # the name alone is fine outside the workdir
    elsewhere.mkdir()
    evaluate_cli.main(["--workdir", workdir, "--output", str(elsewhere / "summary.json")])
    assert _json(str(elsewhere / "summary.json"))["split"] == "test"
    out = str(tmp_path / "again.json")  # an earlier result of its own: replaced
    evaluate_cli.main(["--workdir", workdir, "--output", out])
    evaluate_cli.main(["--workdir", workdir, "--output", out, "--split", "validation"])
    assert _json(out)["split"] == "validation"


def test_output_never_goes_into_another_runs_workdir(capsys, resnet, tmp_path):
    """--output <another run>/eval_best_test.json replaced that run's result with this
    one's, and nothing in it says which run it is of."""
    import shutil

    _, workdir = resnet
    other = str(tmp_path / "other")
    os.makedirs(other)
    shutil.copy(os.path.join(workdir, "run.json"), other)
    theirs = os.path.join(other, "eval_best_test.json")
    with open(theirs, "w") as f:
        json.dump({"evaluated_step": 7, "error": 0.5}, f)
    for path in (theirs, os.path.join(other, "new.json")):
        line = one_line_error(capsys, evaluate_cli.main, ["--workdir", workdir, "--output", path])
        assert f"--output {path} is in the workdir of another run ({other})" in line
    assert _json(theirs) == {"evaluated_step": 7, "error": 0.5}
    assert not os.path.exists(os.path.join(other, "new.json"))


@pytest.mark.parametrize("inside", ["checkpoints/99", "checkpoints_best/mine.json",
                                    "checkpoints/2/mine.json"])
def test_output_never_goes_into_another_runs_checkpoints(capsys, resnet, tmp_path, inside):
    """--output <another run>/checkpoints/99 was accepted (only the folder holding its
    run.json was refused): a result named as a step was replaced, unsaid, by that run's
    save of the step, and the run deletes or moves what its checkpoint folders hold."""
    import shutil

    _, workdir = resnet
    other = str(tmp_path / "other")
    shutil.copytree(workdir, other)
    before = _files(other)
    path = os.path.join(other, inside)
    folder = os.path.join(os.path.realpath(other), inside.split("/")[0])
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", workdir, "--output", path])
    assert line == (f"error: --output {path} is inside {folder}/, a folder of the run in "
                    f"{os.path.realpath(other)} whose contents that run manages (it deletes, "
                    "moves and rewrites them: a result named as a step is replaced by that "
                    "step's save); give a path outside it, or leave --output out. Nothing was "
                    "evaluated.")
    assert _files(other) == before


@pytest.mark.parametrize("where", ["own", "other"])
def test_an_export_never_goes_into_a_runs_checkpoint_folders(capsys, resnet, tmp_path, where):
    """--export <run>/checkpoints/99 (new, so empty) was accepted: the run then took the
    export for a damaged checkpoint of step 99 ('the latest checkpoint (step 99) is
    damaged') and moved it to checkpoints_corrupt/; in checkpoints_best/ it became the
    newest 'best'."""
    import shutil

    _, workdir = resnet
    run = workdir
    if where == "other":
        run = str(tmp_path / "other")
        shutil.copytree(workdir, run)
    before = _files(run)
    out = os.path.join(run, "checkpoints" if where == "own" else "checkpoints_best", "99")
    line = one_line_error(capsys, evaluate_cli.main,
                          ["--workdir", workdir, "--export", out, "--remove", "1"])
    assert line.startswith(f"error: Export directory {out} is inside "
                           f"{os.path.realpath(os.path.dirname(out))}/, a folder of the run in "
                           f"{os.path.realpath(run)} whose contents that run manages"), line
    assert _files(run) == before and not os.path.exists(out)


def test_output_never_replaces_a_depth_curves_json_or_an_exports_record(capsys, resnet,
                                                                         tmp_path):
    """Results of evaluate.py, so they were replaced: a depth curve's numbers (its PNG left
    without them), an export's export.json (the export then described by an evaluation)."""
    _, workdir = resnet
    curve = {"figure": "depth_curve_survival.png", "order_rule": "survival", "points": []}
    export = {"output": str(tmp_path / "pruned"), "order_rule": "survival", "removed": [2]}
    for folder, name, record, beside in [("curves", "depth_curve_survival.json", curve,
                                          "depth_curve_survival.png"),
                                         ("pruned", "export.json", export, "model.json")]:
        os.makedirs(tmp_path / folder)
        path = str(tmp_path / folder / name)
        with open(path, "w") as f:
            json.dump(record, f)
        open(tmp_path / folder / beside, "w").close()
        line = one_line_error(capsys, evaluate_cli.main, ["--workdir", workdir, "--output", path])
        assert f"--output {path} is part of the " in line and line.endswith("Nothing was written.")
        assert _json(path) == record
        os.remove(tmp_path / folder / beside)  # a copy on its own is a result like any other
        evaluate_cli.main(["--workdir", workdir, "--output", path])
        assert _json(path)["split"] == "test"


def test_a_run_without_checkpoints_says_what_to_do(capsys, resnet, tmp_path):
    """It said 'has no best checkpoint yet (latest: [])', or '(latest: [4, 8])' without
    naming --checkpoint latest."""
    import shutil

    _, workdir = resnet
    young = str(tmp_path / "young")
    shutil.copytree(workdir, young, ignore=shutil.ignore_patterns("checkpoints_best"))
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", young])
    assert "has no best checkpoint yet; its latest checkpoints are at steps [" in line
    assert line.endswith("evaluate one with --checkpoint latest or --checkpoint STEP.")
    # Only 'best' (checkpoints/ deleted to save space, or killed after a mid-epoch 'best'
    # before the first 'latest'): it said 'no latest checkpoint yet, nor any other'.
    kept = str(tmp_path / "kept")
    shutil.copytree(workdir, kept, ignore=shutil.ignore_patterns("checkpoints"))
    best = sorted(int(s) for s in os.listdir(os.path.join(kept, "checkpoints_best")))
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", kept, "--checkpoint",
                                                      "latest"])
    assert line == (f"error: The run in {kept} has no latest checkpoint; its best checkpoints "
                    f"are at steps {best}: evaluate one with --checkpoint best or --checkpoint "
                    "STEP.")
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    shutil.copy(os.path.join(workdir, "run.json"), empty)
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", empty, "--mc-samples", "2"])
    assert line.startswith(f"error: The run in {empty} has no best checkpoint yet, nor any "
                           "other: one is saved at the end of each epoch")
    # A step asked of it was told 'checkpoints/ holds steps [] and checkpoints_best/ steps
    # []; give one of them', though neither exists: told that none is saved yet.
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", empty, "--checkpoint", "4"])
    assert line.startswith(f"error: The run in {empty} has no latest checkpoint yet, nor any "
                           "other: one is saved at the end of each epoch")
    # A sweep's run that diverged before its first save was told to be evaluated 'once one
    # is saved', which never happens.
    from stochastic_depth_jax.training import evaluate

    assert evaluate.DIVERGED_FILE == loop.DIVERGED_FILE
    with open(os.path.join(empty, loop.DIVERGED_FILE), "w") as f:
        json.dump({"step": 3, "epoch": 1, "kept_step": 0, "error": "Non-finite"}, f)
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", empty, "--mc-samples", "2"])
    assert line == (f"error: The run in {empty} diverged at epoch 1 before it saved any "
                    "checkpoint (its diverged.json records it): there is nothing to evaluate. "
                    "To train it again, remove its directory and run its sweep again (a lower "
                    "--config.learning_rate or another --config.seed is a new sweep, in a new "
                    "--root).")


def test_an_export_directory_that_cannot_be_made_names_export_not_workdir(capsys, resnet,
                                                                          tmp_path):
    """Under a file, it said '... a file is in the way of the directory; use another
    --workdir'; a refused --remove leaves no directory behind."""
    _, workdir = resnet
    blocked = os.path.join(workdir, "run.json", "pruned")
    line = one_line_error(capsys, evaluate_cli.main,
                          ["--workdir", workdir, "--export", blocked, "--remove", "1", *FAST])
    assert line == (f"error: Cannot create the export directory {blocked} (Not a directory); "
                    "choose another one (--export DIR). Nothing was written.")
    new = str(tmp_path / "pruned")
    line = one_line_error(capsys, evaluate_cli.main,
                          ["--workdir", workdir, "--export", new, "--remove", "99", *FAST])
    assert "--remove must be a number of blocks in [0, 2], got 99" in line
    assert not os.path.exists(new)


# ---- evaluate.py --data-dir: the run's data moved --------------------------------------------

@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """``(workdir, new data_dir, result before the move)``: a 1-epoch run on a tfds dataset
    in its own data_dir, which is then moved elsewhere."""
    base = tmp_path_factory.mktemp("moved")
    old_dir, new_dir = str(base / "data"), str(base / "data_now")
    sdj.data.testing.make_tfds_dataset("cifar10", old_dir, num_train=48, num_test=16, seed=3)
    workdir = str(base / "run")
    config = load_config("cifar10:smoke", TINY + [
        "--config.num_epochs=1", "--config.fake_data.num_train=0", "--config.download=false",
        f"--config.data_dir={old_dir}"])
    loop.train_and_evaluate(config, workdir)
    before = evaluate_cli.run(evaluate_cli.parse_args(["--workdir", workdir,
                                                       "--output", str(base / "b.json")]))
    os.rename(old_dir, new_dir)
    return workdir, new_dir, before


def test_data_dir_evaluates_a_run_whose_data_moved(capsys, moved, tmp_path):
    workdir, new_dir, before = moved
    with pytest.raises(SystemExit) as info:  # without --data-dir: not where run.json says
        evaluate_cli.main(["--workdir", workdir])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err
    assert err.startswith("error: Dataset 'cifar10' is not prepared in data_dir=")
    assert "If the run's data moved, give its new location: evaluate.py --data-dir DIR" in err
    out = str(tmp_path / "moved.json")
    evaluate_cli.main(["--workdir", workdir, "--data-dir", new_dir, "--output", out])
    after = _json(out)
    assert after["data_dir"] == new_dir
    assert {k: after[k] for k in ("error", "loss", "count", "evaluated_step")} == {
        k: before[k] for k in ("error", "loss", "count", "evaluated_step")}


def test_data_dir_refuses_other_data(capsys, moved, tmp_path):
    workdir, _, _ = moved
    other = str(tmp_path / "other")
    sdj.data.testing.make_tfds_dataset("cifar10", other, num_train=48, num_test=24, seed=4)
    before = _files(workdir)
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", workdir, "--data-dir", other])
    assert f"The data read from {other} is not the data this run trained on" in line
    assert "num_test 16 recorded, 24 here" in line and "channel mean differs" in line
    assert _files(workdir) == before


def test_data_dir_of_a_fake_data_run_or_a_missing_folder_is_refused(capsys, resnet, tmp_path):
    _, workdir = resnet
    line = one_line_error(capsys, evaluate_cli.main,
                          ["--workdir", workdir, "--data-dir", str(tmp_path)])
    assert "trained on fake data written inside its workdir" in line and "drop it" in line
    missing = str(tmp_path / "gone")
    line = one_line_error(capsys, evaluate_cli.main,
                          ["--workdir", workdir, "--data-dir", missing])
    assert f"--data-dir {missing!r} is not a directory" in line


def test_relocate_data_moves_an_image_folder_and_keeps_the_run_config(tmp_path):
    from stochastic_depth_jax.training import evaluate

    config = load_config("cifar10:smoke", ["--config.dataset=image_folder:/old/images"])
    moved = evaluate.relocate_data(config, str(tmp_path))
    assert moved.dataset == f"image_folder:{tmp_path}" and moved.data_dir is None
    assert config.dataset == "image_folder:/old/images"  # the run's own config is unchanged


def test_run_json_records_class_names_and_evaluation_refuses_another_order(tmp_path):
    """An image folder's label order is recorded; the same images under other class names
    (labels meaning other classes) are refused, not evaluated against the wrong labels."""
    from stochastic_depth_jax import data
    from stochastic_depth_jax.training import evaluate, setup

    folder = data.testing.make_image_folder(str(tmp_path / "f"), classes=["1", "2", "10"],
                                            per_class_train=2, per_class_test=1, size=(4, 4))
    config = load_config("cifar10:smoke", [f"--config.dataset=image_folder:{folder}"])
    ds = data.load_dataset(config.dataset, validation_size=0)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    recorded = setup.run_metadata(config, ds, mesh)["data"]
    assert recorded["class_names"] == ["1", "10", "2"]
    workdir = str(tmp_path)
    evaluate.check_same_data(recorded, ds, config, workdir)
    with pytest.raises(errors.DataError, match="class names or their label order differ"):
        evaluate.check_same_data(dict(recorded, class_names=["1", "2", "10"]), ds, config,
                                 workdir)
    evaluate.check_same_data({k: v for k, v in recorded.items() if k != "class_names"}, ds,
                             config, workdir)  # a run.json written before names were recorded


def test_the_pixel_fingerprint_catches_what_sizes_and_statistics_miss(tmp_path):
    """A square test image turned by 90 degrees keeps every count and the training
    statistics; the recorded fingerprint of the pixels still refuses it."""
    from PIL import Image

    from stochastic_depth_jax import data
    from stochastic_depth_jax.training import evaluate, setup

    folder = data.testing.make_image_folder(str(tmp_path / "f"), classes=2, per_class_train=2,
                                            per_class_test=1, size=(4, 4))
    config = load_config("cifar10:smoke", [f"--config.dataset=image_folder:{folder}"])
    ds = data.load_dataset(config.dataset, validation_size=0)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    recorded = setup.run_metadata(config, ds, mesh)["data"]
    evaluate.check_same_data(recorded, ds, config, str(tmp_path))
    test_dir = os.path.join(folder, "test", sorted(os.listdir(os.path.join(folder, "test")))[0])
    path = os.path.join(test_dir, sorted(os.listdir(test_dir))[0])
    with Image.open(path) as image:
        image.rotate(90).save(path)
    turned = data.load_dataset(config.dataset, validation_size=0)
    assert data.fingerprint(turned) != recorded["pixels_sha256"]
    with pytest.raises(errors.DataError, match="the images or labels of a split differ"):
        evaluate.check_same_data(recorded, turned, config, str(tmp_path))


def test_a_run_recorded_before_the_fingerprint_is_refused_where_images_now_read_differently(
        tmp_path):
    """An image folder run.json without the fingerprint: plain PNGs pass; an EXIF-rotated
    JPEG, which the earlier reader did not turn, is refused naming it."""
    from PIL import Image

    from stochastic_depth_jax import data
    from stochastic_depth_jax.training import evaluate, setup

    folder = data.testing.make_image_folder(str(tmp_path / "f"), classes=2, per_class_train=2,
                                            per_class_test=1, size=(4, 4))
    config = load_config("cifar10:smoke", [f"--config.dataset=image_folder:{folder}"])
    ds = data.load_dataset(config.dataset, validation_size=0)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    old = {k: v for k, v in setup.run_metadata(config, ds, mesh)["data"].items()
           if k != "pixels_sha256"}
    evaluate.check_same_data(old, ds, config, str(tmp_path))
    class0 = os.path.join(folder, "train", sorted(os.listdir(os.path.join(folder, "train")))[0])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to view
    path = os.path.join(class0, "turned.jpg")
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(path, exif=exif)
    with pytest.raises(errors.DataError, match="recorded by an earlier version.*turned.jpg.*"
                       "EXIF rotation \\(6\\), applied only now.*or retrain"):
        evaluate.check_same_data(old, ds, config, str(tmp_path))


# ---- sweep.py ------------------------------------------------------------------------------

def _sweep_argv(root, *extra):
    return ["--config", "cifar10:smoke", "--depths", "8", "--p-last", "0.5", "--root", root,
            *TINY, *extra]


@pytest.mark.parametrize("override, expected", [
    ("--config.learning_rate=0.05", "learning_rate: 0.1 -> 0.05"),
    ("--config.num_epochs=1", "num_epochs: 2 -> 1 (shorter; a longer one extends the run)"),
    ("--config.model.survival_rule=uniform", "model.survival_rule: 'linear' -> 'uniform'"),
])
def test_sweep_refuses_a_run_made_with_another_config(capsys, resnet, override, expected):
    root, workdir = resnet
    before = _files(workdir)
    line = one_line_error(capsys, sweep_cli.main, _sweep_argv(root, override))
    assert f"{workdir} holds a run trained with a different config" in line
    assert expected in line and f"use a new --root for this config, or remove {workdir}" in line
    assert _files(workdir) == before


def test_sweep_extends_a_longer_run_and_ignores_logging_fields(resnet):
    root, _ = resnet
    trained = []

    def train(config, workdir):
        trained.append((config.num_epochs, workdir))

    [(name, extra)] = sweep.plan([8], [0.5])
    same = load_config("cifar10:smoke", TINY + extra + ["--config.write_plots=true",
                                                        "--config.keep_checkpoints=1"])
    assert sweep.run_sweep([(name, same)], root, train=train) == {NAME: "skipped (finished)"}
    longer = load_config("cifar10:smoke", TINY + extra + ["--config.num_epochs=3"])
    assert sweep.run_sweep([(name, longer)], root, train=train) == {NAME: "resumed"}
    assert trained == [(3, os.path.join(root, NAME))]


def test_a_sweep_measures_a_finished_run_s_best_that_no_evaluation_measured(
        capsys, resnet, tmp_path):
    """A finished run of an earlier version whose summary.json's best has no test error:
    the sweep skipped it, and Fig. 8 left it without a point until train.py was run on it.
    The sweep's command runs it again: its 'best' checkpoint is evaluated ('Nothing to
    train'), the errors added to summary.json, and Fig. 8 draws it."""
    import shutil

    root = str(tmp_path / "sweep")
    shutil.copytree(resnet[0], root)
    path = os.path.join(root, NAME, loop.SUMMARY_FILE)
    summary = _json(path)
    measured = summary["best"]
    with open(path, "w") as f:
        json.dump({**summary, "best": {k: v for k, v in measured.items()
                                       if k not in ("test_error", "val_error")}}, f)
    [(name, extra)] = sweep.plan([8], [0.5])
    status = sweep.run_sweep([(name, load_config("cifar10:smoke", TINY + extra))], root)
    assert status == {NAME: "skipped (finished; its best measured now)"}
    assert "Nothing to train" in capsys.readouterr().out
    assert _json(path)["best"]["test_error"] == pytest.approx(measured["test_error"])


def test_a_sweep_does_not_train_a_finished_run_again_to_measure_its_best(resnet, tmp_path):
    """The same run, its checkpoints/ removed to save space (checkpoints_best kept): run
    again to measure its best, it had no checkpoint to resume from and was trained afresh
    from step 0, its records replaced. It is left as it is, a warning saying why."""
    root = str(tmp_path / "sweep")
    shutil.copytree(resnet[0], root)
    workdir = os.path.join(root, NAME)
    path = os.path.join(workdir, loop.SUMMARY_FILE)
    summary = _json(path)
    with open(path, "w") as f:
        json.dump({**summary, "best": {k: v for k, v in summary["best"].items()
                                       if k not in ("test_error", "val_error")}}, f)
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    before = {n: _bytes(os.path.join(workdir, n)) for n in (loop.SUMMARY_FILE, "metrics.jsonl")}
    [(name, extra)] = sweep.plan([8], [0.5])
    with pytest.warns(logs.RunWarning, match="is not measured now: its last checkpoint"):
        status = sweep.run_sweep([(name, load_config("cifar10:smoke", TINY + extra))], root)
    assert status == {NAME: "skipped (finished; its best could not be measured)"}
    assert {n: _bytes(os.path.join(workdir, n)) for n in before} == before
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.parametrize("override, flag", [
    ("--config.model.final_survival_prob=0.2", "--p-last"),
    ("--config.model.depth=20", "--depths"),
])
def test_sweep_refuses_an_override_of_a_swept_field(capsys, tmp_path, override, flag):
    root = str(tmp_path / "swept")
    line = one_line_error(capsys, sweep_cli.main, _sweep_argv(root, override))
    assert f"{override!r} would be replaced in every run" in line and flag in line
    assert not os.path.exists(root)


def test_sweep_collect_without_the_root_is_one_line(capsys, tmp_path):
    missing = str(tmp_path / "does-not-exist")
    line = one_line_error(capsys, sweep_cli.main, ["--root", missing, "--collect"])
    assert f"--root {missing!r} is not a directory" in line


def test_sweep_refuses_the_vit_and_does_not_offer_it(capsys, tmp_path):
    root = str(tmp_path / "swvit")
    line = one_line_error(capsys, sweep_cli.main, [
        "--config", "cifar10_vit:smoke", "--depths", "2", "--p-last", "0.5", "--root", root])
    assert "sweep is over model.depth and p_L" in line and "model is 'vit'" in line
    assert "drop_path_rate" in line and not os.path.exists(root)
    offered = sweep_cli._sweepable_configs()
    assert "cifar10_vit" not in offered and {"cifar10", "cifar100_wrn"} <= set(offered)


def test_a_missing_step_names_the_steps_of_both_series(capsys, resnet, tmp_path):
    """A step that no checkpoint holds was refused as 'No latest checkpoint at step N ...;
    available: [4]', leaving out the best series' steps, which are evaluated too (the
    latest series rotates out steps the best one keeps)."""
    import shutil

    _, workdir = resnet
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    [best] = [int(n) for n in os.listdir(os.path.join(copy, "checkpoints_best")) if n.isdigit()]
    latest = sorted(int(n) for n in os.listdir(os.path.join(copy, "checkpoints")) if n.isdigit())
    shutil.rmtree(os.path.join(copy, "checkpoints", str(best)))  # rotated out of 'latest'
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", copy, "--checkpoint", "99"])
    rest = [s for s in latest if s != best]
    assert line == (f"error: No checkpoint at step 99 in {copy}: checkpoints/ holds steps "
                    f"{rest} and checkpoints_best/ steps [{best}]; give one of them "
                    "(--checkpoint STEP), or --checkpoint best or latest.")
    # ... and such a step, held by the best series alone, is evaluated as the step it is.
    result = training.evaluate_checkpoint(copy, best, split="validation")
    assert (result["evaluated_step"], result["checkpoint"]) == (best, "step")


def test_paths_under_home_are_expanded(tmp_path, monkeypatch):
    """'--workdir=~/runs/x' (the shell expands no '~' after '=') was 'not a directory', and
    '--export=~/pruned' or sweep.py's '--root=~/sweep' wrote into a folder named '~' in the
    current directory, as train.py's --workdir did."""
    monkeypatch.setenv("HOME", str(tmp_path))
    home = str(tmp_path)
    args = evaluate_cli.parse_args(["--workdir=~/run", "--output=~/r.json", "--export=~/e",
                                    "--data-dir=~/data"])
    assert (args.workdir, args.output, args.export, args.data_dir) == tuple(
        os.path.join(home, name) for name in ("run", "r.json", "e", "data"))
    args, _ = sweep_cli.parse_args(["--collect", "--root=~/sweep"])
    assert args.root == os.path.join(home, "sweep")


def test_python_callers_paths_under_home_are_expanded(resnet, monkeypatch):
    """`evaluate_checkpoint('~/run')` was 'not the --workdir of a training run', and
    `export_pruned_run(..., '~/pruned')` wrote into a folder named '~' in the current
    directory (the command line and train_and_evaluate expanded '~'; the library did not)."""
    from stochastic_depth_jax.training import depth, evaluate

    root, _ = resnet
    monkeypatch.setenv("HOME", root)
    tilde = os.path.join("~", NAME)
    result = evaluate.evaluate_checkpoint(tilde, "latest")
    assert result["split"] == "test" and result["count"] > 0
    assert depth.mc_evaluate_run(tilde, samples=1)["samples"] == 1
    assert [r["name"] for r in sweep.collect("~")] == [NAME]
    try:
        record = depth.export_pruned_run(tilde, "~/pruned", remove=1, repeats=1,
                                         throughput_batch=4)
        assert record["removed"] and os.path.isdir(os.path.join(root, "pruned"))
        assert pruning.load_pruned("~/pruned")[2]["removed"] == record["removed"]
    finally:  # the sweep's root is the module's: leave it as it was
        shutil.rmtree(os.path.join(root, "pruned"), ignore_errors=True)


def test_an_abbreviated_debug_flag_shows_the_traceback(tmp_path, monkeypatch):
    """argparse takes '--deb' for --debug, and the error was still one line (as train.py's
    was): the traceback asked for is the exception itself."""
    monkeypatch.delenv("SDJ_DEBUG", raising=False)
    with pytest.raises(errors.CheckpointError, match="is not a directory"):
        evaluate_cli.main(["--workdir", str(tmp_path / "none"), "--deb"])
    with pytest.raises(errors.ConfigError, match="--collect draws every run"):
        sweep_cli.main(["--collect", "--deb", "--root", str(tmp_path), "--config.seed=1"])


def test_an_empty_sweep_root_is_refused(capsys):
    """`--root "$UNSET"` trained the sweep's runs in the current directory (./depth8_pL1,
    ./figures), as train.py's empty --workdir trained in ./workdir/<config>."""
    with pytest.raises(SystemExit) as info:
        sweep_cli.parse_args(["--config", "cifar10:smoke", "--depths", "8", "--p-last", "1",
                              "--root", " "])
    assert info.value.code == 2
    assert "error: --root is empty (an unset shell variable?)" in capsys.readouterr().err


def test_checkpoints_linked_to_a_disk_not_mounted_are_named(resnet, tmp_path):
    """checkpoints/ a symbolic link to nothing (its disk not mounted): the run 'has no latest
    checkpoint yet, nor any other', to be evaluated 'once one is saved', as if it had never
    trained; a step asked for was one neither series holds."""
    from stochastic_depth_jax.training import checkpoint, evaluate

    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    shutil.copy(os.path.join(resnet[1], "run.json"), workdir)
    for name in ("checkpoints", "checkpoints_best"):
        os.symlink(str(tmp_path / "disk" / name), os.path.join(workdir, name))
    link = os.path.join(workdir, "checkpoints")
    for which in ("latest", 4):
        with pytest.raises(checkpoint.CheckpointAccessError) as info:
            evaluate.evaluate_checkpoint(workdir, which)
        assert str(info.value) == (
            f"Cannot read {link}: it is a symbolic link to {tmp_path / 'disk' / 'checkpoints'}, "
            "which does not exist (its filesystem not mounted, or moved?): mount it or mend "
            "the link to evaluate the run.")


def test_an_image_folder_run_of_a_smoke_config_is_not_called_fake():
    """A smoke config's fake_data.num_train (160) is left as it is when --config.dataset names
    an image folder, which is real data and what the run trained on: its results were
    marked "fake_data": true, 'FAKE random-label images' in the line."""
    from stochastic_depth_jax.training import evaluate

    folder = load_config("cifar10:smoke", ["--config.dataset=image_folder:/data/pets"])
    assert folder.fake_data.num_train == 160
    assert evaluate.fake_data_fields(folder) == {}
    assert evaluate.fake_data_fields(load_config("cifar10:smoke")) == {"fake_data": True}


def test_an_empty_output_is_refused(capsys, tmp_path):
    """--output "$UNSET" wrote the default file as if the flag were left out."""
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", str(tmp_path), "--output", ""])
    assert line == ("error: --output is empty (an unset shell variable?); give a JSON path, or "
                    "leave the flag out for the default in the workdir.")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["metrics.jsonl.dropped", "validation.jsonl.dropped",
                                  "summary.json.tmp-0123456789ab", "run.lock", "notes.txt",
                                  "tensorboard"])
def test_output_in_the_workdir_is_a_json_name_other_than_the_runs(capsys, resnet, name):
    """--output <workdir>/metrics.jsonl.dropped (the run's record of the metrics a restart
    set aside, which it appends to), a temporary file's name (removed by the run's next
    start), run.lock, ...: accepted, as only the run's listed files were refused. In the
    run's workdir every name that is not a .json one is the run's, or may become one."""
    _, workdir = resnet
    path = os.path.join(workdir, name)
    before = _files(workdir)
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", workdir, "--output", path])
    assert line.startswith(f"error: --output {path}: in the run's workdir a name that does "
                           "not end in .json is the run's, or may become one")
    assert line.endswith("give a name ending in .json, or leave --output out. Nothing was "
                         "evaluated.")
    assert _files(workdir) == before


def test_output_in_the_workdir_may_be_any_other_json_name(resnet):
    _, workdir = resnet
    path = os.path.join(workdir, "mine.json")
    try:
        evaluate_cli.main(["--workdir", workdir, "--output", path])
        assert _json(path)["split"] == "test"
    finally:
        os.remove(path)


@pytest.mark.parametrize("directory", ["checkpoints", "checkpoints_best/1",
                                       "checkpoints_superseded", "tensorboard", "fake_data"])
def test_output_never_goes_into_a_directory_the_run_manages(capsys, resnet, directory):
    """--output <workdir>/checkpoints/eval.json (or tensorboard/, a step's folder, ...) was
    accepted: the run rotates, moves and purges those directories' contents."""
    _, workdir = resnet
    os.makedirs(os.path.join(workdir, directory), exist_ok=True)
    path = os.path.join(workdir, directory, "mine.json")
    before = _files(workdir)
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", workdir, "--output", path])
    top = directory.split("/")[0]
    assert line == (f"error: --output {path} is inside the run's {top}/, whose contents the "
                    "run manages (it deletes, moves and rewrites them); give a path in "
                    f"--workdir {workdir} itself or outside it, or leave --output out. "
                    "Nothing was evaluated.")
    assert _files(workdir) == before


def _case_insensitive_below(monkeypatch, root):
    """Paths below ``root`` look files up as a case-insensitive file system does (macOS's,
    Windows'): ``Checkpoints`` opens ``checkpoints``, and the name keeps the case typed."""
    def folding(real):
        def call(path, *args, **kwargs):
            p = os.fspath(path)
            if isinstance(p, str) and p.startswith(root + os.sep):
                p = root + p[len(root):].lower()
            return real(p, *args, **kwargs)
        return call
    for name in ("stat", "lstat", "access"):
        monkeypatch.setattr(os, name, folding(getattr(os, name)))


def test_output_check_goes_by_the_directory_not_its_spelling(tmp_path, monkeypatch):
    """On a case-insensitive file system <workdir>/Checkpoints/mine.json passed the check of
    the directories the run manages (its name compared as typed) and was written among the
    checkpoints; <Workdir>/mine.json was refused as in 'another run' and <Workdir>/
    Summary.json for that reason, not as the run's own file."""
    root = str(tmp_path)
    workdir = os.path.join(root, "run")
    os.makedirs(os.path.join(workdir, "checkpoints", "4"))
    open(os.path.join(workdir, "run.json"), "w").close()
    _case_insensitive_below(monkeypatch, root)
    for inside in ("Checkpoints", os.path.join("CHECKPOINTS", "4")):
        path = os.path.join(workdir, inside, "mine.json")
        with pytest.raises(errors.WorkdirError, match=r" is inside the run's checkpoints/,"):
            evaluate_cli._check_output(path, workdir)
    elsewhere = os.path.join(root, "Run")
    evaluate_cli._check_output(os.path.join(elsewhere, "mine.json"), workdir)  # the run's
    with pytest.raises(errors.WorkdirError, match=r"is the name of one of the run's own"):
        evaluate_cli._check_output(os.path.join(elsewhere, "Summary.json"), workdir)
    other = os.path.join(root, "other")
    os.makedirs(other)
    open(os.path.join(other, "run.json"), "w").close()
    with pytest.raises(errors.WorkdirError, match=r"is in the workdir of another run"):
        evaluate_cli._check_output(os.path.join(root, "Other", "mine.json"), workdir)


def _file_ids_below(monkeypatch, root, ids):
    """os.stat of the paths below ``root`` gives the file ids ``ids`` yields, as some file
    systems do: sshfs-win, WebDAV and other network drives give every file the id 0, and
    some an id that changes between calls."""
    real = os.stat

    def stat(path, *args, **kwargs):
        result = real(path, *args, **kwargs)
        p = os.fspath(path) if not isinstance(path, int) else None
        if not (isinstance(p, str) and p.startswith(root + os.sep)):
            return result
        fields = list(result[:10])
        fields[1] = next(ids)  # st_ino
        return os.stat_result(fields)
    monkeypatch.setattr(os, "stat", stat)


@pytest.mark.parametrize("ids", ["zero", "changing"])
def test_output_check_does_not_trust_file_ids_alone(tmp_path, monkeypatch, ids):
    """Compared by file id alone, a file system that gives every directory the id 0 made
    every --output (a new file in a fresh directory, in the workdir) 'inside the run's
    checkpoints/'; one whose ids change between calls made the workdir another run's and
    let a file into checkpoints/. The same real path is the same directory."""
    root = str(tmp_path)
    workdir, other, fresh = (os.path.join(root, n) for n in ("run", "other", "fresh"))
    os.makedirs(os.path.join(workdir, "checkpoints"))
    for d in (other, fresh):
        os.makedirs(d)
    for d in (workdir, other):
        open(os.path.join(d, "run.json"), "w").close()
    _file_ids_below(monkeypatch, root, itertools.repeat(0) if ids == "zero"
                    else itertools.count(1))
    evaluate_cli._check_output(os.path.join(fresh, "mine.json"), workdir)
    evaluate_cli._check_output(os.path.join(workdir, "mine.json"), workdir)
    with pytest.raises(errors.WorkdirError, match=r" is inside the run's checkpoints/,"):
        evaluate_cli._check_output(os.path.join(workdir, "checkpoints", "mine.json"), workdir)
    with pytest.raises(errors.WorkdirError, match=r"is the name of one of the run's own"):
        evaluate_cli._check_output(os.path.join(workdir, "summary.json"), workdir)
    with pytest.raises(errors.WorkdirError, match=r"is in the workdir of another run"):
        evaluate_cli._check_output(os.path.join(other, "mine.json"), workdir)


def test_output_in_a_directory_this_user_cannot_write_is_refused_before_the_work(
        capsys, resnet, tmp_path, monkeypatch):
    """--output into a directory this user may not write in was found only once the
    evaluation had run (a depth curve's minutes: the result printed, not saved). Root
    ignores permissions, so os.access stands in for them."""
    _, workdir = resnet
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        False if os.fspath(p) == str(locked) and mode & os.W_OK else real_access(p, mode, **kw)))
    path = str(locked / "result.json")
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", workdir, "--output", path])
    assert line == (f"error: --output {path}: this user may not write in its directory "
                    f"{locked}; give a path in a directory it can write in, or change that "
                    "directory's permissions. Nothing was evaluated.")
    assert os.listdir(locked) == []


def test_output_never_replaces_a_sweep_s_diverged_record(capsys, tmp_path):
    """--output <run>/diverged.json was accepted: the evaluation's JSON replaced the sweep's
    record that the run diverged (its rerun then trained the run again), or, written before
    it, was read by the sweep as a damaged record. Refused before any work, like the run's
    other own files."""
    workdir = tmp_path / "depth8_pL0.5"
    workdir.mkdir()
    (workdir / "run.json").write_text("{}")
    record = workdir / "diverged.json"
    record.write_text('{"step": 5, "epoch": 2, "kept_step": 4}')
    for name in ("diverged.json", "summary.json"):
        path = str(workdir / name)
        line = one_line_error(capsys, evaluate_cli.main,
                              ["--workdir", str(workdir), "--output", path])
        assert line.startswith(f"error: --output {path} is the name of one of the run's own")
        assert "there; a sweep, its diverged.json), which" in line
    assert record.read_text() == '{"step": 5, "epoch": 2, "kept_step": 4}'

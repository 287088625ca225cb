"""Configs: paper values, smoke variants, overrides, clear errors; optimiser and schedule."""

import importlib
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` lives at the repository root, beside train.py.

from cli_output import one_line_error  # noqa: E402
import stochastic_depth_jax as sdj  # noqa: E402
from configs import CONFIGS, load_config  # noqa: E402
from stochastic_depth_jax.training import config as config_lib  # noqa: E402
from stochastic_depth_jax.training import optim  # noqa: E402

PAPER = {  # name: (dataset, depth, epochs, lr boundaries)
    "cifar10": ("cifar10", 110, 500, (250, 375)),
    "cifar100": ("cifar100", 110, 500, (250, 375)),
    "svhn": ("svhn", 152, 50, (30, 35)),
    # Sec. 4: 300 epochs, / 10 at 150 and 225 (after a warm-up, see the test below).
    "cifar10_resnet1202": ("cifar10", 1202, 300, (150, 225)),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_hyperparameters(name):
    c = load_config(name)
    dataset, depth, epochs, boundaries = PAPER[name]
    assert (c.dataset, c.model.depth, c.num_epochs) == (dataset, depth, epochs)
    assert tuple(c.lr_boundaries_epochs) == boundaries
    assert c.model.final_survival_prob == 0.5 and c.model.survival_rule == "linear"
    assert c.batch_size == 128 and c.learning_rate == 0.1 and c.lr_decay_factor == 0.1
    assert c.optimizer == "sgd" and c.momentum == 0.9 and c.nesterov
    assert c.weight_decay == 1e-4 and c.weight_decay_on == "all"
    assert c.select_best_by == "validation"
    # SVHN: "validation error is calculated every 200 iterations" (Sec. 4); CIFAR: per epoch.
    assert c.eval_every_steps == (200 if name == "svhn" else 0)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_has_nothing_the_paper_does_not(name):
    """The rest of Sec. 4's recipe, which no training test would tell apart: a step schedule
    with no warm-up (ResNet-1202: 10 epochs at lr / 10), plain cross-entropy, no dropout, the
    dataset's own augmentation (CIFAR flip + translate, SVHN none), the paper's validation
    hold-out (CIFAR 5,000, SVHN 6,000), the paper's network (basic blocks, average-pooled
    zero-padded shortcuts, width 16), one gate per block per mini-batch, the branch scaled
    by p_l at test time, and an evaluation every epoch."""
    c = load_config(name)
    assert c.lr_schedule == "step"
    assert c.warmup_epochs == (10 if name == "cifar10_resnet1202" else 0)
    assert c.label_smoothing == 0.0 and c.model.dropout_rate == 0.0
    assert c.augment == "auto" and c.validation_size is None and not c.train_on_all
    assert (c.model.name, c.model.block, c.model.shortcut, c.model.width) == (
        "cifar_resnet", "basic", "A-avg", 16)
    assert (c.model.mode, c.model.scaling) == ("batch", "test")
    assert c.eval_every_epochs == 1


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_file_header_and_smoke_variant(name):
    with open(os.path.join(REPO, "configs", f"{name}.py")) as f:
        header = f.read(1500)
    for word in ("Command:", "python train.py --config", "Runtime:", "Paper:", "%"):
        assert word in header, (name, word)
    smoke = load_config(f"{name}:smoke")
    # ConvNeXt configs give blocks per stage (model.depths) instead of one depth.
    depth = smoke.model.depth if "depth" in smoke.model else sum(smoke.model.depths)
    assert smoke.fake_data.num_train > 0 and depth < 20 and smoke.num_epochs <= 3


def _train_images(dataset):
    """Training images per epoch of ``dataset``, from README's data table (paper splits)."""
    with open(os.path.join(REPO, "README.md")) as f:
        row = next(line for line in f if line.startswith("| `") and f"`{dataset}`" in line)
    return int(re.search(r"\| ([\d,]+) / [\d,]+ / [\d,]+ \|", row).group(1).replace(",", ""))


@pytest.mark.parametrize("name, claim, digits", [
    ("svhn", r"about ([\d.]+)x the CIFAR ResNet-110 run", 1),
    ("cifar10_resnet1202", r"about ([\d.]+)x the ResNet-110 run", 1)])
def test_runtime_ratios_in_config_docstrings_follow_from_the_configs(name, claim, digits):
    """Compute per run, images x epochs x residual blocks, against CIFAR-10's ResNet-110
    (SVHN's said 1.6x, where its 1.33x the images through 75 blocks against 54 are 1.85x)."""
    def work(c):
        return _train_images(c.dataset) * c.num_epochs * (c.model.depth - 2) // 2

    config, module = load_config(name), importlib.import_module(f"configs.{name}")
    quoted = float(re.search(claim, " ".join(module.__doc__.split())).group(1))
    assert quoted == round(work(config) / work(load_config("cifar10")), digits)


def test_path_form_and_overrides():
    c = load_config(
        os.path.join(REPO, "configs", "svhn.py") + ":smoke",
        [
            "--config.batch_size=16",
            "model.width=8",
            "--config.lr_boundaries_epochs=3,5",
            "--config.model.scan=true",
            "--config.data_dir=/tmp/d",
            "--config.model.final_survival_prob=1",
        ],
    )
    assert (c.dataset, c.batch_size, c.model.width) == ("svhn", 16, 8)
    assert tuple(c.lr_boundaries_epochs) == (3, 5) and c.model.scan is True
    assert c.data_dir == "/tmp/d" and c.model.final_survival_prob == 1.0


@pytest.mark.parametrize(
    "spec, overrides, match",
    [
        ("imagenet", [], "Unknown config 'imagenet'.*cifar10"),
        ("cifar10:tiny", [], "Unknown variant 'tiny'.*smoke"),
        ("cifar10", ["--config.bogus=1"], "Unknown config field 'bogus'.*batch_size"),
        ("cifar10", ["--config.model.depht=20"], "model.depht.*model.depth"),
        ("cifar10", ["--config.model.final_survival_prb=0.3"],
         "Unknown config field 'model.final_survival_prb'. Did you mean "
         "'model.final_survival_prob'\\? Valid fields: adam_b1"),
        # A field of another model: no far-fetched guess (model.drop_path_rule), the list.
        ("cifar10_vit", ["--config.model.compact_multiple=4"],
         "Unknown config field 'model.compact_multiple'. Valid fields: "),
        ("cifar10", ["--config.model=1"], "'model' is a group of fields; override one of "
                                          "them: model.block, .*model.depth"),
        ("cifar10", ["--config.lr_boundaries_epochs=abc"], "Bad value 'abc' for config field "
         "'lr_boundaries_epochs' \\(type tuple\\): expected values separated by commas, e.g. "
         "250,375 or \\(250, 375\\); \\(\\) for none$"),
        ("cifar10", ["--config.batch_size=abc"], "Bad value 'abc'.*batch_size"),
        ("cifar10", ["--config.model.scan=maybe"], "expected true/false or None"),
        ("cifar10", ["--config.write_plots=maybe"], "expected true/false, got"),
        ("cifar10", ["--config.model.depth=21"], "model.depth=21 must be 6n\\+2"),
        ("cifar10", ["--config.model.final_survival_prob=0"], "final_survival_prob"),
        ("cifar10", ["--config.model.final_survival_prob=1.5"], "final_survival_prob"),
        ("cifar10", ["--config.model.survival_rule=cosine"], "survival_rule.*linear"),
        ("cifar10", ["--config.model.mode=layer"], "model.mode.*batch"),
        ("cifar10", ["--config.model.initialization=torch"],
         "^Invalid config: model.initialization='torch'; valid: \\['official', 'ours'\\]$"),
        # float16 without loss scaling: the ViT failed in XLA:CPU's attention, the ConvNeXt's
        # first step overflowed; refused for every model, before anything is written.
        *[(name, ["--config.model.dtype=float16"], "^Invalid config: model.dtype='float16' "
           "needs loss scaling, which the trainer does not do .*; use 'bfloat16'")
          for name in ("cifar10", "cifar100_wrn", "cifar10_vit", "cifar10_convnext")],
        ("cifar10", ["--config.model.dtype=half"],
         "model.dtype='half'; valid: \\['bfloat16', 'float32'\\]$"),
        ("cifar10", ["--config.optimizer=adam"], "optimizer='adam'; valid: \\['adamw', 'sgd'\\]"),
        ("cifar10", ["--config.weight_decay_on=bn"], "weight_decay_on.*kernels"),
        ("cifar10", ["--config.batch_size=0"], "batch_size=0 must be"),
        ("cifar10", ["--config.learning_rate=-1"], "learning_rate"),
        ("cifar10", ["--config.lr_boundaries_epochs=375,250"], "lr_boundaries_epochs"),
        ("cifar10", ["--config.dataset=mnist"], "dataset='mnist'.*image_folder"),
        ("cifar10", ["--config.train_on_all=true"], "select_best_by"),
        ("cifar10", ["--config.select_best_by=loss"], "select_best_by.*validation"),
        # eval_every_steps evaluates the validation split: one line names every fix.
        ("svhn", ["--config.validation_size=0"], "validation_size=0 leaves no validation set "
         "for eval_every_steps=200 .*; set --config.eval_every_steps=0 and select_best_by to "
         '"test" or "train"$'),
        ("svhn", ["--config.train_on_all=true", "--config.select_best_by=test"],
         "train_on_all=True leaves no validation set for eval_every_steps=200 .*; set "
         "--config.eval_every_steps=0$"),
        ("cifar10", ["--config.eval_every_steps=-200"], "eval_every_steps=-200 must be an "
         "integer >= 0"),
        # None empties only a field that may be empty: a count, rate or tuple may not.
        ("cifar10", ["--config.num_epochs=None"], "'num_epochs'.*cannot be empty.*500"),
        ("cifar10", ["--config.lr_decay_factor=None"], "'lr_decay_factor'.*cannot be empty"),
        ("cifar10", ["--config.label_smoothing=none"], "'label_smoothing'.*cannot be empty"),
        ("cifar10", ["--config.adam_b1=null"], "'adam_b1'.*cannot be empty"),
        # A string field keeps a None-word as text: the cache went to a folder ./None.
        ("cifar10", ["--config.compilation_cache_dir=None"], "compilation_cache_dir='None' "
         "would be a directory named 'None' in the current directory; "
         "--config.compilation_cache_dir='' turns the cache off"),
        ("cifar10", ["--config.lr_boundaries_epochs=None"], "'lr_boundaries_epochs'.*empty"),
        ("cifar10_vit", ["--config.batch_size=None"], "'batch_size'.*cannot be empty"),
        ("cifar10", ["--config.model.depth=None"], "'model.depth'.*cannot be empty"),
        # num_epochs is checked before the fields compared against it (warmup_epochs).
        ("cifar10", ["--config.num_epochs=0"], "num_epochs=0 must be an integer >= 1"),
        ("cifar10_vit", ["--config.num_epochs=-1"], "num_epochs=-1 must be an integer >= 1"),
        # 160 fake images less 32 for validation: refused before any data is written.
        ("cifar10:smoke", ["--config.batch_size=256"],
         "batch_size=256 is larger than the 128 training examples.*at most 128, or hold out "
         r"fewer than 32 for validation \(--config.validation_size\)$"),
        ("cifar10:smoke", ["--config.batch_size=256", "--config.train_on_all=True",
                           "--config.select_best_by=test"],
         r"larger than the 160 training examples .*: lower --config.batch_size to at most 160$"),
        ("cifar100:smoke", ["--config.batch_size=150", "--config.validation_size=0.5",
                            "--config.select_best_by=test"],
         "batch_size=150 is larger than the 80 training examples"),
        # Fake data writes every split; tfds failed on an empty one with a traceback, after
        # announcing the data.
        ("cifar10:smoke", ["--config.fake_data.num_test=0"], r"fake_data.num_test=0: fake "
         r"data needs a test split; set --config.fake_data.num_test to at least 1"),
        ("svhn:smoke", ["--config.fake_data.num_extra=0"], r"fake_data.num_extra=0: fake svhn "
         r"data needs its extra split .*set --config.fake_data.num_extra to at least 1"),
        ("cifar10", ["--config.augment=crop"], r"augment='crop'; valid: \['auto', "
         r"'flip_translate', 'none', 'translate'\]$"),
        # SVHN's validation set is held out of train + extra (160 + 64 fake images).
        ("svhn:smoke", ["--config.validation_size=224"], r"validation_size=224 must be "
         r"smaller than fake_data.num_train \+ num_extra=224$"),
    ],
)
def test_bad_configs_fail_clearly(spec, overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(spec, overrides)


def test_none_still_empties_optional_fields():
    c = load_config("cifar10", ["--config.model.scan=None", "--config.validation_size=None",
                                "--config.data_dir=None"])
    assert c.model.scan is None and c.validation_size is None and c.data_dir is None
    # A placeholder that was given a value may be emptied again (it is told from a plain
    # field by its FieldReference, not by its value).
    c = load_config("cifar10", ["--config.model.scan=true", "--config.model.scan=None",
                                "--config.validation_size=8", "--config.validation_size=None",
                                "--config.data_dir=/data", "--config.data_dir=None"])
    assert c.model.scan is None and c.validation_size is None and c.data_dir is None
    # A plain text field keeps the word: 'none' is a value of model.remat.
    assert load_config("cifar10", ["--config.model.remat=none"]).model.remat == "none"
    c = load_config("cifar10_vit:smoke", ["--config.model.width=None"])  # from model.size
    assert c.model.width is None
    c = load_config("cifar10_convnext", ["--config.model.layer_scale_init=None"])
    assert c.model.layer_scale_init is None
    # A batch that fits the fake training set exactly is accepted.
    assert load_config("cifar10:smoke", ["--config.batch_size=128"]).batch_size == 128


def test_fake_svhn_counts_its_extra_images():
    """Fake SVHN trains on num_train + num_extra images, as the real one on train + extra;
    only num_train was counted: a validation set of 170 of its 224 images was refused as
    not smaller than 160, and a sweep's subtitle said 160 images were generated."""
    c = load_config("svhn:smoke", ["--config.validation_size=170"])
    assert config_lib.fake_train_size(c) == 224 and c.validation_size == 170
    assert config_lib.fake_train_size(load_config("cifar10:smoke")) == 160
    # Real data (num_train 0) stays real, whatever num_extra says.
    assert config_lib.fake_train_size(load_config("svhn", ["--config.fake_data.num_extra=64"])
                                      ) == 0


@pytest.mark.parametrize("field", ["lr_decay_factor", "label_smoothing", "adam_b2",
                                   "lr_boundaries_epochs", "num_epochs"])
def test_none_in_a_config_file_fails_clearly(field):
    """A config file (not an override) that sets a required field to None."""
    c = load_config("cifar10")
    c[field] = None
    with pytest.raises(ValueError, match=f"{field}=None"):
        config_lib.validate(c)


def test_a_config_that_is_not_a_config_dict_is_one_line(tmp_path):
    # A plain dict (config.to_dict(), a parsed YAML file) failed with AttributeError
    # "'dict' object has no attribute 'fake_data'", and left the workdir behind.
    from stochastic_depth_jax.training import train_and_evaluate

    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"config must be an ml_collections.ConfigDict "
                                         r"\(configs.load_config\), got a dict"):
        train_and_evaluate(load_config("cifar10:smoke").to_dict(), workdir)
    assert not os.path.exists(workdir)


def test_default_workdir_keeps_the_variant():
    import train

    assert train.default_workdir("cifar10") == "./workdir/cifar10"
    assert train.default_workdir("cifar10:smoke") == "./workdir/cifar10_smoke"
    assert train.default_workdir("configs/svhn.py:smoke") == "./workdir/configs_svhn_smoke"
    assert train.default_workdir("../my exp.py") == "./workdir/my_exp"  # a directory name


def test_a_workdir_under_home_is_expanded(tmp_path, monkeypatch):
    """'--workdir=~/runs/x' (the shell expands no '~' after '=') and a Python caller's
    '~/runs/x' trained into a folder named '~' under the current directory."""
    import train
    from stochastic_depth_jax.training import train_and_evaluate

    cache = jax.config.jax_compilation_cache_dir  # the session's (conftest), not under HOME
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    args, _ = train.parse_args(["--config", "cifar10:smoke", "--workdir=~/runs/x"])
    assert args.workdir == str(tmp_path / "home" / "runs" / "x")
    train_and_evaluate(load_config("cifar10:smoke", [
        "--config.max_steps=1", "--config.progress_bar=false", "--config.write_plots=false",
        "--config.write_tensorboard=false", f"--config.compilation_cache_dir={cache}"]),
        "~/run")
    assert os.path.exists(tmp_path / "home" / "run" / "summary.json")
    assert not os.path.exists(tmp_path / "~")


def test_an_empty_workdir_is_refused(tmp_path, monkeypatch, capsys):
    """`--workdir "$UNSET"` trained (or resumed) in ./workdir/<config> as if the flag were
    left out, and train_and_evaluate(config, '') in the current directory."""
    import train
    from stochastic_depth_jax import errors
    from stochastic_depth_jax.training import train_and_evaluate

    with pytest.raises(SystemExit) as info:
        train.parse_args(["--config", "cifar10:smoke", "--workdir", ""])
    assert info.value.code == 2
    assert "error: --workdir is empty (an unset shell variable?)" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.WorkdirError, match=r"The workdir is empty \(''\); give"):
        train_and_evaluate(load_config("cifar10:smoke", ["--config.max_steps=1"]), "")
    assert os.listdir(tmp_path) == []


# A script as a command, with SIGINT arriving while it imports `configs` or the package (and
# JAX), as a Ctrl-C in the first seconds does; SWALLOW: inside code that swallows the
# KeyboardInterrupt, as JAX's garbage-collection callback does.
_CTRL_C_AT_START = """
import builtins, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
real = builtins.__import__
def hooked(name, *args, **kwargs):
    if name in ("configs", "stochastic_depth_jax") and hooked.first:
        hooked.first = False
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            if not SWALLOW:
                raise
    return real(name, *args, **kwargs)
hooked.first = True
builtins.__import__ = hooked
sys.argv = ARGV
if EXEC:  # as `exec(open(script).read())` runs it: no __file__
    exec(compile(open(ARGV[0]).read(), ARGV[0], "exec"), {"__name__": "__main__"})
else:
    runpy.run_path(ARGV[0], run_name="__main__")
"""


@pytest.mark.parametrize("script, flags", [
    ("train.py", ["--config", "cifar10:smoke", "--config.max_steps=1", "--workdir"]),
    ("evaluate.py", ["--workdir"]), ("sweep.py", ["--collect", "--root"])])
@pytest.mark.parametrize("swallow, by_exec", [(True, False), (False, False), (False, True)])
def test_ctrl_c_at_start_up_is_one_line(tmp_path, swallow, by_exec, script, flags):
    """A Ctrl-C while a script imported JAX printed a traceback (an ImportError's, from an
    interrupted extension module: "numpy._core.multiarray failed to import"), or was lost in
    JAX's garbage-collection callback and the run went on training. Run by exec() (no
    __file__, so no huge-pages restart), the guard was left out: a traceback."""
    workdir = tmp_path / "run"
    argv = [script, *flags, str(workdir)]
    code = f"SWALLOW = {swallow}\nEXEC = {by_exec}\nARGV = {argv!r}\n" + _CTRL_C_AT_START
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert (done.returncode, done.stderr) == (130, "interrupted (Ctrl-C).\n")
    assert not workdir.exists()


def test_cli_reports_config_errors():
    for args, expected in (
        (["--config", "nope"], "cifar100"),
        (["--config", "cifar10", "--config.nope=1"], "Valid fields"),
        (["--config", "cifar10", "--config.num_epochs=None"], "'num_epochs'"),
    ):
        out = subprocess.run(
            [sys.executable, "train.py", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 1 and expected in out.stderr, out.stderr[-2000:]
        assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr


def test_an_abbreviated_debug_flag_shows_the_traceback(monkeypatch):
    """argparse takes '--deb' for --debug, and the error was still one line."""
    import train
    from stochastic_depth_jax import errors

    monkeypatch.delenv("SDJ_DEBUG", raising=False)
    with pytest.raises(errors.ConfigError, match="Bad value 'abc'"):
        train.main(["--config", "cifar10:smoke", "--deb", "--config.batch_size=abc"])


@pytest.mark.parametrize("source, expected", [
    ("def get_config(arg=None)\n    return None\n",
     "has a syntax error at line 1 (expected ':'): 'def get_config(arg=None)'; fix the file."),
    ("import ml_collections\n\ndef get_config(arg=None):\n    return ml_collections.nope()\n",
     "raised AttributeError at line 4: module 'ml_collections' has no attribute 'nope'"),
    ("import no_such_module_here\n",
     "raised ModuleNotFoundError at line 1: No module named 'no_such_module_here'"),
])
def test_a_broken_config_file_is_one_line_naming_its_line(capsys, tmp_path, source, expected):
    import train

    path = tmp_path / "mine.py"
    path.write_text(source)
    with pytest.raises(ValueError, match="Config file") as info:
        load_config(str(path))
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, (SyntaxError, AttributeError, ImportError))
    line = one_line_error(capsys, train.main, ["--config", f"{path}:smoke"])
    assert expected in line


def test_a_missing_config_file_says_so():
    with pytest.raises(ValueError, match="Config file 'nope/mine.py' does not exist; give an "
                       "existing .py file defining get_config, or one of the registered"):
        load_config("nope/mine.py")


def test_a_config_files_own_config_error_passes_through(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("from stochastic_depth_jax import errors\n\ndef get_config(arg=None):\n"
                    "    raise errors.ConfigError('mine needs a dataset')\n")
    with pytest.raises(ValueError, match="^mine needs a dataset$"):
        load_config(str(path))


def test_a_config_file_that_requires_a_variant_says_so(tmp_path):
    """A file whose VARIANTS lack None: "Unknown variant None ...; valid: ['small'] (or
    none)", offering the very choice that failed."""
    path = tmp_path / "mine.py"
    path.write_text("from configs import base\nVARIANTS = ('small',)\n\n"
                    "def get_config(arg):\n    return base.smoke(base.base_config())\n")
    with pytest.raises(ValueError, match=re.escape(
            f"Config '{path}' needs a variant: give {path}:<variant> with one of ['small'].")):
        load_config(str(path))
    with pytest.raises(ValueError, match=re.escape(
            f"Unknown variant 'smoke' of config '{path}'; valid: ['small'].") + "$"):
        load_config(f"{path}:smoke")
    assert load_config(f"{path}:small").model.depth == 8


@pytest.mark.parametrize("body, expected", [
    # A forgotten return failed in the overrides: AttributeError's traceback.
    ("    c = base.base_config()\n", "get_config(None) returned None, not an "
     "ml_collections.ConfigDict; return one"),
    # A dict was told to "build it with load_config(name, overrides)".
    ("    return {'seed': 1}\n", "get_config(None) returned a dict, not an "),
    # A missing field: KeyError or AttributeError tracebacks, some only once training.
    ("    c = base.base_config()\n    del c['write_plots'], c['batch_size']\n    return c\n",
     "lacks the fields batch_size, write_plots; start from configs/base.py's base_config()"),
    ("    c = base.base_config()\n    del c.model['depth']\n    return c\n",
     "has no field 'depth' (model.depth?), which its model needs"),
])
def test_a_config_file_returning_no_full_config_is_one_line(tmp_path, body, expected):
    path = tmp_path / "mine.py"
    path.write_text("from configs import base\n\ndef get_config(arg=None):\n" + body)
    with pytest.raises(ValueError, match=f"^Config file '{re.escape(str(path))}'.* "
                                         + re.escape(expected)):
        load_config(str(path), ["--config.seed=1"])


def test_a_config_file_under_home_is_found(tmp_path, monkeypatch):
    """'--config=~/exp.py:smoke' (no '~' expanded by the shell after '='): "Config file
    '~/exp.py' does not exist"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "exp.py").write_text("from configs import base\n\ndef get_config(arg=None):\n"
                                     "    return base.smoke(base.base_config())\n")
    assert load_config("~/exp.py:smoke").model.depth == 8


def test_lr_drops_past_the_last_epoch_are_named():
    """`--config.num_epochs=100` on cifar10 kept its drops after epochs 250 and 375: the run
    trained at lr 0.1 throughout, and nothing said so."""
    late = config_lib.unreached_lr_drops
    assert late(load_config("cifar10", ["--config.num_epochs=100"])) == (
        "lr_boundaries_epochs=(250, 375): the learning-rate drops after epochs 250, 375 never "
        "happen in a run of num_epochs=100 (unless extended later); set "
        "--config.lr_boundaries_epochs to epochs below 100, or () for none.")
    assert "drop after epoch 160 never happens in a run of num_epochs=150" in late(
        load_config("cifar100_wrn", ["--config.num_epochs=150"]))
    assert late(load_config("cifar10:smoke", ["--config.num_epochs=1"])).endswith(
        "set --config.lr_boundaries_epochs=() (none).")
    for spec in CONFIGS:  # as shipped, every drop happens; a cosine schedule has none
        assert late(load_config(spec)) is None and late(load_config(f"{spec}:smoke")) is None
    assert late(load_config("cifar10_vit", ["--config.num_epochs=100"])) is None


def test_a_run_whose_lr_drops_never_happen_warns(tmp_path):
    from stochastic_depth_jax import logs
    from stochastic_depth_jax.training import train_and_evaluate

    config = load_config("cifar10:smoke", [
        "--config.num_epochs=1", "--config.max_steps=1", "--config.progress_bar=false",
        "--config.write_plots=false", "--config.write_tensorboard=false"])
    with pytest.warns(logs.RunWarning, match=r"lr_boundaries_epochs=\(1,\): the learning-rate "
                      r"drop after epoch 1 never happens in a run of num_epochs=1"):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_step_schedule_divides_at_epoch_boundaries():
    c = load_config("cifar10")
    schedule = optim.make_lr_schedule(c, steps_per_epoch=10)
    lrs = {n: float(schedule(n)) for n in (0, 2499, 2500, 3749, 3750, 4999)}
    np.testing.assert_allclose(list(lrs.values()), [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_warmup_cosine_rises_to_the_rate_then_falls_to_zero_at_the_last_step():
    """The ViT's schedule: linear from 0 over warmup_epochs, then a half cosine that ends
    at 0 at num_epochs (300 epochs, 10 of warm-up; 10 steps an epoch here)."""
    c = load_config("cifar10_vit")
    assert (c.lr_schedule, c.num_epochs, c.warmup_epochs) == ("warmup_cosine", 300, 10)
    schedule = optim.make_lr_schedule(c, steps_per_epoch=10)
    lrs = [float(schedule(n)) for n in (0, 50, 100, 1550, 3000)]
    np.testing.assert_allclose(lrs, [0.0, c.learning_rate / 2, c.learning_rate,
                                     c.learning_rate / 2, 0.0], rtol=1e-5, atol=1e-9)


def test_resnet1202_warms_up_at_a_tenth_then_steps():
    """Paper Sec. 4: lr 0.01 for the first 10 epochs, then 0.1, / 10 at epochs 150 and 225."""
    c = load_config("cifar10_resnet1202")
    schedule = optim.make_lr_schedule(c, steps_per_epoch=10)
    steps = (0, 99, 100, 1499, 1500, 2249, 2250, 2999)
    np.testing.assert_allclose([float(schedule(n)) for n in steps],
                               [0.01, 0.01, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    smoke = optim.make_lr_schedule(load_config("cifar10_resnet1202:smoke"), steps_per_epoch=5)
    np.testing.assert_allclose([float(smoke(n)) for n in (0, 4, 5, 9)],
                               [0.01, 0.01, 0.1, 0.1], rtol=1e-6)


def test_wrn_config_is_the_wrn_recipe_and_multiplies_its_rate_by_a_fifth():
    """WRN-28-10's recipe (Zagoruyko & Komodakis, 2016): SGD 0.1 with Nesterov momentum 0.9,
    weight decay 5e-4 on every weight, batch 128, 200 epochs, lr x 0.2 after epochs 60, 120
    and 160 (the only shipped schedule whose factor is not 0.1), the other CIFAR configs'
    augmentation (its docstring says where the WRN paper's differs)."""
    c = load_config("cifar100_wrn")
    assert (c.dataset, c.model.name, c.model.depth, c.model.widen_factor) == (
        "cifar100", "wide_resnet", 28, 10)
    assert (c.optimizer, c.learning_rate, c.momentum, c.nesterov) == ("sgd", 0.1, 0.9, True)
    assert (c.weight_decay, c.weight_decay_on, c.batch_size) == (5e-4, "all", 128)
    assert (c.num_epochs, tuple(c.lr_boundaries_epochs)) == (200, (60, 120, 160))
    assert c.augment == "auto"
    assert "reflections" in importlib.import_module(CONFIGS["cifar100_wrn"]).__doc__
    schedule = optim.make_lr_schedule(c, steps_per_epoch=10)
    steps = (0, 599, 600, 1199, 1200, 1599, 1600, 1999)
    np.testing.assert_allclose([float(schedule(n)) for n in steps],
                               [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008], rtol=1e-6)


def _torch_sgd_reference(params, grads, lr, momentum, wd, steps):
    """torch.optim.SGD(nesterov=True, dampening=0, weight_decay=wd), written out in numpy."""
    p, buf = params.copy(), None
    for g in grads[:steps]:
        d = g + wd * p
        buf = d if buf is None else momentum * buf + d
        p = p - lr * (d + momentum * buf)
    return p


def test_optimizer_is_torch_sgd_nesterov_with_l2():
    c = load_config("cifar10")
    opt = optim.make_optimizer(c, steps_per_epoch=1000)
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.normal(size=(3, 3)).astype(np.float32),
        "bn_scale": rng.normal(size=(3,)).astype(np.float32),
    }
    grads = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        for _ in range(4)
    ]
    state, p = opt.init(params), jax.tree.map(jnp.asarray, params)
    for g in grads:
        updates, state = opt.update(g, state, p)
        p = optax.apply_updates(p, updates)
    for k in params:  # Weight decay reaches BatchNorm parameters too (Torch default).
        want = _torch_sgd_reference(params[k], [g[k] for g in grads], 0.1, 0.9, 1e-4, 4)
        np.testing.assert_allclose(p[k], want, rtol=1e-5, atol=1e-6)


def test_adamw_is_decoupled_decay_on_kernels_with_the_configured_betas():
    """The drop-path configs' AdamW (DeiT): Adam's moments with ``adam_b1``, ``adam_b2``,
    then ``weight_decay`` times the parameter, on kernels only, all scaled by the rate;
    written out in numpy (a constant rate here: the cosine's first step is at rate 0)."""
    c = load_config("cifar10_vit", ["--config.lr_schedule=constant",
                                    "--config.warmup_epochs=0", "--config.adam_b1=0.8"])
    lr, wd, b1, b2 = c.learning_rate, c.weight_decay, c.adam_b1, c.adam_b2
    assert (c.optimizer, c.weight_decay_on, wd, b2) == ("adamw", "kernels", 0.05, 0.999)
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
              "bias": rng.normal(size=(2,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(3)]
    opt = optim.make_optimizer(c, steps_per_epoch=100)
    state, p = opt.init(params), jax.tree.map(jnp.asarray, params)
    for g in grads:
        updates, state = opt.update(g, state, p)
        p = optax.apply_updates(p, updates)
    for k, decay in (("kernel", wd), ("bias", 0.0)):
        want, m, v = params[k].astype(np.float64), 0.0, 0.0
        for t, g in enumerate(grads, 1):
            m, v = b1 * m + (1 - b1) * g[k], b2 * v + (1 - b2) * g[k] ** 2
            step = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + 1e-8)
            want = want - lr * (step + decay * want)
        np.testing.assert_allclose(p[k], want, rtol=1e-5, atol=1e-7, err_msg=k)


def test_kernels_only_weight_decay_mask():
    mask = optim.WEIGHT_DECAY_MASKS["kernels"]({"k": jnp.zeros((3, 3, 1, 2)), "b": jnp.zeros(2)})
    assert mask == {"k": True, "b": False}


@pytest.mark.parametrize("scan", [True, False])
def test_kernels_only_weight_decay_skips_every_batchnorm_also_in_scanned_stages(scan):
    """A scanned stage stacks its BatchNorm scales and biases ([blocks, C], ndim 2): they
    were decayed, unlike the first block's, so scan=True trained another model than
    scan=False. Now every kernel and only the kernels, either way."""
    from flax import traverse_util
    model = sdj.CifarResNet(depth=20, num_classes=10, scan=scan)
    params = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                               jnp.zeros((1, 32, 32, 3)), train=False))["params"]
    mask = traverse_util.flatten_dict(optim.WEIGHT_DECAY_MASKS["kernels"](params), sep="/")
    assert any("_scan/" in k for k in mask) == scan
    for name, decayed in mask.items():
        assert decayed == name.endswith("/kernel"), name


def test_kernels_only_weight_decay_counts_a_scanned_stages_stacking_axis_out():
    """In a scanned stage (``ResidualStages`` scans a user's blocks too) every parameter
    gains a leading axis: a user's per-channel vector under a name of its own (not a
    BatchNorm's ``scale`` or ``bias``) is ``[blocks, C]`` there. It is a vector, not
    decayed, as it is not in the unscanned first block; the stacked kernels still are."""
    def stage(stacked):
        lead = (3,) if stacked else ()
        return {"block": {"gain": jnp.zeros(lead + (8,)),
                          "conv": {"kernel": jnp.zeros(lead + (3, 3, 8, 8))}}}

    params = {"stages": {"stage1_0": stage(False), "stage1_scan": stage(True)}}
    mask = optim.WEIGHT_DECAY_MASKS["kernels"](params)["stages"]
    for name in ("stage1_0", "stage1_scan"):
        assert mask[name] == {"block": {"gain": False, "conv": {"kernel": True}}}, name


def test_kernels_only_weight_decay_spares_norms_stacked_by_a_users_own_scan():
    """A user's ``nn.scan`` over ViT blocks (any name: not a ResNet's ``stage<i>_scan``)
    stacks each LayerNorm's scale and bias to ``[blocks, C]``, ndim 2; they are still a
    norm's, never decayed, and the stacked kernels still are."""
    blocks = {"norm1": {"scale": jnp.zeros((4, 16)), "bias": jnp.zeros((4, 16))},
              "mlp": {"kernel": jnp.zeros((4, 16, 32)), "bias": jnp.zeros((4, 32))}}
    mask = optim.WEIGHT_DECAY_MASKS["kernels"]({"encoder": blocks})["encoder"]
    assert mask == {"norm1": {"scale": False, "bias": False},
                    "mlp": {"kernel": True, "bias": False}}


def test_kernels_only_weight_decay_spares_the_vits_position_embedding_and_class_token():
    """DeiT (timm's ``no_weight_decay``) decays neither; both are ndim 3, so the ndim test
    alone decayed them."""
    from flax import traverse_util
    model = sdj.ViT(num_classes=10, patch_size=8, width=16, depth=2, num_heads=2, mlp_ratio=2)
    params = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                               jnp.zeros((1, 32, 32, 3)), train=False))["params"]
    mask = traverse_util.flatten_dict(optim.WEIGHT_DECAY_MASKS["kernels"](params), sep="/")
    assert mask["pos_embed"] is False and mask["cls"] is False
    assert all(decayed == name.endswith("/kernel") for name, decayed in mask.items()), mask


def test_kernels_only_weight_decay_names_an_nnx_models_params_as_linen():
    """``nnx.Optimizer(model, tx, wrt=nnx.Param)`` hands the mask the arrays inside the
    Params, each path ending in the Variable's ``.value``: the names were missed there, and
    the NNX ViT's pos_embed and cls token were decayed (as the ndim test alone did)."""
    from flax import nnx
    from stochastic_depth_jax import nnx_layers
    model = nnx_layers.ViT(10, image_size=16, patch_size=8, width=16, depth=1, num_heads=2,
                           mlp_ratio=2, rngs=nnx.Rngs(0))
    masks = []

    def spy(params):
        masks.append(optim.WEIGHT_DECAY_MASKS["kernels"](params))
        return masks[-1]

    nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=0.05, mask=spy), wrt=nnx.Param)
    flat = {jax.tree_util.keystr(k): v
            for k, v in jax.tree_util.tree_flatten_with_path(masks[0])[0]}
    assert flat["['pos_embed'].value"] is False and flat["['cls'].value"] is False, flat
    assert all(v == k.endswith("['kernel'].value") for k, v in flat.items()), flat


def test_kernels_only_weight_decay_decays_a_kernel_under_a_name_merely_ending_in_scan():
    """Only the scanned stages (``stage<i>_scan``) stack parameters; a user's module named
    ``..._scan`` does not, and its Dense kernel ([in, out]) was taken for a stacked vector
    and not decayed."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4, name="lidar_scan")(x)
            return nn.Dense(2, name="head")(nn.LayerNorm(name="norm_scan")(x))

    params = jax.eval_shape(lambda: Net().init(jax.random.key(0), jnp.zeros((1, 3))))["params"]
    mask = optim.WEIGHT_DECAY_MASKS["kernels"](params)
    assert mask["lidar_scan"] == {"kernel": True, "bias": False}
    assert mask["head"]["kernel"] is True
    assert mask["norm_scan"] == {"scale": False, "bias": False}


def test_field_names_lists_nested_fields():
    names = config_lib.field_names(load_config("cifar10"))
    assert "model.depth" in names and "fake_data.num_train" in names and "batch_size" in names


@pytest.mark.parametrize("name", ["cifar10_vit", "cifar10_convnext"])
def test_drop_path_configs_say_how_to_shorten_them_and_that_they_do_not_sweep(name):
    """One epoch of a warmed-up config names the field to change with it; the sweep's
    refusal of a non-ResNet names no other model than the one given."""
    from stochastic_depth_jax.training import sweep
    with pytest.raises(ValueError, match=r"num_epochs=1\); for fewer epochs set "
                                         r"--config.warmup_epochs too"):
        load_config(f"{name}:smoke", ["--config.num_epochs=1"])
    with pytest.raises(ValueError, match="Train it with train.py") as refused:
        sweep.require_sweepable(load_config(f"{name}:smoke"))
    assert "ViT" not in str(refused.value)


@pytest.mark.parametrize("overrides, match", [
    (["--config.lr_schedule=constant", "--config.warmup_epochs=2"],
     "does nothing with lr_schedule='constant'"),
    (["--config.warmup_epochs=6", "--config.lr_boundaries_epochs=5,8"],
     r"lasts until the first lr drop \(lr_boundaries_epochs=\(5, 8\)\).*fewer than 5 epochs"),
    # Ending at the drop: lr / 10 for 5 epochs, then lr / 10 again; never learning_rate.
    (["--config.warmup_epochs=5", "--config.lr_boundaries_epochs=5,8"],
     r"lasts until the first lr drop"),
])
def test_a_warm_up_the_schedule_would_ignore_or_hide_a_drop_with_is_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("cifar10:smoke", ["--config.num_epochs=10", *overrides])
    load_config("cifar10:smoke", ["--config.num_epochs=10", "--config.warmup_epochs=4",
                                  "--config.lr_boundaries_epochs=5,8"])  # before the drop: fine


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_official_variant_is_the_official_codes_recipe(name):
    paper, c = load_config(name), load_config(f"{name}:official")
    assert paper.model.initialization == "ours" and paper.normalization == "channel"
    changes = config_lib.config_changes(paper.to_dict(), c.to_dict())
    # main.lua: lr 0.1 while the 1-based epoch counter is < 250 of 500: 249 epochs, not 250.
    assert changes == {"model.initialization": {"old": "ours", "new": "official"},
                       "normalization": {"old": "channel", "new": "pixel"},
                       "lr_boundaries_epochs": {"old": (250, 375), "new": (249, 374)}}
    schedule = optim.make_lr_schedule(c, steps_per_epoch=10)
    np.testing.assert_allclose([float(schedule(n)) for n in (2489, 2490, 3739, 3740)],
                               [0.1, 0.01, 0.01, 0.001], rtol=1e-6)
    # Its smoke run: the smoke config with the official fields.
    smoke, official_smoke = load_config(f"{name}:smoke"), load_config(f"{name}:official_smoke")
    assert set(config_lib.config_changes(smoke.to_dict(), official_smoke.to_dict())) == {
        "model.initialization", "normalization"}


def _main_lua_rates(num_epochs):
    """The official loop's lr per 1-based epoch (main.lua: 0.1 while the counter is below
    maxEpochs * 0.5, 0.01 while below maxEpochs * 0.75, then 0.001)."""
    return [0.1 if e < num_epochs * 0.5 else 0.01 if e < num_epochs * 0.75 else 0.001
            for e in range(1, num_epochs + 1)]


@pytest.mark.parametrize("num_epochs", [3, 4, 7, 10, 101, 500])
def test_the_official_drops_of_a_config_file_s_epochs_are_the_official_loop_s(
        tmp_path, num_epochs):
    """base.official() computed its drops as N // 2 - 1 and 3N // 4 - 1: for a config file
    of 10 (or any odd number of) epochs, one epoch before the official loop's."""
    (tmp_path / "exp.py").write_text(
        "from configs import base\n\ndef get_config(arg=None):\n    c = base.base_config()\n"
        f"    c.num_epochs = {num_epochs}\n    return base.official(c)\n")
    c = load_config(str(tmp_path / "exp.py"))
    schedule = optim.make_lr_schedule(c, steps_per_epoch=1)
    np.testing.assert_allclose([float(schedule(e)) for e in range(num_epochs)],
                               _main_lua_rates(num_epochs), rtol=1e-6)


def test_official_with_fewer_epochs_keeps_its_drops_and_warns_as_the_plain_config():
    """`:official --config.num_epochs=N` keeps its drops (epochs, as the plain config's: an
    extended run keeps its schedule) and warns alike; the official code's for N are named
    in configs/base.py and README."""
    from configs import base

    plain, official = (load_config(f"cifar10{v}", ["--config.num_epochs=100"])
                       for v in ("", ":official"))
    assert plain.lr_boundaries_epochs == load_config("cifar10").lr_boundaries_epochs
    assert official.lr_boundaries_epochs == base.official_lr_drops(500)
    for c in (plain, official):
        assert "never happen in a run of num_epochs=100" in config_lib.unreached_lr_drops(c)
    fixed = load_config("cifar10:official", ["--config.num_epochs=100",
                                             "--config.lr_boundaries_epochs=49,74"])
    assert fixed.lr_boundaries_epochs == base.official_lr_drops(100)
    schedule = optim.make_lr_schedule(fixed, steps_per_epoch=1)
    np.testing.assert_allclose([float(schedule(e)) for e in range(100)], _main_lua_rates(100),
                               rtol=1e-6)


def test_a_config_recorded_before_initialization_existed_builds_the_old_init():
    from stochastic_depth_jax.training import setup

    new = load_config("cifar100_wrn:smoke").to_dict()
    old = {**new, "model": {k: v for k, v in new["model"].items() if k != "initialization"}}
    assert new["model"]["initialization"] == "ours"
    assert config_lib.config_changes(config_lib.with_absent_defaults(old), new) == {}
    # As evaluate.py and a resume read run.json: validated, then built.
    recorded = config_lib.validate(ml_collections.ConfigDict(old))
    model = setup.build_cifar_resnet(recorded, 100, mesh=None, implementation="skip")
    assert isinstance(model, sdj.WideResNet) and model.initialization == "ours"
    official = load_config("cifar100_wrn:smoke", ["--config.model.initialization=official"])
    assert setup.build_cifar_resnet(official, 100, None, "skip").initialization == "official"


def test_initialization_is_refused_for_the_drop_path_models():
    c = load_config("cifar10_vit")
    with pytest.raises(ValueError, match="Unknown config field 'model.initialization'"):
        config_lib.apply_overrides(c, ["--config.model.initialization=official"])
    c.model.initialization = "official"  # as a config file of its own could write it
    with pytest.raises(ValueError, match="^Invalid config: model.initialization='official' "
                       "applies to the ResNets only .*not to 'vit': remove it$"):
        config_lib.validate(c)


def test_an_unknown_initialization_is_one_line(capsys, tmp_path):
    import train

    line = one_line_error(capsys, train.main, [
        "--config", "cifar10:official_smoke", "--workdir", str(tmp_path / "w"),
        "--config.model.initialization=fan_in"])
    assert line == ("error: Invalid config: model.initialization='fan_in'; valid: "
                    "['official', 'ours']")
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("name", ["cifar10:smoke", "cifar10_vit:smoke", "cifar10_convnext:smoke"])
def test_a_run_recorded_in_float16_is_read_and_built_in_float16(name):
    """Refusing model.dtype='float16' for training refused the run.json of a run trained in
    it before (a ResNet trained): evaluate.py, the depth analyses and sweep --collect read
    run.json through validate and said "needs loss scaling ... use 'bfloat16'", which no
    recorded run can do."""
    from stochastic_depth_jax.training import setup

    recorded = load_config(name)
    recorded.model.dtype = "float16"  # as an earlier version recorded it
    config = config_lib.validate(recorded, recorded=True)
    model = setup.build_model(config, 10, mesh=None, implementation="skip")
    assert model.dtype == jnp.float16
    with pytest.raises(ValueError, match="^Invalid config: model.dtype='float16' needs loss "
                       "scaling"):  # training it still is refused
        config_lib.validate(recorded)


def _advised(flags):
    """The config that ``--config X[:v] --config.f=v ...`` (an error's advice) loads."""
    import shlex

    words = shlex.split(flags)
    assert words[0] == "--config", flags
    return load_config(words[1], words[2:])


@pytest.mark.parametrize("spec, name, lacks, use", [
    ("cifar10:smoke", "vit", "model.drop_path_rate", "--config cifar10_vit:smoke"),
    ("svhn", "convnext", "model.depths", "--config cifar10_convnext --config.dataset=svhn"),
    ("svhn:smoke", "vit", "model.drop_path_rate", "--config cifar10_vit:smoke "
     "--config.dataset=svhn --config.fake_data.num_extra=64"),
    ("cifar100:official_smoke", "vit", "model.drop_path_rate",
     "--config cifar10_vit:smoke --config.dataset=cifar100"),
    ("cifar10_vit:smoke", "convnext", "model.depths", "--config cifar10_convnext:smoke"),
    ("cifar10_convnext", "vit", "model.depth,", "--config cifar10_vit"),
    ("cifar10_vit", "wide_resnet", "model.block",
     "--config cifar100_wrn --config.dataset=cifar10"),
    ("cifar10_convnext:smoke", "cifar_resnet", "model.block", "--config cifar10:smoke"),
])
def test_a_model_name_whose_fields_the_config_lacks_is_one_line_naming_its_config(
        capsys, tmp_path, spec, name, lacks, use):
    """``--config.model.name`` keeps the config's model block: switching the ResNet's to
    the ViT's failed with an AttributeError traceback ('size'), and the ViT's to the
    ConvNeXt's with "model.size='ti'; valid: ['atto', ...]", neither naming the config
    that trains that model. The flags named train that model on the data the command asked
    for: they named the model's config alone, dropping the dataset and ':smoke'."""
    import train

    line = one_line_error(capsys, train.main, [
        "--config", spec, "--workdir", str(tmp_path / "w"), f"--config.model.name={name}"])
    assert line.startswith(f"error: --config.model.name={name} does not fit config "
                           f"{spec.split(':')[0]!r}: its model block is for model.name="), line
    assert lacks in line and line.endswith(
        f"which {name!r} needs; train {name!r} with {use}, "
        f"or with a config file whose model block is for {name!r}."), line
    assert not os.path.exists(tmp_path / "w")
    advised, asked = _advised(use), load_config(spec)
    assert advised.model.name == name and advised.dataset == asked.dataset
    assert advised.fake_data.to_dict() == asked.fake_data.to_dict()


@pytest.mark.parametrize("spec, overrides, use, left", [
    # The ConvNeXt's own field, and an override that its config refuses on its own (a
    # one-epoch warm-up needs two epochs): the advice dropped both, and the batch size too.
    ("cifar100:smoke", ["--config.model.drop_path_rate=0.2", "--config.batch_size=32",
                        "--config.num_epochs=1"],
     "--config cifar10_convnext:smoke --config.model.drop_path_rate=0.2 "
     "--config.batch_size=32 --config.dataset=cifar100",
     "--config.num_epochs=1: cifar10_convnext:smoke refuses it (Invalid config: "
     "warmup_epochs=1 must be an integer in [0, num_epochs=1)"),
    # Together they fit: both kept.
    ("cifar10:smoke", ["--config.num_epochs=1", "--config.warmup_epochs=0"],
     "--config cifar10_convnext:smoke --config.num_epochs=1 --config.warmup_epochs=0", None),
    # A field only the ResNet has is named as left out, not dropped unsaid.
    ("cifar10", ["--config.model.final_survival_prob=0.8", "--config.model.size=tiny"],
     "--config cifar10_convnext --config.model.size=tiny",
     "--config.model.final_survival_prob=0.8: cifar10_convnext has no such field"),
])
def test_the_advised_flags_keep_the_overrides_that_fit_and_name_those_left_out(
        capsys, tmp_path, spec, overrides, use, left):
    """``--config.model.name=convnext`` on a ResNet config advised the ConvNeXt's config
    with the overrides given only where all of them fit it, and with the model block's
    never: ``--config.model.drop_path_rate=0.2`` (the ConvNeXt's own field) and, with it,
    every other override were left out, unsaid."""
    import train

    line = one_line_error(capsys, train.main, [
        "--config", spec, "--config.model.name=convnext", *overrides,
        "--workdir", str(tmp_path / "w")])
    advice = line.split("train 'convnext' with ", 1)[1]
    assert advice.startswith(use + (" (left out: " if left else ", or with")), line
    assert left is None or left in advice, line
    advised = _advised(use)
    for item in use.split()[2:]:
        key, value = config_lib.split_override(item)
        assert str(_field_of(advised, key)) == value, (key, line)


def _field_of(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def test_a_model_name_the_config_s_fields_fit_still_switches():
    """The CIFAR ResNet's and the wide ResNet's model blocks have the same fields."""
    c = load_config("cifar10:smoke", ["--config.model.name=wide_resnet",
                                      "--config.model.depth=10"])
    assert (c.model.name, c.model.depth) == ("wide_resnet", 10)
    with pytest.raises(ValueError, match=r"model.name='vti'; valid: \['cifar_resnet'"):
        load_config("cifar10", ["--config.model.name=vti"])


def test_a_config_file_without_the_newer_resnet_fields_still_switches_to_a_wide_resnet(
        tmp_path):
    """A config file written before ``model.dropout_rate`` existed (the model reads it with
    a default) still switches between the two ResNets, whose fields are the same."""
    path = tmp_path / "old_resnet.py"
    path.write_text("from configs import base\n\ndef get_config(arg=None):\n"
                    "    c = base.smoke(base.base_config())\n    del c.model['dropout_rate']\n"
                    "    return c\n")
    c = load_config(str(path), ["--config.model.name=wide_resnet", "--config.model.depth=10"])
    assert c.model.name == "wide_resnet" and "dropout_rate" not in c.model
    with pytest.raises(ValueError, match="model.name='cifar_resnet' and lacks model.drop_path"):
        load_config(str(path), ["--config.model.name=vit"])


@pytest.mark.parametrize("field", ["seed", "batch_size", "num_epochs", "eval_every_epochs",
                                   "keep_checkpoints", "max_steps", "eval_every_steps",
                                   "checkpoint_every_epochs", "model.width",
                                   "model.compact_multiple", "fake_data.num_train"])
def test_a_bool_in_an_int_field_of_a_config_built_in_python_is_refused(field):
    # The flags refuse --config.eval_every_steps=true, but a config built in Python keeps
    # True in an int field: eval_every_steps=True evaluated every step, max_steps=True
    # trained one step, seed=True was recorded as true.
    c = load_config("cifar10:smoke")
    *parents, leaf = field.split(".")
    node = c
    for name in parents:
        node = node[name]
    node[leaf] = True
    with pytest.raises(ValueError, match=rf"^Invalid config: {re.escape(field)}=True must be"):
        config_lib.validate(c)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_kernels_only_weight_decay_spares_the_layer_scales(api):
    """A layer scale's ``gamma`` (the ViT's LayerScale, the ConvNeXt's) is not decayed, as
    timm (``ndim <= 1``), DINOv2 (``'gamma'`` in the name) and the ConvNeXt code do not: decay
    would pull the 1e-5 start towards 0, switching the branches off. Every kernel still is."""
    from flax import nnx
    from stochastic_depth_jax import nnx_layers
    x = jnp.zeros((1, 16, 16, 3))
    if api == "linen":
        models = (sdj.ViT(num_classes=10, patch_size=8, width=16, depth=2, num_heads=2,
                          layer_scale_init=1e-5),
                  sdj.ConvNeXt(num_classes=10, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8),
                               stem_stride=1))
        trees = [jax.eval_shape(lambda m=m: m.init(jax.random.key(0), x, train=False))["params"]
                 for m in models]
    else:
        models = (nnx_layers.ViT(10, image_size=16, patch_size=8, width=16, depth=2,
                                 num_heads=2, layer_scale_init=1e-5, rngs=nnx.Rngs(0)),
                  nnx_layers.ConvNeXt(10, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8),
                                      stem_stride=1, rngs=nnx.Rngs(0)))
        trees = [nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in models]
    for params in trees:
        mask = {"/".join(str(getattr(k, "key", k)) for k in path): decayed for path, decayed
                in jax.tree_util.tree_flatten_with_path(
                    optim.WEIGHT_DECAY_MASKS["kernels"](params))[0]}
        gammas = [k for k in mask if k.endswith("/gamma")]
        assert len(gammas) >= 4 and not any(mask[k] for k in gammas), mask
        assert any(mask[k] for k in mask if k.endswith("/kernel")), mask

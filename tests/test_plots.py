"""The training curves: title, learning-rate drops, the best checkpoint, and when they are drawn."""

import contextlib
import json
import math
import os
import signal
import sys
import types
import warnings

import pytest

from configs import load_config
from stochastic_depth_jax import logs
from stochastic_depth_jax.training import loop, plots


def _records(lrs, start_error=0.9):
    return [{"epoch": i + 1, "step": 10 * (i + 1), "lr": lr, "train_error": start_error - 0.1 * i,
             "val_error": start_error - 0.05 * i, "test_error": start_error - 0.06 * i,
             "train_loss": 2.0 - 0.1 * i} for i, lr in enumerate(lrs)]


def test_step_drops_are_marked_where_they_happen():
    # A record's lr is its epoch's last: a drop after epoch 3 shows in epoch 4's record.
    step = _records([0.1, 0.1, 0.1, 0.01, 0.01, 0.001])
    assert plots._lr_changes(step) == [(3, pytest.approx(0.01)), (5, pytest.approx(0.001))]
    # float32 round trips of one value are not a change
    assert plots._lr_changes(_records([0.1, 0.10000000149011612])) == []


def test_error_figure_has_the_title_drops_best_star_and_integer_epochs():
    records = _records([0.1, 0.1, 0.1, 0.01, 0.01, 0.001])
    best = {"metric": "val_error", "value": 0.7, "epoch": 5, "step": 50, "test_error": 0.66}
    fig = plots.curves_figure(records, ("train_error", "val_error", "test_error"), "error (%)",
                              True, title="the run", best=best, lr_drops=True)
    ax = fig.axes[0]
    assert fig.get_suptitle() == "the run"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:4] == ["train_error", "val_error", "test_error", "learning-rate drop"]
    assert labels[4] == "best val_error: epoch 5, test error 66.00%"
    star = [line for line in ax.get_lines() if line.get_label().startswith("best")][0]
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([5], [pytest.approx(70.0)])
    drops = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert sorted(line.get_xdata()[0] for line in drops) == [3, 5]
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 6]
    assert ticks and all(float(t).is_integer() for t in ticks)
    # Not marked for a schedule that is not piecewise constant (cosine changes every epoch).
    cosine = plots.curves_figure(records, ("val_error",), "error (%)", True)
    assert all(line.get_linestyle() != ":" for line in cosine.axes[0].get_lines())
    # A best chosen by another metric is not starred on a figure without it.
    loss = plots.curves_figure(records, ("train_loss",), "loss", False, best=best)
    assert all(not line.get_label().startswith("best") for line in loss.axes[0].get_lines())


def test_a_step_schedules_warm_up_end_is_not_called_a_drop():
    """ResNet-1202's recipe warms up at lr / 10: its first change is a rise, then drops."""
    records = _records([0.01, 0.01, 0.1, 0.1, 0.01])
    fig = plots.curves_figure(records, ("train_error",), "error (%)", True, lr_drops=True)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["train_error", "learning-rate rise (warm-up ends)", "learning-rate drop"]
    lines = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == ":"]
    assert [(line.get_xdata()[0], line.get_label()) for line in lines] == [
        (2, "learning-rate rise (warm-up ends)"), (4, "learning-rate drop")]


@pytest.mark.parametrize("spec, overrides, want", [
    ("cifar10", [], "cifar10, ResNet-110, stochastic depth p_L=0.5 (linear, batch), float32"),
    ("cifar10", ["--config.model.final_survival_prob=1.0", "--config.model.dtype=bfloat16"],
     "cifar10, ResNet-110, constant depth, bfloat16"),
    ("cifar100_wrn", [], "cifar100, WRN-28-10, stochastic depth p_L=0.8"),
    # The smoke WRN's base width is 4, not the WRN paper's 16: it was titled WRN-10-2 alone.
    ("cifar100_wrn:smoke", [], "(FAKE random-label data), WRN-10-2 width 4, stochastic depth"),
    ("cifar100_wrn", ["--config.model.dropout_rate=0.3"], ", WRN-28-10 dropout 0.3, "),
    # Its start-up line (and curves) read as the paper recipe's: the init is named.
    ("cifar10:official", [], "cifar10, ResNet-110 official init, stochastic depth p_L=0.5"),
    # The patch size sets the token count: ViT-S/4 on CIFAR is not DeiT's ViT-S/16.
    ("cifar10_vit", [], "cifar10, ViT-S/4, drop path 0.1 (linear, sample)"),
    ("cifar10_vit", ["--config.model.patch_size=8"], "cifar10, ViT-S/8, drop path"),
    # A model whose dimensions are set, not taken from its size, is not that size: said so.
    ("cifar10_vit:smoke", [], "ViT-Ti/4 depth 2 width 32 num_heads 2, "),
    ("cifar10_convnext", [], "ConvNeXt-femto, drop path 0.1"),
    ("cifar10_convnext:smoke", [], "ConvNeXt-atto depths 1-1-2-1 dims 8-16-24-32, drop path"),
    # A ConvNeXt without its paper's layer scale (or with another start) is another network:
    # its curves were titled as the default's.
    ("cifar10_convnext", ["--config.model.layer_scale_init=0"],
     "ConvNeXt-femto no layer scale, drop path 0.1"),
    ("cifar10_convnext", ["--config.model.layer_scale_init=None"],
     "ConvNeXt-femto no layer scale, drop path 0.1"),
    ("cifar10_convnext", ["--config.model.layer_scale_init=0.1"],
     "ConvNeXt-femto layer scale 0.1, drop path 0.1"),
    ("cifar10_vit", ["--config.model.layer_scale_init=1e-5"], "ViT-S/4 layer scale 1e-05, drop"),
    ("cifar10_vit", ["--config.model.drop_path_rate=0"], "cifar10, ViT-S/4, no drop path, float32"),
    ("cifar10:smoke", [], "cifar10 (FAKE random-label data), ResNet-8 width 4, "),
    # CIFAR-10 without augmentation is not the paper's CIFAR-10+: named; the dataset's own
    # augmentation, named or 'auto', is not.
    ("cifar10", ["--config.augment=none"], "cifar10 (no augmentation), ResNet-110, "),
    ("cifar10", ["--config.augment=flip_translate"], "cifar10, ResNet-110, "),
    ("svhn", ["--config.augment=translate"], "svhn (translate only), ResNet-152, "),
])
def test_run_title_names_data_model_and_depth_rule(spec, overrides, want):
    config = load_config(spec, overrides)
    assert want in plots.run_title(config)
    assert plots.run_title(json.loads(config.to_json())) == plots.run_title(config)  # run.json


@pytest.mark.parametrize("spec", ["cifar10:smoke", "cifar10_vit:smoke", "cifar10_convnext:smoke"])
def test_the_title_is_inside_the_figure(spec):
    """Centred over the axes, beside the legend, these titles ran off the figure's left edge
    (error.png read '(FAKE random-label data), ViT-Ti ...', the dataset cut off)."""
    title = plots.run_title(load_config(spec))
    records = _records([0.1, 0.1, 0.01])
    best = {"metric": "val_error", "value": 0.8, "epoch": 2, "test_error": 0.75}
    fig = plots.curves_figure(records, ("train_error", "val_error", "test_error"), "error (%)",
                              True, title=title, best=best, lr_drops=True)
    _assert_title_inside(fig, title)


def _assert_title_inside(fig, title):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    shown = [t for t in fig.findobj(lambda a: hasattr(a, "get_text"))
             if t.get_visible() and t.get_text().replace("\n", " ").startswith(title[:20])]
    [text] = shown
    assert text.get_text().replace("\n", " ") == title  # wrapped, not shortened
    box, width = text.get_window_extent(renderer), fig.bbox.width
    assert 0 <= box.x0 and box.x1 <= width, (box, width)
    assert box.y0 >= max(ax.get_window_extent(renderer).y1 for ax in fig.axes)  # above


def test_the_depth_curve_title_is_inside_its_figure(monkeypatch, tmp_path):
    """The depth curve's title (a run's, evaluate.py --depth-curve) was drawn at the default
    size unwrapped: an image-folder WRN run's ran off both edges of the figure."""
    from stochastic_depth_jax.training import figures

    title = plots.run_title(load_config("cifar100_wrn", [
        "--config.dataset=image_folder:/data/a_long_folder_name_of_my_own_images",
        "--config.model.dropout_rate=0.3"])) + ": error as blocks are removed at test time"
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, *a, **k: drawn.append(fig))
    points = [{"blocks_kept": k, "test_error": 0.1 + 0.01 * (12 - k), "images_per_s": 100.0 * k}
              for k in (12, 11, 10)]
    figures.plot_depth_curve(points, str(tmp_path / "depth.png"), [], title=title)
    _assert_title_inside(drawn[0], title)


def test_a_greedy_depth_curve_says_its_order_was_chosen_on_validation(monkeypatch, tmp_path):
    """The greedy order is chosen on the validation split, so its validation curve is
    optimistic; the legend named it as any split."""
    from stochastic_depth_jax.training import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, *a, **k: drawn.append(fig))
    points = [{"blocks_kept": k, "validation_error": 0.1, "test_error": 0.2,
               "images_per_s": 100.0 * k} for k in (3, 2)]
    figures.plot_depth_curve(points, str(tmp_path / "depth.png"), [], chosen_on="validation")
    for ax in drawn[0].axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            "validation (the order was chosen on it)", "test"]


def test_the_depth_curve_s_images_per_s_panel_draws_no_line_through_noisy_points(
        monkeypatch, tmp_path):
    """The right panel joined its points in removal order: measured images/s is noisy (a
    pruned model may time slower than a deeper one), and the line turned back on itself."""
    from stochastic_depth_jax.training import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, *a, **k: drawn.append(fig))
    speed = {4: 100.0, 3: 140.0, 2: 120.0, 1: 200.0}  # 2 blocks timed slower than 3
    points = [{"blocks_kept": k, "test_error": 0.1 * (5 - k), "images_per_s": speed[k]}
              for k in speed]
    figures.plot_depth_curve(points, str(tmp_path / "depth.png"), [])
    left, right = drawn[0].axes
    [by_blocks], [by_speed] = left.get_lines(), right.get_lines()
    assert by_blocks.get_linestyle() == "-"  # blocks kept: in order, joined
    assert by_speed.get_linestyle() == "None" and by_speed.get_marker() == "o"
    assert list(by_speed.get_xdata()) == list(speed.values())  # every point drawn


@pytest.mark.parametrize("folder", ["/data/my_images/", "my_images", "file:///data/my_images"])
def test_run_title_names_an_image_folder_by_its_last_part(folder):
    """A relative folder (a run.json recorded before paths were made absolute, a Python
    caller's config) was titled 'image_folder:image_folder:my_images'."""
    config = load_config("cifar10", [f"--config.dataset=image_folder:{folder}"])
    assert plots.run_title(config).startswith("image_folder:my_images, ResNet-110, ")


def test_curves_are_drawn_after_the_first_epoch_then_at_most_every_plot_every_s(
        monkeypatch, tmp_path):
    drawn, now = [], [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(plots, "plot_curves", lambda records, out, **kw: drawn.append(kw))
    run = types.SimpleNamespace(config=load_config("cifar10:smoke"), workdir=str(tmp_path),
                                best=None, plotted_at=None, title=None)
    loop._draw_plots(run, force=run.plotted_at is None)  # the first epoch: drawn
    now[0] += loop.PLOT_EVERY_S / 2
    loop._draw_plots(run, force=False)  # too soon
    now[0] += loop.PLOT_EVERY_S / 2
    loop._draw_plots(run, force=False)  # due
    loop._draw_plots(run, force=True)  # the end, or a stop
    assert len(drawn) == 3 and drawn[0]["title"] == plots.run_title(run.config)
    assert drawn[0]["lr_drops"] is True  # the smoke config's step schedule
    run.config.write_plots = False
    loop._draw_plots(run, force=True)
    assert len(drawn) == 3 and not os.listdir(tmp_path)


def test_a_record_without_an_epoch_is_left_off_the_curves(tmp_path):
    """A metrics.jsonl line without an epoch (appended by hand or another tool) stopped the
    drawing, and with it the training, with a KeyError."""
    records = _records([0.1, 0.01]) + [{"step": 30, "lr": 0.001, "train_error": 0.5}]
    paths = plots.plot_curves(records, str(tmp_path), best=None, lr_drops=True)
    assert all(os.path.getsize(p) > 0 for p in paths)


def test_a_run_stopped_before_its_first_epoch_ends_draws_without_a_warning(tmp_path):
    """Ctrl-C before the first epoch's end draws the curves of no records: matplotlib's
    "No artists with labels found to put in legend" came out as one of our warning lines."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = plots.plot_curves([], str(tmp_path), title="the run")
    assert all(os.path.getsize(p) > 0 for p in paths)


def test_an_interrupted_drawing_leaves_the_earlier_curves(monkeypatch, tmp_path):
    """A second Ctrl-C (training stops at once) or an error while error.png was written
    left it truncated: matplotlib wrote the PNG in place."""
    paths = plots.plot_curves(_records([0.1, 0.01]), str(tmp_path))
    before = [open(p, "rb").read() for p in paths]
    figure = plots.curves_figure

    def cut_short(*args, **kwargs):
        fig = figure(*args, **kwargs)

        def savefig(target, **kw):  # a path (written in place) or a file object
            with contextlib.ExitStack() as stack:
                f = stack.enter_context(open(target, "wb")) if isinstance(target, str) else target
                f.write(b"\x89PNG half")
                raise KeyboardInterrupt

        fig.savefig = savefig
        return fig

    monkeypatch.setattr(plots, "curves_figure", cut_short)
    with pytest.raises(KeyboardInterrupt):
        plots.plot_curves(_records([0.1, 0.01, 0.001]), str(tmp_path))
    assert [open(p, "rb").read() for p in paths] == before
    assert sorted(os.listdir(tmp_path)) == ["error.png", "loss.png"]  # no temporary file


@pytest.mark.parametrize("when", ["always", "stop"])
def test_a_failing_drawing_never_costs_a_checkpoint_or_the_run(monkeypatch, tmp_path, when):
    """The curves were drawn before the epoch's checkpoint was saved, and at a stop before the
    stop's: a drawing that failed lost the checkpoint due then, and ended the run with its
    error. Now it is one warning (once), and training goes on."""
    from stochastic_depth_jax.training import checkpoint, stopping

    drawn = []

    def plot_curves(records, out_dir, **kwargs):
        drawn.append(len(records))
        if when == "always" or len(drawn) == 2:  # every drawing, or the stop's
            raise RuntimeError("drawing failed")

    monkeypatch.setattr(plots, "plot_curves", plot_curves)
    if when == "stop":  # As on SIGTERM, once the first epoch's curves are drawn.
        monkeypatch.setattr(stopping.StopSignals, "agreed",
                            lambda self: signal.SIGTERM if drawn else None)
    config = load_config("cifar10:smoke", [
        "--config.progress_bar=false", "--config.write_tensorboard=false",
        f"--config.checkpoint_every_epochs={1 if when == 'always' else 0}"])
    with pytest.warns(logs.RunWarning) as caught:
        if when == "stop":
            with pytest.raises(stopping.Stopped):
                loop.train_and_evaluate(config, str(tmp_path))
        else:
            summary = loop.train_and_evaluate(config, str(tmp_path))
    said = [str(w.message) for w in caught if "Could not draw" in str(w.message)]
    # A stop's drawing is the run's last: training does not go on after it.
    assert len(said) == 1 and ("(RuntimeError: drawing failed); " + (
        "training goes on" if when == "always" else "the numbers are in metrics.jsonl;")
        in said[0])
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = checkpoint.Checkpoints(str(tmp_path), read_only=True).steps("latest")
    if when == "stop":
        assert steps == [records[0]["step"]] and len(drawn) == 2
    else:  # drawn after epoch 1 and at the end, every checkpoint saved, the run finished
        assert steps == [r["step"] for r in records] and len(drawn) == 2
        assert summary["steps"] == records[-1]["step"]


@pytest.mark.parametrize("fails", ["png", "json"])
def test_a_figure_failing_mid_write_leaves_the_earlier_one(monkeypatch, tmp_path, fails):
    """A figure (a depth curve, a sweep's) and its sidecar were written in place: an error
    partway (a full disk, a kill) left a truncated PNG or JSON where a good one was."""
    import matplotlib.figure

    from stochastic_depth_jax.training import figures

    path = str(tmp_path / "curve.png")
    files = (path, os.path.splitext(path)[0] + ".json")

    def draw(value):
        fig = plots.new_figure((2, 2))
        fig.subplots().plot([0, value])
        return fig

    figures.save_figure(draw(1), path, ["run A"], [1])
    before = [open(p, "rb").read() for p in files]

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def savefig(self, target, *args, **kwargs):  # half a PNG, then the disk is full
        with (open(target, "wb") if isinstance(target, str) else contextlib.nullcontext(
                target)) as f:
            f.write(before[0][:100])
        full_disk()

    def dump(obj, f, **kwargs):
        f.write(json.dumps(obj)[:20])
        full_disk()

    if fails == "png":
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    else:
        monkeypatch.setattr(json, "dump", dump)
    with pytest.raises(OSError, match="No space left"):
        figures.save_figure(draw(2), path, ["run B"], [2])
    assert [open(p, "rb").read() for p in files] == before
    assert sorted(os.listdir(tmp_path)) == ["curve.json", "curve.png"]  # no partial file


@pytest.mark.parametrize("epochs", [[0.5], [1], [0.25, 0.75]])
def test_a_run_of_less_than_two_epochs_has_whole_epoch_ticks(epochs):
    """A run stopped at epoch 0.5 (or after its first) had ticks 0.474, 0.498, 0.522."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    records = [dict(r, epoch=e) for r, e in zip(_records([0.1] * len(epochs)), epochs)]
    fig = plots.curves_figure(records, ("train_error", "test_error"), "error (%)", True)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    assert lo < min(epochs) and max(epochs) < hi


@pytest.mark.parametrize("plot", ["plot_first_conv_grad", "plot_error_curves"])
def test_a_sweep_of_one_epoch_has_whole_epoch_ticks_and_every_point_shown(plot, monkeypatch,
                                                                         tmp_path):
    """A sweep of one-epoch runs drew Fig. 7 and Fig. 3 with ticks 0.96, 0.98, 1.0 (the
    run's curves had whole epochs), and Fig. 3's training loss, a dashed line without a
    marker, not at all: a single point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from stochastic_depth_jax.training import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, *a, **k: drawn.append(fig))
    records = [dict(_records([0.1])[0], grad_first_conv_mean_abs=0.02)]
    runs = [{"name": f"depth14_pL{p:g}", "depth": 14, "p_last": p, "records": records,
             "workdir": str(tmp_path / f"pL{p:g}")} for p in (0.5, 1.0)]
    getattr(figures, plot)(runs, str(tmp_path / "fig.png"))
    [fig] = drawn
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    lines = [line for a in fig.axes for line in a.get_lines()]
    assert len(lines) == 2 * len(fig.axes)  # each run's line on each axis (Fig. 3: 2 axes)
    assert all(line.get_marker() not in (None, "None", "") for line in lines)


def test_a_mid_epoch_best_is_starred_in_view_on_the_curve_every_n_steps():
    """eval_every_steps: a first epoch's best at step 2 of 4 (epoch 0.5) was starred outside
    the axes (a run under two epochs long is shown from epoch 0.75) and labelled 'epoch 0.5'
    without its step; the validation curve now has a point per evaluation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    records = _records([0.1])  # epoch 1, step 10
    validation = [{"step": s, "epoch": s / 4, "val_error": e}
                  for s, e in ((1, 0.8), (2, 0.5), (3, 0.7), (4, 0.9))]
    best = {"metric": "val_error", "value": 0.5, "epoch": 0.5, "step": 2, "test_error": 0.55}
    fig = plots.curves_figure(records, ("train_error", "val_error"), "error (%)", True,
                              best=best, validation=validation)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    star = lines["best val_error: epoch 0.50 (step 2), test error 55.00%"]
    lo, hi = ax.get_xlim()
    assert lo < star.get_xdata()[0] < hi and lo < 1 < hi
    assert list(lines["val_error"].get_xdata()) == [0.25, 0.5, 0.75, 1.0]
    assert list(lines["train_error"].get_xdata()) == [1]  # per epoch, as before


def test_validation_curve_keeps_the_epochs_of_sessions_without_eval_every_steps():
    """validation.jsonl has the records of the sessions run with eval_every_steps only (a run
    may turn it on or off when resumed): here epochs 2 and 4. The validation curve was drawn
    from it alone, losing epochs 1 and 3 of metrics.jsonl."""
    records = _records([0.1] * 4)  # epochs 1-4, 10 steps each
    validation = [{"step": s, "epoch": s / 10, "val_error": 0.5} for s in (15, 20, 35, 40)]
    fig = plots.curves_figure(records, ("val_error",), "error (%)", True,
                              validation=validation)
    line = {line.get_label(): line for line in fig.axes[0].get_lines()}["val_error"]
    assert list(line.get_xdata()) == [1, 1.5, 2, 3, 3.5, 4]
    assert list(line.get_ydata()) == [pytest.approx(v) for v in (90, 50, 50, 80, 50, 50)]


def test_the_curves_title_is_true_for_every_session_of_a_resumed_run(monkeypatch, tmp_path):
    """Resumed with --config.model.dtype=bfloat16 after float32 epochs, the whole curve was
    titled bfloat16 (the current session's config)."""
    titles = []
    monkeypatch.setattr(plots, "plot_curves", lambda records, out, **kw: titles.append(kw["title"]))
    flags = ["--config.progress_bar=false", "--config.write_tensorboard=false"]
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(load_config("cifar10:smoke", flags + ["--config.num_epochs=1"]),
                            workdir)
    unchanged = plots.run_title(load_config("cifar10:smoke"))
    assert titles == [unchanged]  # a run never changed: as before
    resumed = load_config("cifar10:smoke", flags + ["--config.model.dtype=bfloat16"])
    with pytest.warns(logs.RunWarning, match="changed config"):
        loop.train_and_evaluate(resumed, workdir)
    assert titles[-1] == unchanged.replace("float32", "float32 then bfloat16 from epoch 2")


def test_the_curves_title_names_each_change_where_its_session_began():
    config = json.loads(load_config("cifar10:smoke", [
        "--config.model.dtype=bfloat16", "--config.model.final_survival_prob=0.8"]).to_json())
    session = {"config_changes": {}, "start_step": 0}
    run_json = {"config": config, "start_step": 28, "history": [
        session,
        {"start_step": 10, "config_changes": {"model.dtype": {"old": "float32",
                                                             "new": "bfloat16"}}},
        {"start_step": 20, "config_changes": {"num_epochs": {"old": 2, "new": 9}}},
        # killed before its first checkpoint: trained nothing the curves show
        {"start_step": 28, "config_changes": {"model.final_survival_prob": {"old": 0.5,
                                                                           "new": 0.6}}}],
        "config_changes": {"model.final_survival_prob": {"old": 0.6, "new": 0.8}}}
    title = plots.curve_title(run_json, steps_per_epoch=4)
    assert title.endswith(", stochastic depth p_L=0.5 (linear, batch) then stochastic depth "
                          "p_L=0.8 (linear, batch) from epoch 8, float32 then bfloat16 from "
                          "step 10 (epoch 2.50)")
    assert plots.curve_title({"config": config, **session}, 4) == plots.run_title(config)


def test_a_moved_image_folder_is_no_change_of_the_curves_dataset():
    """Resumed with the image folder moved (the same images, which the resumed run checks),
    the title read ``image_folder:flowers then image_folder:flowers_v2 from epoch 3``."""
    config = json.loads(load_config("cifar10:smoke").to_json())
    config["dataset"] = "image_folder:/mnt/new/flowers_v2"
    moved = {"dataset": {"old": "image_folder:/data/flowers", "new": config["dataset"]}}
    run_json = {"config": config, "start_step": 8, "config_changes": moved,
                "history": [{"start_step": 0, "config_changes": {}}]}
    assert plots.curve_title(run_json, steps_per_epoch=4) == plots.run_title(config)
    # Another dataset is a change.
    run_json["config_changes"] = {"dataset": {"old": "cifar10", "new": config["dataset"]}}
    assert plots.curve_title(run_json, 4).startswith(
        "cifar10 (FAKE random-label data) then image_folder:flowers_v2 from epoch 3, ")


@pytest.mark.parametrize("old, new, named", [
    ("none", "translate", "(no augmentation then translate only from epoch 3), ResNet-8 "),
    ("auto", "none", "(flip + translate then no augmentation from epoch 3), ResNet-8 "),
    ("none", "auto", "(no augmentation then flip + translate from epoch 3), ResNet-8 ")])
def test_a_changed_augmentation_is_one_part_of_the_curves_title(old, new, named):
    """Resumed with another augmentation, the title repeated the whole dataset part
    ('cifar10 (FAKE ...) (no augmentation) then cifar10 (FAKE ...) (translate only) from
    epoch 3'); a change to the dataset's own was not named at all ('then cifar10 (FAKE ...)
    from epoch 3')."""
    config = json.loads(load_config("cifar10:smoke", [f"--config.augment={new}"]).to_json())
    run_json = {"config": config, "start_step": 8,
                "config_changes": {"augment": {"old": old, "new": new}},
                "history": [{"start_step": 0, "config_changes": {}}]}
    assert plots.curve_title(run_json, steps_per_epoch=4) == (
        f"cifar10 (FAKE random-label data) {named}width 4, stochastic depth p_L=0.5 "
        "(linear, batch), float32")


def test_a_non_finite_value_is_a_gap_in_its_curve_marked_as_such():
    """metrics.jsonl records NaN and infinities as 'nan' and 'inf' (JSON has no number for
    them): the curves left those epochs out silently, joining their neighbours as if the
    run had been fine there."""
    records = _records([0.1] * 3)
    for record, val, test in zip(records, (2.2, "nan", 2.0), (2.1, 2.05, "inf")):
        record.update(val_loss=val, test_loss=test)
    fig = plots.curves_figure(records, ("train_loss", "val_loss", "test_loss"), "loss", False)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["val_loss"].get_xdata()) == [1, 2, 3]
    assert math.isnan(lines["val_loss"].get_ydata()[1])  # a gap, not a line through it
    assert list(lines["val_loss: NaN or infinite"].get_xdata()) == [2]
    assert list(lines["test_loss: NaN or infinite"].get_xdata()) == [3]
    assert "train_loss: NaN or infinite" not in lines
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "val_loss: NaN or infinite" in legend and "test_loss: NaN or infinite" in legend


def test_a_non_finite_first_conv_gradient_is_marked_on_fig_7(monkeypatch, tmp_path):
    from stochastic_depth_jax.training import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, *a, **k: drawn.append(fig))
    records = [dict(r, grad_first_conv_mean_abs=g)
               for r, g in zip(_records([0.1] * 3), (0.02, "inf", 0.01))]
    runs = [{"name": "depth14_pL0.5", "depth": 14, "p_last": 0.5, "records": records,
             "workdir": str(tmp_path / "depth14_pL0.5")}]
    figures.plot_first_conv_grad(runs, str(tmp_path / "fig.png"))
    lines = {line.get_label(): line for line in drawn[0].axes[0].get_lines()}
    assert list(lines["depth14_pL0.5: NaN or infinite"].get_xdata()) == [2]
    assert math.isnan(lines["14 layers, stochastic, $p_L$=0.5"].get_ydata()[1])


@pytest.mark.parametrize("epochs", [[1], [0.5]])
def test_fig_7_of_runs_with_no_finite_gradient_is_drawn(tmp_path, epochs):
    """The runs of Fig. 7 whose every gradient record is NaN or infinite (the deepest depth's
    first epoch, where its parameters blew up): the NaN gaps left no positive value on the
    log axis, and matplotlib refused to draw the figure ('Data cannot be log-scaled'), which
    stopped `sweep.py --collect`."""
    from stochastic_depth_jax.training import figures

    runs = [{"name": f"depth14_pL{p}", "depth": 14, "p_last": p, "workdir": str(tmp_path),
             "records": [{"epoch": e, "grad_first_conv_mean_abs": bad} for e in epochs]}
            for p, bad in ((0.5, "nan"), (1.0, "inf"))]
    png, _ = figures.plot_first_conv_grad(runs, str(tmp_path / "fig7.png"))
    assert os.path.getsize(png) and figures.read_sources(png) == [str(tmp_path)] * 2


def test_fig_7_legend_counts_its_nan_markers(tmp_path, monkeypatch):
    """Three runs with a NaN epoch each: six legend entries (each line and its NaN marker),
    which the legend placement counted as three and put inside the axes, over the lines."""
    import matplotlib.figure

    from stochastic_depth_jax.training import figures

    sizes = []
    savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (
        sizes.append((tuple(fig.get_size_inches()), fig.axes[0].get_legend())),
        savefig(fig, *a, **k))[1])
    runs = [{"name": f"depth14_pL{p}", "depth": 14, "p_last": p, "workdir": str(tmp_path),
             "records": [{"epoch": 1, "grad_first_conv_mean_abs": 0.02},
                         {"epoch": 2, "grad_first_conv_mean_abs": "nan"},
                         {"epoch": 3, "grad_first_conv_mean_abs": 0.01}]}
            for p in (0.5, 0.75, 1.0)]
    figures.plot_first_conv_grad(runs[:2], str(tmp_path / "two.png"))
    figures.plot_first_conv_grad(runs, str(tmp_path / "three.png"))
    (two, legend_two), (three, legend_three) = sizes
    assert len(legend_two.get_texts()) == 4 and len(legend_three.get_texts()) == 6
    assert three[0] == two[0] + 3  # widened for the legend beside the axes


class _BadBackendImport:
    """Importing matplotlib.figure fails as ``MPLBACKEND=bogus`` makes matplotlib's import
    fail: a ValueError, not an ImportError."""

    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib.figure":
            raise ValueError("Key backend: 'bogus' is not a valid value for backend; "
                             "supported values are ['agg', 'pdf']")
        return None


def _matplotlib_fails(monkeypatch, how):
    """matplotlib.figure's import fails ``how``: 'missing' (an ImportError) or 'backend'
    (a ValueError, ``MPLBACKEND`` naming no backend)."""
    if how == "missing":
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
        return "; install it (pip install matplotlib)"
    monkeypatch.setenv("MPLBACKEND", "bogus")
    monkeypatch.delitem(sys.modules, "matplotlib.figure", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BadBackendImport(), *sys.meta_path])
    return "; unset MPLBACKEND or set it to a backend matplotlib lists"


@pytest.mark.parametrize("how", ["missing", "backend"])
def test_a_matplotlib_failing_on_import_leaves_a_sweeps_table_and_names_its_fix(
        monkeypatch, tmp_path, how):
    """``MPLBACKEND=bogus`` makes importing matplotlib raise a ValueError, which the check
    for a missing matplotlib let through: a sweep ended, its runs trained, in a traceback,
    its table and the figures' paths unwritten (and a depth curve refused with one)."""
    from stochastic_depth_jax.training import sweep

    fix = _matplotlib_fails(monkeypatch, how)
    problem = plots.matplotlib_problem()
    assert problem.startswith("matplotlib cannot be imported (ModuleNotFoundError" if
                              how == "missing" else "matplotlib fails on import (ValueError: "
                              "Key backend: 'bogus' is not a valid value")
    assert fix in problem and "\n" not in problem
    run = {"name": "depth8_pL1", "workdir": str(tmp_path / "depth8_pL1"), "depth": 8,
           "p_last": 1.0, "finished": True, "test_error": 0.9, "records": [{"epoch": 1}]}
    with pytest.warns(logs.RunWarning) as caught:
        outputs = sweep.write_figures([run], str(tmp_path / "figures"), report=None)
    [message] = [str(w.message) for w in caught]
    assert f"not drawn: {problem}, then " in message
    assert outputs == {"training_time": str(tmp_path / "figures" / "training_time.md")}


@pytest.mark.parametrize("how", ["missing", "backend"])
def test_curves_that_matplotlib_cannot_draw_are_one_warning_naming_the_fix(
        monkeypatch, tmp_path, how):
    """A run without matplotlib (or with a wrong MPLBACKEND) warned with the bare error of
    its import, not saying what to do about it."""
    fix = _matplotlib_fails(monkeypatch, how)
    run = types.SimpleNamespace(config=load_config("cifar10:smoke"), workdir=str(tmp_path),
                                best=None, plotted_at=None, title=None, plot_failed=False)
    with pytest.warns(logs.RunWarning) as caught:
        loop._draw_plots(run, force=True)
    [message] = [str(w.message) for w in caught]
    assert message.startswith(f"Could not draw error.png/loss.png in {tmp_path}: matplotlib ")
    assert fix in message and "; training goes on (the numbers are in metrics.jsonl" in message
    assert run.plot_failed and not os.listdir(tmp_path)


def test_mid_epoch_evaluations_of_an_earlier_session_stay_on_the_curves(monkeypatch, tmp_path):
    """A run resumed without eval_every_steps drew no validation.jsonl record: the earlier
    sessions' mid-epoch evaluations left the validation curve, their best's star alone."""
    drawn = []
    monkeypatch.setattr(plots, "plot_curves", lambda records, out, **kw: drawn.append(kw))
    validation = [{"step": 3, "epoch": 0.75, "val_error": 0.5},
                  {"step": 4, "epoch": 1, "val_error": 0.6}]
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in validation))
    config = load_config("cifar10:smoke", ["--config.eval_every_steps=0"])
    run = types.SimpleNamespace(config=config, workdir=str(tmp_path), plotted_at=None,
                                best={"metric": "val_error", "value": 0.5, "epoch": 0.75,
                                      "step": 3}, title=None, plot_failed=False)
    loop._draw_plots(run, force=True)
    [kwargs] = drawn
    assert kwargs["validation"] == validation


def test_fig_3_legend_beside_the_axes_leaves_the_training_loss_axis_readable(
        monkeypatch, tmp_path):
    """A sweep of the paper's ten p_L values draws ten runs in Fig. 3: the legend, put
    beside the axes, covered the right axis (training loss) with its tick labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from stochastic_depth_jax.training import figures

    saved = []
    save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure",
                        lambda fig, *a, **k: (saved.append(fig), save(fig, *a, **k))[1])
    runs = [{"name": f"depth110_pL{p / 10:g}", "depth": 110, "p_last": p / 10,
             "workdir": str(tmp_path), "records": [
                 {"epoch": e, "test_error": 0.3 - 0.01 * e, "train_loss": 1.5 - 0.1 * e * p}
                 for e in (1, 2, 3)]} for p in range(1, 11)]
    figures.plot_error_curves(runs, str(tmp_path / "fig3.png"))
    [fig] = saved
    error_ax, loss_ax = fig.axes
    renderer = FigureCanvasAgg(fig).get_renderer()
    legend = error_ax.get_legend().get_window_extent(renderer)
    assert loss_ax.get_tightbbox(renderer).x1 < legend.x0  # past the loss axis's labels
    assert legend.x1 <= fig.bbox.x1  # and in the figure


def test_figures_are_drawn_without_latex_whatever_the_matplotlibrc_says(monkeypatch, tmp_path):
    """Under a matplotlibrc's 'text.usetex: True' every text went to LaTeX, where the
    labels' '_' and '%' are errors (without LaTeX, each drawing failed): a sweep ended in
    a traceback, its table unwritten, and a run's curves were never drawn."""
    import matplotlib.figure
    from matplotlib.text import Text

    from stochastic_depth_jax.training import figures

    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)
    texts = []
    savefig = matplotlib.figure.Figure.savefig

    def saved(fig, *args, **kwargs):
        result = savefig(fig, *args, **kwargs)
        texts.extend(fig.findobj(Text))  # tick labels included: made as it is saved
        return result

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", saved)
    plots.plot_curves(_records([0.1, 0.01]), str(tmp_path), title="cifar10, 100% of it")
    run = {"name": "depth8_pL1", "depth": 8, "p_last": 1.0, "workdir": str(tmp_path),
           "records": _records([0.1, 0.01]), "finished": True, "test_error": 0.5}
    figures.plot_error_curves([run], str(tmp_path / "fig3.png"))
    figures.plot_error_vs_p_last([run], str(tmp_path / "fig8.png"))
    assert len(texts) > 20 and not any(t.get_usetex() for t in texts)
    assert matplotlib.rcParams["text.usetex"]  # the session's own setting, left as it was


def test_a_diverged_run_draws_its_curves_up_to_the_divergence(monkeypatch, tmp_path):
    """Drawn at most every PLOT_EVERY_S, the curves of a run that diverged stopped where they
    were last drawn: epochs before the divergence (dozens on a fast GPU) were missing."""
    drawn = []
    monkeypatch.setattr(plots, "plot_curves",
                        lambda records, out, **kw: drawn.append([r["epoch"] for r in records]))
    train_epoch = loop._train_epoch

    def diverging(run, compiled, epoch, end):
        if epoch == 3:
            raise loop._diverged("Non-finite training loss (a test's)", run.step + 1, epoch)
        return train_epoch(run, compiled, epoch, end)

    monkeypatch.setattr(loop, "_train_epoch", diverging)
    config = load_config("cifar10:smoke", ["--config.num_epochs=3", "--config.progress_bar=false",
                                           "--config.write_tensorboard=false"])
    with pytest.raises(loop.NonFiniteLossError):
        loop.train_and_evaluate(config, str(tmp_path))
    assert drawn == [[1], [1, 2]]  # after the first epoch, then at the divergence


def test_weights_that_diverged_at_an_evaluation_are_not_drawn_as_the_best(
        monkeypatch, tmp_path):
    """Parameters non-finite at the first epoch's end (its loss still finite): the epoch was
    evaluated on them and taken for the best before its save refused them, and the curves
    starred 'best val_error: epoch 1, test error ...' over 'no epoch finished', with no
    checkpoint of it."""
    import jax
    import jax.numpy as jnp

    drawn = []
    monkeypatch.setattr(plots, "plot_curves", lambda records, out, **kw: drawn.append(kw))
    train_epoch = loop._train_epoch

    def diverging(run, compiled, epoch, end):
        took = train_epoch(run, compiled, epoch, end)
        run.state = run.state.replace(
            params=jax.tree.map(lambda x: x * jnp.nan, run.state.params))
        return took

    monkeypatch.setattr(loop, "_train_epoch", diverging)
    config = load_config("cifar10:smoke", ["--config.progress_bar=false",
                                           "--config.write_tensorboard=false"])
    with pytest.raises(loop.NonFiniteLossError, match="parameters became non-finite"):
        loop.train_and_evaluate(config, str(tmp_path))
    [kw] = drawn
    assert kw["best"] is None and kw["diverged"] is not None
    assert not os.listdir(tmp_path / "checkpoints_best")


@pytest.mark.parametrize("how", ["raises", "missing"])
def test_a_diverged_runs_failed_drawing_does_not_say_training_goes_on(
        monkeypatch, tmp_path, how):
    """A run that diverged in its first epoch, its drawing failing (matplotlib missing),
    said 'training goes on' in the line before the one saying it stopped."""
    if how == "missing":
        _matplotlib_fails(monkeypatch, how)
    else:
        def broken(records, out_dir, **kwargs):
            raise RuntimeError("drawing failed")

        monkeypatch.setattr(plots, "plot_curves", broken)

    def diverging(run, compiled, epoch, end):
        raise loop._diverged("Non-finite training loss (a test's)", run.step + 1, epoch)

    monkeypatch.setattr(loop, "_train_epoch", diverging)
    config = load_config("cifar10:smoke", ["--config.progress_bar=false",
                                           "--config.write_tensorboard=false"])
    with pytest.warns(logs.RunWarning) as caught, pytest.raises(loop.NonFiniteLossError):
        loop.train_and_evaluate(config, str(tmp_path))
    [said] = [str(w.message) for w in caught if "Could not draw" in str(w.message)]
    assert "training goes on" not in said and "; the numbers are in metrics.jsonl;" in said


def test_figures_drawn_under_a_constrained_layout_matplotlibrc_do_not_warn(
        monkeypatch, tmp_path):
    """A matplotlibrc's 'figure.constrained_layout.use: True' made each drawing warn 'The
    figure layout has changed to tight' (a run's first curves, each of a sweep's figures):
    a warning its user could do nothing about."""
    import matplotlib

    from stochastic_depth_jax.training import figures

    monkeypatch.setitem(matplotlib.rcParams, "figure.constrained_layout.use", True)
    run = {"name": "depth8_pL1", "depth": 8, "p_last": 1.0, "workdir": str(tmp_path),
           "records": _records([0.1, 0.01]), "finished": True, "test_error": 0.5}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots.plot_curves(_records([0.1, 0.01]), str(tmp_path), title="cifar10")
        figures.plot_error_curves([run], str(tmp_path / "fig3.png"))
        figures.plot_first_conv_grad([run], str(tmp_path / "fig7.png"))
        figures.plot_error_vs_p_last([run], str(tmp_path / "fig8.png"))
    assert [str(w.message) for w in caught] == []
    assert matplotlib.rcParams["figure.constrained_layout.use"]  # the session's, as it was


def _texts(fig):
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text)]


def test_a_run_diverging_in_its_first_epoch_marks_it_and_says_there_is_nothing_to_draw(
        monkeypatch, tmp_path):
    """A run that diverged before its first epoch's end wrote error.png and loss.png as
    blank axes (0 to 1 on both): read as a drawing that failed, the divergence unmarked."""
    drawn = []
    monkeypatch.setattr(plots, "plot_curves", lambda records, out, **kw: drawn.append(kw))

    def diverging(run, compiled, epoch, end):
        raise loop._diverged("Non-finite training loss (a test's)", run.step + 2, epoch)

    monkeypatch.setattr(loop, "_train_epoch", diverging)
    config = load_config("cifar10:smoke", ["--config.progress_bar=false",
                                           "--config.write_tensorboard=false"])
    with pytest.raises(loop.NonFiniteLossError):
        loop.train_and_evaluate(config, str(tmp_path))
    [kw] = drawn
    x, label = kw["diverged"]
    assert label == "diverged at step 2 (epoch 1)" and 0 < x < 1  # 2 of the epoch's steps
    fig = plots.curves_figure([], ("train_error", "test_error"), "error (%)", True,
                              diverged=kw["diverged"])
    ax = fig.axes[0]
    assert "no epoch finished before training diverged: no numbers to draw" in _texts(fig)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [label]
    assert list(ax.get_yticks()) == []  # no values to read off empty axes
    fig = plots.curves_figure([], ("train_error",), "error (%)", True)
    assert "no epoch has finished yet: nothing to draw" in _texts(fig)


def test_a_later_divergence_is_marked_after_the_curves():
    records = _records([0.1, 0.1, 0.1])
    fig = plots.curves_figure(records, ("train_error", "test_error"), "error (%)", True,
                              diverged=(3.4, "diverged at step 34 (epoch 4)"))
    ax = fig.axes[0]
    [mark] = [line for line in ax.get_lines() if line.get_label().startswith("diverged")]
    assert list(mark.get_xdata()) == [3.4, 3.4] and ax.get_xlim()[1] > 3.4
    assert not any("nothing to draw" in t or "no numbers" in t for t in _texts(fig))


def test_curves_of_no_epoch_never_replace_earlier_curves(tmp_path):
    """Restarted from step 0 (its checkpoints lost: the records are set aside in
    metrics.jsonl.dropped) and diverging in its first epoch, a run wrote blank PNGs over
    the earlier run's curves. Those are left now; a figure of no epoch replaces only one of
    its own kind."""
    paths = plots.plot_curves(_records([0.1, 0.01]), str(tmp_path))
    before = [open(p, "rb").read() for p in paths]
    assert plots.plot_curves([], str(tmp_path)) == []
    assert [open(p, "rb").read() for p in paths] == before
    assert plots.plot_curves([], str(tmp_path), diverged=(0.5, "diverged at step 2")) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    first = plots.plot_curves([], str(empty))
    assert first == [str(empty / name) for name in plots.CURVE_FILES]
    assert plots.plot_curves([], str(empty), diverged=(0.5, "diverged at step 2")) == first
    assert plots.plot_curves(_records([0.1]), str(empty)) == first  # the first epoch's curves


def test_a_curves_figure_drawn_by_a_caller_ignores_a_usetex_or_constrained_matplotlibrc(
        monkeypatch, tmp_path):
    """plots.curves_figure (public) was made outside drawn_as_ours: under a matplotlibrc's
    usetex its texts went to LaTeX (its '_' and '%' are errors), under constrained layout it
    warned 'The figure layout has changed to tight'."""
    import io

    import matplotlib
    from matplotlib.text import Text

    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)
    monkeypatch.setitem(matplotlib.rcParams, "figure.constrained_layout.use", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.curves_figure(_records([0.1, 0.01]), ("train_error", "test_error"),
                                  "error (%)", True, title="cifar10, 100% of it")
        fig.savefig(io.BytesIO(), format="png")  # the caller's save, outside our settings
    texts = fig.findobj(Text)
    assert len(texts) > 10 and not any(t.get_usetex() for t in texts)


def test_a_one_epoch_run_is_shown_from_its_start_not_up_to_an_epoch_it_never_reached():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plots.curves_figure(_records([0.1]), ("train_error", "test_error"), "error (%)", True)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert [t for t in ax.get_xticks() if lo <= t <= hi] == [0, 1] and hi < 2


def test_fig_3_marks_the_training_loss_otherwise_than_a_nan(monkeypatch, tmp_path):
    """Fig. 3's training-loss points were x's, the other figures' mark of a NaN."""
    from stochastic_depth_jax.training import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, *a, **k: drawn.append(fig))
    run = {"name": "depth8_pL1", "depth": 8, "p_last": 1.0, "workdir": str(tmp_path),
           "records": _records([0.1, 0.01])}
    figures.plot_error_curves([run], str(tmp_path / "fig3.png"))
    [fig] = drawn
    [loss] = fig.axes[1].get_lines()
    assert loss.get_marker() not in ("x", "None", None, "")


def test_fig_7_shows_a_zero_gradient_below_its_log_axis(monkeypatch, tmp_path):
    """A first-conv gradient of exactly 0 (a frozen stem, dead units) has no place on Fig.
    7's log axis: the line fell off the bottom and its points were not drawn, unsaid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from stochastic_depth_jax.training import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, *a, **k: drawn.append(fig))
    grads = [0.02, 0.01, 0.0, 0.0, 0.005]
    records = [dict(r, grad_first_conv_mean_abs=g) for r, g in zip(_records([0.1] * 5), grads)]
    run = {"name": "depth8_pL1", "depth": 8, "p_last": 1.0, "workdir": str(tmp_path),
           "records": records}
    figures.plot_first_conv_grad([run], str(tmp_path / "fig7.png"))
    [fig] = drawn
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    zero = lines["depth8_pL1: 0 (below the log axis)"]
    assert list(zero.get_xdata()) == [3, 4]
    curve = lines["8 layers, constant depth"]
    assert [y for y in curve.get_ydata() if y == y] == [0.02, 0.01, 0.005]  # NaN: the gaps
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "depth8_pL1: 0 (below the log axis)" in labels


def test_the_results_line_names_curves_an_earlier_session_drew_as_such(tmp_path):
    """Resumed with write_plots=false, a run's last line listed error.png and loss.png as
    its results: drawn by an earlier session, they lack this one's epochs."""
    from stochastic_depth_jax.training import progress

    for name in ("summary.json", "metrics.jsonl", "error.png", "loss.png"):
        (tmp_path / name).write_text("")
    os.utime(tmp_path / "error.png", (1000, 1000))
    os.utime(tmp_path / "loss.png", (1000, 1000))
    os.utime(tmp_path / "metrics.jsonl", (2000, 2000))
    [results] = progress.summary_lines({}, str(tmp_path), 1)
    assert results == (f"Results in {tmp_path}: summary.json, metrics.jsonl; drawn before "
                       "metrics.jsonl's last records (write_plots was off, or a drawing "
                       "failed): error.png, loss.png.")
    os.utime(tmp_path / "error.png", (3000, 3000))  # drawn after the last record
    os.utime(tmp_path / "loss.png", (3000, 3000))
    [results] = progress.summary_lines({}, str(tmp_path), 1)
    assert results == f"Results in {tmp_path}: summary.json, metrics.jsonl, error.png, loss.png."


def _sweep_runs(depth=8):
    from stochastic_depth_jax.training import sweep

    return [(name, load_config("cifar10:smoke", extra))
            for name, extra in sweep.plan([depth], [0.5, 1.0])]


def test_only_process_0_of_a_multi_process_sweep_prints_and_warns(monkeypatch, tmp_path,
                                                                   capsys):
    """Every process of a job printed each run's 'sweep: starting' line and warned about
    each diverged run: N copies of each in a job's log."""
    import jax

    from stochastic_depth_jax.training import sweep

    def diverging(config, workdir):
        raise loop._diverged("Non-finite training loss (a test's)", 3, 1)

    for process, said in ((1, False), (0, True)):
        monkeypatch.setattr(jax, "process_index", lambda: process)
        root = tmp_path / str(process)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            status = sweep.run_sweep(_sweep_runs(), str(root), train=diverging)
        assert set(status.values()) == {"diverged at epoch 1"}
        out = capsys.readouterr().out
        assert ("sweep: " in out) is said, out
        assert any("the sweep goes on" in str(w.message) for w in caught) is said


def test_only_process_0_of_a_multi_process_job_draws_a_sweeps_figures(monkeypatch, tmp_path):
    import jax

    from stochastic_depth_jax.training import sweep

    runs = [{"name": f"depth8_pL{p:g}", "depth": 8, "p_last": p, "finished": True,
             "workdir": str(tmp_path / f"depth8_pL{p:g}"), "records": _records([0.1, 0.01]),
             "test_error": 0.5} for p in (0.5, 1.0)]
    reported = []
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    paths = sweep.write_figures(runs, str(tmp_path / "figures"), report=reported.append)
    assert reported == [] and not os.path.exists(tmp_path / "figures")
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert sweep.write_figures(runs, str(tmp_path / "figures"), report=reported.append) == paths
    assert all(os.path.exists(p) for p in paths.values()) and len(reported) == 4


def test_only_process_0_says_a_run_starts_afresh_without_a_readable_checkpoint(monkeypatch):
    import jax

    from stochastic_depth_jax.training import checkpoint, setup

    def unreadable(kind, abstract):
        raise checkpoint.NoCheckpointError("none readable")

    monkeypatch.setattr(setup, "abstract_state", lambda *a: None)
    monkeypatch.setattr(loop, "_note_earlier_best", lambda run: None)
    for process, said in ((1, False), (0, True)):
        monkeypatch.setattr(jax, "process_index", lambda: process)
        run = types.SimpleNamespace(
            workdir="w", ckpts=types.SimpleNamespace(steps=lambda kind: [4], restore=unreadable),
            setup=types.SimpleNamespace(init_state=lambda shape: "fresh"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop._resume_or_init(run, (32, 32, 3))
        assert run.state == "fresh"
        assert any("starting afresh" in str(w.message) for w in caught) is said


def test_curves_of_a_copied_workdir_are_told_apart_by_their_records_not_their_mtimes(
        tmp_path):
    """Copied file by file in name order (rsync -r, cp -r, a download), a workdir's
    metrics.jsonl is newer than its PNGs: the 'Nothing to train' rerun of the copy named its
    current curves as drawn before metrics.jsonl's last records. A PNG drawn before a record
    that is newer than it (copied after metrics.jsonl) was listed as current."""
    from stochastic_depth_jax.training import metrics, progress

    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    for record in _records([0.1, 0.1]):
        writer.write(record)
    plots.plot_curves(metrics.read_metrics(str(tmp_path)), str(tmp_path))
    (tmp_path / "summary.json").write_text("{}")
    copied = ("error.png", "loss.png", "metrics.jsonl", "summary.json")  # in name order
    for second, name in enumerate(copied):
        os.utime(tmp_path / name, (1000 + second, 1000 + second))
    [results] = progress.summary_lines({}, str(tmp_path), 2)
    assert results == f"Results in {tmp_path}: summary.json, metrics.jsonl, error.png, loss.png."
    writer.write(_records([0.1, 0.1, 0.1])[-1])  # a later session's epoch, write_plots off
    for name in ("error.png", "loss.png"):
        os.utime(tmp_path / name, (2000, 2000))  # copied after metrics.jsonl
    [results] = progress.summary_lines({}, str(tmp_path), 3)
    assert results == (f"Results in {tmp_path}: summary.json, metrics.jsonl; drawn before "
                       "metrics.jsonl's last records (write_plots was off, or a drawing "
                       "failed): error.png, loss.png.")


def test_a_divergence_at_the_first_step_is_shown_from_epoch_0_not_from_epoch_minus_1():
    """A loss non-finite at the first step (step 0: the initial parameters') is marked at
    epoch 0; the axis then spanned epochs -1 to 0."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plots.curves_figure([], ("train_error", "test_error"), "error (%)", True,
                              diverged=(0.0, "diverged at step 0 (epoch 1)"))
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert [t for t in ax.get_xticks() if lo <= t <= hi] == [0, 1]

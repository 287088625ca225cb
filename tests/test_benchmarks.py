"""The benchmarks the GPU suite runs, at toy sizes: a part that breaks should break here, on
the CPU, not in a lent GPU's minutes. Figures are not checked (they are the machine's), only
that every variant ran and its table row is there and well formed."""

import os
import sys

import pytest

from bench_scripts import load


def rows(path, first_cells):
    """The table rows of ``path`` whose first cell is one of ``first_cells``, split."""
    found = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] in first_cells:
            found[cells[0]] = cells
    return found


def test_bench_step_every_kind_of_variant(tmp_path):
    out = tmp_path / "step.md"
    # skip and compact also run in test_stage_costs; here the suffix and fitted lengths.
    names = ["constant", "lengths-3-unrolled"]
    load("bench_step").main(["--depth", "8", "--batch", "4", "--rounds", "1", "--warmup", "1",
                             "--variants", ",".join(names), "--compile-depths", "",
                             "--out", str(out)])
    found = rows(out, names)
    assert sorted(found) == sorted(names)
    assert float(found["constant"][4]) == 1.0  # the ratio base
    assert all(float(found[n][1]) > 0 for n in names)


def test_bench_step_user_branch(tmp_path):
    out = tmp_path / "user.md"
    load("bench_step").main(["--user-branch", "--blocks", "2", "--width", "4", "--batch", "4",
                             "--rounds", "1", "--warmup", "1", "--variants", "constant,skip",
                             "--out", str(out)])
    assert sorted(rows(out, ["constant (1.0, auto)", "skip (0.5, auto)"])) == [
        "constant (1.0, auto)", "skip (0.5, auto)"]


def test_bench_train_whole_epochs(tmp_path):
    out = tmp_path / "train.md"
    load("bench_train").main([
        "--whole-epochs", "constant,auto", "--epochs", "1", "--train-images", "64",
        "--test-images", "20", "--depth", "8", "--batch", "16", "--eval-batch", "80",
        "--out", str(out)])
    found = rows(out, ["constant", "auto"])
    assert sorted(found) == ["auto", "constant"] and found["constant"][3] == "1.000"


def test_bench_train_images_are_reused_and_others_refused(tmp_path, capsys):
    bench_train = load("bench_train")

    def args(folder, train_images=64):
        return type("Args", (), {"images_dir": str(folder), "train_images": train_images,
                                 "test_images": 20})()

    images = tmp_path / "images"
    sibling = tmp_path / "images.partial"  # a user's folder that merely looks like staging
    sibling.mkdir()
    (sibling / "mine.txt").write_text("keep me")
    assert bench_train._epoch_images(args(f"{images}/"), str(tmp_path)) == str(images)
    assert (sibling / "mine.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["images", "images.partial"]  # no staging left
    marker = (images / "bench_train_images.txt").read_text()
    capsys.readouterr()
    assert bench_train._epoch_images(args(images), str(tmp_path)) == str(images)
    assert f"reusing the images in {images}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds other images than this run needs"):
        bench_train._epoch_images(args(images, 128), str(tmp_path))
    assert (images / "bench_train_images.txt").read_text() == marker
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="is not a bench_train image folder"):
        bench_train._epoch_images(args(other), str(tmp_path))
    assert (other / "notes.txt").read_text() == "keep me"


def test_bench_drop_path_tiny_vit(tmp_path):
    out = tmp_path / "dp.md"
    load("bench_drop_path").main(["--size", "ti", "--depth", "2", "--image", "32", "--patch",
                                  "8", "--batch", "4", "--rounds", "1", "--warmup", "1",
                                  "--rates", "0.4", "--linear", "0.4", "--out", str(out)])
    found = rows(out, ["none", "uniform 0.4 skip", "uniform 0.4 mask"])
    assert len(found) == 3 and found["uniform 0.4 skip"][5].strip("*") != "-"


def test_gpu_suite_budget_and_stops(tmp_path, monkeypatch, capsys):
    suite = load("gpu_suite")
    quick = suite.Part("quick", 1, ("-c", "print('quick ran')"))
    slow = suite.Part("slow", 1, ("-c", "import time; print('slow started', flush=True); "
                                        "time.sleep(60)"))
    huge = suite.Part("huge", 10**6, ("-c", "print('never')"))
    monkeypatch.setattr(suite, "BY_NAME", {p.name: p for p in (quick, slow, huge)})
    suite.main(["--parts", "quick,huge,slow", "--budget", "8", "--out-dir", str(tmp_path)])
    log = (tmp_path / "gpu_suite.log").read_text()
    assert "quick ran" in log and "never" not in log and "slow started" in log
    assert "quick: ok" in log
    assert "huge: not started" in log
    assert "slow: stopped (budget)" in log
    with pytest.raises(SystemExit):
        suite.main(["--parts", "nonsense"])
    assert "unknown parts" in capsys.readouterr().err


def test_gpu_suite_runs_torch_parts_with_the_torch_python(tmp_path):
    suite = load("gpu_suite")
    args = suite.parse_args(["--torch-python", "/some/venv/bin/python", "--out-dir",
                             str(tmp_path)])
    torch_parts = [p for p in suite.PARTS if p.torch]
    assert [p.name for p in torch_parts] == ["epochs-torch"]
    assert suite.command(torch_parts[0], args)[:2] == ["/some/venv/bin/python",
                                                       "benchmarks/bench_torch.py"]
    assert suite.command(suite.BY_NAME["epochs"], args)[0] == sys.executable
    vs = suite.command(suite.BY_NAME["vs-torch"], args)  # runs ours, and torch through the flag
    assert vs[0] == sys.executable and vs[vs.index("--torch-python") + 1] == "/some/venv/bin/python"


def test_gpu_suite_parts_name_known_variants():
    """Every variant a suite part asks of bench_step / bench_train / stage_costs exists."""
    suite, bench_step, bench_train = load("gpu_suite"), load("bench_step"), load("bench_train")
    for part in suite.PARTS:
        args = list(part.args)
        script = os.path.basename(args[0])
        if "--variants" in args and script in ("bench_step.py", "stage_costs.py",
                                               "profile_step.py", "compare_torch.py"):
            for name in args[args.index("--variants") + 1].split(","):
                assert bench_step.known_variant(name), (part.name, name)
        if "--whole-epochs" in args and script == "bench_train.py":
            for name in args[args.index("--whole-epochs") + 1].split(","):
                assert name in bench_train.EPOCH_VARIANTS, (part.name, name)

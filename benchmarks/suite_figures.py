"""The headline figures of the tables a ``gpu_suite.py`` run appended, as lines to print.

Read back from the markdown the benchmarks append (standard library only), so that the
suite's log says, after each part and again at its end, what was measured: whole epochs
against constant depth with the 500-epoch projection (``bench_train.py --whole-epochs``),
PyTorch's whole epochs and our throughput against them (``bench_torch.py --whole-epochs``),
and each train-step variant against constant depth (``bench_step.py``). A table it cannot
read is named, never an error: the tables themselves are what is recorded.
"""

from __future__ import annotations

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class Table:
    """One appended table: its ``## `` heading, its rows, each a dict by column name, and
    the text between the two (what was measured, how, the command)."""

    heading: str
    rows: list[dict[str, str]]
    notes: str = ""

    @property
    def mark(self) -> str:
        """' (interrupted ...)' where the heading says a signal cut the table short."""
        found = re.search(r" \((interrupted [^()]*)\)$", self.heading)
        return f" ({found.group(1)})" if found else ""


def tables(text: str) -> list[Table]:
    """The tables of ``text`` (markdown as the benchmarks append it): each ``## `` heading
    with the first table below it."""
    found: list[Table] = []
    heading, columns, read, notes = "", None, False, []
    for line in text.splitlines():
        if line.startswith("## "):
            heading, columns, read, notes = line[3:].strip(), None, False, []
        elif not line.startswith("|"):
            read, columns = read or columns is not None, None  # a table ended
            notes.append(line)
        elif heading and not read:  # the first table under the heading
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if columns is None:
                columns = cells
                found.append(Table(heading, [], "\n".join(notes).strip()))
            elif not set("".join(cells)) <= set("-: "):  # not the |---| line
                found[-1].rows.append(dict(zip(columns, cells)))
    return found


def appended_since(folder: str, sizes: dict[str, int]) -> str:
    """What was appended to the ``.md`` files in ``folder`` since ``sizes``
    (:func:`file_sizes`)."""
    text = []
    for name, size in sorted(file_sizes(folder).items()):
        if size > sizes.get(name, 0):
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                f.seek(sizes.get(name, 0))
                text.append(f.read())
    return "\n".join(text)


def file_sizes(folder: str) -> dict[str, int]:
    """The size of each ``.md`` file in ``folder``."""
    try:
        names = [n for n in os.listdir(folder) if n.endswith(".md")]
    except OSError:
        return {}
    return {n: os.path.getsize(os.path.join(folder, n)) for n in names}


@dataclasses.dataclass(frozen=True)
class Epochs:
    """One variant's whole epochs: ``ours`` (bench_train) or PyTorch's (bench_torch)."""

    ours: bool
    # Ours and PyTorch's are compared only where these four are the same: the network
    # ('ResNet-110'), the model (ours: the config, 'cifar10'; PyTorch's: TORCH_MODEL), the
    # batch and p_L (stochastic rows only; '' where the table does not say).
    network: str
    model: str
    batch: int
    p_last: str
    precision: str  # 'fp32' or 'bf16'
    variant: str  # ours: with what it ran as, 'auto (compact, multiple 4 (gpu))'
    constant: bool  # constant depth (every block), else stochastic depth
    epoch_s: float  # median steady epoch, training only
    images_per_s: float
    vs_constant: str  # the table's ratio cell ('-' where there is none)
    minutes_500: str  # 500 x (epoch + evaluation), the table's cell
    mark: str  # ' (interrupted ...)' or ''


_OURS = re.compile(r"^Whole epochs, .*batch (\d+), .*, (float32|bfloat16), .*\((\d+) steps")
_THEIRS = re.compile(r"^PyTorch whole epochs, .*batch (\d+), ")
# bench_train.py's config (its heading's '(config cifar10)'; '' in a table from before it
# said, which is paired with none).
_CONFIG = re.compile(r"\(config ([^()\s]+)\)")
# bench_torch.py's network is the cifar10 config's: CIFAR ResNet, option-A shortcuts
# (average pooling, zero channels), BatchNorm, 10 classes.
TORCH_MODEL = "cifar10"
_P_LAST = re.compile(r"p_L=(\d*\.?\d+)")
_STEP = re.compile(r"^Train step, ")


def epochs_of(table: Table) -> list[Epochs]:
    """The rows of a whole-epochs table, ours or PyTorch's; [] for any other table."""
    ours, theirs = _OURS.match(table.heading), _THEIRS.match(table.heading)
    found_p = _P_LAST.search(f"{table.heading}\n{table.notes}")
    p_last = found_p.group(1) if found_p else ""
    if ours:
        batch, dtype, steps = int(ours.group(1)), ours.group(2), int(ours.group(3))
        precision = "fp32" if dtype == "float32" else "bf16"
        config = _CONFIG.search(table.heading)
        found = []
        for row in table.rows:
            seconds = float(row["median epoch >= 2 s, compiles excluded"])
            found.append(Epochs(True, _network(table), config.group(1) if config else "",
                                batch, p_last, precision,
                                f"{row['variant']} ({row['ran as']})",
                                row["variant"].startswith("constant"), seconds,
                                steps * batch / seconds, row["/ constant (same scan form)"],
                                row["500 epochs, min"], table.mark))
        return found
    if theirs:
        return [Epochs(False, _network(table), TORCH_MODEL, int(theirs.group(1)), p_last,
                       row["variant"].split("-")[1], row["variant"],
                       row["variant"].endswith("-constant"), float(row["median epoch s"]),
                       float(row["img/s"]), row["skip / constant"], row["500 epochs, min"],
                       table.mark)
                for row in table.rows]
    return []


def _network(table: Table) -> str:
    """'ResNet-110', from the heading (ours: 'ResNet-110', PyTorch's: 'CIFAR ResNet-110')."""
    found = re.search(r"ResNet-(\d+)", table.heading)
    return found.group(0) if found else table.heading


def lines_of(text: str) -> tuple[list[str], list[Epochs]]:
    """The figure lines of the tables in ``text``, and their whole epochs (for
    :func:`ours_vs_torch` across parts)."""
    lines, epochs = [], []
    for table in tables(text):
        try:
            rows = epochs_of(table)
            if rows:
                epochs += rows
                lines += [_epoch_line(e) for e in rows]
            elif _STEP.match(table.heading):
                lines += [_step_line(table, row) for row in table.rows]
        except (KeyError, ValueError, IndexError, StopIteration) as e:  # a column missing
            lines.append(f"(could not read the table '{table.heading}': {e!r})")
    return lines, epochs


def _step_line(table: Table, row: dict[str, str]) -> str:
    """A train-step table's row: the variant over constant depth."""
    network = table.heading.removeprefix("Train step, ").split(", batch")[0]
    dtype = " bf16" if "bfloat16" in table.heading else ""
    ratio = next(v for k, v in row.items() if k.startswith("/ constant"))
    return (f"step {network}{dtype}: {next(iter(row.values()))} {ratio} x constant (per "
            f"round {row.get('per round', '-')}), {row['img/s']} img/s{table.mark}")


def _epoch_line(e: Epochs) -> str:
    who = "ours" if e.ours else "PyTorch"
    ratio = "" if e.vs_constant == "-" else f", {e.vs_constant} x constant"
    return (f"whole epochs {e.precision}, {who} {e.variant}: {e.epoch_s:.2f} s/epoch "
            f"({e.images_per_s:.0f} img/s){ratio}; 500 epochs (training + evaluation each "
            f"epoch): {e.minutes_500} min{e.mark}")


def ours_vs_torch(epochs: list[Epochs]) -> list[str]:
    """Our throughput over PyTorch's in whole epochs, each of our rows against each PyTorch
    row of the same kind (:func:`_same_run`); the last of each measured. None where one
    side was not measured."""
    ours = {_key(e): e for e in epochs if e.ours}
    theirs = {_key(e): e for e in epochs if not e.ours}
    return [f"whole epochs {o.precision}: ours {o.variant} / PyTorch {t.variant}: "
            f"{o.images_per_s / t.images_per_s:.2f}x the throughput{o.mark}{t.mark}"
            for o in ours.values() for t in theirs.values() if _same_run(o, t)]


def _key(e: Epochs) -> tuple:
    """What makes two rows of one side the same measurement (the later one is kept)."""
    return e.network, e.model, e.batch, e.p_last, e.precision, e.variant


def _same_run(o: Epochs, t: Epochs) -> bool:
    """Whether our row ``o`` and PyTorch's ``t`` measured the same thing, so that their
    ratio means something: the same network, model (a config's other head or blocks is
    another model), batch and precision, and the same kind: constant depth with constant
    depth, stochastic depth with PyTorch's skipping at the same p_L. Any of these unknown
    (a table that does not say it): not the same."""
    same = (o.network, o.model, o.batch, o.precision, o.constant) == (
        t.network, t.model, t.batch, t.precision, t.constant) and bool(o.model)
    if o.constant:
        return same
    return same and bool(o.p_last) and bool(t.p_last) and float(o.p_last) == float(t.p_last)

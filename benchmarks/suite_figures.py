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
    """One appended table: its ``## `` heading and its rows, each a dict by column name."""

    heading: str
    rows: list[dict[str, str]]

    @property
    def mark(self) -> str:
        """' (interrupted ...)' where the heading says a signal cut the table short."""
        found = re.search(r" \((interrupted [^()]*)\)$", self.heading)
        return f" ({found.group(1)})" if found else ""


def tables(text: str) -> list[Table]:
    """The tables of ``text`` (markdown as the benchmarks append it): each ``## `` heading
    with the first table below it."""
    found: list[Table] = []
    heading, columns, read = "", None, False
    for line in text.splitlines():
        if line.startswith("## "):
            heading, columns, read = line[3:].strip(), None, False
        elif not line.startswith("|"):
            read, columns = read or columns is not None, None  # a table ended
        elif heading and not read:  # the first table under the heading
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if columns is None:
                columns = cells
                found.append(Table(heading, []))
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
    network: str  # 'ResNet-110': ours and PyTorch's compared only on the same
    precision: str  # 'fp32' or 'bf16'
    variant: str  # ours: with what it ran as, 'auto (compact, multiple 4 (gpu))'
    constant: bool  # constant depth (every block), else stochastic depth
    epoch_s: float  # median steady epoch, training only
    images_per_s: float
    vs_constant: str  # the table's ratio cell ('-' where there is none)
    minutes_500: str  # 500 x (epoch + evaluation), the table's cell
    mark: str  # ' (interrupted ...)' or ''


_OURS = re.compile(r"^Whole epochs, .*batch (\d+), .*, (float32|bfloat16), .*\((\d+) steps")
_THEIRS = "PyTorch whole epochs"
_STEP = re.compile(r"^Train step, ")


def epochs_of(table: Table) -> list[Epochs]:
    """The rows of a whole-epochs table, ours or PyTorch's; [] for any other table."""
    ours = _OURS.match(table.heading)
    if ours:
        batch, dtype, steps = int(ours.group(1)), ours.group(2), int(ours.group(3))
        precision = "fp32" if dtype == "float32" else "bf16"
        found = []
        for row in table.rows:
            seconds = float(row["median epoch >= 2 s, compiles excluded"])
            found.append(Epochs(True, _network(table), precision,
                                f"{row['variant']} ({row['ran as']})",
                                row["variant"].startswith("constant"), seconds,
                                steps * batch / seconds, row["/ constant (same scan form)"],
                                row["500 epochs, min"], table.mark))
        return found
    if table.heading.startswith(_THEIRS):
        return [Epochs(False, _network(table), row["variant"].split("-")[1], row["variant"],
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
    row of the same network, precision and kind (constant depth with constant depth,
    stochastic with PyTorch's skipping); the last of each measured. None where one side was
    not measured."""
    ours = {(e.precision, e.variant): e for e in epochs if e.ours}
    theirs = {(e.precision, e.variant): e for e in epochs if not e.ours}
    return [f"whole epochs {o.precision}: ours {o.variant} / PyTorch {t.variant}: "
            f"{o.images_per_s / t.images_per_s:.2f}x the throughput{o.mark}{t.mark}"
            for o in ours.values() for t in theirs.values()
            if (o.network, o.precision, o.constant) == (t.network, t.precision, t.constant)]

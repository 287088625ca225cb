"""The line each finished epoch prints where no progress bar is drawn."""

import pytest

from stochastic_depth_jax.training import progress


@pytest.mark.parametrize("epoch, shown", [
    (3, "epoch 3/50: "), (0.5, "epoch 0.5/50: "), (2 / 7, "epoch 0.29/50: "),
    (12 + 1 / 3, "epoch 12.33/50: ")])
def test_an_epoch_cut_short_shows_its_fraction_to_two_decimals(epoch, shown):
    """svhn:smoke with --config.train_on_all=true --config.max_steps=2 (7 steps an epoch)
    printed 'epoch 0.2857142857142857/2: ...'."""
    record = {"epoch": epoch, "train_loss": 2.3, "train_error": 0.9, "test_error": 0.875,
              "epoch_time_s": 0.1, "images_per_s": 500.0}
    line = progress.epoch_line(record, 50)
    assert line.startswith(shown + "train loss 2.3000, error 90.00%; test error 87.50%")

"""CIFAR-100+, Wide ResNet WRN-28-10 with stochastic depth (linear decay to p_L = 0.8).

Command:  python train.py --config cifar100_wrn [--workdir ./workdir/cifar100_wrn]
Smoke:    python train.py --config cifar100_wrn:smoke   (fake data, WRN-10-2 of base width 4, CPU:
          about 20 s on 2 cores)
Runtime:  200 epochs of a 36.5M-parameter net (WRN paper: about a day on a 2016 GPU).
Recipe:   the common WRN CIFAR recipe (Zagoruyko & Komodakis, 2016): SGD, Nesterov momentum
          0.9, weight decay 5e-4, lr 0.1 times 0.2 at epochs 60, 120, 160, batch 128,
          pre-activation blocks, projection shortcuts (here 1x1 conv + BN on the block
          input; the WRN code's: a bare 1x1 conv on the pre-activation); dropout between
          the convolutions off (the WRN paper's option: --config.model.dropout_rate=0.3).
          Augmentation: the stochastic-depth paper's flip + 4-pixel translation with zero
          (mean) padding, as every CIFAR config here, so WRN and ResNet runs differ in the
          network alone; the WRN paper fills the padding with reflections of the image.
          Not reproduced either: the WRN Torch code's drops come one epoch earlier (after
          epochs 59, 119, 159) and restart the momentum.
Paper:    WRN paper, Table 4: WRN-28-10 CIFAR-100+ test error 20.50% (no dropout, no
          stochastic depth). p_L = 0.8 is our choice (the stochastic-depth paper has no
          wide nets); sweep it: python sweep.py --config cifar100_wrn --depths 28
          --p-last 0.5,0.8,1.0 --root runs/wrn
"""

from configs import base


def get_config(arg=None):
    c = base.base_config()
    c.dataset = "cifar100"
    c.model.name = "wide_resnet"
    c.model.depth = 28
    c.model.widen_factor = 10
    c.model.width = 16
    c.model.block = "preact"
    c.model.shortcut = "B"
    c.model.final_survival_prob = 0.8
    c.num_epochs = 200
    c.weight_decay = 5e-4
    c.lr_boundaries_epochs = (60, 120, 160)
    c.lr_decay_factor = 0.2
    if arg == "smoke":
        c = base.smoke(c)
        c.model.depth = 10
        c.model.widen_factor = 2
    return c

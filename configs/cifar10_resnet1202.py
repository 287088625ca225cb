"""CIFAR-10+, ResNet-1202 with stochastic depth, p_L = 0.5 (paper Sec. 4, 1202-layer ResNet).

Command:  python train.py --config cifar10_resnet1202 [--workdir ./workdir/cifar10_resnet1202]
Smoke:    python train.py --config cifar10_resnet1202:smoke   (fake data, CPU:
          about 20 s on 2 cores)
Runtime:  about 6.7x the ResNet-110 run (11x the blocks, 300 epochs instead of 500; the
          paper gives no time for it); days on one GPU.
Paper:    Sec. 4 and Fig. 4 (right), CIFAR-10+ test error 4.91% (constant depth
          ResNet-1202: 6.67%; He et al. reported 7.93%); not in Table 1. Recipe (Sec. 4):
          300 epochs, lr 0.01 for the first 10 epochs, then 0.1, / 10 at epochs 150 and 225.
"""

from configs import base


def get_config(arg=None):
    c = base.base_config()
    c.dataset = "cifar10"
    c.model.depth = 1202
    c.num_epochs = 300
    c.warmup_epochs = 10  # at learning_rate / 10 (lr_schedule='step')
    c.lr_boundaries_epochs = (150, 225)
    if arg == "smoke":
        c = base.smoke(c)
        c.model.depth = 14  # still deeper than the other smoke runs
        # Two epochs: one of warm-up at 0.01, one at 0.1.
        c.warmup_epochs = 1
        c.lr_boundaries_epochs = ()
    return c

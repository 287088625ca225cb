"""CIFAR-10+ (flip + translate augmentation), ResNet-110 with stochastic depth, p_L = 0.5.

Command:  python train.py --config cifar10 [--workdir ./workdir/cifar10]
Smoke:    python train.py --config cifar10:smoke    (fake data, CPU, about a minute)
Runtime:  paper (Table 2): 15h7m on the authors' GPU (constant depth: 20h42m), 500 epochs.
Paper:    Table 1, CIFAR-10+ test error 5.25% (constant depth ResNet-110: 6.41%);
          constant depth: --config.model.final_survival_prob=1.0
"""

from configs import base


def get_config(arg=None):
    c = base.base_config()
    c.dataset = "cifar10"
    if arg == "smoke":
        c = base.smoke(c)
    return c

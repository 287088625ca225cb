"""CIFAR-10+ (flip + translate augmentation), ResNet-110 with stochastic depth, p_L = 0.5.

Command:  python train.py --config cifar10 [--workdir ./workdir/cifar10]
Smoke:    python train.py --config cifar10:smoke    (fake data, CPU: about 15 s on 2 cores)
Official: python train.py --config cifar10:official   (the official Torch code's init,
          normalisation and lr drops; cifar10:official_smoke is its smoke run)
Runtime:  paper (Table 2): 15h7m on the authors' GPU (constant depth: 20h42m), 500 epochs.
Paper:    Table 1, CIFAR-10+ test error 5.25% (constant depth ResNet-110: 6.41%);
          constant depth: --config.model.final_survival_prob=1.0
"""

from configs import base

VARIANTS = base.OFFICIAL_VARIANTS


def get_config(arg=None):
    c = base.base_config()
    c.dataset = "cifar10"
    return base.cifar_variant(c, arg)

"""CIFAR-100+ (flip + translate augmentation), ResNet-110 with stochastic depth, p_L = 0.5.

Command:  python train.py --config cifar100 [--workdir ./workdir/cifar100]
Smoke:    python train.py --config cifar100:smoke   (fake data, CPU: about 15 s on 2 cores)
Official: python train.py --config cifar100:official   (the official Torch code's init,
          normalisation and lr drops; cifar100:official_smoke is its smoke run)
Runtime:  paper (Table 2): 15h20m on the authors' GPU (constant depth: 20h51m), 500 epochs.
Paper:    Table 1, CIFAR-100+ test error 24.98% (constant depth ResNet-110: 27.22% in
          Sec. 4's text; some copies of Table 1 print 27.76%);
          constant depth: --config.model.final_survival_prob=1.0
"""

from configs import base

VARIANTS = base.OFFICIAL_VARIANTS


def get_config(arg=None):
    c = base.base_config()
    c.dataset = "cifar100"
    return base.cifar_variant(c, arg)

"""CIFAR-10+, ResNet-1202 with stochastic depth, p_L = 0.5 (paper Sec. 4, 1202-layer ResNet).

Command:  python train.py --config cifar10_resnet1202 [--workdir ./workdir/cifar10_resnet1202]
Smoke:    python train.py --config cifar10_resnet1202:smoke   (fake data, CPU)
Runtime:  about 11x the ResNet-110 run (paper: 15h7m for ResNet-110); days on one GPU.
Paper:    Table 1, CIFAR-10+ test error 4.91% (constant depth ResNet-1202 in the paper
          overfits: 7.93%, from He et al.); the learning-rate schedule is the CIFAR one.
"""

from configs import base


def get_config(arg=None):
    c = base.base_config()
    c.dataset = "cifar10"
    c.model.depth = 1202
    if arg == "smoke":
        c = base.smoke(c)
        c.model.depth = 14  # still deeper than the other smoke runs
    return c

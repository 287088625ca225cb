"""SVHN (train + extra, no augmentation), ResNet-152 with stochastic depth, p_L = 0.5.

Command:  python train.py --config svhn [--workdir ./workdir/svhn]
Smoke:    python train.py --config svhn:smoke       (fake data, CPU: about 15 s on 2 cores)
Runtime:  paper (Table 2): 25h33m on the authors' GPU (constant depth: 33h43m); 50 epochs
          over ~598k images, about 1.8x the CIFAR ResNet-110 run's compute (1.33x the
          images seen, 75 blocks against 54).
Paper:    Table 1, SVHN test error 1.75% (constant depth ResNet-152: 1.80%);
          lr 0.1, / 10 at epochs 30 and 35 of 50 (Sec. 4, SVHN); as the paper, the
          validation error every 200 iterations (eval_every_steps, validation.jsonl), the
          test error and 'best' checkpoint where it is the lowest so far;
          constant depth: --config.model.final_survival_prob=1.0
"""

from configs import base


def get_config(arg=None):
    c = base.base_config()
    c.dataset = "svhn"
    c.model.depth = 152
    c.num_epochs = 50
    c.lr_boundaries_epochs = (30, 35)
    c.eval_every_steps = 200  # the paper's validation interval (~1,170 points in 50 epochs)
    if arg == "smoke":
        c = base.smoke(c)
        c.fake_data.num_extra = 64
        c.eval_every_steps = 2  # a few mid-epoch evaluations in 6-step epochs
    return c

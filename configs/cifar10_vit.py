"""CIFAR-10+, a ViT-S with patch 4 (8 x 8 + 1 tokens) and drop path that really skips.

Command:  python train.py --config cifar10_vit [--workdir ./workdir/cifar10_vit]
Smoke:    python train.py --config cifar10_vit:smoke   (fake data, CPU, tens of seconds)
Runtime:  not measured yet (no full run made; see benchmarks/bench_drop_path.py for step times).
Paper:    no paper result: Huang et al. (2016) train ResNets only. DeiT-S reaches 79.8% top-1
          on ImageNet with its own recipe and augmentation; not comparable to this config.
Recipe:   DeiT-style (Touvron et al., 2021), scaled to CIFAR: AdamW (lr 1e-3 at batch 512,
          weight decay 0.05 on kernels), 10 warm-up epochs then cosine decay to 0, label
          smoothing 0.1, drop path 0.1 with timm's linear rule (0 at the first block). No
          RandAugment/Mixup/CutMix: this repo's augmentation is the paper's flip + translate,
          so expect well below DeiT-level accuracy from scratch on CIFAR. Not a paper result.
Drop path: per-example subsets (mode='sample', implementation='skip'): each residual branch
          runs on round(n (1 - rate)) examples of each of model.groups groups of n; groups
          must be a multiple of the device count (8 covers 1, 2, 4 and 8 devices with the
          same numbers). implementation='mask' is timm's computed-and-masked drop path.
"""

import ml_collections

from configs import base


def get_config(arg=None):
    c = base.base_config()
    c.dataset = "cifar10"
    c.model = ml_collections.ConfigDict()
    c.model.name = "vit"
    c.model.size = "s"  # 'ti', 's', 'b', 'l' (stochastic_depth_jax.VIT_SIZES)
    c.model.width = ml_collections.config_dict.placeholder(int)  # None: from size
    c.model.depth = ml_collections.config_dict.placeholder(int)
    c.model.num_heads = ml_collections.config_dict.placeholder(int)
    c.model.patch_size = 4
    c.model.pool = "token"  # 'token' (class token) or 'gap' (mean of patch tokens)
    c.model.drop_path_rate = 0.1  # the last block's drop probability
    c.model.drop_path_rule = "linear"  # timm/DeiT; 'paper' = Huang et al. Eq. 4; 'uniform'
    c.model.mode = "sample"  # per-example gates (drop path)
    c.model.scaling = "train"  # kept examples x n / k in training, none at evaluation
    c.model.implementation = "skip"  # 'skip': branch runs on the kept subset only; 'mask'
    c.model.groups = 8  # subsets drawn per group of batch_size / groups examples
    c.model.dtype = "float32"

    c.batch_size = 512
    c.eval_batch_size = 500
    c.num_epochs = 300
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    c.weight_decay = 0.05
    c.weight_decay_on = "kernels"
    c.lr_schedule = "warmup_cosine"
    c.warmup_epochs = 10
    c.label_smoothing = 0.1
    if arg == "smoke":
        c.fake_data.num_train = 160
        c.fake_data.num_test = 64
        c.validation_size = 32
        c.model.size = "ti"
        c.model.depth = 2
        c.model.width = 32
        c.model.num_heads = 2
        c.model.drop_path_rate = 0.3
        c.batch_size = 32
        c.eval_batch_size = 32
        c.num_epochs = 2
        c.warmup_epochs = 1
        c.log_every_steps = 1
    return c

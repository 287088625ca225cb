"""CIFAR-10+, a ViT-S with patch 4 (8 x 8 + 1 tokens) and drop path that really skips.

Command:  python train.py --config cifar10_vit [--workdir ./workdir/cifar10_vit]
Smoke:    python train.py --config cifar10_vit:smoke   (fake data, CPU: about 20 s on 2 cores)
Runtime:  not measured yet (no full run made; see benchmarks/bench_drop_path.py for step times).
Paper:    no paper result: Huang et al. (2016) train ResNets only. DeiT-S reaches 79.8% top-1
          on ImageNet with its own recipe and augmentation; not comparable to this config.
Recipe:   DeiT-style (Touvron et al., 2021), scaled to CIFAR: AdamW (lr 1e-3 at batch 512,
          weight decay 0.05 on kernels, not on pos_embed/cls as DeiT), 10 warm-up epochs
          then cosine decay to 0, label smoothing 0.1, drop path 0.1 with timm's linear rule
          (0 at the first block). Not tuned; DeiT's own rule gives lr 5e-4 at batch 512,
          and it warms up 5 epochs. No
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
    c = base.drop_path_config("vit")
    c.model.size = "s"  # 'ti', 's', 'b', 'l' (stochastic_depth_jax.VIT_SIZES)
    c.model.width = ml_collections.config_dict.placeholder(int)  # None: from size
    c.model.depth = ml_collections.config_dict.placeholder(int)
    c.model.num_heads = ml_collections.config_dict.placeholder(int)
    c.model.patch_size = 4
    c.model.pool = "token"  # 'token' (class token) or 'gap' (mean of patch tokens)
    # LayerScale's initial gamma on every branch (DINOv2: 1e-5; timm's init_values); None
    # or 0: none (DeiT).
    c.model.layer_scale_init = ml_collections.config_dict.placeholder(float)
    if arg == "smoke":
        base.drop_path_smoke(c)
        c.model.size = "ti"
        c.model.depth = 2
        c.model.width = 32
        c.model.num_heads = 2
    return c

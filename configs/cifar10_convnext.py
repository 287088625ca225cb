"""CIFAR-10+, a ConvNeXt-Femto with a stride-2 stem and drop path that really skips.

Command:  python train.py --config cifar10_convnext [--workdir ./workdir/cifar10_convnext]
Smoke:    python train.py --config cifar10_convnext:smoke   (fake data, CPU: about 30 s on 2 cores)
Runtime:  not measured (no full run made; see benchmarks/bench_drop_path.py --model convnext
          for step times).
Paper:    no paper result: Huang et al. (2016) train ResNets only. ConvNeXt-T reaches 82.1%
          top-1 on ImageNet-1k with its own recipe (Liu et al., 2022); no CIFAR
          figure there, and this config is not comparable.
Recipe:   ConvNeXt's ImageNet recipe (AdamW, warm-up + cosine, label smoothing 0.1, layer
          scale 1e-6) scaled to CIFAR as cifar10_vit.py: AdamW lr 1e-3 at batch 512 (the
          paper's 4e-3 at batch 4096, scaled linearly, is 5e-4; 1e-3 is not tuned), weight
          decay 0.05 on kernels, 10 warm-up epochs then cosine to 0 over 300 epochs, drop path
          0.1 with timm's linear rule over all 12 blocks (0 at the first). No RandAugment /
          Mixup / CutMix / EMA: this repo's augmentation is the paper's flip + translate.
Model:    timm's ConvNeXt-Femto widths and depths (48/96/192/384, 2/2/6/2). The stem is a
          2x2 stride-2 patchify instead of ImageNet's 4x4 stride 4, so the four stages see
          16/8/4/2 pixel sides on 32x32 images (ImageNet 224: 56/28/14/7). Stride 4 would
          leave the last stage at 1x1, where the 7x7 depthwise kernel uses only its centre
          tap; stride 1 costs 4x the FLOPs of stride 2. Not tuned.
Drop path: per-example subsets (mode='sample', implementation='skip'): each block's branch
          runs on round(n (1 - rate)) examples of each of model.groups groups of n, and the
          outputs are added into the block input in one scatter-add; groups must be a
          multiple of the device count (8 covers 1, 2, 4 and 8 devices with the same numbers).
          implementation='mask' is timm's computed-and-masked drop path.
"""

import ml_collections

from configs import base


def get_config(arg=None):
    c = base.drop_path_config("convnext")
    c.model.size = "femto"  # atto, femto, pico, nano, tiny, ... (sdj.CONVNEXT_SIZES)
    c.model.depths = ml_collections.config_dict.placeholder(tuple)  # None: from size
    c.model.dims = ml_collections.config_dict.placeholder(tuple)  # None: from size
    c.model.stem_stride = 2  # patchify stem side and stride (ImageNet: 4)
    c.model.layer_scale_init = 1e-6  # initial gamma; 0 disables layer scale
    if arg == "smoke":
        base.drop_path_smoke(c)
        c.model.size = "atto"
        c.model.depths = (1, 1, 2, 1)
        c.model.dims = (8, 16, 24, 32)
    return c

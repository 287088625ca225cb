"""Fields shared by every experiment config; each config file overrides what differs.

Not a config itself (it is not in the registry): ``configs/cifar10.py`` and friends call
``base_config()`` and set the dataset, depth and schedule of their experiment.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """The paper's CIFAR training recipe (Huang et al., 2016, Sec. 4), ResNet-110, p_L = 0.5."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # PRNG for parameter init only ('threefry2x32', 'rbg', 'unsafe_rbg'). Gates and
    # augmentation always use threefry. rbg: same distributions, init compiles ~6x faster
    # on XLA:CPU (threefry: ~30 s even for ResNet-8).
    c.init_rng_impl = "rbg"

    # Data (stochastic_depth_jax.data.load_dataset). validation_size=None holds out the
    # paper's validation set (CIFAR: 5,000 training images; SVHN: 6,000 of train+extra).
    c.dataset = "cifar10"
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.download = True
    # A count (5000) or a fraction of the training set (0.1); 0 = no validation set.
    c.validation_size = ml_collections.config_dict.placeholder(object)
    c.train_on_all = False
    c.label = "fine"
    # Input normalisation by the training split's statistics: 'channel' (per-channel mean
    # and std) or 'pixel' (the official Torch code's: the mean image and one global std,
    # before augmentation, so a translation's fill is the mean at that pixel).
    c.normalization = "channel"
    # Training images' augmentation: 'auto' (the dataset's, as the paper: CIFAR and image
    # folders flip + translate by up to 4 px, SVHN none), 'flip_translate', 'translate' (no
    # flip: digits, text) or 'none' (e.g. the un-augmented CIFAR-10/100 benchmarks).
    c.augment = "auto"
    # > 0: build a small fake dataset with the real name and shapes under
    # <workdir>/fake_data and train on it (offline smoke runs and CI only). Ignored for
    # image folders (real data): `:smoke --config.dataset=image_folder:PATH` is a short run.
    c.fake_data = ml_collections.ConfigDict({"num_train": 0, "num_test": 0, "num_extra": 0})

    # Model (stochastic_depth_jax.CifarResNet). final_survival_prob = p_L; 1.0 = constant depth.
    c.model = ml_collections.ConfigDict()
    c.model.name = "cifar_resnet"  # 'cifar_resnet', 'wide_resnet' (WRN-d-k), 'vit' or 'convnext'
    c.model.widen_factor = 1  # k of WRN-d-k (wide_resnet only)
    c.model.dropout_rate = 0.0  # dropout between a branch's convs in training (WRN paper: 0.3)
    c.model.depth = 110
    c.model.width = 16
    c.model.final_survival_prob = 0.5
    c.model.survival_rule = "linear"  # p_l = 1 - l/L (1 - p_L), paper Eq. 4
    c.model.mode = "batch"  # one gate per block per mini-batch, as in the paper
    c.model.scaling = "test"  # train: identity or full block; test: residual * p_l
    # Parameter-free shortcuts as the paper's: 2x2 average pooling + zero channels (Sec. 4);
    # 'A' subsamples instead (He et al.'s option A as fb.resnet.torch writes it).
    c.model.shortcut = "A-avg"
    c.model.block = "basic"  # 'basic' (paper) or 'preact'
    # 'ours': convs He-initialised on fan-out, BatchNorm scales 1, Flax's Dense classifier;
    # 'official': the official Torch code's (convs He on fan-in, BatchNorm scales uniform in
    # [0, 1), classifier weight and bias uniform in +-1/sqrt(fan_in)). See `:official`.
    c.model.initialization = "ours"
    # 'auto' (default): the real skipping that measured fastest on the run's platform,
    # resolved at start-up and recorded in run.json (CPU: lax.cond skipping; GPU/TPU:
    # compact mode where a stage is scanned, else lax.cond skipping; see compact_multiple).
    # 'skip': a dropped block is not computed (forward
    # or backward); 'mask': compute, multiply by the gate (what other libraries do; same
    # numbers, no speed-up); 'loop': each scanned stage's kept blocks in one device loop of
    # dynamic length (one program, no padding; GPU speed not measured yet).
    c.model.implementation = "auto"
    # What a kept block saves for backward: 'convs' (conv outputs; BN/ReLU recomputed),
    # 'none' (everything) or 'full' (input only). 'convs' was fastest on CPU and H100.
    c.model.remat = "convs"
    # > 0: compact mode, draw gates on the host and gather each stage's kept blocks into a
    # scan whose length is the kept count rounded up to this multiple (no conditionals;
    # the blocks outside scanned stages, and each stage's first, are masked).
    # Fastest on GPU (H100, ResNet-110, batch 128: 0.85x the constant-depth step with 4).
    c.model.compact_multiple = 0
    # > 0: compact mode with this many scan lengths per stage, chosen to minimise the
    # expected padding under the survival schedule (ResNet-110, 3: 2.5 padded blocks a step
    # where multiple 4 pads 3.7; 3^3 = 27 programs; GPU speed not measured yet). At most one
    # of the two is > 0. Both 0 (default): with implementation='auto' the platform decides
    # (GPU/TPU: compact mode, multiple 4; CPU: lax.cond skipping); with 'skip', off.
    c.model.compact_lengths = 0
    c.model.scan = ml_collections.config_dict.placeholder(bool)
    # True: inline every scanned block (same parameters and results; no loop for XLA:GPU to drive
    # from the host block by block; compile time grows with depth).
    c.model.scan_unroll = False
    c.model.dtype = "float32"

    # Optimisation: SGD, Nesterov momentum 0.9, dampening 0, L2 1e-4 on every weight
    # (Torch optim.sgd as in the official code), lr 0.1 / 10 at 50% and 75% of training.
    c.batch_size = 128
    c.eval_batch_size = 500
    c.num_epochs = 500
    c.max_steps = 0  # > 0 stops after this many steps (smoke runs, benchmarks)
    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 1e-4
    c.weight_decay_on = "all"  # 'all' (Torch default, official code) or 'kernels'
    c.lr_schedule = "step"
    c.lr_boundaries_epochs = (250, 375)
    c.lr_decay_factor = 0.1
    # Warm-up epochs: 'step' runs them at learning_rate / 10 (paper's ResNet-1202: 10);
    # 'warmup_cosine' ramps linearly from 0.
    c.warmup_epochs = 0
    c.adam_b1 = 0.9  # optimizer='adamw' only
    c.adam_b2 = 0.999
    c.label_smoothing = 0.0  # paper: plain cross-entropy; DeiT: 0.1

    # Evaluation, selection, checkpoints, logging.
    c.eval_every_epochs = 1
    # > 0: also evaluate the validation split every this many steps (global step multiple,
    # mid-epoch included; SVHN in the paper: 200), recorded in validation.jsonl; where the
    # validation error improves on the best, the test error too and the 'best' checkpoint.
    # With select_best_by 'test' or 'train' they only record the validation error (the best
    # is chosen at epoch ends). Needs a validation set.
    c.eval_every_steps = 0
    c.select_best_by = "validation"  # paper: report the model with the best validation error
    # ('train': the best training error among the evaluated epochs, so it has a test error)
    c.checkpoint_every_epochs = 1
    c.checkpoint_every_steps = 0  # > 0 also saves every this many steps
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    # JAX's persistent compilation cache: 'auto' = $JAX_COMPILATION_CACHE_DIR, else
    # $XDG_CACHE_HOME (or ~/.cache)/stochastic_depth_jax/jax/<jaxlib, machine, CPU features>;
    # a path; '' = off. A resumed or repeated run loads its programs instead of compiling
    # them (programs that took >= 1 s).
    c.compilation_cache_dir = "auto"
    c.log_every_steps = 20  # progress-bar refresh (host sync) interval
    c.progress_bar = True  # a bar per epoch (terminal); a line every 5 min in a log
    c.write_tensorboard = True
    c.write_plots = True
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns ``c`` into a tiny CPU variant: fake data, ResNet-8 of width 4, two short epochs."""
    c.fake_data.num_train = 160
    c.fake_data.num_test = 64
    c.validation_size = 32
    c.model.depth = 8
    c.model.width = 4
    c.batch_size = 32
    c.eval_batch_size = 32
    c.num_epochs = 2
    c.lr_boundaries_epochs = (1,)
    c.log_every_steps = 1
    return c


# The CIFAR configs' variants: the official recipe, and its smoke-sized run.
OFFICIAL_VARIANTS = (None, "smoke", "official", "official_smoke")


def official(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns the paper's CIFAR recipe ``c`` into the official Torch code's where the two
    differ (github.com/yueatsprograms/Stochastic_Depth, main.lua): its initialisation, its
    input normalisation (the mean image and one std), and its lr drops for ``c.num_epochs``
    (:func:`official_lr_drops`: after epochs 249 and 374 of 500, one before the paper's).
    They are epochs, as the paper recipe's are: ``--config.num_epochs`` applied after this
    keeps them (a run that never reaches one warns); ``official_lr_drops(N)`` gives the
    official code's for N epochs. Not reproduced: its last partial batch of each epoch (72
    images; we drop it)."""
    c.model.initialization = "official"
    c.normalization = "pixel"
    c.lr_boundaries_epochs = official_lr_drops(c.num_epochs)
    return c


def official_lr_drops(num_epochs: int) -> tuple[int, ...]:
    """The official code's lr drops in a run of ``num_epochs`` (N), as
    ``lr_boundaries_epochs``: its loop trains at lr 0.1 while its 1-based epoch counter is
    below N * 0.5 and at 0.01 while below N * 0.75, i.e. ceil(N / 2) - 1 and
    ceil(3N / 4) - 1 epochs (500: 249 and 374; 101: 50 and 75). A drop before the first
    epoch (N <= 2, where that loop never trains at 0.1) has no boundary and is left out."""
    drops = (-(-num_epochs // 2) - 1, -(-3 * num_epochs // 4) - 1)
    return tuple(sorted({e for e in drops if e > 0}))


def cifar_variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """``c`` as variant ``arg`` of :data:`OFFICIAL_VARIANTS` makes it (None: unchanged)."""
    if arg in ("official", "official_smoke"):
        c = official(c)
    if arg in ("smoke", "official_smoke"):
        c = smoke(c)
    return c


def drop_path_config(name: str) -> ml_collections.ConfigDict:
    """A CIFAR-10 config for the drop-path model ``name`` (``'vit'``, ``'convnext'``): its
    ``model`` block holds the drop-path fields they share (the caller adds the rest), and
    the training recipe is DeiT-style (Touvron et al., 2021), not tuned: AdamW (lr 1e-3 at
    batch 512, weight decay 0.05 on kernels), 10 warm-up epochs then cosine decay to 0,
    label smoothing 0.1, 300 epochs. DeiT's own: lr 5e-4 x batch / 512 (5e-4 at 512) and 5
    warm-up epochs."""
    c = base_config()
    c.dataset = "cifar10"
    c.model = ml_collections.ConfigDict()
    c.model.name = name
    c.model.drop_path_rate = 0.1  # the last block's drop probability
    c.model.drop_path_rule = "linear"  # timm/DeiT; 'paper' = Huang et al. Eq. 4; 'uniform'
    c.model.mode = "sample"  # per-example gates (drop path)
    c.model.scaling = "train"  # kept examples x n / k in training, none at evaluation
    c.model.implementation = "skip"  # 'skip': branch runs on the kept subset only; 'mask'
    c.model.groups = 8  # subsets drawn per group of batch_size / groups examples
    # What a kept branch saves for backward: 'none' (every activation) or 'full' (its input
    # only: each block's branches recomputed in the backward pass, timm's grad checkpointing;
    # the same values). The ResNets' 'convs' keeps their conv outputs: theirs only.
    c.model.remat = "none"
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
    return c


def drop_path_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The training side of a drop-path model's ``:smoke`` variant (fake data, two short
    epochs, drop rate 0.3); the caller shrinks the model."""
    c.fake_data.num_train = 160
    c.fake_data.num_test = 64
    c.validation_size = 32
    c.model.drop_path_rate = 0.3
    c.batch_size = 32
    c.eval_batch_size = 32
    c.num_epochs = 2
    c.warmup_epochs = 1
    c.log_every_steps = 1
    return c

"""Data: tfds datasets (CIFAR-10/100, SVHN) and image folders, held and augmented on device.

Typical use:
    ds = data.load_dataset('cifar10', data_dir=...)
    dev = data.put_on_devices(ds.train, mesh)
    images, labels = data.train_batch(dev, key, step, batch_size=128,
                                      mean=ds.mean, std=ds.std, augment=ds.augment)
"""
from stochastic_depth_jax.data import testing
from stochastic_depth_jax.data.augment import (AUGMENTATIONS, augment_batch, flip_translate,
                                               normalize, translate)
from stochastic_depth_jax.data.dataset import (IMAGE_FOLDER_PREFIX, Dataset, default_augment,
                                               fingerprint, load_dataset, recorded_holdout)
from stochastic_depth_jax.data.pipeline import (DATA_AXIS, DeviceSplit, epoch_order,
                                                eval_batches, eval_plan, put_on_devices,
                                                steps_per_epoch, train_batch)
from stochastic_depth_jax.data.sources import (CorruptDataError, DataUnavailableError,
                                               TfdsImportError)
from stochastic_depth_jax.data.splits import Split

__all__ = [
    "AUGMENTATIONS", "CorruptDataError", "IMAGE_FOLDER_PREFIX", "DATA_AXIS",
    "DataUnavailableError", "Dataset",
    "DeviceSplit", "Split", "augment_batch", "default_augment", "epoch_order", "eval_batches",
    "eval_plan",
    "fingerprint",
    "flip_translate", "load_dataset", "normalize", "put_on_devices", "recorded_holdout",
    "steps_per_epoch", "TfdsImportError",
    "testing", "train_batch", "translate",
]

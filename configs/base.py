"""Base configuration: every field vesseljax reads, with its default.

Dataset configs (`drive.py`, `chase.py`, `hrf.py`, `synthetic.py`) call
`get_config()` here and change only what differs. Override any field on the
command line, e.g. `--config.train.num_steps=100`.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---- data ----
  config.data = ml_collections.ConfigDict()
  config.data.name = 'synthetic'  # drive | chase_db1 | hrf | synthetic
  # Folder holding the publishers' folders (DRIVE/, CHASEDB1/, HRF/) or the
  # dataset's own folder. Unset: $VESSELJAX_DATA_DIR, else ../shared/datasets.
  config.data.root = config_dict.placeholder(str)
  config.data.source = 'files'  # files | tfds (array_record via TFDS, no TF)
  config.data.tfds_dir = config_dict.placeholder(str)  # unset: <workdir>/tfds
  config.data.image_size = (512, 512)  # working resolution (H, W), pixels
  config.data.clahe_clip = 5.0
  config.data.clahe_tile_px = 32  # CLAHE tile side at the working resolution
  config.data.gamma = 1.2  # applied as out = in ** (1 / gamma)
  config.data.num_val = 2  # training images held out for validation Dice
  # k-fold over the training split (0 = off): train without block `fold` of
  # `num_folds` contiguous blocks of the sorted training images; `--mode=holdout`
  # then writes the coarse maps of the held-out block (out-of-fold masks for
  # the refiner, which must never see a coarse mask of an image the coarse
  # model was trained on).
  config.data.num_folds = 0
  config.data.fold = 0
  # Synthetic data only.
  config.data.synthetic_num_train = 12
  config.data.synthetic_num_test = 4
  config.data.synthetic_size = (256, 256)

  # ---- augmentation (device side, jitted, vmapped over the batch) ----
  config.augment = ml_collections.ConfigDict()
  config.augment.enabled = True
  config.augment.max_rotation_deg = 15.0
  config.augment.flip = True
  config.augment.elastic_alpha_px = 8.0  # displacement scale, pixels
  config.augment.elastic_sigma_px = 12.0  # smoothing of the displacement field
  config.augment.elastic_prob = 0.5

  # ---- coarse model ----
  config.model = ml_collections.ConfigDict()
  config.model.name = 'lunet_ra'  # lunet | lunet_ra
  config.model.widths = (32, 64, 128, 256)
  config.model.bottleneck = 640
  config.model.impl = 'auto'  # auto (fast on CPU, reference on GPU) | fast | reference
  config.model.dtype = 'float32'

  # ---- coarse training ----
  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16  # global, split over local devices
  config.train.patch_size = 128  # 0 = whole images
  config.train.fov_patch_min = 0.25  # min FOV fraction inside a sampled patch
  config.train.num_steps = 800  # ~1 h on the 2-core CPU at 16x128x128
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 100
  config.train.weight_decay = 1e-4
  config.train.grad_clip = 1.0
  config.train.dice_weight = 1.0
  config.train.edge_weight = 0.1
  config.train.bce_weight = 1.0
  config.train.side_weight = 0.4  # deep supervision weight per side output
  config.train.log_every = 10
  config.train.eval_every = 100
  config.train.checkpoint_every = 50
  config.train.keep_checkpoints = 2

  # ---- evaluation / prediction ----
  config.eval = ml_collections.ConfigDict()
  config.eval.split = 'test'
  config.eval.threshold = 0.5
  config.eval.batch_size = 2
  config.eval.compare_to = config_dict.placeholder(str)  # rows JSON for Wilcoxon
  config.eval.max_images = 0  # 0 = all
  # Params-only coarse checkpoint for evaluate/predict; unset: <workdir>/params.msgpack.
  config.eval.checkpoint = config_dict.placeholder(str)

  return config

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

  # ---- latent-diffusion refiner (paper 3.3; SPEC's reading) ----
  config.diffusion = ml_collections.ConfigDict()
  # Mask autoencoder: 512 -> 128 per side; C latent channels (paper-faithful: 64).
  config.diffusion.latent_channels = 4
  config.diffusion.ae_widths = (8, 16, 32)
  # Image encoder (RGB -> token grid for cross-attention + pooled vector for FiLM).
  config.diffusion.image_widths = (32, 64, 128)
  config.diffusion.token_grid = 16
  # Denoiser U-Net.
  # 3,127,900 params (paper: ~3.1M); the 128x128 level is kept narrow for CPU speed.
  config.diffusion.widths = (16, 32, 48, 72)
  config.diffusion.num_res_blocks = 2
  config.diffusion.num_heads = 4
  # Levels with cross-attention to the image tokens (the paper: all four). Level 0
  # (128x128 queries) triples the CPU cost of a forward: 0.68 s vs 0.23 s at batch 2.
  config.diffusion.attention_levels = (1, 2, 3)
  config.diffusion.timesteps = 1000  # T, cosine schedule
  # The refiner works on square tiles of the working-size image (train and
  # inference alike: its cross-attention tokens are defined per tile).
  config.diffusion.tile_size = 256
  config.diffusion.tile_overlap = 32
  # Where the refiner's coarse masks come from: 'oof' (holdout_maps.npz files of
  # k-fold coarse runs, listed in coarse_maps), 'degrade' (a degradation model
  # of the ground truth; see data/degrade.py) or 'oof+degrade' (both).
  config.diffusion.coarse_source = 'degrade'
  config.diffusion.coarse_maps = ''  # comma-separated holdout_maps.npz paths (coarse_source='oof')
  config.diffusion.degrade_variants = 4  # degraded maps per training image ('degrade')
  config.diffusion.coarse_checkpoint = config_dict.placeholder(str)  # coarse params for inference
  config.diffusion.autoencoder_checkpoint = config_dict.placeholder(str)  # unset: <workdir>/autoencoder.msgpack
  # True (our departure): the denoiser also sees each 4x4 cell's RGB and coarse-map
  # pixels as 64 channels on the latent grid (the image tokens are 16x16 per tile, far
  # coarser than a thin vessel). A refiner without it can warm-start one with it.
  config.diffusion.pixel_detail = False
  # Conditioning switches (the ablations).
  config.diffusion.use_image = True
  config.diffusion.use_ra = True
  config.diffusion.cfg_drop_prob = 0.1  # image condition -> learned null
  # Coarse-condition dropout (a departure): with this probability per example the
  # coarse latent, RA map and detail coarse pixels are zeros, so the denoiser must
  # learn the vessels from the photo alone too (0: off, the paper).
  config.diffusion.coarse_drop_prob = 0.0
  # Losses: L_DDPM + dice_weight * Dice + edge_weight * Edge on the decoded x0 estimate.
  config.diffusion.dice_weight = 0.5
  config.diffusion.edge_weight = 0.3
  # A departure: > 0 adds this times a BCE of the decoded x0 estimate on the pixels
  # where the training pair's coarse map and label disagree (weighted by
  # |coarse - label|), so the coarse map's errors, a few % of a tile, get a loss of
  # their own instead of being averaged into Dice with the pixels it has right.
  config.diffusion.disagreement_weight = 0.0
  # A departure: > 0 trains, with this probability per example, the step that sampling
  # from start='coarse' begins with: z_t is the noised coarse latent (t drawn from
  # coarse_start_timesteps, inclusive; strength 0.5 starts at t = 400 / 450 / 480 for
  # N = 10 / 20 / 50) and the target is the noise whose x0 estimate is the label latent.
  # The paper's pairs (0: off) only ever noise the label, so the denoiser learns to keep
  # whatever z_t holds (BUILD_NOTES.md, "Training the coarse start").
  config.diffusion.coarse_start_prob = 0.0
  config.diffusion.coarse_start_timesteps = (400, 500)
  config.diffusion.ema_decay = 0.999
  # Autoencoder training.
  config.diffusion.ae_steps = 600
  config.diffusion.ae_learning_rate = 2e-3
  config.diffusion.ae_batch_size = 8
  # The loss on the coarse-map tiles: 'l2+dice' (the paper; it sharpens soft maps)
  # or 'l2+kl' (Bernoulli KL, zero only at the input: soft maps come back soft).
  config.diffusion.ae_coarse_loss = 'l2+dice'
  # An exported autoencoder.msgpack to start from, and whether its encoder trains.
  # ae_train_encoder=False re-fits the decoder alone: same latents and latent scale,
  # so refiners trained with the original autoencoder work with the new one.
  config.diffusion.ae_init_checkpoint = ''
  config.diffusion.ae_train_encoder = True
  # Denoiser training.
  config.diffusion.num_steps = 2000
  # An exported refiner.msgpack to start from (fine-tuning, e.g. a refiner trained
  # on 'degrade' pairs, then on 'oof+degrade'); same architecture and autoencoder.
  config.diffusion.init_checkpoint = ''
  # True: init_checkpoint may have been trained with other weights (and latent scale)
  # of the same autoencoder architecture, e.g. one re-trained from it with another
  # loss; the fine-tune adapts the refiner to the new latents (recorded in the export).
  config.diffusion.init_new_autoencoder = False
  # True: init_checkpoint was trained with another latent C (another autoencoder architecture),
  # e.g. the C = 4 refiner as the start of a C = 64 one: the denoiser's C-shaped latent
  # input and output convs start fresh, everything else from it (recorded in the export).
  config.diffusion.init_new_latent_channels = False
  config.diffusion.learning_rate = 2e-4
  config.diffusion.warmup_steps = 100
  config.diffusion.batch_size = 8
  config.diffusion.log_every = 20
  config.diffusion.checkpoint_every = 100
  # > 0: each of train_autoencoder / train_refiner stops (checkpointed, then exported)
  # after this many seconds of training, e.g. inside a lent GPU's time.
  config.diffusion.max_train_seconds = 0.0
  # --mode=train_refiner_ablations: the refiners trained together from scratch, one
  # vmapped step (names of train/refiner_sweep.ABLATIONS; 'control' is the full refiner;
  # also cdrop, disagree01, disagree1: coarse-condition dropout, the disagreement loss).
  config.diffusion.ablations = 'control,noimage,nora,noedge,nodice'
  # --mode=evaluate_autoencoder reconstructs 'label' (the test labels) or 'coarse'
  # (the coarse model's maps: the output of a refiner that learned the identity).
  config.diffusion.ae_eval_input = 'label'

  # ---- sampling ----
  config.sample = ml_collections.ConfigDict()
  config.sample.steps = 20  # DDIM steps N
  config.sample.eta = 0.0
  config.sample.guidance = 1.0  # s in eps_c + s (eps_c - eps_u); 0 = conditional only
  config.sample.start = 'noise'  # noise (the paper) | coarse (noised coarse latent)
  config.sample.strength = 0.5  # start='coarse': fraction of the N steps that are run
  config.sample.ensemble = 5  # k trajectories; mean probability + per-pixel variance
  config.sample.seed = 0
  config.sample.tile_batch = 4  # tiles sampled together
  # direct: the decoded z0 (the paper); residual: p_c + decoded z0 - decoded E(p_c),
  # so an identity refiner returns the coarse map, not its autoencoder round trip.
  config.sample.decode = 'direct'
  config.sample.drop_image = False  # True: the learned null image condition (ablation at sampling)
  # True: the coarse condition is zeros at every step (what the refiner draws from the
  # photo alone); needs start='noise' and decode='direct', which read the coarse map.
  config.sample.drop_coarse = False
  config.sample.uncertain_variance = 0.01  # uncertainty overlay: pixels at or above this variance

  # ---- evaluation / prediction ----
  config.eval = ml_collections.ConfigDict()
  config.eval.split = 'test'
  config.eval.threshold = 0.5
  config.eval.batch_size = 2
  config.eval.compare_to = config_dict.placeholder(str)  # rows JSON for Wilcoxon
  config.eval.max_images = 0  # 0 = all
  config.eval.flips = 1  # test-time flips: 1 (none), 2 (+ left-right), 4 (+ top-bottom, both)
  # Params-only coarse checkpoint for evaluate/predict; unset: <workdir>/params.msgpack.
  config.eval.checkpoint = config_dict.placeholder(str)

  return config

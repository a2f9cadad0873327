"""BTVAE: a variational autoencoder with a Barlow Twins loss, in one file.

Paper: Xu, Wei & Yin, "BTVAE: A Contrastive Learning Approach Towards Expressive Latent Space in Variational
Autoencoders". Its Figure 1:

    x_gt --encoder--> (mu, sigma) --sample z--> decoder --> x_recon --encoder--> (mu_recon, sigma_recon)
                          |                                                          |
                          +--------------- Barlow Twins loss: BT(z_gt, z_recon) -----+

An image and its own reconstruction should carry the same features, so BTVAE treats them as two "distorted views"
of one sample, as Barlow Twins (Zbontar et al., 2021) does with two augmentations of an image, and adds the Barlow
Twins loss between their embeddings to the VAE's objective (Eq. 4):

    loss = MSE(x, x_recon) + lambda1 KL(q(z|x) || N(0, I)) + lambda2 BT(z_gt, z_recon)

With lambda2 = 0 it is the baseline VAE. The file reads like the paper, in lettered parts (the paper's are
numbered: Sec. N): the method, A. Model, B. Reparameterisation, C. Objective (Eqs. 2-4), D. Training, E. Sampling;
the experiments, F. what they share, G. Data, H. FID, I. Latent space; then, below a marked line a first reading can
skip, the harness (flags, checkpoints, a run, main). Where the paper's text and the authors' released code disagree,
it follows README.md's "Deviations", each explained where it happens.
"""

import argparse, contextlib, ctypes, io, json, math, os, pickle, shlex, signal, subprocess, sys, time  # noqa: E401
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# torchvision, tqdm, torch-fidelity and scikit-learn are imported where used: a mistyped flag should not wait for them.

# =============================================================================
# A. Model (Sec. 2.1.1, 2.1.2, 3.3)
# Encoder: blocks of Conv2d(kernel 3, stride 2, padding 1) -> BatchNorm2d -> LeakyReLU with widths 16, 32, 64, 128,
# 256 (Sec. 3.3), each halving the image, then two linear heads predicting the mean and log-variance of q(z|x) = N(mu,
# diag(sigma^2)). Predicting log sigma^2 rather than sigma keeps sigma positive without a constraint. (The paper's
# text also puts a sigmoid on these heads; that would forbid negative means, and the authors' code has none.)
#
# Decoder: the mirror image, a linear layer back to the smallest feature map and ConvTranspose2d blocks that each
# double it, then a 3x3 conv to the image's channels. The linear layer has no activation after it, as the paper's
# u^0 = V^fc z + b^fc (Sec. 2.1.1) has none; the blocks use LeakyReLU where the paper writes ReLU, as the encoder and
# the authors' code do. Its Sigmoid output matches the data's [0, 1] range, so the MSE of Eq. 2 compares like with
# like (the authors' code put a Tanh, range [-1, 1], on data in [0, 1]).

def conv_block(in_channels, out_channels, transposed=False):
    if transposed:  # output_padding=1 makes the transposed conv exactly double the size
        conv = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1)
    else:
        conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.LeakyReLU())

def bottleneck_side(image_size, depth):
    """The side of the smallest feature map: each of the `depth` encoder blocks halves the image."""
    if image_size % 2 ** depth:
        raise ValueError(f"an image size of {image_size} is not divisible by 2^{depth} = {2 ** depth} "
                         f"(each of the {depth} encoder blocks halves the image)")
    return image_size // 2 ** depth

class ConvVAE(nn.Module):
    """The network shared by the VAE and BTVAE: only the objective (part C) differs."""

    def __init__(self, channels, image_size, hidden_dims=(16, 32, 64, 128, 256), latent_dim=128):
        super().__init__()
        self.architecture = dict(channels=channels, image_size=image_size, hidden_dims=tuple(hidden_dims),
                                 latent_dim=latent_dim)
        side = bottleneck_side(image_size, len(hidden_dims))
        self.bottleneck_shape = (hidden_dims[-1], side, side)
        flat = math.prod(self.bottleneck_shape)
        channels_in = [channels, *hidden_dims]
        self.encoder = nn.Sequential(*(conv_block(a, b) for a, b in zip(channels_in[:-1], channels_in[1:])),
                                     nn.Flatten())
        self.to_mu = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim)
        channels_out = [*reversed(hidden_dims), hidden_dims[0]]  # e.g. 256, 128, 64, 32, 16, 16
        self.from_latent = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(
            *(conv_block(a, b, transposed=True) for a, b in zip(channels_out[:-1], channels_out[1:])),
            nn.Conv2d(hidden_dims[0], channels, 3, padding=1),
            nn.Sigmoid())

    def encode(self, x):
        """x -> (mu, logvar) of q(z|x), each batch x latent_dim."""
        features = self.encoder(x)
        return self.to_mu(features), self.to_logvar(features)

    def decode(self, z):
        """z -> image in [0, 1]."""
        return self.decoder(self.from_latent(z).view(-1, *self.bottleneck_shape))

# =============================================================================
# B. Reparameterisation trick (Sec. 2.1)
# Sampling z ~ N(mu, sigma^2) directly has no gradient with respect to mu and sigma; writing z = mu + sigma * eps with
# eps ~ N(0, I) moves the randomness into eps, so the gradient flows through mu and sigma.

def reparameterise(mu, logvar):
    sigma = torch.exp(0.5 * logvar)  # logvar = log sigma^2
    return mu + sigma * torch.randn_like(sigma)

# =============================================================================
# C. Objective (Sec. 2.1.3, 2.2)
# Eq. 2, the baseline VAE:   MSE(x, x_recon) + lambda1 KL(q(z|x) || N(0, I))
# Eq. 3, Barlow Twins:       sum_i (1 - C_ii)^2 + delta sum_{i != j} C_ij^2
# Eq. 4, BTVAE:              Eq. 2 + lambda2 BT(z_gt, z_recon)
#
# Names in the code: lambda1 is lam1, lambda2 is lam2 (the flags --lam1, --lam2), delta is delta; the twins are z_gt
# and z_recon; C is what cross_correlation returns.

def kl_per_dimension(mu, logvar):
    """KL(N(mu_d, sigma_d^2) || N(0, 1)) = 1/2 (sigma_d^2 + mu_d^2 - 1 - log sigma_d^2), per image and dimension d.
    Eq. 2 writes the KL as an expectation over q(z|x); for two Gaussians it has this exact value, so no sample of z is
    needed for it (Kingma & Welling 2014, Appendix B), with less variance than a Monte Carlo estimate."""
    return 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar)

def kl_to_standard_normal(mu, logvar):
    """KL(q(z|x) || N(0, I)): summed over the latent dimensions (it is one KL of a D-dimensional Gaussian), averaged
    over the batch. The rate, in nats."""
    return kl_per_dimension(mu, logvar).sum(dim=1).mean()

def kl_with_free_bits(mu, logvar, free_bits):
    """sum_d max(free_bits, KL_d), with KL_d dimension d's KL averaged over the batch (Kingma et al. 2016).
    Not the paper's: a baseline (--free-bits). Below the floor a dimension's KL costs nothing, so nothing pushes it
    onto the prior: a VAE that keeps more dimensions in use without Barlow Twins."""
    return kl_per_dimension(mu, logvar).mean(dim=0).clamp(min=free_bits).sum()

def vae_loss(x, x_recon, mu, logvar, lam1, free_bits=0.0):
    """Eq. 2: MSE(x, x_recon) + lambda1 KL(q(z|x) || N(0, I)); returns it, the MSE and the KL.
    MSE replaces the Gaussian negative log-likelihood (Sec. 2.1.3), a mean over pixels. lambda1: the paper says it was
    fixed at 1, but with a mean over pixels (~0.01-0.05) against a KL summed over 128 dimensions (tens of nats) a
    weight of 1 lets the KL win and the posterior collapse to the prior (every sample is the mean image). The authors'
    code trained with 0.00025; so do we, in training and validation alike. With free bits, the objective's KL has its
    floor; the KL returned is the true one."""
    recon = F.mse_loss(x_recon, x)
    kl = kl_to_standard_normal(mu, logvar)
    return recon + lam1 * (kl_with_free_bits(mu, logvar, free_bits) if free_bits else kl), recon, kl

BT_EPS = 1e-5  # as BatchNorm1d's default, which the official Barlow Twins code uses to standardise

def standardise(z, eps=BT_EPS):
    """Each feature to zero mean and unit variance over the batch (biased variance, like BatchNorm)."""
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)

def cross_correlation(z_a, z_b):
    """C of Eq. 3: C_ij is the correlation over the batch between feature i of z_a and feature j of z_b.
    Each feature is standardised over the batch and the product divided by the real batch size, as the official Barlow
    Twins code does. The paper writes C = z_A^T z_B without the standardisation, which would make the "1" that the
    diagonal term aims for meaningless."""
    return standardise(z_a).T @ standardise(z_b) / z_a.shape[0]

def barlow_twins_loss(z_gt, z_recon, delta=5e-3):
    """Eq. 3: sum_i (1 - C_ii)^2 + delta sum_{i != j} C_ij^2.
    The diagonal term pulls C_ii to 1 (each feature agrees between the twins); the off-diagonal term pushes C_ij to 0
    (features carry no redundant information)."""
    c = cross_correlation(z_gt, z_recon)
    diagonal = torch.diagonal(c)
    on_diagonal = (1 - diagonal).pow(2).sum()
    off_diagonal = c.pow(2).sum() - diagonal.pow(2).sum()
    return on_diagonal + delta * off_diagonal

def twins(model, mu, logvar, z, x_recon, bt_on):
    """The pairs (z_gt, z_recon) that the Barlow Twins loss compares: the reconstruction is encoded again (Fig. 1).
    Gradients flow through both encoder passes and through x_recon into the decoder, as in the authors' code. In
    training mode this pass also updates BatchNorm's running statistics with reconstructions, as theirs did."""
    mu_recon, logvar_recon = model.encode(x_recon)
    if bt_on == "mu":  # the paper's z_gt and z_recon, taken as the posterior means
        return [(mu, mu_recon)]
    if bt_on == "z":  # sampled embeddings
        return [(z, reparameterise(mu_recon, logvar_recon))]
    return [(mu, mu_recon), (logvar, logvar_recon)]  # "mu+logvar", what the authors' released code computed

LOSS_TERMS = ("loss", "recon", "kl", "bt")

def btvae_loss(model, x, cfg):
    """Eq. 4: Eq. 2 + lambda2 BT(z_gt, z_recon), with cfg's lam1, lam2, delta, bt_on and free_bits.
    Returns the total ("loss") and its terms unweighted: the MSE, the KL and the Barlow Twins loss. With lambda2 = 0,
    the baseline VAE, the re-encoding is skipped (it costs what a VAE costs) and "bt" is 0."""
    mu, logvar = model.encode(x)
    z = reparameterise(mu, logvar)
    x_recon = model.decode(z)
    loss, recon, kl = vae_loss(x, x_recon, mu, logvar, cfg.lam1, cfg.free_bits)
    bt = torch.zeros((), device=x.device)
    if cfg.lam2 != 0:
        bt = sum(barlow_twins_loss(z_gt, z_recon, cfg.delta)
                 for z_gt, z_recon in twins(model, mu, logvar, z, x_recon, cfg.bt_on))
        loss = loss + cfg.lam2 * bt
    return {"loss": loss, "recon": recon, "kl": kl, "bt": bt}

# =============================================================================
# D. Training with early stopping (Sec. 3.3)
# Adam, learning rate 0.005, no weight decay, batches of 64; after each epoch the loss on the validation split, with
# the same lambda1 and lambda2 as in training. The run stops when that loss has not improved for `patience` epochs (or
# after `epochs`) and ends with the best epoch's weights.
#
# Each split is one uint8 tensor (N x C x H x W) in memory; a batch is a slice of it, scaled to [0, 1] on the fly: an
# MNIST epoch is ~900 tensor slices, not 60,000 image decodes.

def to_model_range(images_uint8):
    """uint8 pixels in [0, 255] -> floats in [0, 1], the range of the decoder's Sigmoid output."""
    return images_uint8.float().div_(255)

def batch_indices(count, batch_size, shuffle=None, device="cpu"):
    """Index tensors of full batches, in the order of the generator `shuffle` if given, on `device` (where the images
    are). The last incomplete batch is dropped: BatchNorm and the Barlow Twins standardisation need a real batch, not
    a remainder of one image. A split smaller than one batch is one batch."""
    order = torch.randperm(count, generator=shuffle) if shuffle is not None else torch.arange(count)
    order = order.to(device)  # once per epoch, not once per batch
    if count <= batch_size:
        return [order]
    return list(order[: count - count % batch_size].split(batch_size))

def run_epoch(model, images, cfg, optimiser=None, shuffle=None):
    """One pass over `images`: a training epoch if an optimiser is given, else the validation pass. Returns the mean
    of each term of Eq. 4 over the images seen, how many they were and the seconds taken."""
    training = optimiser is not None
    model.train(training)
    device = next(model.parameters()).device
    started, totals, seen = time.perf_counter(), torch.zeros(len(LOSS_TERMS), device=device), 0
    with torch.set_grad_enabled(training):
        for index in batch_indices(len(images), cfg.batch_size, shuffle, images.device):
            terms = btvae_loss(model, to_model_range(images[index].to(device, non_blocking=True)), cfg)
            if training:
                optimiser.zero_grad(set_to_none=True)
                terms["loss"].backward()
                optimiser.step()
            # Summed on the device and copied to the CPU once per epoch: no per-step synchronisation.
            totals += torch.stack([terms[name].detach() for name in LOSS_TERMS]) * len(index)
            seen += len(index)
    means = dict(zip(LOSS_TERMS, (totals / seen).cpu().tolist()))
    return {**means, "images": seen, "seconds": time.perf_counter() - started}

@dataclass
class Training:
    """What the loop changes besides the weights, epoch after epoch: Adam's moments, the shuffling generator, and early
    stopping's memory of the best validation loss and its weights (a checkpoint keeps it all, for --resume)."""
    optimiser: torch.optim.Optimizer
    shuffle: torch.Generator  # the order of the training images, epoch after epoch
    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict = None
    epochs_without_improvement: int = 0
    finished: bool = False
    stopped_early: bool = False

    @classmethod
    def start(cls, model, cfg):
        """Adam without weight decay (Sec. 3.3). fused: one kernel updates every parameter instead of ~10 small ops
        per tensor, the same arithmetic (CPU and CUDA have it)."""
        fused = next(model.parameters()).device.type in ("cpu", "cuda")
        optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=0, fused=fused)
        return cls(optimiser, torch.Generator().manual_seed(cfg.seed))

def train(model, train_images, val_images, cfg, training=None, after_epoch=None):
    """Train until early stopping or cfg.epochs; the model ends with the best epoch's weights, even when
    after_epoch(training, train_terms, val_terms), the harness's turn after each epoch, raises. `training` continues a
    stopped run where it was."""
    training = training or Training.start(model, cfg)
    try:
        while not training.finished:
            training.epoch += 1
            train_terms = run_epoch(model, train_images, cfg, training.optimiser, training.shuffle)
            val_terms = run_epoch(model, val_images, cfg)
            if val_terms["loss"] < training.best_loss:
                training.best_loss, training.best_epoch = val_terms["loss"], training.epoch
                training.best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
                training.epochs_without_improvement = 0
            else:
                training.epochs_without_improvement += 1
            training.stopped_early = training.epochs_without_improvement >= cfg.patience
            training.finished = training.stopped_early or training.epoch == cfg.epochs
            if after_epoch:
                after_epoch(training, train_terms, val_terms)
    finally:
        if training.best_state is not None:
            model.load_state_dict(training.best_state)
    return training

# =============================================================================
# E. Sampling (Sec. 3.2, Figure 2)
# A VAE generates by decoding draws from the prior p(z) = N(0, I). The paper's Figure 2 shows 144 of them as a 12 x 12
# grid. Part I adds a second sampler, a mixture fitted to where the encoder puts the training images.

@torch.no_grad()
def generate(model, count, generator, mixture=None):
    """`count` images decoded from the prior N(0, I), or from a LatentMixture (part I). z is drawn on the CPU with
    `generator`: the same seed gives the same z on every device."""
    model.eval()
    if mixture is None:
        z = torch.randn(count, model.architecture["latent_dim"], generator=generator)
    else:
        z = mixture.sample(count, generator)
    return model.decode(z.to(next(model.parameters()).device))

@torch.no_grad()
def reconstruct(model, images):
    """Decode the posterior mean: the model's best guess of each image."""
    model.eval()
    mu, _ = model.encode(images)
    return model.decode(mu)

# =============================================================================
# F. What the experiments share: one-line errors, files written whole, caches kept between runs

class UsageError(Exception):  # bad input (a missing data set, a corrupt file): one line, exit status 2
    pass

class WriteFailed(Exception):  # a file could not be written (a full disk): the run stops, keeping what it wrote
    pass

def first_line(error):
    return (str(error).strip() or type(error).__name__).splitlines()[0]

def write_atomically(path, data):
    """The bytes `data` into a temporary file beside path, renamed over path: a run stopped mid-write keeps the
    previous file whole. The temporary name is this process's, so two processes never share it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as error:
        raise WriteFailed(f"could not write {path} ({error.strerror or first_line(error)})") from None
    finally:
        temporary.unlink(missing_ok=True)

def save_atomically(obj, path):  # in memory first: a full disk is the system's error, not torch's 'unexpected pos'
    """torch.save, written whole or not at all."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(path, buffer.getvalue())

def cached(path, make):
    """make()'s tensor or number, kept at path for the next run: an unreadable cache is made again, and one that
    cannot be written (a full disk) costs time, never the run."""
    with contextlib.suppress(Exception):  # none yet, or unreadable: made again
        return torch.load(path, weights_only=True)
    value = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(value, path)
    except Exception as error:  # whatever failed (the disk, the folder, torch.save itself): only the cache is lost
        print(f"note: could not cache {path} ({first_line(error)}); pass a writable --cache-dir", flush=True)
    return value

# =============================================================================
# G. Data (Sec. 3.1): MNIST, CIFAR-10 and CelebA, each split decoded once into a uint8 tensor

DATASETS = ("mnist", "cifar10", "celeba")
IMAGE_CHANNELS = {"mnist": 1, "cifar10": 3, "celeba": 3}
DEFAULT_IMAGE_SIZE = {"mnist": 32, "cifar10": 32, "celeba": 64}
VALIDATION_IMAGES = 5000  # held out of the training set, at most a tenth of it
HOLDOUT_SEED = 0  # fixed, so every run of a sweep validates on the same images whatever its --seed
MNIST_PADDING = 2  # black pixels a side: 28 + 2 + 2 = 32, which five halvings divide
CELEBA_CROP = 148  # the crop of the VAE collection the authors built on: the face, without most background

@dataclass
class Split:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: "torch.Tensor | None" = None  # int64 class labels, where the data set has them

    def take(self, index):
        return Split(self.images[index], None if self.labels is None else self.labels[index])

    def __len__(self):
        return len(self.images)

def resize(images, size):
    """Square uint8 images to size x size (antialiased)."""
    import torchvision.transforms.v2.functional as TF
    return images if images.shape[-1] == size else TF.resize(images, [size, size], antialias=True)

def holdout(split, count):
    """Split off `count` random images (fixed seed) for validation; the rest keep their order."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return split.take(order[count:].sort().values), split.take(order[:count])

def load_mnist(data_dir):
    """MNIST's training and test sets, each 28x28 digit padded with black to 32x32 (torchvision downloads what is
    missing)."""
    import torchvision
    sets = [torchvision.datasets.MNIST(data_dir, train=is_training_set, download=True) for is_training_set in (True, False)]
    return [Split(F.pad(s.data.unsqueeze(1), (MNIST_PADDING,) * 4), s.targets) for s in sets]

def load_cifar10(data_dir):
    """CIFAR-10's training and test sets, from its pickled batches (torchvision's reader demands the originals' MD5s)."""
    import torchvision
    if not (data_dir / "cifar-10-batches-py").is_dir():
        torchvision.datasets.CIFAR10(data_dir, download=True)

    def read(name):
        batch = pickle.loads((data_dir / "cifar-10-batches-py" / name).read_bytes(), encoding="bytes")
        return torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32), torch.as_tensor(batch[b"labels"])
    training_batches = [read(f"data_batch_{i}") for i in range(1, 6)]  # (images, labels) each
    return Split(*(torch.cat(parts) for parts in zip(*training_batches))), Split(*read("test_batch"))

def load_celeba(data_dir, size, cache_dir):
    """CelebA's official splits (codes 0, 1, 2), centre-cropped to 148 and resized; decoded once, then cached."""
    import torchvision
    import torchvision.transforms.v2.functional as TF
    from PIL import Image  # torchvision's own decoders are deprecated
    folder = data_dir / "celeba"
    if not (folder / "img_align_celeba").is_dir():
        torchvision.datasets.CelebA(data_dir, split="all", download=True)
    partition = [line.split() for line in (folder / "list_eval_partition.txt").read_text().splitlines() if line.strip()]

    def decode(split):
        names, images = [name for name, code in partition if int(code) == split], []
        print(f"decoding {len(names)} CelebA images once (cached in {cache_dir})", flush=True)
        for name in names:
            with Image.open(folder / "img_align_celeba" / name) as image:
                images.append(resize(TF.center_crop(TF.pil_to_tensor(image.convert("RGB")), [CELEBA_CROP] * 2), size))
        return torch.stack(images)
    return [Split(cached(cache_dir / f"celeba_{name}_{size}px.pt", lambda: decode(split)))
            for split, name in enumerate(("train", "valid", "test"))]

def load_data(cfg):
    """The train, validation and test splits of cfg.dataset as uint8 tensors of cfg.image_size. The test split is
    FID's reference. Validation: CelebA's official split; otherwise a fixed part of the training set, at most a tenth."""
    try:
        if cfg.dataset == "celeba":
            train_split, val_split, test_split = load_celeba(cfg.data_dir, cfg.image_size, cfg.cache_dir)
        else:
            training_set, test_split = (load_mnist if cfg.dataset == "mnist" else load_cifar10)(cfg.data_dir)
            train_split, val_split = holdout(training_set, min(VALIDATION_IMAGES, len(training_set) // 10))
    except Exception as error:  # a failed download (offline) or a truncated file
        raise UsageError(f"cannot read {cfg.dataset} from {cfg.data_dir} ({first_line(error)}); without internet, put "
                         "its files there (README, 'Data'); delete a truncated one to download it again") from None
    train_split, val_split, test_split = (Split(resize(s.images, cfg.image_size), s.labels)
                                          for s in (train_split, val_split, test_split))
    if cfg.subset is not None:
        train_split = train_split.take(slice(0, cfg.subset))
    if len(train_split) < 2:
        raise UsageError(f"only {len(train_split)} training image(s); BatchNorm and Barlow Twins need at least 2")
    return train_split, val_split, test_split

# =============================================================================
# H. FID (Sec. 3.1, Table 1), and precision and recall
# The Frechet distance between Gaussians fitted to Inception-v3 features of test images and of generated ones (lower
# is better): as in the paper, of the 64-d layer, over 10,000 samples, from the TF FID network as torch-fidelity (and
# TorchMetrics) runs it. Images go in as uint8 RGB: the authors' code cast [-1, 1] outputs straight to uint8, so
# negative pixels wrapped to bright ones. Beyond the paper, whose claim is about variety, --fid-2048 also measures in
# the same pass the 2048-d layer of other FID papers, and there Kynkaanniemi et al.'s (2019) precision (realism) and
# recall (coverage).

FID_FEATURE = 64  # the paper's layer (Sec. 3.3)
STANDARD_FID_FEATURE = 2048  # the pool layer of other FID papers, where precision and recall are measured
FID_BATCH = 50  # images resized to 299 x 299 per batch (~280 MB of activations); ran faster than 100 or 200
PRECISION_RECALL_NEIGHBOURS = 3  # Kynkaanniemi et al.'s k
DISTANCE_ROWS = 1000  # rows of a distance matrix held at once: 1,000 x 10,000 floats is 40 MB

def to_fid_input(images):
    """[0, 1] floats (or uint8), 1 or 3 channels -> uint8 RGB, the input the FID network expects; clamped first, so
    that nothing wraps around."""
    if images.dtype != torch.uint8:
        images = images.clamp(0, 1).mul(255).round().to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

def make_fid_network(features, weights_path=None):
    """torch-fidelity's FID Inception-v3, giving each layer in `features` (sizes: 64, 2048) from one pass."""
    from torch_fidelity import FeatureExtractorInceptionV3
    return FeatureExtractorInceptionV3("inception-v3-compat", list(map(str, features)), weights_path and str(weights_path))

@torch.inference_mode()
def inception_features(network, make_batch, count, device, description="FID"):
    """Features of `count` images, FID_BATCH at a time, one tensor per layer the network gives (a list); make_batch(n)
    gives the next n images ([0, 1] floats or uint8). A progress bar on a terminal only."""
    from tqdm import tqdm
    per_batch = []
    for start in tqdm(range(0, count, FID_BATCH), description, leave=False, disable=None):
        images = to_fid_input(make_batch(min(FID_BATCH, count - start)).to(device))
        per_batch.append([layer.float().cpu() for layer in network(images)])  # one tensor per layer asked for
    return [torch.cat(layer) for layer in zip(*per_batch)]

def frechet_distance(real, fake):
    """FID = ||m_r - m_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) for Gaussians N(m, S) fitted to two feature sets.
    Tr((S_r S_f)^(1/2)) is the sum of the square roots of the eigenvalues of S_r S_f, which are real and non-negative
    (up to rounding, hence .real)."""

    def mean_and_covariance(features):
        features = features.double()
        mean = features.mean(dim=0)
        centred = features - mean
        return mean, centred.T @ centred / (len(features) - 1)
    (mean_real, cov_real), (mean_fake, cov_fake) = mean_and_covariance(real), mean_and_covariance(fake)
    trace_sqrt = torch.linalg.eigvals(cov_real @ cov_fake).sqrt().real.sum()
    return float((mean_real - mean_fake).square().sum() + cov_real.trace() + cov_fake.trace() - 2 * trace_sqrt)

def precision_recall(real, fake, neighbours=PRECISION_RECALL_NEIGHBOURS):
    """Kynkaanniemi et al.'s precision and recall. Each set's manifold is the union of balls around its points, each
    as wide as the distance from its point to the point's k-th nearest neighbour in the set. Precision: the share of
    fake points inside the real manifold; recall: of real points inside the fake."""

    def radii(points):  # the (k+1)-th smallest distance, since the nearest point is the point itself
        return torch.cat([torch.cdist(rows, points).kthvalue(neighbours + 1, dim=1).values
                          for rows in points.split(DISTANCE_ROWS)])

    def share_inside(points, centres):
        centre_radii = radii(centres)
        return torch.cat([(torch.cdist(rows, centres) <= centre_radii).any(dim=1)
                          for rows in points.split(DISTANCE_ROWS)]).float().mean().item()
    return share_inside(fake, real), share_inside(real, fake)

def fid_measurer(test_split, cfg, device):
    """measure(make_fake_batch, suffix): metrics.json's FID-64 of a sampler (make_batch, as above) and, with
    --fid-2048, its FID, precision and recall in the 2048-d layer, named with suffix ("" for the prior, "_gmm" for the
    mixture); None when --fid-samples is 0 or the network cannot be had. The test images' features are computed once
    for a whole sweep and kept in --cache-dir."""
    count = min(cfg.fid_samples, len(test_split))
    layers = (FID_FEATURE, STANDARD_FID_FEATURE) if cfg.fid_2048 else (FID_FEATURE,)
    network = None
    try:
        network = make_fid_network(layers, cfg.fid_weights).to(device).eval() if count else None
    except Exception as error:
        print(f"FID skipped, recorded as null: the Inception network could not be loaded ({first_line(error)}); "
              "pass --fid-weights with a local copy of its weights", flush=True)
    if network is not None and device.type in ("cpu", "cuda"):  # channels_last: twice as fast, same features to ~1e-8
        network.to(memory_format=torch.channels_last)
    cache = cfg.cache_dir / (f"inception_real_{cfg.dataset}_{cfg.image_size}px_n{count}_layers"
                             f"{'+'.join(map(str, layers))}_{cfg.fid_weights.stem if cfg.fid_weights else 'default'}_"
                             f"torch-fidelity{version('torch-fidelity')}.pt")

    def measure(make_fake_batch, suffix):
        names = [f"fid{suffix}", f"fid_2048{suffix}", f"precision_2048{suffix}", f"recall_2048{suffix}",
                 f"fid{suffix}_seconds"]
        if network is None:
            return dict.fromkeys(names)
        start, test_images = time.perf_counter(), iter(test_split.images[:count].split(FID_BATCH))
        real = cached(cache, lambda: inception_features(network, lambda n: next(test_images), count, device,
                                                        "FID, test images"))
        fake = inception_features(network, make_fake_batch, count, device, "FID, samples")
        measured = {names[0]: frechet_distance(real[0], fake[0])}
        line = f"FID-64{' of the mixture sampler' if suffix else ''} over {count} samples: {measured[names[0]]:.4f}"
        if cfg.fid_2048:
            precision, recall = precision_recall(real[1], fake[1])
            measured.update({names[1]: frechet_distance(real[1], fake[1]), names[2]: precision, names[3]: recall})
            line += f"; in 2048-d features FID {measured[names[1]]:.2f}, precision {precision:.3f}, recall {recall:.3f}"
        measured[names[4]] = time.perf_counter() - start
        print(f"{line} ({measured[names[4]]:.0f} s)", flush=True)
        return {name: measured.get(name) for name in names}
    return measure

# =============================================================================
# I. Latent space (beyond the paper)
# The paper claims a "more expressive latent space"; FID sees only samples. So every run also measures, on the test
# split, how many dimensions carry information (active units, participation ratio), how redundant they are (latent
# correlation: the off-diagonal term's target), how well the twins agree (twin correlation: the diagonal term's), what
# a linear classifier reads off (the probe), and the samples when z comes from where the encoder puts images (a
# mixture's FID).

ENCODE_BATCH = 500  # images per encoder pass when measuring; any size gives the same numbers in eval mode
ACTIVE_UNIT_VARIANCE = 0.01  # Burda et al.'s threshold
STRICTER_THRESHOLDS = (0.05, 0.1)  # a count at one threshold can mislead: BTVAE lifts unused dimensions just above 0.01
MIXTURE_COMPONENTS = 10  # with full covariances, the mixture of Ghosh et al.
PROBE_MAX_ITERATIONS = 1000  # lbfgs converges in ~100-200 on MNIST; the default 100 stops short

@torch.no_grad()
def encode_split(model, images, bt_on=None):
    """Posterior means of every image of a split (uint8 tensor), in evaluation mode, on the CPU; with bt_on, also the
    Barlow Twins pairs (z_gt, z_recon), formed as in training: z sampled, decoded, re-encoded."""
    model.eval()
    device = next(model.parameters()).device
    means, pairs = [], []
    for batch in images.split(ENCODE_BATCH):
        mu, logvar = model.encode(to_model_range(batch.to(device)))
        means.append(mu.cpu())
        if bt_on is not None:
            z = reparameterise(mu, logvar)
            pairs.append([(a.cpu(), b.cpu()) for a, b in twins(model, mu, logvar, z, model.decode(z), bt_on)])
    if bt_on is None:
        return torch.cat(means)
    return torch.cat(means), [tuple(torch.cat(side) for side in zip(*pair)) for pair in zip(*pairs)]

def active_units(mu_variance, threshold=ACTIVE_UNIT_VARIANCE):
    """Dimensions whose posterior mean varies across the images (mu_variance: its variance over them) by more than the
    threshold (Burda et al. 2016, Sec. 5.2). A dimension whose mean is the same for every image tells the decoder
    nothing: the KL term has pulled it onto the prior. Barlow Twins standardises every feature, which can lift a
    dimension just over a threshold without making it carry much."""
    return int((mu_variance > threshold).sum())

def participation_ratio(mu_variance):
    """(sum_d v_d)^2 / sum_d v_d^2 of the variances v_d: an effective number of dimensions with no threshold (Gao et
    al. 2017). D when D dimensions share the variance equally, 1 when one holds it all."""
    return float(mu_variance.sum() ** 2 / mu_variance.pow(2).sum())

def unit_activity(mu_variance):
    return {"active_units": active_units(mu_variance),
            **{f"active_units_{t:g}": active_units(mu_variance, t) for t in STRICTER_THRESHOLDS},
            "participation_ratio": participation_ratio(mu_variance)}

def mean_absolute_off_diagonal(c):
    """Mean |C_ij| over the D (D - 1) entries i != j of a square matrix; None if D < 2 (no pairs)."""
    dims = c.shape[0]
    return None if dims < 2 else float((c.abs().sum() - c.diagonal().abs().sum()) / (dims * (dims - 1)))

def latent_correlation(mu):
    """Mean |C_ij| over i != j, C the correlation matrix of mu over the images (Eq. 3's C of mu with itself): what the
    off-diagonal term pushes down. A dimension that never varies correlates with nothing (standardise's eps keeps it
    at 0 rather than 0/0)."""
    return mean_absolute_off_diagonal(cross_correlation(mu, mu))

def twin_correlation(pairs):
    """Mean C_ii of Eq. 3 between images' and their reconstructions' embeddings: what the diagonal term pushes to 1.
    For --bt-on mu+logvar, the mean over both pairs."""
    return float(torch.cat([cross_correlation(z_gt, z_recon).diagonal() for z_gt, z_recon in pairs]).mean())

def probe_accuracy(train_features, train_labels, test_features, test_labels):
    """Test accuracy of a linear classifier fitted on the training images' features (CPU tensors), as Barlow Twins'
    linear evaluation (Zbontar et al. 2021); None without labels (CelebA) or with one class only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    if train_labels is None or test_labels is None or len(train_labels.unique()) < 2:
        return None
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=PROBE_MAX_ITERATIONS))
    classifier.fit(train_features.double().numpy(), train_labels.numpy())
    return float(classifier.score(test_features.double().numpy(), test_labels.numpy()))

class LatentMixture:
    """A Gaussian mixture over latents, p(z) = sum_k pi_k N(z; m_k, S_k), fitted to the training images' posterior
    means: ex-post density estimation (Ghosh et al. 2020). Where the encoder puts images where N(0, I) has little
    mass, the prior's samples decode to images the decoder never learned to draw."""

    def __init__(self, mu, seed, components=MIXTURE_COMPONENTS):
        from sklearn.mixture import GaussianMixture
        fitted = GaussianMixture(min(components, len(mu)), covariance_type="full", random_state=seed)
        fitted.fit(mu.double().numpy())
        self.weights = torch.from_numpy(fitted.weights_)  # pi_k
        self.means = torch.from_numpy(fitted.means_)  # m_k
        self.cholesky = torch.linalg.cholesky(torch.from_numpy(fitted.covariances_))  # L_k with L_k L_k^T = S_k

    def sample(self, count, generator):
        """Pick component k with probability pi_k, then z = m_k + L_k eps with eps ~ N(0, I)."""
        k = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        eps = torch.randn(count, self.means.shape[1], 1, dtype=torch.float64, generator=generator)
        return (self.means[k] + (self.cholesky[k] @ eps).squeeze(-1)).float()

def measure_latent_space(model, train_split, test_split, bt_on):
    """The latent metrics of metrics.json, the report figures' latent.pt, and the training images' means."""
    train_mu = encode_split(model, train_split.images)
    test_mu, pairs = encode_split(model, test_split.images, bt_on)
    metrics = {**unit_activity(test_mu.var(dim=0)), "latent_correlation": latent_correlation(test_mu),
               "twin_correlation": twin_correlation(pairs),
               # the pair of means alone (twins() puts it first), so that mu+logvar compares with mu's
               "twin_correlation_mu": None if bt_on == "z" else twin_correlation(pairs[:1]),
               "probe_accuracy": probe_accuracy(train_mu, train_split.labels, test_mu, test_split.labels)}
    figures = {"mu_variance": test_mu.var(dim=0), "mu_correlation": cross_correlation(test_mu, test_mu)}
    if test_mu.shape[1] <= 2:  # small enough to keep whole: Figure 3 plots it
        figures.update(test_mu=test_mu, test_labels=test_split.labels)
    return metrics, figures, train_mu

def pixel_probe_accuracy(train_split, test_split, cfg):
    """The probe on raw pixels: does a latent space help the classifier at all? The same for every run of a data set,
    so it is kept in --cache-dir. On the CPU: scikit-learn reads NumPy."""
    if train_split.labels is None:
        return None
    return cached(cfg.cache_dir / f"probe_pixels_{cfg.dataset}_{cfg.image_size}px_train{len(train_split)}_"
                                  f"test{len(test_split)}_scikit-learn{version('scikit-learn')}.pt",
                  lambda: probe_accuracy(to_model_range(train_split.images.cpu()).flatten(1), train_split.labels,
                                         to_model_range(test_split.images.cpu()).flatten(1), test_split.labels))

def evaluate(model, train_split, test_split, cfg):
    """Everything measured of a trained model, after training or with --evaluate: metrics.json's measurements,
    returned, and the sample grids, reconstructions and latent.pt, written into cfg.out."""
    from torchvision.utils import save_image

    def save_grid(images, name, nrow):
        buffer = io.BytesIO()
        save_image(images, buffer, format="png", nrow=nrow)
        write_atomically(cfg.out / name, buffer.getvalue())
    sampler = torch.Generator().manual_seed(cfg.seed)
    save_grid(generate(model, 144, sampler), "samples.png", nrow=12)
    originals = to_model_range(test_split.images[:16].to(next(model.parameters()).device))
    save_grid(torch.cat([originals, reconstruct(model, originals)]), "reconstructions.png", nrow=16)
    fid = fid_measurer(test_split, cfg, next(model.parameters()).device)
    metrics = {**fid(lambda n: generate(model, n, sampler), ""), "fid_samples": cfg.fid_samples}
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)  # the twins' z is sampled: the same draws after training and with --evaluate
    latent, figures, train_mu = measure_latent_space(model, train_split, test_split, cfg.bt_on)
    metrics.update(latent, latent_seconds=time.perf_counter() - start)
    save_atomically(figures, cfg.out / "latent.pt")
    metrics["pixel_probe_accuracy"] = pixel_probe_accuracy(train_split, test_split, cfg)
    print("latent space: " + ", ".join(f"{k} {v if v is None else round(v, 3)}" for k, v in metrics.items()
                                       if k in (*latent, "pixel_probe_accuracy")), flush=True)
    start = time.perf_counter()
    mixture = LatentMixture(train_mu, cfg.seed)
    metrics["mixture_fit_seconds"] = time.perf_counter() - start
    mixture_sampler = torch.Generator().manual_seed(cfg.seed)
    save_grid(generate(model, 144, mixture_sampler, mixture), "samples_gmm.png", nrow=12)
    return {**metrics, **fid(lambda n: generate(model, n, mixture_sampler, mixture), "_gmm")}


# #####################################################################################################################
#   A FIRST READING CAN STOP HERE. Below: the command line (flags, model files, checkpoints, records, main()).
# #####################################################################################################################

class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own prints its whole usage block: one line says what to fix
        raise UsageError(f"{message} (see --help)")

def build_parser():
    p = OneLineErrorParser(description="Train a BTVAE (--lam2 0: the baseline VAE), sample from it and measure it.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    add = p.add_argument
    add("--dataset", choices=DATASETS, default="mnist", help="data set (Sec. 3.1)")
    add("--data-dir", type=Path, default=Path("data"), help="in torchvision's layout; missing data is downloaded")
    add("--cache-dir", type=Path, help="for what runs share (default: <data-dir>/btvae_cache)")
    add("--lam1", type=float, default=0.00025, help="KL weight lambda1 (Eq. 2): the authors' (README, 'Deviations')")
    add("--lam2", type=float, default=0.025, help="Barlow Twins weight lambda2 (Eq. 4); 0: the VAE; < 0: an ablation")
    add("--delta", type=float, default=5e-3, help="the off-diagonal Barlow Twins weight delta (Eq. 3, Sec. 3.3)")
    add("--bt-on", choices=("mu", "z", "mu+logvar"), default="mu", help="the twins: posterior means, sampled z, or both")
    add("--free-bits", type=float, default=0.0, help="a floor in nats on each latent dimension's KL (a baseline)")
    add("--latent-dim", type=int, default=128, help="dimension D of the latent space (Sec. 2.1)")
    add("--hidden-dims", type=int, nargs="+", default=(16, 32, 64, 128, 256), help="the encoder's widths (Sec. 3.3)")
    add("--image-size", type=int, help="side of the square images (default: 32 for mnist and cifar10, else 64)")
    add("--batch-size", type=int, default=64, help="batch size (Sec. 3.3)")
    add("--lr", type=float, default=0.005, help="Adam's learning rate (Sec. 3.3)")
    add("--epochs", type=int, default=50, help="maximum number of epochs (Sec. 3.3)")
    add("--patience", type=int, default=5, help="epochs without a better validation loss before stopping (Sec. 3.3)")
    add("--seed", type=int, default=0, help="random seed")
    add("--subset", type=int, help="train on the first N training images only, for quick runs")
    add("--fid-samples", type=int, default=10000, help="generated (and test) images for FID (Sec. 3.1); 0 skips FID")
    add("--fid-2048", action="store_true", help="also FID, precision, recall in the 2048-d layer (FID takes ~2.7x as long)")
    add("--fid-weights", type=Path, help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: download)")
    add("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="auto: cuda, else mps, else cpu")
    add("--out", type=Path, help="default: runs/<dataset>_lam2=<lambda2>_seed<seed>, naming --lam1/--bt-on/--free-bits if set")
    add("--resume", action="store_true", help="continue the stopped run in --out, with the same flags")
    add("--evaluate", type=Path, metavar="MODEL_PT", help="measure a run's model.pt with its settings instead of training")
    return p

DEFAULTS = vars(build_parser().parse_args([]))  # what a flag left out means (also in a checkpoint that predates it)
MINIMUMS = {"lam1": 0, "delta": 0, "free_bits": 0, "latent_dim": 1, "image_size": 1, "batch_size": 2, "epochs": 1,
            "patience": 1, "seed": 0, "subset": 2, "fid_samples": 0}  # 2 images: what BatchNorm needs
# --evaluate takes these from the model file: its data (for the probe and the mixture), seed, objective and network
TRAINING_SETTINGS = ("dataset", "subset", "seed", "lam1", "lam2", "delta", "bt_on", "free_bits", "latent_dim",
                     "hidden_dims", "image_size", "batch_size", "lr", "epochs", "patience")

def parse_config(argv):
    """Parse and check every flag, so that bad input fails before anything is read or written."""
    cfg = build_parser().parse_args(argv)
    given = {arg.split("=")[0][2:].replace("-", "_") for arg in argv if arg.startswith("--")}
    if cfg.evaluate is not None:
        refused = sorted(given & {*TRAINING_SETTINGS, "resume"})
        if refused:
            raise UsageError(f"--{refused[0].replace('_', '-')} cannot be used with --evaluate, which measures the "
                             "model with the settings it was trained with")
        trained = load_model(cfg.evaluate)[1]
        vars(cfg).update({k: trained.get(k, DEFAULTS[k]) for k in TRAINING_SETTINGS})  # one model.pt predates: its default
    for name, minimum in MINIMUMS.items():
        if getattr(cfg, name) is not None and not getattr(cfg, name) >= minimum:  # not >=: NaN fails too
            raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum}, got {getattr(cfg, name)}")
    if not (math.isfinite(cfg.lam2) and 0 < cfg.lr < math.inf and min(cfg.hidden_dims) > 0 and cfg.fid_samples != 1):
        raise UsageError(f"--lam2 must be finite ({cfg.lam2}), --lr above 0 ({cfg.lr}), --hidden-dims positive, and "
                         f"--fid-samples 0 (no FID) or at least 2 (FID needs a covariance) ({cfg.fid_samples})")
    cfg.image_size, cfg.hidden_dims = cfg.image_size or DEFAULT_IMAGE_SIZE[cfg.dataset], tuple(cfg.hidden_dims)
    if cfg.image_size % 2 ** len(cfg.hidden_dims):  # each of the encoder's blocks halves the image
        raise UsageError(f"--image-size {cfg.image_size} is not divisible by 2^{len(cfg.hidden_dims)} = "
                         f"{2 ** len(cfg.hidden_dims)}; use a multiple of it, or fewer --hidden-dims")
    try:
        cfg.fid_weights and torch.load(cfg.fid_weights, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"--fid-weights {cfg.fid_weights} are not PyTorch weights ({first_line(error)}); pass "
                         "torch-fidelity's weights-inception-2015-12-05-6726825d.pth, or leave the flag out") from None
    cfg.cache_dir = cfg.cache_dir or cfg.data_dir / "btvae_cache"
    baseline = [f"{k.replace('_', '-')}={getattr(cfg, k)}" for k in ("lam1", "bt_on", "free_bits")
                if getattr(cfg, k) != DEFAULTS[k]]  # so that a baseline never shares the VAE's folder
    name = "_".join([cfg.dataset, f"lam2={cfg.lam2:g}", *baseline, f"seed{cfg.seed}"])
    cfg.out = cfg.out or Path("runs", *["evaluate"] * bool(cfg.evaluate), name)
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UsageError(f"--out {cfg.out} is a file; name a folder (new or holding this run) instead")
    return cfg

# -----------------------------------------------------------------------------
# Model files and checkpoints. A checkpoint after every epoch holds all the rest of the run depends on, so that a run
# resumed from it on the CPU ends bit for bit as if it had never stopped: the weights, Adam's moments, the early
# stopping state, the shuffling generator, the history, and the random generators that draw eps.

CHECKPOINT = "checkpoint.pt"
NOT_RESULT_SETTINGS = ("data_dir", "cache_dir", "out", "fid_weights", "device", "resume", "evaluate")  # where, not what

def settings(cfg, result_only=False):
    """cfg's settings (Paths as text); result_only: those a run's result depends on, which a resume must share."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()
            if not (result_only and k in NOT_RESULT_SETTINGS)}

def save_model(model, cfg, path):
    save_atomically({"architecture": model.architecture, "state_dict": model.state_dict(), "config": settings(cfg)}, path)

def load_model(path, device="cpu"):
    """A model rebuilt from a run's model.pt, in evaluation mode, with the settings it was trained with."""
    try:  # torch's own message for a foreign file explains weights_only, not what to do
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model, settings_trained_with = ConvVAE(**saved["architecture"]), saved["config"]
    except Exception:
        raise UsageError(f"{path} {'is not a model.pt of btvae.py' if Path(path).is_file() else 'does not exist'}; "
                         "pass a run's model.pt") from None
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as error:
        raise UsageError(f"{path}: its weights do not fit its architecture ({first_line(error)})") from None
    return model.to(device).eval(), settings_trained_with

def write_checkpoint(path, cfg, model, training, history):
    save_atomically({"settings": settings(cfg, result_only=True), "model": model.state_dict(),
                     "optimiser": training.optimiser.state_dict(), "early_stopping": {k: getattr(training, k) for k in (
                         "best_loss", "best_epoch", "best_state", "epochs_without_improvement")},
                     "history": history, "shuffle_rng": training.shuffle.get_state(), "torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                     "finished": training.finished, "stopped_early": training.stopped_early}, path)

def resume(path, model, cfg):
    """The history, the model and the Training state as the checkpoint at path left them; one line refuses a missing,
    unreadable or foreign one, or one of a run with other settings (a setting it predates had its default)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        then = {k: checkpoint["settings"].get(k, DEFAULTS[k]) for k in settings(cfg, True)}
    except Exception as error:
        raise UsageError(f"--resume: {path} is not a checkpoint of this run ({first_line(error)}); delete the "
                         "folder to start the run over") from None
    differing = [f"--{k.replace('_', '-')} {then[k]} (now {v})" for k, v in settings(cfg, True).items() if then[k] != v]
    if differing:
        raise UsageError(f"--resume: {path.parent} was run with other settings: {', '.join(differing)}; resume with "
                         "the same flags, or choose another --out")
    model.load_state_dict(checkpoint["model"])
    training = Training.start(model, cfg)
    training.optimiser.load_state_dict(checkpoint["optimiser"])
    vars(training).update(checkpoint["early_stopping"], epoch=len(checkpoint["history"]),
                          **{k: checkpoint[k] for k in ("finished", "stopped_early")})
    training.shuffle.set_state(checkpoint["shuffle_rng"])
    torch.set_rng_state(checkpoint["torch_rng"])
    for index, state in enumerate(checkpoint["cuda_rng"][:torch.cuda.device_count()]):  # this machine may have fewer
        torch.cuda.set_rng_state(state, index)
    return checkpoint["history"], training

class TrainingDiverged(Exception):  # a NaN loss: the run stops, keeping what it has
    pass

class Interrupted(Exception):  # Ctrl-C or SIGTERM, in any phase of a run: what is written stays
    pass

def interrupt(signum, frame):
    raise Interrupted(signum)

def pick_device(name):
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(n for n in ("cuda", "mps", "cpu") if available[n]) if name == "auto" else name
    if not available[name]:
        raise UsageError(f"--device {name} is not available on this machine; use --device auto or cpu")
    return torch.device(name)

def prepare_for_speed(model, splits, device):
    """What leaves the method unchanged (results/speed.md): channels_last, in which oneDNN (CPU) and cuDNN convolutions
    run ~1.4x faster (MPS keeps its default). On a CPU with glibc, freed activations stay in the process: glibc maps
    each step's large blocks afresh and unmaps them when freed, so they page-fault in again every step (the epoch
    1.1-1.3x slower). On a GPU, cuDNN's fastest kernels for our one batch shape, and the images moved there once if
    they fit, so that no batch crosses the bus (labels stay: scikit-learn reads them)."""
    if device.type in ("cpu", "cuda"):
        model.to(memory_format=torch.channels_last)
    if device.type == "cpu" and sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to set
            mallopt = ctypes.CDLL("libc.so.6").mallopt  # M_MMAP_THRESHOLD (-3) at its maximum; M_TRIM_THRESHOLD (-1)
            mallopt(-3, 32 * 2**20), mallopt(-1, 2**30)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if sum(s.images.nbytes for s in splits) < torch.cuda.mem_get_info(device)[0] // 4:
            return [Split(s.images.to(device), s.labels) for s in splits]
    return splits

def provenance(argv, device):
    """config.json beside the settings. CPU kernels round by instruction set: a run repeats bit for bit on a CPU of the
    same capability, and ONEDNN_MAX_CPU_ISA (recorded with its kin when set) holds oneDNN to another's kernels."""
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or None
    variables = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
    return {"command": shlex.join(["python", "btvae.py", *argv]), "commit": commit, "device": str(device),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_kernel_variables": {k: os.environ[k] for k in variables if k in os.environ},
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,  # with their builds: +cu130, +cpu
                         "torchvision": __import__("torchvision").__version__,
                         **{name: version(name) for name in ("torch-fidelity", "scikit-learn")}}}

def epoch_recorder(cfg, model, history):
    """train()'s after_epoch: a log line, history.csv, the NaN check, model.pt when the validation loss improved,
    and the checkpoint: a run stopped at any point keeps all three."""
    started = time.perf_counter() - (history[-1]["elapsed_seconds"] if history else 0.0)

    def after_epoch(training, train_terms, val_terms):
        history.append({"epoch": training.epoch, **{f"train_{k}": train_terms[k] for k in LOSS_TERMS},
                        **{f"val_{k}": val_terms[k] for k in LOSS_TERMS}, "train_images": train_terms["images"],
                        "train_loop_seconds": train_terms["seconds"],
                        "images_per_second": train_terms["images"] / train_terms["seconds"],
                        "elapsed_seconds": time.perf_counter() - started})
        print(f"epoch {training.epoch:3d}/{cfg.epochs} | " + " | ".join(
            f"{name} loss {terms['loss']:.5f} (recon {terms['recon']:.5f} kl {terms['kl']:.2f} bt {terms['bt']:.3f})"
            for name, terms in (("train", train_terms), ("val", val_terms)))
            + f" | {history[-1]['images_per_second']:.0f} img/s | {history[-1]['elapsed_seconds']:.1f} s", flush=True)
        write_atomically(cfg.out / "history.csv", "".join(",".join(map(str, row)) + "\n" for row in
                                                          [history[0], *(r.values() for r in history)]).encode())
        if not all(math.isfinite(terms[k]) for terms in (train_terms, val_terms) for k in LOSS_TERMS):
            raise TrainingDiverged(f"the loss became NaN or infinite in epoch {training.epoch}; try a smaller --lr or "
                                   f"--lam2 (model.pt keeps the best weights so far, of epoch {training.best_epoch})")
        if training.best_epoch == training.epoch:
            save_model(model, cfg, cfg.out / "model.pt")
        write_checkpoint(cfg.out / CHECKPOINT, cfg, model, training, history)
        if training.stopped_early:
            print(f"early stopping: no better validation loss for {cfg.patience} epochs; keeping epoch "
                  f"{training.best_epoch}", flush=True)
    return after_epoch

def summary(training, history):  # metrics.json's account of the training
    best = history[training.best_epoch - 1]
    return {"best_val_loss": training.best_loss, "best_epoch": training.best_epoch, "epochs_trained": len(history),
            "rate": best["val_kl"], "reconstruction_error": best["val_recon"],  # its place in the rate-distortion plane
            "stopped_early": training.stopped_early, "train_seconds": history[-1]["elapsed_seconds"],
            "images_per_second": sum(r["train_images"] for r in history) / sum(r["train_loop_seconds"] for r in history)}

def run(cfg, argv=()):
    """Train (or, with --evaluate, load) a model, then sample and measure it; returns metrics.json's contents.
    A folder holds one run: a run never writes over another's, nor an evaluation into a training run."""
    if (cfg.out / "metrics.json").is_file():
        if not cfg.resume:
            raise UsageError(f"{cfg.out} already holds results; choose another --out (or delete it)")
        print(f"{cfg.out} is a finished run: nothing to resume", flush=True)
        return json.loads((cfg.out / "metrics.json").read_text())
    if (cfg.out / CHECKPOINT).is_file() != cfg.resume:  # --resume needs a checkpoint, and a checkpoint --resume
        raise UsageError(f"--resume: {cfg.out / CHECKPOINT} does not exist, so there is nothing to resume; run without it"
                         if cfg.resume else f"{cfg.out} already holds a run; " + ("choose another --out for this evaluation"
                         if cfg.evaluate else "add --resume to continue it, or choose another --out (or delete it)"))
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    splits = load_data(cfg)
    model = load_model(cfg.evaluate, device)[0] if cfg.evaluate else ConvVAE(
        IMAGE_CHANNELS[cfg.dataset], cfg.image_size, cfg.hidden_dims, cfg.latent_dim).to(device)
    train_split, val_split, test_split = prepare_for_speed(model, splits, device)
    history, training = resume(cfg.out / CHECKPOINT, model, cfg) if cfg.resume else ([], None)
    write_atomically(cfg.out / "config.json", json.dumps({**settings(cfg), **provenance(argv, device), "train_images":
                     len(train_split), "val_images": len(val_split), "test_images": len(test_split)}, indent=2).encode())
    print(f"{cfg.dataset}: {len(train_split)} train / {len(val_split)} validation / {len(test_split)} test images of "
          f"{tuple(train_split.images.shape[1:])}, lam2 = {cfg.lam2:g}, device {device}, "
          f"{f'evaluating {cfg.evaluate}' if cfg.evaluate else 'training'}, writing to {cfg.out}", flush=True)
    if not cfg.evaluate:
        if history:
            print(f"resuming after epoch {len(history)}{' (training had finished)' * training.finished}", flush=True)
        training = train(model, train_split.images, val_split.images, cfg, training, epoch_recorder(cfg, model, history))
    metrics = {**evaluate(model, train_split, test_split, cfg), **({} if cfg.evaluate else summary(training, history))}
    write_atomically(cfg.out / "metrics.json", json.dumps(metrics, indent=2).encode())
    return metrics

def hold(folder):
    """A descriptor holding folder's flock until closed, so that a second run into it is refused (None on Windows)."""
    if os.name != "nt":
        import fcntl
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            return fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB) or descriptor
        except OSError:
            os.close(descriptor)
            raise UsageError(f"{folder} is in use by another run; wait for it to end, or choose another --out") from None

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, made, lock = None, [], None
    handlers = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        cfg = parse_config(argv)
        made = [folder for folder in (cfg.out, *cfg.out.parents) if not folder.exists()]
        cfg.out.mkdir(parents=True, exist_ok=True)
        lock = hold(cfg.out)
        run(cfg, argv)
    except UsageError as error:
        for folder in made:  # bad input writes nothing: the folders made for the run go again
            with contextlib.suppress(OSError):
                folder.rmdir()
        print(f"btvae.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except (TrainingDiverged, WriteFailed, Interrupted, MemoryError, RuntimeError) as error:
        out_of_memory = isinstance(error, MemoryError) or "out of memory" in str(error) or "allocate memory" in str(error)
        if isinstance(error, RuntimeError) and not out_of_memory:
            raise
        what = ("interrupted" if isinstance(error, Interrupted) else f"stopped: {error}" if not out_of_memory else
                f"out of memory ({first_line(error)}); use a smaller --batch-size or --latent-dim")
        kept = ("the same command measures it again" if cfg and cfg.evaluate else "nothing to resume" if cfg is None
                or not (cfg.out / CHECKPOINT).is_file() else f"{cfg.out} keeps every finished epoch; to continue: "
                + shlex.join(["python", "btvae.py", *argv, *["--resume"] * ("--resume" not in argv)]))
        print(f"btvae.py: {what}; {kept}", file=sys.stderr)
        sys.exit(128 + error.args[0] if isinstance(error, Interrupted) else 1)  # 130 for Ctrl-C, 143 for SIGTERM
    finally:
        if lock is not None:
            os.close(lock)  # and with it the flock
        for signum, handler in handlers.items():
            signal.signal(signum, handler)

if __name__ == "__main__":
    main()

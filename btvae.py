"""BTVAE: a variational autoencoder with a Barlow Twins loss, in one file.

Paper: Xu, Wei & Yin, "BTVAE: A Contrastive Learning Approach Towards Expressive
Latent Space in Variational Autoencoders".

The idea in one picture (the paper's Figure 1):

    x_gt --encoder--> (mu, sigma) --sample z--> decoder --> x_recon --encoder--> (mu_recon, sigma_recon)
                          |                                                          |
                          +--------------- Barlow Twins loss: BT(z_gt, z_recon) -----+

The paper's twins z_gt and z_recon are the two embeddings; by default (--bt-on
mu) they are the posterior means mu and mu_recon, while the decoder gets a
sampled z, as any VAE's does (Section 3 says why, and what else --bt-on takes).

An image and its own reconstruction should carry the same features, so BTVAE
treats them as two "distorted views" of one sample, as Barlow Twins
(Zbontar et al., 2021) does with two augmentations of an image, and adds the
Barlow Twins loss between their embeddings to the VAE's objective (Eq. 4):

    loss = MSE(x, x_recon) + lambda1 KL(q(z|x) || N(0, I)) + lambda2 BT(z_gt, z_recon)

With lambda2 = 0 this is exactly the baseline VAE. The file reads like the paper:

    The method
      1. Model                 convolutional encoder and decoder (Sec. 2.1.1, 2.1.2, 3.3)
      2. Reparameterisation    z = mu + sigma * eps (Sec. 2.1)
      3. Objective             the VAE's (Eq. 2), Barlow Twins (Eq. 3), BTVAE's (Eq. 4)
      4. Training              an epoch of Adam, early stopping on the validation loss (Sec. 3.3)
      5. Sampling              the sample grids of Figure 2 (Sec. 3.2)
    The experiments
      6. Data                  MNIST, CIFAR-10, CelebA 64x64, or a folder of images (Sec. 3.1)
      7. FID                   Table 1's metric (Sec. 3.1), with precision and recall
      8. Latent space          what the Barlow Twins term does to it (beyond the paper)
    ----- a first reading can stop here -----
    The harness                flags, checkpoints and --resume, Ctrl-C, speed, output files, main

Where the paper's text and the authors' released code disagree, this file
follows the decisions listed in README.md ("Deviations"); each is explained
where it happens.

Usage:  python btvae.py --dataset mnist --lam2 0.025
"""

import argparse
import contextlib
import csv
import ctypes
import hashlib
import importlib.metadata
import io
import json
import math
import os
import pickle
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

try:
    import fcntl  # the operating system's file locks (Linux, macOS): one run per --out folder
except ImportError:  # Windows has no flock: runs into one folder are not kept apart there
    fcntl = None

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# Libraries only some paths need (torchvision for data and image grids, tqdm, torch-fidelity, scikit-learn) are
# imported where used: torchvision alone takes seconds, and a mistyped option should not wait for it.


# =============================================================================
# 1. Model (Sec. 2.1.1, 2.1.2, 3.3)
#
# Encoder: blocks of Conv2d(kernel 3, stride 2, padding 1) -> BatchNorm2d ->
# LeakyReLU with widths 16, 32, 64, 128, 256 (Sec. 3.3), each halving the
# image, then two linear heads predicting the mean and log-variance of
# q(z|x) = N(mu, diag(sigma^2)). Predicting log sigma^2 rather than sigma keeps
# sigma positive without a constraint. (The paper's text also puts a sigmoid on
# these heads; that would forbid negative means, and the authors' code has none.)
#
# Decoder: the mirror image, a linear layer back to the smallest feature map and
# ConvTranspose2d blocks that each double it, then a 3x3 conv to the image's
# channels. The linear layer has no activation after it, as the paper's
# u^0 = V^fc z + b^fc (Sec. 2.1.1) has none; the blocks use LeakyReLU where
# the paper writes ReLU, as the encoder and the authors' code do. Its Sigmoid
# output matches the data's [0, 1] range, so the MSE of Eq. 2 compares like
# with like (the authors' code put a Tanh, range [-1, 1], on data in [0, 1]).
# =============================================================================

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
    """The network shared by the VAE and BTVAE: only the objective (Section 3) differs."""

    def __init__(self, channels, image_size, hidden_dims=(16, 32, 64, 128, 256), latent_dim=128):
        super().__init__()
        self.architecture = dict(channels=channels, image_size=image_size,
                                 hidden_dims=tuple(hidden_dims), latent_dim=latent_dim)
        side = bottleneck_side(image_size, len(hidden_dims))
        self.bottleneck_shape = (hidden_dims[-1], side, side)
        widths = [channels, *hidden_dims]
        flat = math.prod(self.bottleneck_shape)

        self.encoder = nn.Sequential(*(conv_block(a, b) for a, b in zip(widths[:-1], widths[1:])), nn.Flatten())
        self.to_mu = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim)

        reversed_widths = [*reversed(hidden_dims), hidden_dims[0]]  # e.g. 256, 128, 64, 32, 16, 16
        self.from_latent = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(
            *(conv_block(a, b, transposed=True) for a, b in zip(reversed_widths[:-1], reversed_widths[1:])),
            nn.Conv2d(hidden_dims[0], channels, 3, padding=1),
            nn.Sigmoid())

    # Both return float32 even when the layers run in bfloat16 (--precision), so every loss is float32.
    def encode(self, x):
        """x -> (mu, logvar) of q(z|x), each batch x latent_dim."""
        features = self.encoder(x)
        return self.to_mu(features).float(), self.to_logvar(features).float()

    def decode(self, z):
        """z -> image in [0, 1]."""
        return self.decoder(self.from_latent(z).view(-1, *self.bottleneck_shape)).float()


# =============================================================================
# 2. Reparameterisation trick (Sec. 2.1)
#
# Sampling z ~ N(mu, sigma^2) directly has no gradient with respect to mu and
# sigma; writing z = mu + sigma * eps with eps ~ N(0, I) moves the randomness
# into eps, so the gradient flows through mu and sigma.
# =============================================================================

def reparameterise(mu, logvar):
    sigma = torch.exp(0.5 * logvar)  # logvar = log sigma^2
    return mu + sigma * torch.randn_like(sigma)


# =============================================================================
# 3. Objective (Sec. 2.1.3, 2.2)
#
# Eq. 2, the baseline VAE:   MSE(x, x_recon) + lambda1 KL(q(z|x) || N(0, I))
# Eq. 3, Barlow Twins:       sum_i (1 - C_ii)^2 + delta sum_{i != j} C_ij^2
# Eq. 4, BTVAE:              Eq. 2 + lambda2 BT(z_gt, z_recon)
#
# Names in the code: lambda1 is lam1, lambda2 is lam2 (the flags --lam1,
# --lam2), delta is delta; the twins are z_gt and z_recon, C is the return
# value of cross_correlation.
# =============================================================================

def kl_to_standard_normal(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, I)) in closed form: 1/2 sum_d (sigma_d^2 + mu_d^2 - 1 - log sigma_d^2).

    Eq. 2 writes the KL as an expectation over q(z|x); for two Gaussians it
    has this exact value, so no sample of z is needed for it (Kingma &
    Welling 2014, Appendix B), with less variance than a Monte Carlo estimate.
    Summed over the latent dimensions (it is one KL of a D-dimensional
    Gaussian), averaged over the batch.
    """
    return 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(dim=1).mean()


def vae_loss(x, x_recon, mu, logvar, lam1):
    """Eq. 2: MSE(x, x_recon) + lambda1 KL(q(z|x) || N(0, I)); returns it with its two terms.

    MSE replaces the Gaussian negative log-likelihood (Sec. 2.1.3), a mean over
    pixels. lambda1: the paper says it was fixed at 1, but with a mean over
    pixels (~0.01-0.05) against a KL summed over 128 dimensions (tens of nats)
    a weight of 1 lets the KL win and the posterior collapse to the prior
    (every sample is the mean image). The authors' code trained with 0.00025;
    so do we, in training and validation alike.
    """
    recon = F.mse_loss(x_recon, x)
    kl = kl_to_standard_normal(mu, logvar)
    return recon + lam1 * kl, recon, kl


BT_EPS = 1e-5  # as BatchNorm1d's default, which the official Barlow Twins code uses to standardise


def standardise(z, eps=BT_EPS):
    """Each feature to zero mean and unit variance over the batch (biased variance, like BatchNorm)."""
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def cross_correlation(z_a, z_b):
    """C of Eq. 3: C_ij is the correlation over the batch between feature i of z_a and feature j of z_b.

    Each feature is standardised over the batch and the product divided by the
    real batch size, as the official Barlow Twins code does. The paper writes
    C = z_A^T z_B without the standardisation, which would make the "1" that
    the diagonal term aims for meaningless.
    """
    return standardise(z_a).T @ standardise(z_b) / z_a.shape[0]


def barlow_twins_loss(z_gt, z_recon, delta=5e-3):
    """Eq. 3: sum_i (1 - C_ii)^2 + delta sum_{i != j} C_ij^2.

    The diagonal term pulls C_ii to 1 (each feature agrees between the twins);
    the off-diagonal term pushes C_ij to 0 (features carry no redundant
    information).
    """
    c = cross_correlation(z_gt, z_recon)
    diagonal = torch.diagonal(c)
    on_diagonal = (1 - diagonal).pow(2).sum()
    off_diagonal = c.pow(2).sum() - diagonal.pow(2).sum()
    return on_diagonal + delta * off_diagonal


def twins(model, mu, logvar, z, x_recon, bt_on):
    """The pairs (z_gt, z_recon) that the Barlow Twins loss compares: the reconstruction is encoded again (Fig. 1).

    Gradients flow through both encoder passes and through x_recon into the
    decoder, as in the authors' code. In training mode this pass also updates
    BatchNorm's running statistics with reconstructions, as theirs did.
    """
    mu_recon, logvar_recon = model.encode(x_recon)
    if bt_on == "mu":  # the paper's z_gt and z_recon, taken as the posterior means
        return [(mu, mu_recon)]
    if bt_on == "z":  # sampled embeddings
        return [(z, reparameterise(mu_recon, logvar_recon))]
    return [(mu, mu_recon), (logvar, logvar_recon)]  # "mu+logvar", what the authors' released code computed


LOSS_TERMS = ("loss", "recon", "kl", "bt")


def btvae_loss(model, x, lam1, lam2, bt_on="mu", delta=5e-3):
    """Eq. 4: Eq. 2 + lambda2 BT(z_gt, z_recon). Returns the total ("loss") and each unweighted term."""
    mu, logvar = model.encode(x)
    z = reparameterise(mu, logvar)
    x_recon = model.decode(z)
    loss, recon, kl = vae_loss(x, x_recon, mu, logvar, lam1)
    bt = torch.zeros((), device=x.device)
    if lam2 != 0:  # the baseline VAE skips the re-encoding: it costs exactly what a VAE costs
        bt = sum(barlow_twins_loss(z_gt, z_recon, delta) for z_gt, z_recon in twins(model, mu, logvar, z, x_recon, bt_on))
        loss = loss + lam2 * bt
    return {"loss": loss, "recon": recon, "kl": kl, "bt": bt}


# =============================================================================
# 4. Training with early stopping (Sec. 3.3)
#
# Adam, learning rate 0.005, no weight decay, batches of 64; after each epoch
# the loss on the validation split, with the same lambda1 and lambda2 as in
# training. The run stops when that loss has not improved for `patience`
# epochs (or after `epochs`) and ends with the best epoch's weights.
# =============================================================================

def batch_indices(count, batch_size, shuffle=None, device="cpu"):
    """Index tensors of full batches, in the order of the generator `shuffle` if given, on `device` (where
    the images are).

    The last incomplete batch is dropped: BatchNorm and the Barlow Twins
    standardisation need a real batch, not a remainder of one image. A split
    smaller than one batch is a single batch.
    """
    order = torch.randperm(count, generator=shuffle) if shuffle is not None else torch.arange(count)
    order = order.to(device)  # once per epoch, not once per batch
    if count <= batch_size:
        return [order]
    return list(order[: count - count % batch_size].split(batch_size))


def load_batch(images, index, device):
    """The uint8 images at `index` as a float batch in [0, 1] on `device` (the images may already be there)."""
    return to_model_range(images[index].to(device, non_blocking=True))


def make_optimiser(model, cfg, device):
    """Adam without weight decay (Sec. 3.3). fused: one kernel updates every parameter instead of ~10 small
    ops per tensor, the same arithmetic (CPU and CUDA have it)."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=0, fused=device.type in ("cpu", "cuda"))


def run_epoch(model, images, cfg, device, optimiser=None, shuffle=None, watch=None):
    """One pass over `images`: a training epoch if an optimiser is given, else the validation pass.

    Returns the mean of each term of Eq. 4 over the images seen. `watch`
    (below the line) wraps the batches for the progress bar and Ctrl-C.
    """
    training = optimiser is not None
    model.train(training)
    batches = batch_indices(len(images), cfg.batch_size, shuffle, images.device)
    if watch:
        batches = watch(batches, "train" if training else "validate")
    totals, seen = torch.zeros(len(LOSS_TERMS), device=device), 0
    with torch.set_grad_enabled(training):
        for index in batches:
            terms = btvae_loss(model, load_batch(images, index, device), cfg.lam1, cfg.lam2, cfg.bt_on, cfg.delta)
            if training:
                optimiser.zero_grad(set_to_none=True)
                terms["loss"].backward()
                optimiser.step()
            # Summed on the device and copied to the CPU once per epoch: no per-step synchronisation.
            totals += torch.stack([terms[name].detach() for name in LOSS_TERMS]) * len(index)
            seen += len(index)
    return dict(zip(LOSS_TERMS, (totals / seen).cpu().tolist()))


class EarlyStopping:
    """Remembers the best validation loss and its weights; says when `patience` epochs passed without a better one."""

    def __init__(self, patience):
        self.patience = patience
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_state = None
        self.epochs_without_improvement = 0

    def should_stop(self, val_loss, model, epoch):
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch = val_loss, epoch
            self.best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        return self.epochs_without_improvement >= self.patience

    def restore_best(self, model):
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


@dataclass
class Training:
    """Everything the training loop changes besides the weights (a checkpoint keeps it for --resume)."""
    optimiser: torch.optim.Optimizer
    stopper: EarlyStopping
    shuffle: torch.Generator  # the order of the training images, epoch after epoch
    epoch: int = 0
    finished: bool = False
    stopped_early: bool = False


def start_training(model, cfg, device):
    return Training(make_optimiser(model, cfg, device), EarlyStopping(cfg.patience),
                    torch.Generator().manual_seed(cfg.seed))


def train(model, train_images, val_images, cfg, device, training=None, after_epoch=None, watch=None):
    """Train until early stopping or cfg.epochs; the model ends with the best epoch's weights.

    `training` continues an interrupted run (see Training); after_epoch(training,
    train_terms, val_terms) is the harness's turn after each epoch (the
    history, a log line, the NaN check, the checkpoint), and `watch` its hold
    on each batch (see run_epoch). The best weights are restored even when one
    of them raises.
    """
    training = training or start_training(model, cfg, device)
    try:
        while not training.finished:
            training.epoch += 1
            train_terms = run_epoch(model, train_images, cfg, device, training.optimiser, training.shuffle, watch)
            val_terms = run_epoch(model, val_images, cfg, device, watch=watch)
            training.stopped_early = training.stopper.should_stop(val_terms["loss"], model, training.epoch)
            training.finished = training.stopped_early or training.epoch == cfg.epochs
            if after_epoch:
                after_epoch(training, train_terms, val_terms)
    finally:
        training.stopper.restore_best(model)
    return training


# =============================================================================
# 5. Sampling (Sec. 3.2, Figure 2)
#
# A VAE generates by decoding draws from the prior p(z) = N(0, I). The paper's
# Figure 2 shows 144 of them as a 12 x 12 grid. Section 8 adds a second
# sampler, a mixture fitted to where the encoder puts the training images.
# =============================================================================

@torch.no_grad()
def generate(model, count, generator, device, mixture=None):
    """`count` images decoded from the prior N(0, I), or from a LatentMixture (Section 8).

    z is drawn on the CPU with `generator`, so the images are the same on every device.
    """
    model.eval()
    if mixture is None:
        z = torch.randn(count, model.architecture["latent_dim"], generator=generator)
    else:
        z = mixture.sample(count, generator)
    return model.decode(z.to(device))


@torch.no_grad()
def reconstruct(model, images):
    """Decode the posterior mean: the model's best guess of each image."""
    model.eval()
    mu, _ = model.encode(images)
    return model.decode(mu)


# =============================================================================
# What the experiments share: their errors, progress bars, files and caches
#
# Bad input (a missing data set, an unreadable file) is a UsageError, which
# the command line shows as one line; a FID network that cannot be had is
# FIDUnavailable, and the run records FID as null; a file that cannot be
# written (a full disk) is WriteFailed. Every file is written whole or not at
# all. Decoded data sets and the test images' Inception features are kept in
# --cache-dir between runs.
# =============================================================================

class UsageError(Exception):
    """Bad input from the user: shown as one line and the exit status below, with nothing written."""
    exit_status = 2


class FIDUnavailable(Exception):
    """The FID network cannot be had (no weights, no torch-fidelity): FID is recorded as null."""


class WriteFailed(Exception):
    """A file could not be written (a full disk, no permission): the run stops, keeping the files it wrote."""


def first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def progress(iterable, description):
    """A progress bar on a terminal; logs and CI get the one line per epoch instead."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=description, leave=False)


def write_atomically(path, data):
    """Write the bytes `data` to a temporary file beside path, then rename it over path: a run that stops or
    fails mid-write keeps the previous file whole and leaves no temporary file behind. The temporary name is
    this process's own, so two processes writing one cache never share it. Raises WriteFailed naming path."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as error:
        raise WriteFailed(f"could not write {path} ({error.strerror or first_line(error)})") from None
    finally:
        temporary.unlink(missing_ok=True)


def save_atomically(obj, path):
    """torch.save, written whole or not at all. Serialised in memory first, so that a failed write is the
    operating system's error (disk full, permission), not torch's unexplained 'unexpected pos'."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(path, buffer.getvalue())


def save_grid(images, path, nrow):
    """A grid of images as a PNG, written whole or not at all."""
    from torchvision.utils import save_image
    buffer = io.BytesIO()
    save_image(images, buffer, format="png", nrow=nrow)
    write_atomically(path, buffer.getvalue())


def load_from_cache(path):
    """What save_to_cache (or save_atomically) wrote at path, or None if nothing readable is there: made again."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:
        print(f"note: the cache {path} is unreadable ({first_line(error)}); making it again", flush=True)
        return None


def save_to_cache(value, path):
    """Caches are a convenience: an unwritable cache folder or a full disk costs time, never the run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(value, path)
    except Exception as error:  # whatever failed (the disk, the folder, torch.save itself): only this cache is lost
        print(f"note: could not cache {path.name} in {path.parent} ({first_line(error)}); "
              "pass a writable --cache-dir with room to skip this work next time", flush=True)


# =============================================================================
# 6. Data (Sec. 3.1)
#
# Each split is decoded once into one uint8 tensor (N x C x H x W) held in
# memory; a training batch is a slice of it, scaled to [0, 1] on the fly. That
# keeps per-image Python work off the training path entirely: an MNIST epoch
# is ~900 tensor slices, not 60,000 PIL decodes.
# =============================================================================

DATASETS = ("mnist", "cifar10", "celeba", "folder")
IMAGE_CHANNELS = {"mnist": 1, "cifar10": 3, "celeba": 3, "folder": 3}
DEFAULT_IMAGE_SIZE = {"mnist": 32, "cifar10": 32, "celeba": 64, "folder": 64}


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: Optional[torch.Tensor] = None  # int64 class labels, where the data set has them

    def take(self, index):
        return Split(self.images[index], None if self.labels is None else self.labels[index])

    def __len__(self):
        return len(self.images)


VALIDATION_IMAGES = 5000  # held out of the training set where there is no official validation split
HOLDOUT_SEED = 0  # fixed, so every run of a sweep validates on the same images whatever its --seed
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def to_model_range(images_uint8):
    """uint8 pixels in [0, 255] -> floats in [0, 1], the range of the decoder's Sigmoid output."""
    return images_uint8.float().div_(255)


def to_uint8(images):
    """Model output in [0, 1] -> uint8 in [0, 255]; clamped first so nothing wraps around."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


def square_resize(images, size):
    """Centre-crop to a square, then resize to size x size (antialiased), staying uint8."""
    import torchvision.transforms.v2.functional as TF
    height, width = images.shape[-2:]
    if height != width:
        images = TF.center_crop(images, [min(height, width)] * 2)
    if images.shape[-1] != size:
        images = TF.resize(images, [size, size], antialias=True)
    return images


def read_rgb(path):
    """One image file as a uint8 3 x H x W tensor (Pillow: torchvision's own decoders are deprecated)."""
    import torchvision.transforms.v2.functional as TF
    try:
        with Image.open(path) as image:
            return TF.pil_to_tensor(image.convert("RGB"))
    except Exception as error:
        raise UsageError(f"cannot decode image {path} ({first_line(error)}); remove or replace it") from None


def download_if_missing(files, download, name, data_dir):
    """Let torchvision fetch a data set whose files are missing; if that fails (offline, quota), say which to put where."""
    missing = [f for f in files if not (data_dir / f).exists()]
    if not missing:
        return
    try:
        download()
    except Exception as error:
        raise UsageError(
            f"{name} is not in {data_dir} and downloading it failed ({first_line(error)}); "
            f"put {', '.join(missing)} there (torchvision's layout) and run again") from None


def unreadable(name, data_dir, error):
    return UsageError(f"cannot read {name} in {data_dir} ({first_line(error)}); a file is truncated or corrupt: "
                      "delete it and run again to download a fresh copy")


def holdout(split, count):
    """Split off `count` random images (fixed seed) for validation; the rest keep their order."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    kept = order[count:].sort().values
    return split.take(kept), split.take(order[:count])


def load_mnist(data_dir):
    """MNIST's 28x28 digits, padded with 2 black pixels a side to 32x32 so that five stride-2 layers fit."""
    import torchvision
    download_if_missing([f"MNIST/raw/{prefix}-{kind}-ubyte" for prefix in ("train", "t10k")
                         for kind in ("images-idx3", "labels-idx1")],
                        lambda: torchvision.datasets.MNIST(data_dir, download=True), "MNIST", data_dir)
    splits = []
    for train in (True, False):
        try:
            dataset = torchvision.datasets.MNIST(data_dir, train=train)
        except Exception as error:
            raise unreadable("MNIST", data_dir, error) from None
        splits.append(Split(F.pad(dataset.data.unsqueeze(1), (2, 2, 2, 2)), dataset.targets))
    return splits  # train, test


def load_cifar10(data_dir):
    """CIFAR-10's pickled batches, read directly (torchvision would insist on the original files' MD5s)."""
    import torchvision
    folder = "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    download_if_missing([f"{folder}/{name}" for name in train_files + ["test_batch"]],
                        lambda: torchvision.datasets.CIFAR10(data_dir, download=True), "CIFAR-10", data_dir)

    def read(names):
        images, labels = [], []
        for name in names:
            try:
                with open(data_dir / folder / name, "rb") as file:
                    batch = pickle.load(file, encoding="bytes")
                images.append(torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
                labels.append(torch.as_tensor(batch[b"labels"], dtype=torch.int64))
            except Exception as error:
                raise unreadable(f"CIFAR-10 file {folder}/{name}", data_dir, error) from None
        return Split(torch.cat(images), torch.cat(labels))

    return read(train_files), read(["test_batch"])


CELEBA_CROP = 148  # the crop of the VAE collection the authors built on: the face, without most background


def load_celeba(data_dir, size, cache_dir):
    """CelebA with its official train/valid/test partition, centre-cropped to 148 and resized.

    202,599 JPEGs take minutes to decode, so each split's tensor is cached in
    cache_dir and later runs load it in seconds.
    """
    import torchvision
    import torchvision.transforms.v2.functional as TF
    download_if_missing(["celeba/img_align_celeba", "celeba/list_eval_partition.txt"],
                        lambda: torchvision.datasets.CelebA(data_dir, split="all", download=True), "CelebA", data_dir)
    folder = data_dir / "celeba"
    files_by_split = {0: [], 1: [], 2: []}  # the partition file's codes: 0 train, 1 valid, 2 test
    try:
        for line in (folder / "list_eval_partition.txt").read_text().splitlines():
            if line.strip():
                name, code = line.split()
                files_by_split[int(code)].append(name)
    except (ValueError, KeyError, UnicodeDecodeError) as error:
        raise unreadable("celeba/list_eval_partition.txt", data_dir, error) from None

    splits = []
    for code, split_name in enumerate(("train", "valid", "test")):
        cache_file = cache_dir / f"celeba_{split_name}_{size}px.pt"
        cached = load_from_cache(cache_file)
        if cached is not None:
            splits.append(Split(cached))
            continue
        names = files_by_split[code]
        print(f"decoding {len(names)} CelebA {split_name} images once (cached in {cache_file})", flush=True)
        images = torch.empty(len(names), 3, size, size, dtype=torch.uint8)
        for i, name in enumerate(names):
            image = read_rgb(folder / "img_align_celeba" / name)
            images[i] = square_resize(TF.center_crop(image, [CELEBA_CROP, CELEBA_CROP]), size)
        save_to_cache(images, cache_file)
        splits.append(Split(images))
    return splits  # train, valid, test


def load_folder(data_dir, size):
    """Every image below data_dir (any depth), centre-cropped to a square and resized, as RGB."""
    paths = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UsageError(f"--data-dir {data_dir} has no images ({', '.join(IMAGE_SUFFIXES)}); "
                         "point --data-dir at a folder of images")
    images = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, path in enumerate(paths):
        images[i] = square_resize(read_rgb(path), size)
    return Split(images)


def load_data(cfg):
    """The train, validation and test splits of cfg.dataset as uint8 tensors of cfg.image_size.

    The test split is the FID reference. Validation: CelebA's official split;
    otherwise a fixed random part of the training set (for a folder, the test
    split is carved out the same way).
    """
    size, data_dir = cfg.image_size, cfg.data_dir
    if cfg.dataset == "celeba":
        train, val, test = load_celeba(data_dir, size, cfg.cache_dir)
    else:
        if cfg.dataset == "folder":
            everything = load_folder(data_dir, size)
            if len(everything) < 10:
                raise UsageError(f"--data-dir {data_dir} has only {len(everything)} images; "
                                 "a folder data set needs at least 10 (train, validation and test)")
            held_out = min(VALIDATION_IMAGES, len(everything) // 10)
            train, test = holdout(everything, held_out)
        else:
            train, test = load_mnist(data_dir) if cfg.dataset == "mnist" else load_cifar10(data_dir)
            held_out = min(VALIDATION_IMAGES, len(train) // 10)
        train, val = holdout(train, held_out)
    train, val, test = (Split(square_resize(s.images, size), s.labels) for s in (train, val, test))
    if cfg.subset is not None:
        train = train.take(slice(0, cfg.subset))
    if len(train) < 2:
        raise UsageError(f"only {len(train)} training image(s); BatchNorm and Barlow Twins need at least 2")
    return train, val, test


# =============================================================================
# 7. FID (Sec. 3.1, Table 1), and precision and recall
#
# The Frechet distance between Gaussians fitted to Inception-v3 features of
# test images and of generated ones; lower is better. As in the paper, the
# 64-dimensional feature layer and 10,000 samples. The network is the TF FID
# Inception-v3 as torch-fidelity provides it (the one TorchMetrics runs),
# resizing to 299 x 299 as TensorFlow 1 did. Images go in as uint8 in
# [0, 255] with 3 channels: the authors' code cast [-1, 1] outputs straight to
# uint8, so negative pixels wrapped around to bright ones.
#
# Beyond the paper: FID mixes two failures, unrealistic samples and missing
# variety. The paper's claim is about variety ("more diverse" samples), so
# --fid-2048 also measures, in the same pass, the 2048-d pool layer that every
# other FID paper uses: FID-2048, and precision (the share of samples that fall
# within the real images' feature manifold) and recall (the share of real
# images that fall within the samples' manifold) of Kynkaanniemi et al. (2019),
# with 3 nearest neighbours. In the 64-d layer they are ~0 for every model
# (its features hardly tell one blurry digit from another), so they are
# measured in the 2048-d layer only.
# =============================================================================

FID_FEATURE = 64  # the paper's layer (Sec. 3.3)
STANDARD_FID_FEATURE = 2048  # the pool layer of every other FID paper, where precision and recall are measured
FID_BATCH = 50  # images resized to 299 x 299 per batch (~280 MB of activations); ran faster than 100 or 200
PRECISION_RECALL_NEIGHBOURS = 3  # Kynkaanniemi et al.'s k
DISTANCE_ROWS = 1000  # rows of a distance matrix held at once: 1,000 x 10,000 floats is 40 MB


def to_fid_input(images):
    """[0, 1] floats (or uint8), 1 or 3 channels -> uint8 RGB, the input the FID network expects."""
    images = images if images.dtype == torch.uint8 else to_uint8(images)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def make_fid_network(features, weights_path=None):
    """The FID Inception-v3 (torch-fidelity's), giving each layer in `features` (sizes: 64, 2048) from one pass.

    Raises FIDUnavailable when its weights cannot be loaded or downloaded, so
    that a finished run still ends well, with FID null.
    """
    try:
        from torch_fidelity import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3("inception-v3-compat", [str(size) for size in features],
                                           feature_extractor_weights_path=None if weights_path is None else str(weights_path))
    except Exception as error:
        raise FIDUnavailable(f"{first_line(error)}; pass --fid-weights with a local copy of the Inception weights") from None


@torch.inference_mode()
def inception_features(network, make_batch, count, device, description="FID"):
    """Features of `count` images, FID_BATCH at a time, one tensor per layer the network gives (a list);
    make_batch(n) gives the next n images ([0, 1] floats or uint8)."""
    per_batch = []
    for start in progress(range(0, count, FID_BATCH), description):
        images = to_fid_input(make_batch(min(FID_BATCH, count - start)).to(device))
        per_batch.append([layer.float().cpu() for layer in network(images)])  # one tensor per layer asked for
    return [torch.cat(layer) for layer in zip(*per_batch)]


def frechet_distance(real, fake):
    """FID = ||m_r - m_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) for Gaussians N(m, S) fitted to two feature sets.

    Tr((S_r S_f)^(1/2)) is the sum of the square roots of the eigenvalues of
    S_r S_f, which are real and non-negative (up to rounding, hence .real).
    """
    def mean_and_covariance(features):
        features = features.double()
        mean = features.mean(dim=0)
        centred = features - mean
        return mean, centred.T @ centred / (len(features) - 1)

    (mean_real, cov_real), (mean_fake, cov_fake) = mean_and_covariance(real), mean_and_covariance(fake)
    trace_sqrt = torch.linalg.eigvals(cov_real @ cov_fake).sqrt().real.sum()
    return float((mean_real - mean_fake).square().sum() + cov_real.trace() + cov_fake.trace() - 2 * trace_sqrt)


def precision_recall(real, fake, neighbours=PRECISION_RECALL_NEIGHBOURS):
    """Kynkaanniemi et al.'s precision and recall of two feature sets.

    Each set's manifold is the union of balls around its points, each ball as
    wide as the distance from its point to the point's k-th nearest neighbour
    in the same set. Precision: the share of fake points inside the real
    manifold (realism). Recall: the share of real points inside the fake
    manifold (coverage).
    """
    def radii(points):  # the (k+1)-th smallest distance, since the nearest point is the point itself
        return torch.cat([torch.cdist(rows, points).kthvalue(neighbours + 1, dim=1).values
                          for rows in points.split(DISTANCE_ROWS)])

    def share_inside(points, centres):
        centre_radii = radii(centres)
        return torch.cat([(torch.cdist(rows, centres) <= centre_radii).any(dim=1)
                          for rows in points.split(DISTANCE_ROWS)]).float().mean().item()

    return share_inside(fake, real), share_inside(real, fake)


# =============================================================================
# 8. Latent space (beyond the paper)
#
# The paper claims a "more expressive latent space", and argues it through the
# Barlow Twins mechanism: the diagonal term of Eq. 3 makes each latent feature
# of an image agree with the same feature of its reconstruction, and the
# off-diagonal term decorrelates the features. FID sees only samples from the
# prior, mostly their blur. So every run also measures the latent space itself,
# on the test split, with the model in evaluation mode:
#
#   active_units        how many dimensions carry information about the image, at three
#                       thresholds of their variance, and the participation ratio, which needs none
#   latent_correlation  how redundant the dimensions are (the off-diagonal term's target)
#   twin_correlation    how well the twins agree (the diagonal term's target)
#   probe_accuracy      how much of the label a linear classifier can read off
#   fid_gmm             how good the decoder's images are when z comes from where the
#                       encoder actually puts images rather than from the prior N(0, I)
# =============================================================================

ENCODE_BATCH = 500  # images per encoder pass when measuring; any size gives the same numbers in eval mode
ACTIVE_UNIT_VARIANCE = 0.01  # Burda et al.'s threshold
STRICTER_THRESHOLDS = (0.05, 0.1)  # a count at one threshold can mislead: BTVAE lifts unused dimensions just above 0.01
MIXTURE_COMPONENTS = 10  # with full covariances, the mixture of Ghosh et al.
PROBE_MAX_ITERATIONS = 1000  # lbfgs converges in ~100-200 on MNIST; the default 100 stops short


@torch.no_grad()
def encode_split(model, images, device, bt_on=None):
    """Posterior means of every image of a split (uint8 tensor), in evaluation mode, on the CPU.

    With bt_on, also the Barlow Twins pairs (z_gt, z_recon) of every image, as
    the training objective forms them: z sampled, decoded, re-encoded.
    """
    model.eval()
    means, pairs = [], []
    for batch in images.split(ENCODE_BATCH):
        x = to_model_range(batch.to(device))
        mu, logvar = model.encode(x)
        means.append(mu.cpu())
        if bt_on is not None:
            z = reparameterise(mu, logvar)
            pairs.append([(a.cpu(), b.cpu()) for a, b in twins(model, mu, logvar, z, model.decode(z), bt_on)])
    if bt_on is None:
        return torch.cat(means)
    return torch.cat(means), [tuple(torch.cat(side) for side in zip(*pair)) for pair in zip(*pairs)]


def active_units(mu_variance, threshold=ACTIVE_UNIT_VARIANCE):
    """Dimensions whose posterior mean varies across images (variance over the test images, mu_variance) by
    more than the threshold, 0.01 by default (Burda et al. 2016, Sec. 5.2).

    A dimension whose mean is the same for every image tells the decoder
    nothing about the image: the KL term has pulled it onto the prior. A VAE
    keeps only as many as it needs. The Barlow Twins term standardises every
    feature and asks each to agree with its twin, which can lift a dimension's
    variance just over a threshold without making it carry much: hence the
    stricter thresholds, and the participation ratio, which needs none.
    """
    return int((mu_variance > threshold).sum())


def participation_ratio(mu_variance):
    """(sum_d v_d)^2 / sum_d v_d^2 of the variances v_d: an effective number of dimensions, with no threshold.

    D when the variance is spread equally over D dimensions, 1 when one
    dimension holds it all; a dimension with a hundredth of the others'
    variance adds a hundredth of one (Gao et al. 2017, "A theory of
    multineuronal dimensionality").
    """
    return float(mu_variance.sum() ** 2 / mu_variance.pow(2).sum())


def unit_activity(mu_variance):
    """metrics.json's active units at each threshold, and the participation ratio."""
    return {"active_units": active_units(mu_variance),
            **{f"active_units_{t:g}": active_units(mu_variance, t) for t in STRICTER_THRESHOLDS},
            "participation_ratio": participation_ratio(mu_variance)}


def latent_correlation(mu):
    """Mean |C_ij| over i != j, with C the correlation matrix of mu over the images: redundancy.

    C is Eq. 3's cross-correlation of mu with itself. The off-diagonal term
    of Eq. 3 pushes the cross-correlation between twins towards the identity,
    so it should push this down. A dimension that never varies correlates
    with nothing (standardise's eps keeps it at 0 rather than 0/0).
    """
    return mean_absolute_off_diagonal(cross_correlation(mu, mu))


def mean_absolute_off_diagonal(c):
    """Mean |C_ij| over the D (D - 1) entries i != j of a square matrix; None if D < 2 (no pairs)."""
    dims = c.shape[0]
    if dims < 2:
        return None
    return float((c.abs().sum() - c.diagonal().abs().sum()) / (dims * (dims - 1)))


def twin_correlation(pairs):
    """Mean C_ii of Eq. 3 between the embeddings of images and of their reconstructions, over the test split.

    What the diagonal term pushes to 1: how well each feature of an image is
    kept by its reconstruction. For --bt-on mu+logvar, the mean over both pairs.
    """
    return float(torch.cat([cross_correlation(z_gt, z_recon).diagonal() for z_gt, z_recon in pairs]).mean())


def probe_accuracy(train_features, train_labels, test_features, test_labels):
    """Test accuracy of a linear classifier fitted on the training images' features: the linear evaluation
    of Barlow Twins (Zbontar et al. 2021), here multinomial logistic regression on standardised
    features. None where there are no labels (CelebA, a folder) or only one class to tell apart. The tensors
    are on the CPU: scikit-learn reads them as NumPy arrays.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if train_labels is None or test_labels is None or len(train_labels.unique()) < 2:
        return None
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=PROBE_MAX_ITERATIONS))
    classifier.fit(train_features.double().numpy(), train_labels.numpy())
    return float(classifier.score(test_features.double().numpy(), test_labels.numpy()))


class LatentMixture:
    """A Gaussian mixture over latents, p(z) = sum_k pi_k N(z; m_k, S_k), fitted to the training images'
    posterior means: ex-post density estimation (Ghosh et al. 2020, "From Variational to Deterministic
    Autoencoders"). If the encoder puts images where N(0, I) has little mass, samples from the
    prior decode to images the decoder never learned to draw; samples from this mixture do not.
    """

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


def measure_latent_space(model, train_split, test_split, bt_on, device):
    """The latent metrics of metrics.json, and what the report's figures need (latent.pt)."""
    train_mu = encode_split(model, train_split.images, device)
    test_mu, pairs = encode_split(model, test_split.images, device, bt_on)
    metrics = {**unit_activity(test_mu.var(dim=0)), "latent_correlation": latent_correlation(test_mu),
               "twin_correlation": twin_correlation(pairs),
               "probe_accuracy": probe_accuracy(train_mu, train_split.labels, test_mu, test_split.labels)}
    figures = {"mu_variance": test_mu.var(dim=0), "mu_correlation": cross_correlation(test_mu, test_mu)}
    if test_mu.shape[1] <= 2:  # small enough to keep whole: Figure 3 plots it
        figures.update(test_mu=test_mu, test_labels=test_split.labels)
    return metrics, figures, train_mu


# #############################################################################
#
#   A FIRST READING CAN STOP HERE. The method is above; what follows is the
#   harness that makes it a command-line program: flags and their checks,
#   model files and checkpoints, --resume, Ctrl-C, speed settings, the
#   measurements a run writes, and main().
#
# #############################################################################


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: the run stops, keeping what it has."""


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM, in any phase of a run: what is written stays, and --resume continues from the last
    epoch's checkpoint. Carries the signal, for the exit status (128 + its number: 130 or 143)."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt(signum, frame):
    """A signal handler: stop where the run is, as Ctrl-C does (main says what is kept)."""
    raise RunInterrupted(signum)


# -----------------------------------------------------------------------------
# Flags (every hyper-parameter's default is the paper's value, or, where the
# paper and the authors' code disagree, the choice explained in README.md)
# -----------------------------------------------------------------------------

class DefaultsInHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Show each flag's default in --help, except where the help text explains a computed one."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints its whole usage block on an error; we want one line saying what to fix."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def number(minimum=None, above=None, integer=False):
    """An argparse type for a finite number (or an integer) in range; argparse puts the flag's name in front."""
    kind = "an integer" if integer else "a finite number"

    def parse(text):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be greater than {above}, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text!r}")
        return value
    return parse


def fid_sample_count(text):
    count = number(minimum=0, integer=True)(text)
    if count == 1:
        raise argparse.ArgumentTypeError("must be 0 (skip FID) or at least 2 (FID needs a covariance)")
    return count


def hidden_dims(text):
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated positive integers such as 16,32,64,128,256, got {text!r}")
    return dims


def build_parser():
    p = OneLineErrorParser(
        description="Train a BTVAE (or, with --lam2 0, the baseline VAE), sample from it and measure it.",
        formatter_class=DefaultsInHelp)
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="data set (Sec. 3.1); 'folder' is every image below --data-dir")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="data root, in torchvision's layout; missing data is downloaded here")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where decoded CelebA tensors, the test images' FID features and the pixel probe are kept "
                        "(default: <data-dir>/btvae_cache)")
    p.add_argument("--lam1", type=number(minimum=0), default=0.00025,
                   help="KL weight lambda1 (Eq. 2); the authors' training value, see README 'Deviations'")
    p.add_argument("--lam2", type=number(), default=0.025,
                   help="Barlow Twins weight lambda2 (Eq. 4); 0 is the baseline VAE, negative values are the paper's ablation")
    p.add_argument("--delta", "--bt-offdiag", type=number(minimum=0), default=5e-3,
                   help="delta, weight of the off-diagonal Barlow Twins term (Eq. 3, Sec. 3.3); --bt-offdiag is its old name")
    p.add_argument("--bt-on", choices=("mu", "z", "mu+logvar"), default="mu",
                   help="what the Barlow Twins loss compares: posterior means, sampled z, or the authors' BT(mu)+BT(logvar)")
    p.add_argument("--latent-dim", type=number(minimum=1, integer=True), default=128,
                   help="dimension D of the latent space (Sec. 2.1)")
    p.add_argument("--hidden-dims", type=hidden_dims, default=(16, 32, 64, 128, 256),
                   help="encoder conv widths (Sec. 3.3); the decoder mirrors them")
    p.add_argument("--image-size", type=number(minimum=1, integer=True), default=None,
                   help="side of the square images (default: 32 for mnist and cifar10, 64 for celeba and folder)")
    p.add_argument("--batch-size", type=number(minimum=2, integer=True), default=64,
                   help="batch size (Sec. 3.3); at least 2, since BatchNorm and Barlow Twins standardise over the batch")
    p.add_argument("--lr", type=number(above=0), default=0.005, help="Adam learning rate (Sec. 3.3)")
    p.add_argument("--epochs", type=number(minimum=1, integer=True), default=50,
                   help="maximum number of epochs (Sec. 3.3)")
    p.add_argument("--patience", type=number(minimum=1, integer=True), default=5,
                   help="early stopping: epochs without a better validation loss before stopping (Sec. 3.3)")
    p.add_argument("--seed", type=number(minimum=0, integer=True), default=0, help="random seed")
    p.add_argument("--subset", type=number(minimum=2, integer=True), default=None,
                   help="train on the first N training images only, for quick runs")
    p.add_argument("--fid-samples", type=fid_sample_count, default=10000,
                   help="generated (and test) images for FID (Sec. 3.1); 0 skips FID")
    p.add_argument("--fid-2048", action="store_true",
                   help="also measure FID, precision and recall in Inception's 2048-d pool layer, from the same pass as "
                        "the paper's FID-64 (which runs only the network's first layers: FID takes ~2.7x as long); "
                        "run_all.sh sets it")
    p.add_argument("--fid-weights", type=Path, default=None,
                   help="local FID Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth); default downloads them")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="where to train; auto picks cuda, then mps, then cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="arithmetic of the network on every device: bf16 is mixed precision (weights, optimiser and "
                        "losses stay fp32), which changes the results against fp32's (results/speed.md)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<dataset>_lam2=<value>_seed<seed>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last checkpoint (same settings required)")
    p.add_argument("--evaluate", type=Path, default=None, metavar="MODEL_PT",
                   help="measure a trained model.pt instead of training: samples, reconstructions, FID and the latent "
                        "metrics, with the settings it was trained with (default --out: runs/evaluate/<run name>)")
    return p


# With --evaluate, the model file decides these: they are what it was trained with.
SETTINGS_OF_A_TRAINED_MODEL = ("lam1", "lam2", "delta", "latent_dim", "hidden_dims", "image_size", "batch_size",
                               "lr", "epochs", "patience")
# and these too, unless given: what it was trained on (the probe and mixture use the same training images),
# the seed (the same samples), and which embeddings twin_correlation compares.
DEFAULTS_OF_A_TRAINED_MODEL = ("dataset", "subset", "seed", "bt_on")


def flag(name):
    return "--" + name.replace("_", "-")


def take_settings_of_the_model(cfg, argv):
    """--evaluate: fill cfg with the settings saved in the model file; refuse flags that would contradict them."""
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    refused = [flag(name) for name in (*SETTINGS_OF_A_TRAINED_MODEL, "resume")
               if flag(name) in given or (name == "delta" and "--bt-offdiag" in given)]
    if refused:
        raise UsageError(f"{', '.join(refused)} cannot be used with --evaluate, which measures the model with the "
                         "settings it was trained with; leave them out")
    trained = read_model_file(cfg.evaluate)
    settings = saved_settings(trained["config"])
    for name in SETTINGS_OF_A_TRAINED_MODEL + DEFAULTS_OF_A_TRAINED_MODEL:
        if flag(name) not in given:
            setattr(cfg, name, settings[name])
    cfg.hidden_dims = tuple(cfg.hidden_dims)
    channels = trained["architecture"]["channels"]
    if channels != IMAGE_CHANNELS[cfg.dataset]:
        raise UsageError(f"--evaluate: {cfg.evaluate} was trained on {channels}-channel images, and --dataset "
                         f"{cfg.dataset} has {IMAGE_CHANNELS[cfg.dataset]}; pass the data set it was trained on "
                         f"(--dataset {settings['dataset']})")


def saved_settings(settings):
    """Settings as a model.pt or checkpoint.pt saved them, in today's names and values: delta was once
    bt_offdiag, and --precision's old default, auto, was fp32 on every device but CUDA GPUs with bfloat16
    (on which none of this project's runs were made), so it is read as fp32."""
    today = {("delta" if name == "bt_offdiag" else name): value for name, value in settings.items()}
    if today.get("precision") == "auto":
        today["precision"] = "fp32"
    return today


def parse_config(argv=None):
    """Parse and check every flag, so that bad input fails before anything is read or written."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = build_parser().parse_args(argv)
    if cfg.evaluate is not None:
        take_settings_of_the_model(cfg, argv)
    if cfg.image_size is None:
        cfg.image_size = DEFAULT_IMAGE_SIZE[cfg.dataset]
    try:
        bottleneck_side(cfg.image_size, len(cfg.hidden_dims))
    except ValueError as error:
        raise UsageError(f"--image-size: {error}; use a multiple of {2 ** len(cfg.hidden_dims)} "
                         "or fewer --hidden-dims") from None
    if cfg.dataset == "folder" and not cfg.data_dir.is_dir():
        raise UsageError(f"--data-dir {cfg.data_dir} is not a folder; point --data-dir at a folder of images")
    if cfg.fid_weights is not None:
        try:
            torch.load(cfg.fid_weights, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UsageError(
                f"--fid-weights {cfg.fid_weights} cannot be read as PyTorch weights ({first_line(error)}); "
                "pass torch-fidelity's weights-inception-2015-12-05-6726825d.pth or leave the flag out to download it") from None
    if cfg.cache_dir is None:
        cfg.cache_dir = cfg.data_dir / "btvae_cache"
    if cfg.out is None:
        cfg.out = Path("runs", *(["evaluate"] if cfg.evaluate else []), f"{cfg.dataset}_lam2={cfg.lam2:g}_seed{cfg.seed}")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UsageError(f"--out {cfg.out} is a file; name a folder (new or holding this run) instead")
    return cfg


def shown(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


# -----------------------------------------------------------------------------
# Files: model.pt, caches, and writing without leaving half a file
# -----------------------------------------------------------------------------


def write_json(data, path):
    write_atomically(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def write_csv(rows, path):
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, text.getvalue().encode())


def save_model(model, cfg, path):
    """model.pt: weights, the architecture to rebuild them into, and the run's settings."""
    save_atomically({"architecture": model.architecture, "state_dict": model.state_dict(),
                     "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()}}, path)


def read_model_file(path):
    """The contents of a model.pt (see save_model); anything else is a UsageError."""
    if not Path(path).is_file():
        raise UsageError(f"{path} does not exist; pass the model.pt a run wrote")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's own message explains weights_only at length: it is not what the user needs
        saved = None
    if not isinstance(saved, dict):
        raise UsageError(f"{path} is not a model.pt written by btvae.py; pass the model.pt a run wrote")
    missing = {"architecture", "state_dict", "config"} - set(saved)
    if missing:
        raise UsageError(f"{path} is not a model.pt written by btvae.py (it has no {', '.join(sorted(missing))}); "
                         "pass the model.pt a run wrote")
    return saved


def load_model(path, device="cpu"):
    """Rebuild a trained model from the model.pt a run writes (weights plus architecture)."""
    saved = read_model_file(path)
    try:
        model = ConvVAE(**saved["architecture"])
        model.load_state_dict(saved["state_dict"])
    except Exception as error:
        raise UsageError(f"{path}: its weights do not fit its architecture ({first_line(error)}); "
                         "pass the model.pt a run wrote") from None
    return model.to(device).eval()


CPU_KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def library_versions():
    import torchvision  # already loaded with the data; its version, like torch's, names its build (+cu130, +cpu)
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__}
    # the others' from their installed metadata: importing them takes seconds a run's start should not wait for
    for name, package in (("torch_fidelity", "torch-fidelity"), ("scikit_learn", "scikit-learn")):
        try:
            versions[name] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# -----------------------------------------------------------------------------
# Checkpoints and --resume
#
# A checkpoint after every epoch holds everything the rest of the run depends
# on, so that a run resumed from it on the CPU ends bit for bit as if it had
# never stopped: the weights, the Training state (Adam's moments, the early
# stopping state, the shuffling generator), the history, and the global random
# generators (the one that draws eps in the reparameterisation).
# -----------------------------------------------------------------------------

CHECKPOINT = "checkpoint.pt"
MEASURED_SO_FAR = "measured_so_far.pt"  # a stopped run's FIDs, until metrics.json holds them (KeptMeasurements)
NOT_RESULT_SETTINGS = ("data_dir", "cache_dir", "out", "fid_weights", "device", "resume", "evaluate")  # where, not what


class Checkpoint(NamedTuple):
    """What checkpoint.pt holds: written, checked and read through these fields alone."""
    settings: dict  # result_settings(cfg): a checkpoint continues only a run with the same ones
    model: dict
    optimiser: dict
    early_stopping: dict
    history: list
    shuffle_rng: torch.Tensor
    torch_rng: torch.Tensor
    cuda_rng: list
    finished: bool
    stopped_early: bool


def result_settings(cfg):
    """The settings a run's result depends on."""
    return {k: v for k, v in vars(cfg).items() if k not in NOT_RESULT_SETTINGS}


def write_checkpoint(path, cfg, model, training, history):
    checkpoint = Checkpoint(
        settings=result_settings(cfg), model=model.state_dict(), optimiser=training.optimiser.state_dict(),
        early_stopping=dict(vars(training.stopper)), history=history, shuffle_rng=training.shuffle.get_state(),
        torch_rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        finished=training.finished, stopped_early=training.stopped_early)
    save_atomically(checkpoint._asdict(), path)


def read_checkpoint(path, cfg):
    """The Checkpoint to resume from, refusing missing, unreadable, foreign and different-settings ones."""
    if not path.is_file():
        raise UsageError(f"--resume: {path} does not exist, so there is nothing to resume; run without --resume")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        missing = [field for field in Checkpoint._fields if field not in saved]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        checkpoint = Checkpoint(**{field: saved[field] for field in Checkpoint._fields})
    except Exception as error:
        raise UsageError(f"--resume: {path} is not a readable btvae checkpoint ({first_line(error)}); "
                         "delete it (and the folder's other files) to start the run over") from None
    saved_with = saved_settings(checkpoint.settings)
    differing = [f"{flag(k)} {saved_with.get(k)} (now {v})" for k, v in result_settings(cfg).items()
                 if saved_with.get(k) != v]
    if differing:
        raise UsageError(f"--resume: {path.parent} was run with other settings: {', '.join(differing)}; "
                         "resume with the same flags, or choose another --out")
    return checkpoint


def resume_training(checkpoint, model, cfg, device):
    """The model and Training state as the checkpoint left them."""
    model.load_state_dict(checkpoint.model)
    training = start_training(model, cfg, device)
    training.optimiser.load_state_dict(checkpoint.optimiser)
    vars(training.stopper).update(checkpoint.early_stopping)
    training.shuffle.set_state(checkpoint.shuffle_rng)
    torch.set_rng_state(checkpoint.torch_rng)
    # One state per GPU of the machine that wrote it; this one may have fewer, or none (device_count() is 0).
    for index, state in enumerate(checkpoint.cuda_rng[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, index)
    training.epoch, training.finished = len(checkpoint.history), checkpoint.finished
    training.stopped_early = checkpoint.stopped_early
    return training


# -----------------------------------------------------------------------------
# Watching training: progress bars, Ctrl-C and SIGTERM, the training pass's time
# -----------------------------------------------------------------------------


class GracefulStop:
    """While active, the first Ctrl-C or SIGTERM asks training to stop after the current step; a second stops at once.
    (Outside training, main's handlers stop the run at once.)"""

    def __init__(self):
        self.requested = None  # the signal that asked, once one has

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def request(self, signum, frame):
        if self.requested:
            raise RunInterrupted(signum)
        self.requested = signum
        print("\nstopping after this step (the last finished epoch is checkpointed); press Ctrl-C again to stop at once",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Watch:
    """run_epoch's `watch`: shows a progress bar, stops at the next batch once `stop` is requested, and times
    the training pass (train_seconds, train_images of the last one)."""

    def __init__(self, stop=None):
        self.stop = stop
        self.train_seconds, self.train_images = 0.0, 0

    def __call__(self, batches, name):
        start, seen = time.perf_counter(), 0
        for index in progress(batches, name):
            if self.stop is not None and self.stop.requested:
                raise RunInterrupted(self.stop.requested)
            yield index
            seen += len(index)
        if name == "train":
            self.train_seconds, self.train_images = time.perf_counter() - start, seen


# -----------------------------------------------------------------------------
# Speed settings that leave the method unchanged (results/speed.md)
# -----------------------------------------------------------------------------

def pick_device(name):
    """The device to train on; asking for one that is not there is a usage error, not a crash."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(n for n in ("cuda", "mps", "cpu") if available[n])
    if not available[name]:
        raise UsageError(f"--device {name} is not available on this machine; use --device auto or cpu")
    return torch.device(name)


def use_bf16(precision, device):
    """Mixed precision only when asked (--precision bf16), on every device: the published tables are fp32's,
    and bf16 changes the results against them. On a CPU it trained MNIST no faster and ended worse in
    validation loss (results/speed.md); on a GPU it has not been measured, and on these small layers the
    weights' cast to bfloat16 at every call may cost what the faster arithmetic gains."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU has no bfloat16 support; use --precision fp32")
    return precision == "bf16"


def run_in_bfloat16(model, device):
    """Mixed precision, set once for a run: the model's encode and decode run under torch.autocast in
    bfloat16. What they return stays float32 (see ConvVAE), so every loss is computed in float32."""
    for name in ("encode", "decode"):
        def autocast(x, network_pass=getattr(model, name)):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return network_pass(x)
        setattr(model, name, autocast)


def keep_freed_memory():
    """Let glibc's malloc reuse freed activations instead of returning them to the operating system.

    By default glibc maps every block over 128 KB (up to 32 MB once it adapts)
    fresh from the kernel and unmaps it when freed, so each step's 1-4 MB
    activations arrive as new pages and page-fault in, one 4 KB page at a time
    (how often depends on glibc's adaptive threshold, so on the run's history).
    Raising the mapping threshold to its maximum and never trimming the heap
    keeps those pages in the process (it holds on to its peak memory, which a
    training run reaches every step anyway). Other C libraries (macOS,
    Windows, musl) keep their own behaviour.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers, from glibc's malloc.h
    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)  # glibc's upper limit for this setting
        libc.mallopt(M_TRIM_THRESHOLD, 2**30)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to set


def prefers_channels_last(device):
    """oneDNN (CPU) and cuDNN (GPU) convolutions run ~1.4x faster on channels_last; MPS keeps the default layout."""
    return device.type in ("cpu", "cuda")


def prepare_for_speed(model, splits, device, bf16):
    """The model in channels_last where that is faster, and in bfloat16 mixed precision if asked; on a CPU,
    freed activations stay in the process (keep_freed_memory); on a GPU the uint8 images move there once if
    they fit, so a batch never crosses the bus. Returns the splits, where they now are."""
    if prefers_channels_last(device):
        model.to(memory_format=torch.channels_last)
    if bf16:
        run_in_bfloat16(model, device)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the same shape: pick the fastest kernels once
        free_bytes, _ = torch.cuda.mem_get_info(device)
        if sum(s.images.nbytes for s in splits) < free_bytes // 4:
            splits = [Split(s.images.to(device), s.labels) for s in splits]
    return splits


# -----------------------------------------------------------------------------
# A run: training with its records, then every measurement, written to --out
# -----------------------------------------------------------------------------

def epoch_recorder(cfg, model, history, watch, started, log):
    """train()'s after_epoch: the history row and log line, the NaN check, and (with cfg.out) history.csv,
    model.pt whenever the validation loss improved, and the checkpoint, so a run stopped at any point keeps
    all three."""

    def after_epoch(training, train_terms, val_terms):
        row = {"epoch": training.epoch,
               **{f"train_{k}": v for k, v in train_terms.items()},
               **{f"val_{k}": v for k, v in val_terms.items()},
               "train_images": watch.train_images, "train_loop_seconds": watch.train_seconds,
               "images_per_second": watch.train_images / watch.train_seconds,
               "elapsed_seconds": time.perf_counter() - started}
        history.append(row)
        log(f"epoch {training.epoch:3d}/{cfg.epochs} | train loss {train_terms['loss']:.5f} "
            f"(recon {train_terms['recon']:.5f} kl {train_terms['kl']:.2f} bt {train_terms['bt']:.3f}) | "
            f"val loss {val_terms['loss']:.5f} (recon {val_terms['recon']:.5f} kl {val_terms['kl']:.2f} "
            f"bt {val_terms['bt']:.3f}) | {row['images_per_second']:.0f} img/s | {row['elapsed_seconds']:.1f} s")
        write_csv(history, cfg.out / "history.csv")
        if not all(math.isfinite(v) for v in (*train_terms.values(), *val_terms.values())):
            raise TrainingDiverged(
                f"the loss became NaN or infinite in epoch {training.epoch}; try a smaller --lr or --lam2 "
                f"(the best weights so far are from epoch {training.stopper.best_epoch})")
        if training.stopper.best_epoch == training.epoch:
            save_model(model, cfg, cfg.out / "model.pt")
        write_checkpoint(cfg.out / CHECKPOINT, cfg, model, training, history)
        if training.stopped_early:
            log(f"early stopping: no better validation loss for {cfg.patience} epochs; "
                f"keeping epoch {training.stopper.best_epoch}")
    return after_epoch


def train_and_record(model, train_split, val_split, cfg, device, checkpoint=None, log=print):
    """train() with the harness around it: resuming from `checkpoint`, Ctrl-C, the records of every epoch.
    Returns metrics.json's training summary."""
    history, training = [], None
    if checkpoint is not None:
        history, training = checkpoint.history, resume_training(checkpoint, model, cfg, device)
        log(f"resuming after epoch {len(history)}" + (" (training had finished)" if training.finished else ""))
    started = time.perf_counter() - (history[-1]["elapsed_seconds"] if history else 0.0)
    with GracefulStop() as stop:
        watch = Watch(stop)
        training = train(model, train_split.images, val_split.images, cfg, device, training,
                         epoch_recorder(cfg, model, history, watch, started, log), watch)
    best = history[training.stopper.best_epoch - 1]
    return {"best_val_loss": training.stopper.best_loss,
            "best_epoch": training.stopper.best_epoch,
            **rate_and_distortion(best),
            "epochs_trained": len(history),
            "stopped_early": training.stopped_early,
            "train_seconds": history[-1]["elapsed_seconds"],
            "images_per_second": sum(row["train_images"] for row in history) / sum(row["train_loop_seconds"]
                                                                                  for row in history)}


def rate_and_distortion(best):
    """The kept epoch's validation KL (the rate, in nats: what beta, here lambda1, trades) and reconstruction
    error (the MSE of a reconstruction from one sampled z): a run's place in the rate-distortion plane."""
    return {"rate": best["val_kl"], "reconstruction_error": best["val_recon"]}


def evaluate(model, train_split, test_split, cfg, device):
    """Everything measured of a trained model; writes the sample grids, reconstructions and latent.pt into
    cfg.out and returns metrics.json's measurements. A run calls it after training, --evaluate on a saved
    model, so both give the same numbers for the same model and settings.
    """
    sampler = torch.Generator().manual_seed(cfg.seed)
    save_grid(generate(model, 144, sampler, device), cfg.out / "samples.png", nrow=12)
    originals = to_model_range(test_split.images[:16].to(device))
    save_grid(torch.cat([originals, reconstruct(model, originals)]), cfg.out / "reconstructions.png", nrow=16)
    fid = fid_measurer(test_split, cfg, device)
    kept = KeptMeasurements(cfg.out, model, cfg, device)
    metrics = {**kept.get("", lambda: fid(lambda n: generate(model, n, sampler, device), "")),
               "fid_samples": cfg.fid_samples}

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)  # the twins' z is sampled: the same draws after training and with --evaluate
    latent, figures, train_mu = measure_latent_space(model, train_split, test_split, cfg.bt_on, device)
    metrics.update(latent, latent_seconds=time.perf_counter() - start)
    save_atomically(figures, cfg.out / "latent.pt")
    metrics["pixel_probe_accuracy"] = pixel_probe_accuracy(train_split, test_split, cfg)
    print(f"latent space: {latent['active_units']} of {train_mu.shape[1]} units active "
          f"({latent['active_units_0.05']} above 0.05, {latent['active_units_0.1']} above 0.1; participation ratio "
          f"{latent['participation_ratio']:.1f}), latent correlation "
          f"{shown(latent['latent_correlation'])}, twin correlation {shown(latent['twin_correlation'])}, "
          f"probe accuracy {shown(latent['probe_accuracy'])} (on pixels {shown(metrics['pixel_probe_accuracy'])}) "
          f"({metrics['latent_seconds']:.0f} s)", flush=True)

    start = time.perf_counter()
    mixture = LatentMixture(train_mu, cfg.seed)
    metrics["mixture_fit_seconds"] = time.perf_counter() - start
    mixture_sampler = torch.Generator().manual_seed(cfg.seed)
    save_grid(generate(model, 144, mixture_sampler, device, mixture), cfg.out / "samples_gmm.png", nrow=12)
    metrics.update(kept.get("_gmm", lambda: fid(lambda n: generate(model, n, mixture_sampler, device, mixture),
                                                "_gmm")))
    return metrics


def fid_line(measured, suffix, counted=""):
    """One sampler's measurements as the log shows them, the 2048-d ones if measured: for example
    'FID-64 of the mixture sampler over 10000 samples: 0.0714; in 2048-d features FID 57.32, precision 0.041,
    recall 0.011' (counted: ' over 10000 samples')."""
    line = f"FID-64{' of the mixture sampler' if suffix else ''}{counted}: {measured[f'fid{suffix}']:.4f}"
    if measured.get(f"fid_2048{suffix}") is not None:
        line += (f"; in 2048-d features FID {measured[f'fid_2048{suffix}']:.2f}, "
                 f"precision {measured[f'precision_2048{suffix}']:.3f}, recall {measured[f'recall_2048{suffix}']:.3f}")
    return line


class KeptMeasurements:
    """The FIDs that a stopped attempt already measured (an hour each at 10,000 samples on a CPU), kept in the
    run's folder with what they measured: a hash of the model's weights, the run's settings (as a checkpoint
    keeps them) and the device. --resume, or the same --evaluate command again, reads them back instead of
    measuring again; another model, settings or device find nothing to reuse. The run removes the file once
    metrics.json holds them.

    Skipping the prior's FID changes no other number: the mixture's samples and the latent measurements
    draw from their own seeded generators.
    """

    def __init__(self, folder, model, cfg, device):
        weights = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            weights.update(f"{name}{tuple(tensor.shape)}".encode())
            weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        self.identity = {"weights_sha256": weights.hexdigest(), "device": str(device), **result_settings(cfg)}
        self.path = folder / MEASURED_SO_FAR
        kept = load_from_cache(self.path)
        self.measured = kept["measured"] if kept is not None and kept.get("identity") == self.identity else {}

    def get(self, suffix, measure):
        """The FID measurements named with suffix: read back if kept, else measured by measure() and kept."""
        if suffix in self.measured:
            print(f"{fid_line(self.measured[suffix], suffix)} (measured before the run was stopped; kept in "
                  f"{self.path.name})", flush=True)
            return self.measured[suffix]
        measured = measure()
        if measured[f"fid{suffix}"] is not None:  # None: FID was skipped, and a later attempt may have the network
            self.measured[suffix] = measured
            save_atomically({"identity": self.identity, "measured": self.measured}, self.path)
        return measured


def fid_measurer(test_split, cfg, device):
    """A function from a sampler (make_fake_batch) to its FID-64 and, with --fid-2048, its FID, precision and
    recall in the 2048-d layer, against the test split, named with a suffix; all None when FID is skipped
    (--fid-samples 0) or its network cannot be loaded, the 2048-d ones None without --fid-2048.

    The test images' features are computed on first use and kept in
    --cache-dir: every run of a sweep compares against the same test images,
    so they go through the network once.
    """
    count = min(cfg.fid_samples, len(test_split))
    layers = (FID_FEATURE, STANDARD_FID_FEATURE) if cfg.fid_2048 else (FID_FEATURE,)
    network, real = None, None
    if cfg.fid_samples:
        if count < cfg.fid_samples:
            print(f"note: the test split has only {count} images, so FID uses {count} samples", flush=True)
        try:
            network = make_fid_network(layers, cfg.fid_weights).to(device)
        except FIDUnavailable as error:
            print(f"FID skipped, recorded as null: the Inception network could not be loaded ({error})", flush=True)
    if network is not None and prefers_channels_last(device):  # doubles the convolutions' speed; same features to ~1e-8
        network.to(memory_format=torch.channels_last)
    weights_tag = "default" if cfg.fid_weights is None else cfg.fid_weights.stem
    cache = cfg.cache_dir / (f"inception_real_{cfg.dataset}_{cfg.image_size}px_n{count}_"
                             f"layers{'+'.join(map(str, layers))}_{weights_tag}_"
                             f"torch-fidelity{library_versions()['torch_fidelity']}.pt")

    def measure(make_fake_batch, suffix):
        nonlocal real
        names = [f"fid{suffix}", f"fid_2048{suffix}", f"precision_2048{suffix}", f"recall_2048{suffix}",
                 f"fid{suffix}_seconds"]
        if network is None:
            return dict.fromkeys(names)
        start = time.perf_counter()
        if real is None:
            real = load_from_cache(cache)
        if real is None:
            test_batches = iter(test_split.images[:count].split(FID_BATCH))
            real = inception_features(network, lambda n: next(test_batches), count, device, "FID, test images")
            save_to_cache(real, cache)
        fake = inception_features(network, make_fake_batch, count, device, "FID, samples")
        measured = {f"fid{suffix}": frechet_distance(real[0], fake[0])}
        if cfg.fid_2048:
            precision, recall = precision_recall(real[1], fake[1])
            measured.update({f"fid_2048{suffix}": frechet_distance(real[1], fake[1]),
                             f"precision_2048{suffix}": precision, f"recall_2048{suffix}": recall})
        measured[f"fid{suffix}_seconds"] = time.perf_counter() - start
        print(f"{fid_line(measured, suffix, counted=f' over {count} samples')} "
              f"({measured[f'fid{suffix}_seconds']:.0f} s)", flush=True)
        return {name: measured.get(name) for name in names}
    return measure


def pixel_probe_accuracy(train_split, test_split, cfg):
    """The same linear probe on raw pixels: does a latent space help the classifier at all? The same for
    every run of a data set, so it is computed once and kept in --cache-dir."""
    if train_split.labels is None:
        return None
    cache = cfg.cache_dir / (f"probe_pixels_{cfg.dataset}_{cfg.image_size}px_train{len(train_split)}_"
                             f"test{len(test_split)}_scikit-learn{library_versions()['scikit_learn']}.pt")
    accuracy = load_from_cache(cache)
    if accuracy is None:  # on the CPU: scikit-learn reads NumPy, and as floats the pixels are 4x a GPU's uint8 copy
        accuracy = probe_accuracy(to_model_range(train_split.images.cpu()).flatten(1), train_split.labels,
                                  to_model_range(test_split.images.cpu()).flatten(1), test_split.labels)
        save_to_cache(accuracy, cache)
    return accuracy


# -----------------------------------------------------------------------------
# One run per --out folder, and what a stopped run keeps
# -----------------------------------------------------------------------------

@contextlib.contextmanager
def one_run_per_folder(out):
    """Hold the operating system's exclusive lock (flock) on the --out folder itself for the run's whole life,
    so a second run or --resume into it is refused before it writes anything, and a killed run releases it.
    A folder made here for a run that then fails on bad input is removed again: bad input writes nothing."""
    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # innermost first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {out} cannot be made ({error.strerror}); choose a folder you can write") from None
    lock = lock_folder(out)
    try:
        yield
    except UsageError:
        release(lock)
        lock = None
        for folder in made:
            with contextlib.suppress(OSError):  # not empty, or not ours to remove: leave it
                folder.rmdir()
        raise
    finally:
        release(lock)


class FolderInUse(UsageError):
    """Another run holds the --out folder. Its own exit status, sysexits' EX_TEMPFAIL ("try again later"), lets
    run_all.sh tell this apart from a failed run: the folder is left to the run that holds it, unmarked."""
    exit_status = 75


def lock_folder(folder):
    """An open descriptor of `folder` holding its exclusive lock; None where there are no flocks (Windows)."""
    if fcntl is None:
        return None
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        holder = lock_holder(folder)
        raise FolderInUse(f"{folder} is in use by another run{f' (process {holder})' if holder else ''}; "
                         "wait for it to end, or choose another --out") from None
    return descriptor


def release(lock):
    if lock is not None:
        os.close(lock)  # closing the descriptor releases the flock


def lock_holder(folder):
    """The process that holds the flock on `folder`, read from Linux's /proc/locks; None elsewhere."""
    try:
        inode = os.stat(folder).st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()  # 1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF
            if fields[1] == "FLOCK" and int(fields[5].rsplit(":", 1)[1]) == inode:
                return int(fields[4])
    except (OSError, ValueError, IndexError):
        pass
    return None


def what_is_kept(cfg, argv):
    """The end of a stopped run's message: what its folder keeps, and the command that continues it."""
    if cfg is None:
        return "nothing was written"
    fids_kept = (cfg.out / MEASURED_SO_FAR).is_file()
    if cfg.evaluate is not None:
        kept = "; the FIDs measured so far are kept" if fids_kept else ""
        return (f"the measurements in {cfg.out} are incomplete{kept}; "
                f"to finish them: {shlex.join(['python', 'btvae.py', *argv])}")
    if not (cfg.out / CHECKPOINT).is_file():
        return "no epoch was checkpointed, so there is nothing to resume"
    resume = shlex.join(["python", "btvae.py", *argv, *([] if "--resume" in argv else ["--resume"])])
    return (f"everything up to the last checkpointed epoch{' and the FIDs measured so far' if fids_kept else ''} "
            f"is in {cfg.out}. To continue: {resume}")


def run(cfg):
    """Train (or, with --evaluate, load) a model, then sample and measure it; returns metrics.json's contents."""
    device = pick_device(cfg.device)
    checkpoint = None
    # A folder holds one run's files: a new run or evaluation never writes over another's (a finished run whose
    # checkpoint.pt was deleted to save space included), and an evaluation never joins a training run.
    if (cfg.out / "metrics.json").is_file() and not cfg.resume:
        raise UsageError(f"{cfg.out} already holds results; choose another --out (or delete it)")
    if cfg.evaluate is not None:
        if (cfg.out / CHECKPOINT).is_file():
            raise UsageError(f"{cfg.out} holds a training run; choose another --out for this evaluation")
    elif cfg.resume:
        checkpoint = read_checkpoint(cfg.out / CHECKPOINT, cfg)
        if (cfg.out / "metrics.json").is_file():
            print(f"{cfg.out} is a finished run: nothing to resume", flush=True)
            return json.loads((cfg.out / "metrics.json").read_text())
    elif (cfg.out / CHECKPOINT).is_file():
        raise UsageError(f"{cfg.out} already holds a run; add --resume to continue it, "
                         "or choose another --out (or delete the folder) to start over")
    torch.manual_seed(cfg.seed)
    train_split, val_split, test_split = load_data(cfg)
    if cfg.evaluate is not None:
        model = load_model(cfg.evaluate, device)
    else:
        model = ConvVAE(IMAGE_CHANNELS[cfg.dataset], cfg.image_size, cfg.hidden_dims, cfg.latent_dim).to(device)
    bf16 = use_bf16(cfg.precision, device)
    train_split, val_split, test_split = prepare_for_speed(model, (train_split, val_split, test_split), device, bf16)

    write_json({**vars(cfg), "device": str(device), "mixed_precision_bf16": bf16,
                "versions": library_versions(),
                # CPU kernels differ by instruction set (AVX2, AVX-512), and so do their last bits: a run repeats
                # bit for bit on a CPU with the same capability. The convolutions' kernels are oneDNN's, and these
                # variables can choose others than the CPU's best (ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU
                # repeats an AVX2 run), which the capability ATen reports does not show
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "cpu_kernel_variables": {name: os.environ[name] for name in CPU_KERNEL_VARIABLES if name in os.environ},
                "train_images": len(train_split), "val_images": len(val_split), "test_images": len(test_split)},
               cfg.out / "config.json")
    print(f"{cfg.dataset}: {len(train_split)} train / {len(val_split)} validation / {len(test_split)} test images "
          f"of {tuple(train_split.images.shape[1:])}, lam2 = {cfg.lam2:g}, device {device}"
          f"{' (bf16 mixed precision)' if bf16 else ''}, "
          f"{'evaluating ' + str(cfg.evaluate) if cfg.evaluate else 'training'}, writing to {cfg.out}", flush=True)

    summary = {}
    if cfg.evaluate is None:
        summary = train_and_record(model, train_split, val_split, cfg, device, checkpoint,
                                   log=lambda line: print(line, flush=True))
    metrics = {**evaluate(model, train_split, test_split, cfg, device), **summary}
    write_json(metrics, cfg.out / "metrics.json")
    (cfg.out / MEASURED_SO_FAR).unlink(missing_ok=True)  # metrics.json holds them now
    return metrics


def out_of_memory(error):
    """Is this the allocator's failure (CPU, CUDA or MPS), which a smaller model or batch avoids?"""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or any(
        text in str(error) for text in ("can't allocate memory", "out of memory"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = None
    previous_handler = signal.signal(signal.SIGTERM, interrupt)  # SIGTERM stops a run as Ctrl-C does, anywhere
    try:
        cfg = parse_config(argv)
        with one_run_per_folder(cfg.out):
            run(cfg)
    except UsageError as error:
        print(f"btvae.py: error: {error}", file=sys.stderr)
        sys.exit(error.exit_status)
    except TrainingDiverged as error:
        print(f"btvae.py: stopped: {error}; the best weights and history so far are in {cfg.out}", file=sys.stderr)
        sys.exit(1)
    except WriteFailed as error:
        print(f"btvae.py: stopped: {error}; {what_is_kept(cfg, argv)}", file=sys.stderr)
        sys.exit(1)
    except (RunInterrupted, KeyboardInterrupt) as error:
        print(f"btvae.py: interrupted; {what_is_kept(cfg, argv)}", file=sys.stderr)
        sys.exit(128 + getattr(error, "signum", signal.SIGINT))  # 130 for Ctrl-C, 143 for SIGTERM, as the shell's
    except (RuntimeError, MemoryError) as error:
        if not out_of_memory(error):
            raise
        print(f"btvae.py: out of memory ({first_line(error)}); use a smaller --batch-size or --latent-dim "
              "(or --hidden-dims, --image-size)", file=sys.stderr)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    main()

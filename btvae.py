"""BTVAE: a variational autoencoder with a Barlow Twins loss, in one file.

Paper: Xu, Wei & Yin, "BTVAE: A Contrastive Learning Approach Towards Expressive
Latent Space in Variational Autoencoders".

The idea in one picture (the paper's Figure 1):

    x_gt --encoder--> z_gt --decoder--> x_recon --encoder--> z_recon
                       |                                      |
                       +---------- Barlow Twins loss ---------+

An image and its own reconstruction should carry the same features, so BTVAE
treats them as two "distorted views" of one sample, as Barlow Twins
(Zbontar et al., 2021) does with two augmentations, and adds the Barlow Twins
loss between their embeddings to the usual VAE objective (Eq. 4):

    loss = MSE(x, x_recon) + lam1 * KL(q(z|x) || N(0, I)) + lam2 * BT(z_gt, z_recon)

With lam2 = 0 this is exactly the baseline VAE. The file reads top to bottom
like the paper:

    0. Configuration           hyper-parameters of Sec. 3.3, as command-line flags
    1. Data                    MNIST, CIFAR-10, CelebA 64x64, your own images (Sec. 3.1)
    2. Model                   convolutional encoder and decoder (Sec. 2.1.1, 2.1.2, 3.3)
    3. Reparameterisation      z = mu + sigma * eps (Sec. 2.1)
    4. Losses                  ELBO (Eq. 2), Barlow Twins (Eq. 3), BTVAE (Eq. 4)
    5. Training                Adam with early stopping on the validation loss (Sec. 3.3),
                               a checkpoint after every epoch, --resume
    6. Sampling                the 12x12 sample grids of Figure 2 (Sec. 3.2)
    7. FID                     Frechet Inception Distance, Table 1 (Sec. 3.1), precision and recall
    8. Main                    one run: train, sample, measure, write everything to --out;
                               speed settings that leave the method unchanged (prepare_for_speed)

Where the paper's text and the authors' released code disagree, this file
follows the decisions listed in README.md ("Deviations"); each one is also
explained in a comment where it happens.

Usage:  python btvae.py --dataset mnist --lam2 0.025
"""

import argparse
import csv
import ctypes
import json
import math
import pickle
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.utils import save_image


class UsageError(Exception):
    """Bad input from the user: shown as one line, exit status 2, nothing written."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: the run stops, keeping what it has."""


class FIDUnavailable(Exception):
    """The FID network cannot be had (no weights, no torch-fidelity): FID is recorded as null."""


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM during training: the last epoch's checkpoint is kept for --resume."""


# =============================================================================
# 0. Configuration (Sec. 3.3)
#
# Every hyper-parameter is a flag whose default is the paper's value, or, where
# the paper and the authors' code disagree, the choice explained in README.md.
# =============================================================================

DATASETS = ("mnist", "cifar10", "celeba", "folder")
IMAGE_CHANNELS = {"mnist": 1, "cifar10": 3, "celeba": 3, "folder": 3}
DEFAULT_IMAGE_SIZE = {"mnist": 32, "cifar10": 32, "celeba": 64, "folder": 64}
FID_FEATURE_SIZES = (64, 192, 768, 2048)  # the Inception-v3 layers torchmetrics offers


class DefaultsInHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Show each flag's default in --help, except where the help text explains a computed one."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints its whole usage block on an error; we want one line saying what to fix."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def _number(text, flag, minimum=None, above=None, integer=False):
    """Parse a flag's value, rejecting NaN, infinities and out-of-range values with a clear message."""
    kind = "an integer" if integer else "a finite number"
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} must be {kind}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{flag} must be {kind}, got {text!r}")
    if above is not None and value <= above:
        raise argparse.ArgumentTypeError(f"{flag} must be greater than {above}, got {text!r}")
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"{flag} must be at least {minimum}, got {text!r}")
    return value


def _hidden_dims(text):
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"--hidden-dims must be comma-separated positive integers such as 16,32,64,128,256, got {text!r}")
    return dims


def build_parser():
    p = OneLineErrorParser(
        description="Train a BTVAE (or, with --lam2 0, the baseline VAE), sample from it and measure its FID.",
        formatter_class=DefaultsInHelp)
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="data set (Sec. 3.1); 'folder' is every image below --data-dir")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="data root, in torchvision's layout; missing data is downloaded here")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where decoded CelebA tensors and FID reference statistics are kept (default: <data-dir>/btvae_cache)")
    p.add_argument("--lam1", type=lambda s: _number(s, "--lam1", minimum=0), default=0.00025,
                   help="KL weight lambda1 (Eq. 2); the authors' training value, see README 'Deviations'")
    p.add_argument("--lam2", type=lambda s: _number(s, "--lam2"), default=0.025,
                   help="Barlow Twins weight lambda2 (Eq. 4); 0 is the baseline VAE, negative values are the paper's ablation")
    p.add_argument("--bt-offdiag", type=lambda s: _number(s, "--bt-offdiag", minimum=0), default=5e-3,
                   help="delta, weight of the off-diagonal Barlow Twins term (Eq. 3, Sec. 3.3)")
    p.add_argument("--bt-on", choices=("mu", "z", "mu+logvar"), default="mu",
                   help="what the Barlow Twins loss compares: posterior means, sampled z, or the authors' BT(mu)+BT(logvar)")
    p.add_argument("--latent-dim", type=lambda s: _number(s, "--latent-dim", minimum=1, integer=True), default=128,
                   help="dimension D of the latent space (Sec. 2.1)")
    p.add_argument("--hidden-dims", type=_hidden_dims, default=(16, 32, 64, 128, 256),
                   help="encoder conv widths (Sec. 3.3); the decoder mirrors them")
    p.add_argument("--image-size", type=lambda s: _number(s, "--image-size", minimum=1, integer=True), default=None,
                   help="side of the square images (default: 32 for mnist and cifar10, 64 for celeba and folder)")
    p.add_argument("--batch-size", type=lambda s: _number(s, "--batch-size", minimum=2, integer=True), default=64,
                   help="batch size (Sec. 3.3); at least 2, since BatchNorm and Barlow Twins standardise over the batch")
    p.add_argument("--lr", type=lambda s: _number(s, "--lr", above=0), default=0.005, help="Adam learning rate (Sec. 3.3)")
    p.add_argument("--epochs", type=lambda s: _number(s, "--epochs", minimum=1, integer=True), default=50,
                   help="maximum number of epochs (Sec. 3.3)")
    p.add_argument("--patience", type=lambda s: _number(s, "--patience", minimum=1, integer=True), default=5,
                   help="early stopping: epochs without a better validation loss before stopping (Sec. 3.3)")
    p.add_argument("--seed", type=lambda s: _number(s, "--seed", minimum=0, integer=True), default=0, help="random seed")
    p.add_argument("--subset", type=lambda s: _number(s, "--subset", minimum=2, integer=True), default=None,
                   help="train on the first N training images only, for quick runs")
    p.add_argument("--fid-samples", type=lambda s: _number(s, "--fid-samples", minimum=0, integer=True), default=10000,
                   help="generated (and test) images for FID (Sec. 3.1); 0 skips FID")
    p.add_argument("--fid-feature", type=int, choices=FID_FEATURE_SIZES, default=64,
                   help="Inception-v3 feature layer for FID (Sec. 3.3 uses 64)")
    p.add_argument("--fid-weights", type=Path, default=None,
                   help="local FID Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth); default downloads them")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="where to train; auto picks cuda, then mps, then cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="arithmetic of the network: bf16 is mixed precision (weights, optimiser and losses stay fp32); "
                        "auto is bf16 on GPUs that support it, fp32 on CPU and mps (README 'Speed')")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<dataset>_lam2=<value>_seed<seed>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last checkpoint (same settings required)")
    return p


def parse_config(argv=None):
    """Parse and check every flag, so that bad input fails before anything is read or written."""
    cfg = build_parser().parse_args(argv)
    if cfg.image_size is None:
        cfg.image_size = DEFAULT_IMAGE_SIZE[cfg.dataset]
    downsampling = 2 ** len(cfg.hidden_dims)
    if cfg.image_size % downsampling:
        raise UsageError(
            f"--image-size {cfg.image_size} is not divisible by 2^{len(cfg.hidden_dims)} = {downsampling} "
            f"(each of the {len(cfg.hidden_dims)} --hidden-dims layers halves the image); "
            f"use a multiple of {downsampling} or fewer --hidden-dims")
    if cfg.fid_samples == 1:
        raise UsageError("--fid-samples must be 0 (skip FID) or at least 2 (FID needs a covariance)")
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
        cfg.out = Path("runs") / f"{cfg.dataset}_lam2={cfg.lam2:g}_seed{cfg.seed}"
    return cfg


def first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# =============================================================================
# 1. Data (Sec. 3.1)
#
# Each split is decoded once into one uint8 tensor (N x C x H x W) held in
# memory; a training batch is a slice of it, scaled to [0, 1] on the fly. That
# keeps per-image Python work off the training path entirely: an MNIST epoch
# is ~900 tensor slices, not 60,000 PIL decodes.
# =============================================================================

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
    height, width = images.shape[-2:]
    if height != width:
        images = TF.center_crop(images, [min(height, width)] * 2)
    if images.shape[-1] != size:
        images = TF.resize(images, [size, size], antialias=True)
    return images


def read_rgb(path):
    """One image file as a uint8 3 x H x W tensor (Pillow: torchvision's own decoders are deprecated)."""
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
        if cache_file.is_file():
            try:
                splits.append(Split(torch.load(cache_file, weights_only=True)))
                continue
            except Exception as error:
                print(f"note: the cache {cache_file} is unreadable ({first_line(error)}); decoding again", flush=True)
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


def save_atomically(obj, path):
    """torch.save to a temporary file, then rename: a run stopped mid-write keeps the previous file whole."""
    temporary = path.with_suffix(".tmp")
    torch.save(obj, temporary)
    temporary.replace(path)


def save_to_cache(tensor, path):
    """Caches are a convenience: an unwritable cache folder costs time, never the run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(tensor, path)
    except OSError as error:
        print(f"note: could not cache {path.name} in {path.parent} ({first_line(error)}); "
              "pass a writable --cache-dir to skip this work next time", flush=True)


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
# 2. Model (Sec. 2.1.1, 2.1.2, 3.3)
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
# channels. Its Sigmoid output matches the data's [0, 1] range, so the MSE of
# Eq. 2 compares like with like (the authors' code put a Tanh, range [-1, 1], on
# data in [0, 1]).
# =============================================================================

def conv_block(in_channels, out_channels, transposed=False):
    if transposed:  # output_padding=1 makes the transposed conv exactly double the size
        conv = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1)
    else:
        conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.LeakyReLU())


class ConvVAE(nn.Module):
    """The network shared by the VAE and BTVAE: only the objective (Section 4) differs.

    mixed_precision = True runs the layers in bfloat16 (torch.autocast), the
    usual way to use a recent GPU; what encode and decode return is float32
    either way, so every loss is computed in float32.
    """

    mixed_precision = False

    def __init__(self, channels, image_size, hidden_dims=(16, 32, 64, 128, 256), latent_dim=128):
        super().__init__()
        if image_size % 2 ** len(hidden_dims):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(hidden_dims)}")
        self.architecture = dict(channels=channels, image_size=image_size,
                                 hidden_dims=tuple(hidden_dims), latent_dim=latent_dim)
        widths = [channels, *hidden_dims]
        self.bottleneck_shape = (hidden_dims[-1], image_size // 2 ** len(hidden_dims), image_size // 2 ** len(hidden_dims))
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

    def encode(self, x):
        """x -> (mu, logvar) of q(z|x), each batch x latent_dim."""
        with self.autocast(x):
            features = self.encoder(x)
            mu, logvar = self.to_mu(features), self.to_logvar(features)
        return mu.float(), logvar.float()

    def decode(self, z):
        """z -> image in [0, 1]."""
        with self.autocast(z):
            x = self.decoder(self.from_latent(z).view(-1, *self.bottleneck_shape))
        return x.float()

    def autocast(self, tensor):
        return torch.autocast(tensor.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision)


def save_model(model, cfg, path):
    """model.pt: weights, the architecture to rebuild them into, and the run's settings."""
    save_atomically({"architecture": model.architecture, "state_dict": model.state_dict(),
                     "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()}}, path)


def load_model(path, device="cpu"):
    """Rebuild a trained model from the model.pt a run writes (weights plus architecture)."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        model = ConvVAE(**checkpoint["architecture"]).to(device)
        model.load_state_dict(checkpoint["state_dict"])
    except Exception as error:
        raise UsageError(f"{path} is not a btvae.py model.pt, or its weights do not fit its architecture "
                         f"({first_line(error)})") from None
    return model.eval()


# =============================================================================
# 3. Reparameterisation trick (Sec. 2.1)
#
# Sampling z ~ N(mu, sigma^2) directly has no gradient with respect to mu and
# sigma; writing z = mu + sigma * eps with eps ~ N(0, I) moves the randomness
# into eps, so the gradient flows through mu and sigma.
# =============================================================================

def reparameterise(mu, logvar):
    sigma = torch.exp(0.5 * logvar)
    return mu + sigma * torch.randn_like(sigma)


# =============================================================================
# 4. Losses
#
# Eq. 2, the baseline VAE:   MSE(x, x_recon) + lam1 * KL(q(z|x) || N(0, I))
# Eq. 3, Barlow Twins:       sum_i (1 - C_ii)^2 + delta * sum_{i != j} C_ij^2
# Eq. 4, BTVAE:              Eq. 2 + lam2 * BT(z_gt, z_recon)
# =============================================================================

def kl_to_standard_normal(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, I)) in closed form: 1/2 sum_d (sigma_d^2 + mu_d^2 - 1 - log sigma_d^2).

    Summed over the latent dimensions (it is one KL of a D-dimensional
    Gaussian), averaged over the batch.
    """
    return 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(dim=1).mean()


BT_EPS = 1e-5  # as BatchNorm1d's default, which the official Barlow Twins code uses to standardise


def standardise(z, eps=BT_EPS):
    """Each feature to zero mean and unit variance over the batch (biased variance, like BatchNorm)."""
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def barlow_twins_loss(z_a, z_b, offdiag_weight=5e-3):
    """Eq. 3 as the official Barlow Twins code computes it.

    C is the cross-correlation matrix of the two batches of embeddings, each
    feature standardised over the batch and divided by the real batch size N,
    so C_ij is the correlation between feature i of z_a and feature j of z_b.
    The diagonal term pulls C_ii to 1 (each feature agrees between the twins);
    the off-diagonal term pushes C_ij to 0 (features carry no redundant
    information). The paper writes C = z_A^T z_B without the standardisation,
    which would make the "1" on the diagonal meaningless.
    """
    batch_size = z_a.shape[0]
    cross_correlation = standardise(z_a).T @ standardise(z_b) / batch_size
    diagonal = torch.diagonal(cross_correlation)
    on_diagonal = (1 - diagonal).pow(2).sum()
    off_diagonal = cross_correlation.pow(2).sum() - diagonal.pow(2).sum()
    return on_diagonal + offdiag_weight * off_diagonal


LOSS_TERMS = ("loss", "recon", "kl", "bt")


def btvae_loss(model, x, lam1, lam2, bt_on="mu", bt_offdiag=5e-3):
    """Eq. 4: the ELBO of Eq. 2 plus lam2 times the Barlow Twins loss between x's and x_recon's embeddings.

    Returns a dict with the weighted total ("loss") and each unweighted term.

    lam1 (the KL weight): the paper says it was fixed at 1, but its MSE is a
    mean over pixels (~0.01-0.05) while the KL is a sum over 128 latent
    dimensions (tens of nats), so a weight of 1 lets the KL win and the
    posterior collapse to the prior (every sample is the mean image). The
    authors' code trained with 0.00025; we use it, in training and validation
    alike.
    """
    mu, logvar = model.encode(x)
    z = reparameterise(mu, logvar)
    x_recon = model.decode(z)
    recon = F.mse_loss(x_recon, x)  # Sec. 2.1.3: MSE in place of the Gaussian negative log-likelihood
    kl = kl_to_standard_normal(mu, logvar)
    loss = recon + lam1 * kl

    bt = torch.zeros((), device=x.device)
    if lam2 != 0:  # the baseline VAE skips the re-encoding: it costs exactly what a VAE costs
        # Re-encode the reconstruction (Fig. 1). Gradients flow through both
        # encoder passes and through x_recon into the decoder, as in the
        # authors' code. In training mode this pass also updates BatchNorm's
        # running statistics with reconstructions, as theirs did.
        mu_recon, logvar_recon = model.encode(x_recon)
        if bt_on == "mu":  # the paper's z_gt and z_recon, taken as the posterior means
            bt = barlow_twins_loss(mu, mu_recon, bt_offdiag)
        elif bt_on == "z":  # sampled embeddings
            bt = barlow_twins_loss(z, reparameterise(mu_recon, logvar_recon), bt_offdiag)
        else:  # "mu+logvar", what the authors' released code computed
            bt = barlow_twins_loss(mu, mu_recon, bt_offdiag) + barlow_twins_loss(logvar, logvar_recon, bt_offdiag)
        loss = loss + lam2 * bt
    return {"loss": loss, "recon": recon, "kl": kl, "bt": bt}


# =============================================================================
# 5. Training with early stopping (Sec. 3.3)
#
# Adam, learning rate 0.005, no weight decay, batches of 64; after each epoch
# the loss on the validation split, with the same weights as in training. The
# run stops when it has not improved for `patience` epochs (or after `epochs`)
# and ends with the best epoch's weights. Long runs get interrupted, so every
# epoch also ends with a checkpoint from which --resume continues exactly.
# =============================================================================

def batch_indices(count, batch_size, generator=None, device="cpu"):
    """Index tensors of full batches, shuffled if a generator is given, on `device` (where the images are).

    The last incomplete batch is dropped: BatchNorm and the Barlow Twins
    standardisation need a real batch, not a remainder of one image. A split
    smaller than one batch is a single batch.
    """
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    order = order.to(device)  # once per epoch, not once per batch
    if count <= batch_size:
        return [order]
    return list(order[: count - count % batch_size].split(batch_size))


def load_batch(images, index, device):
    """The uint8 images at `index` as a float batch in [0, 1] on `device` (the images may already be there)."""
    return to_model_range(images[index].to(device, non_blocking=True))


def run_epoch(model, images, cfg, device, optimiser=None, generator=None, stop=None):
    """One pass over `images`: a training epoch if an optimiser is given, else an evaluation.

    Returns the mean of each loss term over the images seen, and how many there were.
    Raises RunInterrupted after the step during which `stop` was requested.
    """
    training = optimiser is not None
    model.train(training)
    totals = torch.zeros(len(LOSS_TERMS), device=device)
    seen = 0
    with torch.set_grad_enabled(training):
        batches = batch_indices(len(images), cfg.batch_size, generator, images.device)
        for index in progress(batches, "train" if training else "validate"):
            if stop is not None and stop.requested:
                raise RunInterrupted()
            x = load_batch(images, index, device)
            terms = btvae_loss(model, x, cfg.lam1, cfg.lam2, cfg.bt_on, cfg.bt_offdiag)
            if training:
                optimiser.zero_grad(set_to_none=True)
                terms["loss"].backward()
                optimiser.step()
            # Summed on the device and read once per epoch: no per-step synchronisation.
            totals += torch.stack([terms[name].detach() for name in LOSS_TERMS]) * len(index)
            seen += len(index)
    return dict(zip(LOSS_TERMS, (totals / seen).tolist())), seen


def progress(iterable, description):
    """A progress bar on a terminal; logs and CI get the one line per epoch instead."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=description, leave=False)


class GracefulStop:
    """While active, the first Ctrl-C or SIGTERM asks training to stop after the current step; a second stops at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (the last finished epoch is checkpointed); press Ctrl-C again to stop at once",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def make_optimiser(model, cfg, device):
    """Adam without weight decay (Sec. 3.3). fused: one kernel updates every parameter instead of ~10 small
    ops per tensor, the same arithmetic (CPU and CUDA have it)."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=0, fused=device.type in ("cpu", "cuda"))


class EarlyStopping:
    """Remembers the best validation loss and its weights; says when to stop."""

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


# A checkpoint after every epoch holds everything the rest of the run depends
# on, so that a run resumed from it on the CPU ends bit for bit as if it had
# never stopped: the weights, Adam's moments, the early-stopping state, the
# history, and the state of both random generators (the shuffling order and
# the global one that draws eps in the reparameterisation).

CHECKPOINT = "checkpoint.pt"
NOT_RESULT_SETTINGS = ("data_dir", "cache_dir", "out", "fid_weights", "device", "resume")  # where, not what


def result_settings(cfg):
    """The settings a run's result depends on; a checkpoint continues only a run with the same ones."""
    return {k: v for k, v in vars(cfg).items() if k not in NOT_RESULT_SETTINGS}


def write_checkpoint(path, cfg, model, optimiser, stopper, shuffle, history, finished, stopped_early):
    save_atomically({"settings": result_settings(cfg), "model": model.state_dict(),
                     "optimiser": optimiser.state_dict(), "early_stopping": dict(vars(stopper)), "history": history,
                     "shuffle_rng": shuffle.get_state(), "torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                     "finished": finished, "stopped_early": stopped_early}, path)


def read_checkpoint(path, cfg):
    """A checkpoint to resume from, refusing missing, unreadable, foreign and different-settings ones."""
    if not path.is_file():
        raise UsageError(f"--resume: {path} does not exist, so there is nothing to resume; run without --resume")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"settings", "model", "optimiser", "early_stopping", "history", "torch_rng"} - set(checkpoint)
        if missing:
            raise ValueError(f"no {', '.join(sorted(missing))}")
        saved = checkpoint["settings"]
    except Exception as error:
        raise UsageError(f"--resume: {path} is not a readable btvae checkpoint ({first_line(error)}); "
                         "delete it (and the folder's other files) to start the run over") from None
    differing = [f"--{k.replace('_', '-')} {saved.get(k)} (now {v})" for k, v in result_settings(cfg).items()
                 if saved.get(k) != v]
    if differing:
        raise UsageError(f"--resume: {path.parent} was run with other settings: {', '.join(differing)}; "
                         "resume with the same flags, or choose another --out")
    return checkpoint


def train(model, train_images, val_images, cfg, device, out_dir=None, log=print, checkpoint=None, stop=None):
    """Train until early stopping or cfg.epochs; the model ends with the best epoch's weights.

    With an out_dir, writes after every epoch history.csv, checkpoint.pt and
    (when the validation loss improved) model.pt, so a run stopped at any point
    keeps all three. `checkpoint` (from read_checkpoint) continues an
    interrupted run. On a NaN loss or Ctrl-C the best weights are restored
    before the exception propagates.
    """
    optimiser = make_optimiser(model, cfg, device)
    stopper = EarlyStopping(cfg.patience)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    history, finished, stopped_early = [], False, False
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimiser.load_state_dict(checkpoint["optimiser"])
        vars(stopper).update(checkpoint["early_stopping"])
        shuffle.set_state(checkpoint["shuffle_rng"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if checkpoint["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        history, finished, stopped_early = checkpoint["history"], checkpoint["finished"], checkpoint["stopped_early"]
        log(f"resuming after epoch {len(history)}" + (" (training had finished)" if finished else ""))
    started = time.perf_counter() - (history[-1]["elapsed_seconds"] if history else 0.0)
    try:
        for epoch in range(len(history) + 1, cfg.epochs + 1):
            if finished:
                break
            epoch_start = time.perf_counter()
            train_terms, seen = run_epoch(model, train_images, cfg, device, optimiser, shuffle, stop)
            epoch_train_seconds = time.perf_counter() - epoch_start
            val_terms, _ = run_epoch(model, val_images, cfg, device)
            row = {"epoch": epoch,
                   **{f"train_{k}": v for k, v in train_terms.items()},
                   **{f"val_{k}": v for k, v in val_terms.items()},
                   "train_images": seen, "train_loop_seconds": epoch_train_seconds,
                   "images_per_second": seen / epoch_train_seconds,
                   "elapsed_seconds": time.perf_counter() - started}
            history.append(row)
            log(f"epoch {epoch:3d}/{cfg.epochs} | train loss {train_terms['loss']:.5f} "
                f"(recon {train_terms['recon']:.5f} kl {train_terms['kl']:.2f} bt {train_terms['bt']:.3f}) | "
                f"val loss {val_terms['loss']:.5f} (recon {val_terms['recon']:.5f} kl {val_terms['kl']:.2f} "
                f"bt {val_terms['bt']:.3f}) | {row['images_per_second']:.0f} img/s | {row['elapsed_seconds']:.1f} s")
            if out_dir is not None:
                write_csv(history, out_dir / "history.csv")
            if not all(math.isfinite(v) for v in (*train_terms.values(), *val_terms.values())):
                raise TrainingDiverged(
                    f"the loss became NaN or infinite in epoch {epoch}; try a smaller --lr or --lam2 "
                    f"(the best weights so far are from epoch {stopper.best_epoch})")
            stopped_early = stopper.should_stop(val_terms["loss"], model, epoch)
            finished = stopped_early or epoch == cfg.epochs
            if out_dir is not None:
                if stopper.best_epoch == epoch:
                    save_model(model, cfg, out_dir / "model.pt")
                write_checkpoint(out_dir / CHECKPOINT, cfg, model, optimiser, stopper, shuffle, history,
                                 finished, stopped_early)
            if stopped_early:
                log(f"early stopping: no better validation loss for {cfg.patience} epochs; "
                    f"keeping epoch {stopper.best_epoch}")
    finally:
        stopper.restore_best(model)
    train_loop_seconds = sum(row["train_loop_seconds"] for row in history)
    return {"best_val_loss": stopper.best_loss,
            "best_epoch": stopper.best_epoch,
            "epochs_trained": len(history),
            "stopped_early": stopped_early,
            "train_seconds": history[-1]["elapsed_seconds"] if history else 0.0,
            "images_per_second": sum(row["train_images"] for row in history) / train_loop_seconds}, history


# =============================================================================
# 6. Sampling (Sec. 3.2, Figure 2)
#
# A VAE generates by decoding draws from the prior p(z) = N(0, I). The paper's
# Figure 2 shows 144 of them as a 12 x 12 grid.
# =============================================================================

@torch.no_grad()
def generate(model, count, generator, device):
    """`count` images decoded from prior samples; the generator makes them the same on every device."""
    model.eval()
    z = torch.randn(count, model.architecture["latent_dim"], generator=generator).to(device)
    return model.decode(z)


@torch.no_grad()
def reconstruct(model, images):
    """Decode the posterior mean: the model's best guess of each image."""
    model.eval()
    mu, _ = model.encode(images)
    return model.decode(mu)


# =============================================================================
# 7. FID (Sec. 3.1, Table 1), and precision and recall
#
# The Frechet distance between Gaussians fitted to Inception-v3 features of
# test images and of generated ones; lower is better. As in the paper,
# torchmetrics with the 64-dimensional feature layer and 10,000 samples. Images
# go in as uint8 in [0, 255] with 3 channels: the authors' code cast [-1, 1]
# outputs straight to uint8, so negative pixels wrapped around to bright ones.
#
# Beyond the paper: FID mixes two failures, unrealistic samples and missing
# variety. The paper's claim is about variety ("more diverse" samples), so
# runs also report precision (the share of samples that fall within the real
# images' feature manifold) and recall (the share of real images that fall
# within the samples' manifold) of Kynkaanniemi et al. (2019), computed by
# torch-fidelity with 3 nearest neighbours in the same 64-d Inception features.
# =============================================================================

FID_BATCH = 50  # images resized to 299 x 299 per batch (~280 MB of activations); ran faster than 100 or 200
PRECISION_RECALL_NEIGHBOURS = 3  # Kynkaanniemi et al.'s k


def to_fid_input(images):
    """[0, 1] floats (or uint8), 1 or 3 channels -> uint8 RGB, the input the FID network expects."""
    images = images if images.dtype == torch.uint8 else to_uint8(images)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def make_fid_metric(feature, weights_path=None):
    """torchmetrics' FID that keeps the real images' statistics across resets.

    Raises FIDUnavailable when the Inception weights cannot be loaded or
    downloaded, so that a finished run still ends well, with FID null.
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        return FrechetInceptionDistance(feature=feature, reset_real_features=False,
                                        feature_extractor_weights_path=None if weights_path is None else str(weights_path))
    except Exception as error:
        raise FIDUnavailable(f"{first_line(error)}; pass --fid-weights with a local copy of the Inception weights") from None


@torch.inference_mode()
def fid_precision_recall(metric, real_images, make_fake_batch, count, real_features_path=None,
                         device=torch.device("cpu")):
    """FID, precision and recall of `count` generated images against `count` test images.

    real_images: uint8 N x C x H x W, the first `count` of which are used.
    make_fake_batch(n): n generated images in [0, 1].
    real_features_path: where the test images' Inception features are cached;
    every run of a sweep compares against the same test images, so they go
    through the network once.
    """
    from torch_fidelity.metric_prc import prc_features_to_metric

    metric = metric.to(device)
    if prefers_channels_last(device):  # doubles the Inception convolutions' speed; same features to ~1e-8
        metric.inception.to(memory_format=torch.channels_last)
    features = []  # each batch's features, as the metric computes them for its own statistics
    hook = metric.inception.register_forward_hook(lambda module, inputs, output: features.append(output.float().cpu()))
    try:
        if real_features_path is not None and real_features_path.is_file():
            real = torch.load(real_features_path, weights_only=True)
            as_double = real.double().to(device)  # the statistics torchmetrics' update() would have summed
            metric.real_features_sum = as_double.sum(dim=0)
            metric.real_features_cov_sum = as_double.T @ as_double
            metric.real_features_num_samples = torch.tensor(len(real), device=device)
        else:
            for start in progress(range(0, count, FID_BATCH), "FID, test images"):
                metric.update(to_fid_input(real_images[start:start + FID_BATCH].to(device)), real=True)
            real = torch.cat(features)
            features.clear()
            if real_features_path is not None:
                save_to_cache(real, real_features_path)
        for start in progress(range(0, count, FID_BATCH), "FID, samples"):
            metric.update(to_fid_input(make_fake_batch(min(FID_BATCH, count - start))), real=False)
        fake = torch.cat(features)
    finally:
        hook.remove()
    fid = float(metric.compute())
    metric.reset()  # fake statistics only: the real ones stay for the next call
    precision_recall = prc_features_to_metric(fake, real, prc_neighborhood=PRECISION_RECALL_NEIGHBOURS,
                                              prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    return {"fid": fid, "precision": precision_recall["precision"], "recall": precision_recall["recall"]}


# =============================================================================
# 8. Main: one run, everything written to --out
# =============================================================================

def pick_device(name):
    """The device to train on; asking for one that is not there is a usage error, not a crash."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(n for n in ("cuda", "mps", "cpu") if available[n])
    if not available[name]:
        raise UsageError(f"--device {name} is not available on this machine; use --device auto or cpu")
    return torch.device(name)


def use_bf16(precision, device):
    """Mixed precision by default only on GPUs with bfloat16. On a CPU with AVX-512 BF16 it trained
    MNIST no faster and ended 2% worse in validation loss after 5 epochs (both of 2 seeds; README 'Speed')."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU has no bfloat16 support; use --precision fp32")
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def keep_freed_memory():
    """Let glibc's malloc reuse freed activations instead of returning them to the operating system.

    By default glibc maps every block over 128 KB (up to 32 MB once it adapts)
    fresh from the kernel and unmaps it when freed, so each step's 1-4 MB
    activations arrive as new pages and page-fault in, one 4 KB page at a time.
    How often depends on glibc's adaptive threshold, so on the run's history:
    on the 2-core machine of README 'Speed', ~5,000 faults a step of an MNIST
    VAE run, which trained 1.28x faster without them. Raising the mapping
    threshold to its maximum and never trimming the heap keeps those pages in
    the process (it holds on to its peak memory, which a training run reaches
    every step anyway).
    Other C libraries (macOS, Windows, musl) keep their own behaviour.
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


def prepare_for_speed(model, splits, cfg, device):
    """Speed settings that leave the method unchanged (README 'Speed').

    The model in channels_last where that is faster (prefers_channels_last). On
    a CPU, freed activations stay in the process (keep_freed_memory). On a GPU
    the uint8 images move there once if they fit, so a batch never crosses the
    bus.
    """
    if prefers_channels_last(device):
        model.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        keep_freed_memory()
    model.mixed_precision = use_bf16(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the same shape: pick the fastest kernels once
        free_bytes, _ = torch.cuda.mem_get_info(device)
        if sum(s.images.nbytes for s in splits) < free_bytes // 4:
            splits = [Split(s.images.to(device), s.labels) for s in splits]
    return splits


def write_json(data, path):
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_csv(rows, path):
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def library_versions():
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__}
    try:
        import torchmetrics
        versions["torchmetrics"] = torchmetrics.__version__  # FID moves slightly between versions (antialias, 1.8)
    except ImportError:
        versions["torchmetrics"] = None
    return versions


def run(cfg):
    """Train, sample, measure FID; returns metrics.json's contents."""
    device = pick_device(cfg.device)
    checkpoint = None
    if cfg.resume:
        checkpoint = read_checkpoint(cfg.out / CHECKPOINT, cfg)
        if (cfg.out / "metrics.json").is_file():
            print(f"{cfg.out} is a finished run: nothing to resume", flush=True)
            return json.loads((cfg.out / "metrics.json").read_text())
    elif (cfg.out / CHECKPOINT).is_file():
        raise UsageError(f"{cfg.out} already holds a run; add --resume to continue it, "
                         "or choose another --out (or delete the folder) to start over")
    torch.manual_seed(cfg.seed)
    train_split, val_split, test_split = load_data(cfg)
    model = ConvVAE(IMAGE_CHANNELS[cfg.dataset], cfg.image_size, cfg.hidden_dims, cfg.latent_dim).to(device)
    train_split, val_split, test_split = prepare_for_speed(model, (train_split, val_split, test_split), cfg, device)

    cfg.out.mkdir(parents=True, exist_ok=True)
    write_json({**vars(cfg), "device": str(device), "mixed_precision_bf16": model.mixed_precision,
                "versions": library_versions(),
                "train_images": len(train_split), "val_images": len(val_split), "test_images": len(test_split)},
               cfg.out / "config.json")
    print(f"{cfg.dataset}: {len(train_split)} train / {len(val_split)} validation / {len(test_split)} test images "
          f"of {tuple(train_split.images.shape[1:])}, lam2 = {cfg.lam2:g}, device {device}"
          f"{' (bf16 mixed precision)' if model.mixed_precision else ''}, writing to {cfg.out}", flush=True)

    with GracefulStop() as stop:
        summary, _ = train(model, train_split.images, val_split.images, cfg, device, cfg.out,
                           log=lambda line: print(line, flush=True), checkpoint=checkpoint, stop=stop)

    sampler = torch.Generator().manual_seed(cfg.seed)
    save_image(generate(model, 144, sampler, device), cfg.out / "samples.png", nrow=12)
    originals = to_model_range(test_split.images[:16].to(device))
    save_image(torch.cat([originals, reconstruct(model, originals)]), cfg.out / "reconstructions.png", nrow=16)

    quality = {"fid": None, "precision": None, "recall": None}
    fid_seconds = None
    if cfg.fid_samples:
        count = min(cfg.fid_samples, len(test_split))
        if count < cfg.fid_samples:
            print(f"note: the test split has only {count} images, so FID uses {count} samples", flush=True)
        fid_start = time.perf_counter()
        try:
            metric = make_fid_metric(cfg.fid_feature, cfg.fid_weights)
            weights_tag = "default" if cfg.fid_weights is None else cfg.fid_weights.stem
            cache = cfg.cache_dir / (f"inception_real_{cfg.dataset}_{cfg.image_size}px_n{count}_f{cfg.fid_feature}_"
                                     f"{weights_tag}_torchmetrics{library_versions()['torchmetrics']}.pt")
            quality = fid_precision_recall(metric, test_split.images, lambda n: generate(model, n, sampler, device),
                                           count, cache, device)
            fid_seconds = time.perf_counter() - fid_start
            print(f"FID-{cfg.fid_feature} over {count} samples: {quality['fid']:.4f}, precision {quality['precision']:.3f}, "
                  f"recall {quality['recall']:.3f} ({fid_seconds:.0f} s)", flush=True)
        except FIDUnavailable as error:
            print(f"FID skipped, recorded as null: the Inception network could not be loaded ({error})", flush=True)

    metrics = {**quality, "fid_samples": cfg.fid_samples, "fid_feature": cfg.fid_feature, "fid_seconds": fid_seconds,
               **summary}
    write_json(metrics, cfg.out / "metrics.json")
    return metrics


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = None
    try:
        cfg = parse_config(argv)
        run(cfg)
    except UsageError as error:
        print(f"btvae.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as error:
        print(f"btvae.py: stopped: {error}; the best weights and history so far are in {cfg.out}", file=sys.stderr)
        sys.exit(1)
    except (RunInterrupted, KeyboardInterrupt):
        if cfg is None or not (cfg.out / CHECKPOINT).is_file():
            print("btvae.py: interrupted before the first epoch finished; nothing to resume", file=sys.stderr)
        else:
            resume = shlex.join(["python", "btvae.py", *argv, *([] if "--resume" in argv else ["--resume"])])
            print(f"btvae.py: interrupted; everything up to the last finished epoch is in {cfg.out}. "
                  f"To continue: {resume}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

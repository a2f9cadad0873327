"""The tests of btvae.py: its specification. Offline and fast: no download and no ../shared, only data sets
fabricated in each real format and small models on random tensors.

    python -m pytest test_btvae.py                     # everything (the README's test command)
    python -m pytest test_btvae.py::TestMethod         # the method's specification: sections 1-5 of btvae.py
    python -m pytest test_btvae.py::TestMeasurements   # its experiments: sections 6-8 (data, FID, latent space)

The sections follow btvae.py's: the fabricated data sets and stand-ins first, then TestMethod (1 Model,
2 Reparameterisation, 3 Objective, 4 Training, 5 Sampling), where every line of the method has a test that
fails when the line is changed to something plausible but wrong (tools/check_mutants.py tries that), then
TestMeasurements (6 Data, 7 FID, 8 Latent space), then the harness: the command line end to end, bad input,
checkpoints and --resume, --evaluate, the pretrained models, speed settings, and tools/report.py and
run_all.sh on fabricated runs.
"""

import contextlib
import csv
import errno
import itertools
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.overrides import TorchFunctionMode

import btvae

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tools"))  # the report of a sweep lives with the other helper scripts
import report  # noqa: E402


# =============================================================================
# Fabricated data sets and stand-ins: every data set in the exact on-disk format the real one has, so that
# no test needs a download or ../shared
# =============================================================================


def write_idx(path, array):
    """MNIST's idx format: magic (0x08 = uint8, then the number of dimensions), big-endian sizes, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array, dtype=np.uint8)
    with open(path, "wb") as file:
        file.write(struct.pack(">I", 0x0800 | array.ndim))
        file.write(struct.pack(f">{array.ndim}I", *array.shape))
        file.write(array.tobytes())


def blob_images(count, channels, height, width, seed):
    """Images with structure (a bright rectangle on a dark ground), so models have something to learn."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(count, channels, height, width), dtype=np.uint8)
    for image in images:
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[:, top:top + height // 3, left:left + width // 3] = rng.integers(150, 256, size=(channels, 1, 1))
    return images


def save(image, path, format=None):
    """A C x H x W uint8 array as an image file; the format follows the suffix unless given."""
    array = np.asarray(image).transpose(1, 2, 0)
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path, format=format)


def make_mnist(root, train=200, test=60):
    raw = root / "MNIST" / "raw"
    for prefix, count, seed in (("train", train, 1), ("t10k", test, 2)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", blob_images(count, 1, 28, 28, seed)[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)
    return root


def make_cifar10(root, per_batch=20, test=30):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        count = test if name == "test_batch" else per_batch
        images = blob_images(count, 3, 32, 32, seed=10 + i)
        images[0, 0], images[0, 1], images[0, 2] = 0, 100, 200  # channel order marker: R, G, B planes
        batch = {b"batch_label": name.encode(), b"labels": [j % 10 for j in range(count)],
                 b"data": images.reshape(count, 3072), b"filenames": [b"x.png"] * count}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file)
    return root


def make_celeba(root, counts=(24, 6, 8)):
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    lines, number = [], 0
    for code, count in enumerate(counts):
        images = blob_images(count, 3, 218, 178, seed=20 + code)  # CelebA's aligned images are 178 wide, 218 high
        for image in images:
            number += 1
            name = f"{number:06d}.jpg"
            save(image, folder / "img_align_celeba" / name)
            lines.append(f"{name} {code}")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def make_folder(root, count=30):
    """Mixed sizes, formats and depths, a grayscale PNG and a file that is not an image."""
    for i, image in enumerate(blob_images(count, 3, 40, 56, seed=30)):
        sub = root / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        if i == 0:
            save(image[:1], sub / "gray.png")
        else:
            save(image, sub / (f"{i}.png" if i % 3 else f"{i}.JPG"))
    (root / "notes.txt").write_text("not an image")
    return root


def config(*argv):
    return btvae.parse_config([str(a) for a in argv])


def small_model_and_batch(channels=1):
    torch.manual_seed(6)
    return btvae.ConvVAE(channels, 16, (8, 16), latent_dim=6), torch.rand(12, channels, 16, 16)


class StandInFeatures(torch.nn.Module):
    """A cheap stand-in for torch-fidelity's Inception, with its interface: uint8 RGB images in, a tuple with
    one feature tensor per requested layer out. Its first layer gives each channel's mean and standard
    deviation (6 features); a second layer (the 2048-d one) gives other numbers: the mean and standard
    deviation of each channel's top and bottom halves (12), so a test can tell which layer a measure used."""
    num_features = 6

    def __init__(self, layers=1):
        super().__init__()
        self.layers = layers

    def forward(self, images):
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        x = images.float().flatten(2)
        top, bottom = x.chunk(2, dim=-1)
        first = torch.cat([x.mean(-1), x.std(-1)], dim=1)
        second = torch.cat([top.mean(-1), top.std(-1), bottom.mean(-1), bottom.std(-1)], dim=1)
        return (first, second)[:self.layers]


def stand_in_network(features=(64,), weights=None):
    return StandInFeatures(len(features))


def replay(images, shift=0.0):
    """A make_fake_batch that hands out `images` (as [0, 1] floats, plus `shift`) in order."""
    position = 0

    def make_fake_batch(count):
        nonlocal position
        batch = btvae.to_model_range(images[position:position + count]) + shift
        position += count
        return batch
    return make_fake_batch


def scripted_epochs(monkeypatch, val_losses):
    """run_epoch replaced: each training epoch adds 1 to a bias (so each epoch's weights are recognisable),
    each validation pass returns the next of `val_losses`."""
    val_losses = iter(val_losses)

    def scripted_epoch(model, images, cfg, device, optimiser=None, shuffle=None, watch=None):
        batches = btvae.batch_indices(len(images), 2)
        for _ in watch(batches, "train" if optimiser else "validate") if watch else batches:
            pass
        if optimiser is not None:
            with torch.no_grad():
                model.to_mu.bias.add_(1)
            return {name: 1.0 for name in btvae.LOSS_TERMS}
        loss = next(val_losses)  # its KL and reconstruction error: recognisably the epoch's
        return {**{name: 0.0 for name in btvae.LOSS_TERMS}, "loss": loss, "kl": 10 * loss, "recon": loss / 10}
    monkeypatch.setattr(btvae, "run_epoch", scripted_epoch)
    model = btvae.ConvVAE(1, 16, (8, 16), latent_dim=4)
    with torch.no_grad():
        model.to_mu.bias.zero_()
    return model


NO_IMAGES = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)


def uint8_images(count, size=16, seed=0):
    return torch.randint(0, 256, (count, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def features_of(images, shift=0.0, layer=0):
    network = StandInFeatures(layer + 1)
    return btvae.inception_features(network, replay(images, shift), len(images), torch.device("cpu"))[layer]


def two_clusters(count=4000):
    """Two well-separated, elongated and tilted Gaussian clusters in 2-d, 3:1 in size."""
    generator = torch.Generator().manual_seed(17)
    covariance = torch.tensor([[2.0, 1.2], [1.2, 1.0]])
    means = torch.tensor([[-6.0, 0.0], [6.0, 3.0]])
    which = (torch.rand(count, generator=generator) < 0.25).long()
    noise = torch.randn(count, 2, generator=generator) @ torch.linalg.cholesky(covariance).T
    return means[which] + noise, means, covariance


# =============================================================================
# The method (btvae.py sections 1-5)
# =============================================================================

class TestMethod:
    """Every line of btvae.py's sections 1-5 (model, reparameterisation, the objective of Eq. 2-4, training,
    sampling) has a test here that fails when the line is changed to something plausible but wrong."""


    # ---------------------------------------------------------------------------
    # 1. Model
    # ---------------------------------------------------------------------------

    @pytest.mark.parametrize("channels, size, hidden_dims", [
        (1, 32, (16, 32, 64, 128, 256)),
        (3, 32, (16, 32, 64, 128, 256)),
        (3, 64, (16, 32, 64, 128, 256)),
        (3, 24, (8, 12, 20)),
    ])
    def test_encoder_decoder_and_loss_shapes(self, channels, size, hidden_dims):
        model = btvae.ConvVAE(channels, size, hidden_dims, latent_dim=7)
        x = torch.rand(5, channels, size, size)
        mu, logvar = model.encode(x)
        assert mu.shape == logvar.shape == (5, 7)
        x_recon = model.decode(btvae.reparameterise(mu, logvar))
        assert x_recon.shape == x.shape
        terms = btvae.btvae_loss(model, x, lam1=0.1, lam2=0.1)
        assert all(terms[name].shape == () for name in btvae.LOSS_TERMS)

    def test_encoder_blocks_halve_the_image_with_the_papers_widths(self):
        model = btvae.ConvVAE(3, 32)
        blocks = list(model.encoder)[:-1]
        assert isinstance(model.encoder[-1], torch.nn.Flatten) and len(blocks) == 5
        for block, (in_width, out_width) in zip(blocks, [(3, 16), (16, 32), (32, 64), (64, 128), (128, 256)]):
            conv, norm, activation = block
            assert type(conv) is torch.nn.Conv2d and (conv.in_channels, conv.out_channels) == (in_width, out_width)
            assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (2, 2), (1, 1))
            assert type(norm) is torch.nn.BatchNorm2d and type(activation) is torch.nn.LeakyReLU
        assert model.bottleneck_shape == (256, 1, 1)
        assert model.to_mu.in_features == model.to_logvar.in_features == 256

    def test_decoder_mirrors_the_encoder_and_ends_in_a_sigmoid(self):
        model = btvae.ConvVAE(3, 32)
        assert (model.from_latent.in_features, model.from_latent.out_features) == (128, 256)
        *blocks, last_conv, output = model.decoder
        for block, (in_width, out_width) in zip(blocks, [(256, 128), (128, 64), (64, 32), (32, 16), (16, 16)]):
            conv, norm, activation = block
            assert type(conv) is torch.nn.ConvTranspose2d and (conv.in_channels, conv.out_channels) == (in_width, out_width)
            assert (conv.kernel_size, conv.stride, conv.padding, conv.output_padding) == ((3, 3), (2, 2), (1, 1), (1, 1))
            assert type(norm) is torch.nn.BatchNorm2d and type(activation) is torch.nn.LeakyReLU
        assert (last_conv.in_channels, last_conv.out_channels, last_conv.kernel_size, last_conv.stride) == (16, 3, (3, 3), (1, 1))
        assert type(output) is torch.nn.Sigmoid  # the data's range [0, 1]

    def test_encode_returns_the_mean_head_then_the_log_variance_head(self):
        model, x = small_model_and_batch()
        model.eval()
        with torch.no_grad():
            model.to_mu.weight.zero_(), model.to_mu.bias.fill_(0.25)
            model.to_logvar.weight.zero_(), model.to_logvar.bias.fill_(-1.5)
        mu, logvar = model.encode(x)
        assert torch.all(mu == 0.25) and torch.all(logvar == -1.5)
        assert mu.dtype == logvar.dtype == torch.float32

    def test_decode_starts_from_the_smallest_feature_map_of_z(self):
        model, _ = small_model_and_batch()
        model.eval()
        z = torch.randn(4, 6)
        expected = model.decoder(model.from_latent(z).view(4, 16, 4, 4))
        assert torch.equal(model.decode(z), expected)

    def test_image_size_must_be_divisible_by_every_halving(self):
        assert btvae.bottleneck_side(32, 5) == 1 and btvae.bottleneck_side(64, 5) == 2 and btvae.bottleneck_side(24, 3) == 3
        with pytest.raises(ValueError, match="not divisible by 2\\^2 = 4"):
            btvae.ConvVAE(1, 30, (16, 32), latent_dim=4)


    # ---------------------------------------------------------------------------
    # 2. Reparameterisation
    # ---------------------------------------------------------------------------

    def test_reparameterisation_is_mu_plus_sigma_times_standard_normal_noise(self):
        mu, logvar = torch.tensor([[0.5, -2.0, 3.0]]), torch.tensor([[0.0, math.log(4), math.log(0.25)]])
        torch.manual_seed(0)
        z = btvae.reparameterise(mu, logvar)
        torch.manual_seed(0)
        eps = torch.randn(1, 3)
        assert torch.allclose(z, mu + torch.tensor([1.0, 2.0, 0.5]) * eps)  # sigma = exp(logvar / 2)

    def test_reparameterised_samples_follow_the_posterior(self):
        torch.manual_seed(1)
        mu, logvar = torch.full((200_000, 2), 1.5), torch.tensor([math.log(4), math.log(0.01)]).expand(200_000, 2)
        z = btvae.reparameterise(mu, logvar)
        assert torch.allclose(z.mean(0), torch.tensor([1.5, 1.5]), atol=0.01)
        assert torch.allclose(z.std(0), torch.tensor([2.0, 0.1]), rtol=0.01)
        assert abs(((z[:, 0] - 1.5) / 2).pow(4).mean() - 3) < 0.1  # Gaussian: kurtosis 3

    def test_gradients_flow_through_mu_and_sigma(self):
        mu, logvar = torch.zeros(1, 4, requires_grad=True), torch.zeros(1, 4, requires_grad=True)
        torch.manual_seed(2)
        btvae.reparameterise(mu, logvar).sum().backward()
        torch.manual_seed(2)
        eps = torch.randn(1, 4)
        assert torch.equal(mu.grad, torch.ones(1, 4)) and torch.allclose(logvar.grad, 0.5 * eps)


    # ---------------------------------------------------------------------------
    # 3. Objective: Eq. 2 (the VAE), Eq. 3 (Barlow Twins), Eq. 4 (BTVAE)
    # ---------------------------------------------------------------------------

    def test_kl_is_zero_for_the_prior_itself(self):
        assert btvae.kl_to_standard_normal(torch.zeros(4, 6), torch.zeros(4, 6)).item() == 0

    def test_kl_closed_form_on_known_values(self):
        # mu = 1, sigma = 1: 1/2 per dimension, summed over 5. mu = 0, sigma^2 = 4: 1/2 (4 - 1 - log 4) per dimension.
        assert btvae.kl_to_standard_normal(torch.ones(3, 5), torch.zeros(3, 5)).item() == pytest.approx(2.5)
        logvar = torch.full((3, 5), math.log(4))
        expected = 5 * 0.5 * (4 - 1 - math.log(4))
        assert btvae.kl_to_standard_normal(torch.zeros(3, 5), logvar).item() == pytest.approx(expected, rel=1e-6)
        mixed = torch.tensor([[1.0] * 5, [3.0] * 5])  # per image 2.5 and 22.5: the batch mean is 12.5
        assert btvae.kl_to_standard_normal(mixed, torch.zeros(2, 5)).item() == pytest.approx(12.5)

    def test_kl_matches_monte_carlo_estimate(self):
        torch.manual_seed(0)
        mu, logvar = torch.randn(2, 4) * 0.8, torch.randn(2, 4) * 0.5
        q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
        p = torch.distributions.Normal(torch.zeros(2, 4), torch.ones(2, 4))
        z = q.sample((400_000,))
        monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean()  # mean over samples and batch
        assert btvae.kl_to_standard_normal(mu, logvar).item() == pytest.approx(monte_carlo.item(), rel=0.02)

    def test_vae_loss_is_pixel_mean_squared_error_plus_lambda1_kl(self):
        torch.manual_seed(3)
        x, x_recon = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
        mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
        loss, recon, kl = btvae.vae_loss(x, x_recon, mu, logvar, lam1=0.3)
        assert recon.item() == pytest.approx(((x - x_recon) ** 2).mean().item(), rel=1e-6)
        assert kl.item() == pytest.approx(btvae.kl_to_standard_normal(mu, logvar).item())
        assert loss.item() == pytest.approx(recon.item() + 0.3 * kl.item(), rel=1e-6)

    def test_barlow_twins_is_symmetric(self):
        torch.manual_seed(1)
        a, b = torch.randn(32, 8), torch.randn(32, 8)
        assert btvae.barlow_twins_loss(a, b).item() == pytest.approx(btvae.barlow_twins_loss(b, a).item(), rel=1e-6)

    def test_barlow_twins_diagonal_term_vanishes_for_identical_inputs(self):
        torch.manual_seed(2)
        z = torch.randn(64, 10)
        loss_without_offdiagonal = btvae.barlow_twins_loss(z, z, delta=0).item()
        variance = z.var(0, unbiased=False)
        expected = ((1 - variance / (variance + btvae.BT_EPS)) ** 2).sum().item()  # C_ii = var / (var + eps)
        assert loss_without_offdiagonal == pytest.approx(expected, abs=1e-9)
        assert loss_without_offdiagonal < 1e-8
        # and for unrelated inputs the diagonal term is far from zero
        assert btvae.barlow_twins_loss(z, torch.randn(64, 10), delta=0).item() > 5

    def test_barlow_twins_is_invariant_to_shifting_and_scaling_features(self):
        torch.manual_seed(3)
        a, b = torch.randn(50, 6), torch.randn(50, 6) + 0.5 * torch.randn(50, 1)
        scale, shift = torch.rand(6) * 3 + 0.5, torch.randn(6) * 10
        original = btvae.barlow_twins_loss(a, b).item()
        assert btvae.barlow_twins_loss(a * scale + shift, b).item() == pytest.approx(original, rel=1e-4)
        assert btvae.barlow_twins_loss(a, b * scale.flip(0) - shift).item() == pytest.approx(original, rel=1e-4)

    def test_barlow_twins_off_diagonal_part_has_d_times_d_minus_one_terms(self):
        # Every feature a copy of one column: every C_ij is the same, var / (var + eps), on and off the diagonal.
        torch.manual_seed(4)
        dims = 9
        z = torch.randn(40, 1).repeat(1, dims)
        c = (z[:, 0].var(unbiased=False) / (z[:, 0].var(unbiased=False) + btvae.BT_EPS)).item()
        off_diagonal_only = btvae.barlow_twins_loss(z, z, delta=1).item() - btvae.barlow_twins_loss(z, z, 0).item()
        assert off_diagonal_only == pytest.approx(dims * (dims - 1) * c * c, rel=1e-5)

    def test_barlow_twins_equals_a_plain_double_loop_over_eq3(self):
        torch.manual_seed(5)
        n, d, delta = 16, 5, 0.37
        a, b = torch.randn(n, d).double(), torch.randn(n, d).double()

        def standardised(z, i):
            column = [z[k, i].item() for k in range(n)]
            mean = sum(column) / n
            variance = sum((v - mean) ** 2 for v in column) / n
            return [(v - mean) / math.sqrt(variance + 1e-5) for v in column]

        sa, sb = [standardised(a, i) for i in range(d)], [standardised(b, i) for i in range(d)]
        c = [[sum(sa[i][k] * sb[j][k] for k in range(n)) / n for j in range(d)] for i in range(d)]
        expected = sum((1 - c[i][i]) ** 2 for i in range(d)) + delta * sum(
            c[i][j] ** 2 for i in range(d) for j in range(d) if j != i)
        assert btvae.barlow_twins_loss(a, b, delta).item() == pytest.approx(expected, rel=1e-10)
        assert torch.allclose(btvae.cross_correlation(a, b), torch.tensor(c, dtype=torch.float64))

    def test_twins_compare_the_embeddings_bt_on_names(self):
        model, x = small_model_and_batch()
        model.eval()  # BatchNorm with running statistics: the encoder is then a fixed function of its input
        mu, logvar = model.encode(x)
        z = btvae.reparameterise(mu, logvar)
        x_recon = model.decode(z)
        mu_recon, logvar_recon = model.encode(x_recon)
        (a, b), = btvae.twins(model, mu, logvar, z, x_recon, "mu")
        assert a is mu and torch.equal(b, mu_recon)
        (a, b), = btvae.twins(model, mu, logvar, z, x_recon, "z")
        assert a is z
        spread = (b - mu_recon) / torch.exp(0.5 * logvar_recon)  # b is a sample of N(mu_recon, sigma_recon^2)
        assert spread.abs().max() < 6 and spread.std() > 0.5
        (a, b), (c, d) = btvae.twins(model, mu, logvar, z, x_recon, "mu+logvar")
        assert a is mu and torch.equal(b, mu_recon) and c is logvar and torch.equal(d, logvar_recon)

    @pytest.mark.parametrize("bt_on", ["mu", "z", "mu+logvar"])
    def test_objective_is_the_weighted_sum_of_its_parts(self, bt_on):
        model, x = small_model_and_batch()
        terms = btvae.btvae_loss(model, x, lam1=0.3, lam2=0.7, bt_on=bt_on, delta=0.01)
        assert terms["bt"].item() > 0
        assert terms["loss"].item() == pytest.approx(
            terms["recon"].item() + 0.3 * terms["kl"].item() + 0.7 * terms["bt"].item(), rel=1e-6)

    @pytest.mark.parametrize("bt_on", ["mu", "z", "mu+logvar"])
    def test_objective_decodes_a_sample_and_compares_its_twins(self, bt_on):
        model, x = small_model_and_batch()
        model.eval()
        torch.manual_seed(7)
        terms = btvae.btvae_loss(model, x, lam1=0.3, lam2=0.7, bt_on=bt_on, delta=0.01)
        torch.manual_seed(7)  # the same eps (and, for "z", the same draw for z_recon)
        mu, logvar = model.encode(x)
        z = btvae.reparameterise(mu, logvar)
        x_recon = model.decode(z)
        pairs = btvae.twins(model, mu, logvar, z, x_recon, bt_on)
        bt = sum(btvae.barlow_twins_loss(z_gt, z_recon, 0.01) for z_gt, z_recon in pairs)
        _, recon, kl = btvae.vae_loss(x, x_recon, mu, logvar, 0.3)
        assert (terms["recon"].item(), terms["kl"].item(), terms["bt"].item()) == (recon.item(), kl.item(), bt.item())

    def test_negative_lambda2_subtracts_the_barlow_twins_term(self):
        model, x = small_model_and_batch()
        terms = btvae.btvae_loss(model, x, lam1=0.3, lam2=-0.5)
        assert terms["bt"].item() > 0  # the paper's ablation still computes the term
        assert terms["loss"].item() == pytest.approx(
            terms["recon"].item() + 0.3 * terms["kl"].item() - 0.5 * terms["bt"].item(), rel=1e-6)

    def test_lam2_zero_is_exactly_the_vae_and_skips_the_re_encoding(self):
        model, x = small_model_and_batch()
        encoder_calls = []
        model.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
        torch.manual_seed(8)
        terms = btvae.btvae_loss(model, x, lam1=0.5, lam2=0)
        assert len(encoder_calls) == 1
        torch.manual_seed(8)
        mu, logvar = model.encode(x)
        vae_loss = torch.nn.functional.mse_loss(model.decode(btvae.reparameterise(mu, logvar)), x) \
            + 0.5 * btvae.kl_to_standard_normal(mu, logvar)
        assert terms["bt"].item() == 0
        assert terms["loss"].item() == vae_loss.item()

    def test_barlow_twins_gradient_reaches_both_encoder_passes_and_the_decoder(self):
        model, x = small_model_and_batch()
        mu, logvar = model.encode(x)
        z = btvae.reparameterise(mu, logvar)
        x_recon = model.decode(z)
        (z_gt, z_recon), = btvae.twins(model, mu, logvar, z, x_recon, "mu")
        z_gt_gradient, = torch.autograd.grad(btvae.barlow_twins_loss(z_gt, z_recon), z_gt, retain_graph=True)
        x_recon_gradient, = torch.autograd.grad(btvae.barlow_twins_loss(z_gt, z_recon), x_recon, retain_graph=True)
        assert z_gt_gradient.abs().sum() > 0 and x_recon_gradient.abs().sum() > 0  # neither twin is detached
        terms = btvae.btvae_loss(model, x, lam1=0, lam2=1)
        terms["bt"].backward()
        assert model.to_mu.weight.grad.abs().sum() > 0
        assert model.from_latent.weight.grad.abs().sum() > 0  # through x_recon, into the decoder


    # ---------------------------------------------------------------------------
    # 4. Training
    # ---------------------------------------------------------------------------

    def test_batches_are_full_the_last_incomplete_one_dropped(self):
        batches = btvae.batch_indices(10, 4)
        assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert [b.tolist() for b in btvae.batch_indices(3, 4)] == [[0, 1, 2]]  # smaller than a batch: one batch
        assert [b.tolist() for b in btvae.batch_indices(8, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]

    def test_batches_follow_the_shuffling_generator(self):
        shuffled = torch.cat(btvae.batch_indices(100, 10, torch.Generator().manual_seed(3)))
        assert shuffled.tolist() == torch.randperm(100, generator=torch.Generator().manual_seed(3)).tolist()
        generator = torch.Generator().manual_seed(3)
        first, second = (torch.cat(btvae.batch_indices(100, 10, generator)) for _ in range(2))
        assert not torch.equal(first, second)  # a new order every epoch

    def test_a_batch_is_the_indexed_images_scaled_to_the_unit_interval(self):
        images = torch.tensor([0, 51, 255, 102], dtype=torch.uint8).view(4, 1, 1, 1)
        batch = btvae.load_batch(images, torch.tensor([2, 1]), torch.device("cpu"))
        assert batch.dtype == torch.float32 and batch.flatten().tolist() == pytest.approx([1.0, 0.2])

    def test_a_training_epoch_is_one_adam_step_per_shuffled_batch(self):
        model, _ = small_model_and_batch()
        images, cfg = uint8_images(26), config("--batch-size", 8, "--lam1", 0.1, "--lam2", 0.2, "--delta", 0.3)
        replica = btvae.ConvVAE(1, 16, (8, 16), latent_dim=6)
        replica.load_state_dict(model.state_dict())
        optimiser = btvae.make_optimiser(model, cfg, torch.device("cpu"))
        torch.manual_seed(9)
        terms = btvae.run_epoch(model, images, cfg, torch.device("cpu"), optimiser, torch.Generator().manual_seed(4))

        torch.manual_seed(9)  # the same steps by hand: 3 full batches of 8 (2 images dropped), in the shuffled order
        replica_optimiser = btvae.make_optimiser(replica, cfg, torch.device("cpu"))
        replica.train()
        losses = []
        for index in torch.randperm(26, generator=torch.Generator().manual_seed(4))[:24].split(8):
            step = btvae.btvae_loss(replica, images[index].float() / 255, 0.1, 0.2, "mu", 0.3)
            replica_optimiser.zero_grad()
            step["loss"].backward()
            replica_optimiser.step()
            losses.append([step[name].item() for name in btvae.LOSS_TERMS])
        for name, value in model.state_dict().items():
            assert torch.equal(value, replica.state_dict()[name]), name
        for i, name in enumerate(btvae.LOSS_TERMS):
            assert terms[name] == pytest.approx(sum(row[i] for row in losses) / 3, rel=1e-5)

    def test_a_validation_pass_changes_nothing_and_reports_the_mean_terms(self, monkeypatch):
        model, _ = small_model_and_batch()
        model.train()
        images, cfg = uint8_images(20), config("--batch-size", 10, "--lam1", 0.1, "--lam2", 0.2)
        before = {name: value.clone() for name, value in model.state_dict().items()}
        grad_enabled, loss = [], btvae.btvae_loss

        def recording_loss(*args, **kwargs):
            grad_enabled.append(torch.is_grad_enabled())
            return loss(*args, **kwargs)
        monkeypatch.setattr(btvae, "btvae_loss", recording_loss)
        torch.manual_seed(10)
        terms = btvae.run_epoch(model, images, cfg, torch.device("cpu"))
        assert not model.training and grad_enabled == [False, False]  # evaluation mode, no graph
        assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())  # BatchNorm too
        torch.manual_seed(10)
        with torch.no_grad():
            expected = [loss(model, images[i:i + 10].float() / 255, 0.1, 0.2) for i in (0, 10)]
        for name in btvae.LOSS_TERMS:  # with training's lambda1 and lambda2
            assert terms[name] == pytest.approx((expected[0][name].item() + expected[1][name].item()) / 2, rel=1e-5)

    def test_adam_has_the_papers_learning_rate_and_no_weight_decay(self):
        model, _ = small_model_and_batch()
        optimiser = btvae.make_optimiser(model, config(), torch.device("cpu"))
        assert type(optimiser) is torch.optim.Adam
        group, = optimiser.param_groups
        assert group["lr"] == 0.005 and group["weight_decay"] == 0 and group["betas"] == (0.9, 0.999)
        assert len(group["params"]) == len(list(model.parameters()))

    def test_early_stopping_stops_after_patience_epochs_and_restores_the_best_weights(self, monkeypatch):
        # best at epoch 3; 3 epochs without improvement after (an equal loss is no improvement)
        model = scripted_epochs(monkeypatch, [5.0, 4.0, 3.0, 3.5, 3.0, 3.2, 2.0])
        cfg = config("--epochs", 50, "--patience", 3)
        training = btvae.train(model, NO_IMAGES, NO_IMAGES, cfg, torch.device("cpu"))
        assert training.epoch == 6 and training.finished and training.stopped_early
        assert training.stopper.best_epoch == 3 and training.stopper.best_loss == 3.0
        assert torch.all(model.to_mu.bias == 3)  # the weights after epoch 3, not epoch 6

    def test_patience_counts_epochs_since_the_last_improvement(self, monkeypatch):
        # epoch 2 does not improve, epoch 3 does: the count starts again there, and ends at epoch 6
        model = scripted_epochs(monkeypatch, [5.0, 5.5, 4.0, 4.5, 4.6, 4.7, 1.0])
        training = btvae.train(model, NO_IMAGES, NO_IMAGES, config("--patience", 3), torch.device("cpu"))
        assert training.epoch == 6 and training.stopper.best_epoch == 3 and torch.all(model.to_mu.bias == 3)

    def test_training_ends_after_epochs_without_early_stopping_with_the_best_weights(self, monkeypatch):
        model = scripted_epochs(monkeypatch, [5.0, 4.0, 4.5, 4.2])
        training = btvae.train(model, NO_IMAGES, NO_IMAGES, config("--epochs", 4, "--patience", 3), torch.device("cpu"))
        assert training.epoch == 4 and training.finished and not training.stopped_early
        assert torch.all(model.to_mu.bias == 2)

    def test_the_best_weights_are_restored_even_when_the_harness_stops_training(self, monkeypatch):
        model = scripted_epochs(monkeypatch, [5.0, 4.0, 4.5])

        def after_epoch(training, train_terms, val_terms):
            if training.epoch == 3:
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            btvae.train(model, NO_IMAGES, NO_IMAGES, config(), torch.device("cpu"), after_epoch=after_epoch)
        assert torch.all(model.to_mu.bias == 2)

    def test_training_continues_a_given_state_where_it_stopped(self, monkeypatch):
        model = scripted_epochs(monkeypatch, [5.0, 4.0])
        cfg = config("--epochs", 4)
        training = btvae.start_training(model, cfg, torch.device("cpu"))
        training.epoch = 2
        seen = []
        btvae.train(model, NO_IMAGES, NO_IMAGES, cfg, torch.device("cpu"), training,
                    after_epoch=lambda state, *terms: seen.append(state.epoch))
        assert seen == [3, 4]

    def test_the_shuffling_generator_starts_from_the_seed(self):
        model, _ = small_model_and_batch()
        training = btvae.start_training(model, config("--seed", 7), torch.device("cpu"))
        assert torch.equal(training.shuffle.get_state(), torch.Generator().manual_seed(7).get_state())
        assert training.stopper.patience == 5 and training.epoch == 0 and not training.finished

    def test_tiny_overfit_run_reduces_the_reconstruction_loss_tenfold(self):
        # 32 images, 300 full-batch epochs of the default BTVAE objective and a small model, through run_epoch.
        # Measured: the reconstruction MSE falls ~50x.
        torch.manual_seed(0)
        images = torch.from_numpy(blob_images(32, 1, 16, 16, seed=40))
        images[images < 100] = 0  # a clean background: the blobs are what there is to learn
        cfg = config("--batch-size", 32)
        model = btvae.ConvVAE(1, 16, (8, 16), latent_dim=16)
        optimiser = btvae.make_optimiser(model, cfg, torch.device("cpu"))
        recon = [btvae.run_epoch(model, images, cfg, torch.device("cpu"), optimiser)["recon"] for _ in range(300)]
        assert sum(recon[-5:]) < sum(recon[:5]) / 10, (recon[:5], recon[-5:])


    # ---------------------------------------------------------------------------
    # 5. Sampling
    # ---------------------------------------------------------------------------

    def test_generate_decodes_standard_normal_prior_samples_drawn_with_the_generator(self):
        model, _ = small_model_and_batch()
        decoded = []
        model.decode = lambda z: decoded.append(z) or z  # see the z that generate decodes
        btvae.generate(model, 20000, torch.Generator().manual_seed(2), torch.device("cpu"))
        prior = decoded[-1]
        assert prior.shape == (20000, 6)
        assert prior.mean(0).abs().max() < 0.05 and (prior.std(0) - 1).abs().max() < 0.05  # N(0, I)
        assert torch.corrcoef(prior.T)[~torch.eye(6, dtype=torch.bool)].abs().max() < 0.05
        assert torch.equal(prior, torch.randn(20000, 6, generator=torch.Generator().manual_seed(2)))

    def test_generate_and_reconstruct_use_the_model_in_evaluation_mode(self):
        model, x = small_model_and_batch()
        model.train()
        samples = btvae.generate(model, 5, torch.Generator().manual_seed(1), torch.device("cpu"))
        reconstructions = btvae.reconstruct(model.train(), x)
        model.eval()
        with torch.no_grad():
            assert torch.equal(samples, model.decode(torch.randn(5, 6, generator=torch.Generator().manual_seed(1))))
            assert torch.equal(reconstructions, model.decode(model.encode(x)[0]))  # the posterior mean, not a sample


# =============================================================================
# The experiments (btvae.py sections 6-8)
# =============================================================================

class TestMeasurements:
    """The data loaders on fabricated files in each data set's real format, FID with a stand-in feature
    network, and each latent-space metric on a case whose answer is known."""


    # ---------------------------------------------------------------------------
    # 6. Data loaders, on fabricated files, through the same load_data a run uses
    # ---------------------------------------------------------------------------

    def test_mnist_loader(self, tmp_path):
        make_mnist(tmp_path, train=200, test=60)
        train, val, test = btvae.load_data(config("--dataset", "mnist", "--data-dir", tmp_path))
        assert (len(train), len(val), len(test)) == (180, 20, 60)  # a tenth held out when under 50,000 images
        for split in (train, val, test):
            assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 32, 32)
        source = torch.from_numpy(blob_images(60, 1, 28, 28, seed=2))
        assert torch.equal(test.images[:, :, 2:30, 2:30], source)  # padded by 2, pixels untouched
        assert test.images[:, :, :2].max() == 0
        assert torch.equal(test.labels, torch.arange(60) % 10)
        # the validation images are part of the training file, and not in the training split
        all_train = torch.from_numpy(blob_images(200, 1, 28, 28, seed=1))
        train_rows = {bytes(im[0, 2:30, 2:30].flatten().tolist()) for im in train.images}
        val_rows = {bytes(im[0, 2:30, 2:30].flatten().tolist()) for im in val.images}
        assert not train_rows & val_rows and len(train_rows | val_rows) == len({bytes(im.flatten().tolist()) for im in all_train})

    def test_holdout_is_the_same_whatever_the_seed_and_subset_takes_the_first_images(self, tmp_path):
        make_mnist(tmp_path)
        _, val_a, _ = btvae.load_data(config("--dataset", "mnist", "--data-dir", tmp_path, "--seed", 1))
        train_b, val_b, _ = btvae.load_data(config("--dataset", "mnist", "--data-dir", tmp_path, "--seed", 2))
        assert torch.equal(val_a.images, val_b.images)
        subset, _, _ = btvae.load_data(config("--dataset", "mnist", "--data-dir", tmp_path, "--subset", 50))
        assert torch.equal(subset.images, train_b.images[:50])

    def test_mnist_loader_resizes_to_another_image_size(self, tmp_path):
        make_mnist(tmp_path)
        train, _, _ = btvae.load_data(config("--dataset", "mnist", "--data-dir", tmp_path, "--image-size", 64))
        assert train.images.shape[1:] == (1, 64, 64)

    def test_cifar10_loader(self, tmp_path):
        make_cifar10(tmp_path, per_batch=20, test=30)
        train, val, test = btvae.load_data(config("--dataset", "cifar10", "--data-dir", tmp_path))
        assert (len(train), len(val), len(test)) == (90, 10, 30)
        assert test.images.shape[1:] == (3, 32, 32) and test.images.dtype == torch.uint8
        assert [test.images[0, c].unique().item() for c in range(3)] == [0, 100, 200]  # R, G, B planes in order
        assert torch.equal(test.labels, torch.arange(30) % 10)

    def test_corrupt_cifar10_file_is_a_usage_error(self, tmp_path):
        make_cifar10(tmp_path)
        (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04truncated")
        with pytest.raises(btvae.UsageError, match="test_batch.*truncated or corrupt"):
            btvae.load_data(config("--dataset", "cifar10", "--data-dir", tmp_path))

    def test_celeba_loader_uses_the_official_split_and_caches_decoded_images(self, tmp_path):
        make_celeba(tmp_path, counts=(24, 6, 8))
        cfg = config("--dataset", "celeba", "--data-dir", tmp_path)
        train, val, test = btvae.load_data(cfg)
        assert (len(train), len(val), len(test)) == (24, 6, 8)
        assert train.images.shape[1:] == (3, 64, 64) and train.images.dtype == torch.uint8
        assert sorted(p.name for p in (tmp_path / "btvae_cache").iterdir()) == [
            "celeba_test_64px.pt", "celeba_train_64px.pt", "celeba_valid_64px.pt"]
        for jpeg in (tmp_path / "celeba" / "img_align_celeba").iterdir():
            jpeg.unlink()  # a second load must not decode the JPEGs again
        again = btvae.load_data(cfg)
        assert all(torch.equal(a.images, b.images) for a, b in zip((train, val, test), again))

    def test_celeba_crop_keeps_the_centre_148_pixels(self, tmp_path):
        make_celeba(tmp_path, counts=(2, 1, 1))
        image = torch.zeros(3, 218, 178, dtype=torch.uint8)
        image[:, 35:183, 15:163] = 255  # exactly the central 148 x 148 square is white
        save(image.numpy(), tmp_path / "celeba" / "img_align_celeba" / "000001.jpg", format="PNG")
        train, _, _ = btvae.load_data(config("--dataset", "celeba", "--data-dir", tmp_path))
        assert train.images[0].float().mean() > 250

    def test_folder_loader(self, tmp_path):
        make_folder(tmp_path / "images", count=30)
        train, val, test = btvae.load_data(config("--dataset", "folder", "--data-dir", tmp_path / "images", "--image-size", 32))
        assert (len(train), len(val), len(test)) == (24, 3, 3)
        for split in (train, val, test):
            assert split.images.shape[1:] == (3, 32, 32) and split.images.dtype == torch.uint8

    @pytest.mark.parametrize("dataset, download_class, expected", [
        ("mnist", torchvision.datasets.MNIST, "put MNIST/raw/train-images-idx3-ubyte, MNIST/raw/train-labels-idx1-ubyte"),
        ("cifar10", torchvision.datasets.CIFAR10, "put cifar-10-batches-py/data_batch_1"),
        ("celeba", torchvision.datasets.CelebA, "put celeba/img_align_celeba, celeba/list_eval_partition.txt there"),
    ])
    def test_failed_download_names_the_files_to_provide(self, dataset, download_class, expected, tmp_path, monkeypatch):
        def offline(self):
            raise RuntimeError("Error downloading the-file.gz:\nTried https://example.invalid, got: no network")
        monkeypatch.setattr(download_class, "download", offline)
        with pytest.raises(btvae.UsageError, match="downloading it failed") as error:
            btvae.load_data(config("--dataset", dataset, "--data-dir", tmp_path))
        assert expected in str(error.value) and "\n" not in str(error.value)

    def test_truncated_mnist_file_is_a_usage_error(self, tmp_path):
        make_mnist(tmp_path)
        images = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
        images.write_bytes(images.read_bytes()[:1000])
        with pytest.raises(btvae.UsageError, match="cannot read MNIST.*truncated or corrupt"):
            btvae.load_data(config("--dataset", "mnist", "--data-dir", tmp_path))

    def test_undecodable_image_in_a_folder_is_a_usage_error(self, tmp_path):
        make_folder(tmp_path)
        (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
        with pytest.raises(btvae.UsageError, match="cannot decode image .*broken.png"):
            btvae.load_data(config("--dataset", "folder", "--data-dir", tmp_path))


    # ---------------------------------------------------------------------------
    # 7. FID: the uint8 conversion, the Frechet distance, precision and recall, with a stand-in feature network
    # ---------------------------------------------------------------------------

    def test_fid_input_conversion_clamps_rounds_and_repeats_grayscale(self):
        images = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.7]).view(1, 1, 1, 5)
        converted = btvae.to_fid_input(images)
        assert converted.dtype == torch.uint8 and converted.shape == (1, 3, 1, 5)
        assert converted[0, :, 0].tolist() == [[0, 0, 128, 255, 255]] * 3  # no wrap-around below 0 or above 1
        rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
        assert torch.equal(btvae.to_fid_input(rgb), rgb)

    def test_inception_features_go_through_in_batches_of_converted_images_one_tensor_per_layer(self):
        images = torch.from_numpy(blob_images(120, 1, 16, 16, seed=53))  # grayscale: repeated to RGB on the way
        features = btvae.inception_features(StandInFeatures(2), replay(images), len(images), torch.device("cpu"))
        expected = StandInFeatures(2)(btvae.to_fid_input(images))
        assert [f.shape for f in features] == [(120, 6), (120, 12)]
        assert all(torch.allclose(ours, theirs) for ours, theirs in zip(features, expected))

    def test_frechet_distance_matches_torchmetrics(self):
        from torchmetrics.image.fid import FrechetInceptionDistance

        class TensorOut(torch.nn.Module):  # torchmetrics expects the features themselves, not a tuple
            num_features = StandInFeatures.num_features

            def forward(self, images):
                return StandInFeatures()(images)[0]

        real = torch.from_numpy(blob_images(150, 3, 16, 16, seed=54))
        fake = torch.from_numpy(blob_images(130, 3, 16, 16, seed=55)) // 2
        metric = FrechetInceptionDistance(feature=TensorOut())
        metric.update(real, real=True)
        metric.update(fake, real=False)
        ours = btvae.frechet_distance(features_of(real), features_of(fake))
        assert ours == pytest.approx(float(metric.compute()), rel=1e-6)

    def test_frechet_distance_of_one_dimensional_gaussians_is_mean_and_spread_difference(self):
        torch.manual_seed(9)
        a, b = torch.randn(500, 1) * 2 + 1, torch.randn(400, 1) * 0.5 - 3
        expected = (a.double().mean() - b.double().mean()) ** 2 + (a.double().std() - b.double().std()) ** 2
        assert btvae.frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9)
        assert abs(btvae.frechet_distance(a, a)) < 1e-9

    def test_precision_and_recall_equal_a_plain_loop_over_their_definition(self):
        torch.manual_seed(10)
        real, fake = torch.randn(40, 3), torch.randn(30, 3) * 0.6 + 1.5  # narrower and shifted: both below 1
        k = 3

        def radius(point, points):  # distance to the k-th nearest other point of the same set
            return sorted(float((point - other).norm()) for other in points)[k]  # [0] is the point itself

        def share_inside(points, centres):
            return sum(any(float((p - c).norm()) <= radius(c, centres) for c in centres) for p in points) / len(points)

        precision, recall = btvae.precision_recall(real, fake, neighbours=k)
        assert precision == pytest.approx(share_inside(fake, real)) and recall == pytest.approx(share_inside(real, fake))
        assert 0 < precision < 1 and 0 < recall < 1  # a case that tells the two apart

    def test_a_point_on_the_edge_of_a_ball_is_inside_it(self):
        # Each point four times: with k = 3 every ball has radius 0, and only a point at distance exactly 0 is inside.
        points = torch.randn(10, 3).repeat(4, 1)
        assert btvae.precision_recall(points, points) == (1.0, 1.0)
        assert btvae.precision_recall(points, points + 1e-3) == (0.0, 0.0)

    def test_fid_is_zero_for_identical_sets_and_grows_with_a_shift(self):
        real = torch.from_numpy(blob_images(200, 3, 16, 16, seed=50))
        identical, slightly, strongly = (btvae.frechet_distance(features_of(real), features_of(real, shift))
                                         for shift in (0, 0.05, 0.2))
        assert abs(identical) < 1e-6
        assert 0 < slightly < strongly
        assert btvae.precision_recall(features_of(real), features_of(real)) == (1.0, 1.0)

    def test_precision_and_recall_tell_unrealistic_from_undiverse(self):
        real = torch.from_numpy(blob_images(300, 3, 16, 16, seed=52))
        collapsed = real[:5].repeat(60, 1, 1, 1)  # realistic, but only 5 distinct images: no variety
        precision, recall = btvae.precision_recall(features_of(real), features_of(collapsed))
        assert precision == 1.0 and recall < 0.2
        precision, _ = btvae.precision_recall(features_of(real), features_of(real, 0.5))  # every pixel far off
        assert precision < 0.1

    def test_fid_measurer_caches_the_test_features_and_reuses_them(self, tmp_path, monkeypatch):
        monkeypatch.setattr(btvae, "make_fid_network", stand_in_network)
        test = btvae.Split(torch.from_numpy(blob_images(100, 1, 16, 16, seed=51)))
        cfg = config("--cache-dir", tmp_path / "cache", "--fid-samples", 100, "--image-size", 32, "--fid-2048")
        fake = lambda n: torch.rand(n, 1, 16, 16)  # noqa: E731
        torch.manual_seed(0)
        first = btvae.fid_measurer(test, cfg, torch.device("cpu"))(fake, "_x")
        assert set(first) == {"fid_x", "fid_2048_x", "precision_2048_x", "recall_2048_x", "fid_x_seconds"}
        cached = list((tmp_path / "cache").glob("inception_real_mnist_32px_n100_layers64+2048_default_*.pt"))
        assert len(cached) == 1 and [f.shape for f in torch.load(cached[0])] == [(100, 6), (100, 12)]
        torch.manual_seed(0)  # the same fake images; garbage test images, which a cache hit never looks at
        garbage = btvae.Split(torch.zeros_like(test.images))
        second = btvae.fid_measurer(garbage, cfg, torch.device("cpu"))(fake, "_x")
        assert {k: v for k, v in second.items() if k != "fid_x_seconds"} == \
            {k: v for k, v in first.items() if k != "fid_x_seconds"}

    def test_fid_measurer_measures_fid_64_in_the_first_layer_and_the_rest_in_the_2048_d_one(self, tmp_path, monkeypatch):
        monkeypatch.setattr(btvae, "make_fid_network", stand_in_network)
        real = torch.from_numpy(blob_images(120, 3, 16, 16, seed=56))
        fake = (torch.from_numpy(blob_images(120, 3, 16, 16, seed=57)).int() * 3 // 4).to(torch.uint8)  # a little dimmer
        cfg = config("--cache-dir", tmp_path, "--fid-samples", 120, "--image-size", 32, "--fid-2048")
        measured = btvae.fid_measurer(btvae.Split(real), cfg, torch.device("cpu"))(replay(fake), "")
        assert measured["fid"] == btvae.frechet_distance(features_of(real), features_of(fake))
        assert measured["fid_2048"] == btvae.frechet_distance(features_of(real, layer=1), features_of(fake, layer=1))
        precision, recall = btvae.precision_recall(features_of(real, layer=1), features_of(fake, layer=1))
        assert (measured["precision_2048"], measured["recall_2048"]) == (precision, recall)
        assert 0 < recall < precision < 1  # a case that tells the two apart, and this layer's answer from the first one's
        assert btvae.precision_recall(features_of(real), features_of(fake)) != (precision, recall)

    def test_fid_measurer_without_fid_2048_asks_for_the_64_d_layer_alone(self, tmp_path, monkeypatch):
        asked = []
        monkeypatch.setattr(btvae, "make_fid_network", lambda features, weights: asked.append(features) or StandInFeatures(1))
        real = torch.from_numpy(blob_images(60, 3, 16, 16, seed=58))
        cfg = config("--cache-dir", tmp_path, "--fid-samples", 60, "--image-size", 32)
        measured = btvae.fid_measurer(btvae.Split(real), cfg, torch.device("cpu"))(replay(real // 2), "_gmm")
        assert asked == [(64,)] and measured["fid_gmm"] > 0
        assert measured["fid_2048_gmm"] is measured["precision_2048_gmm"] is measured["recall_2048_gmm"] is None
        cfg.fid_2048 = True
        btvae.fid_measurer(btvae.Split(real), cfg, torch.device("cpu"))
        assert asked[1] == (64, 2048)

    def test_fid_without_reachable_weights_is_unavailable_not_a_crash(self, tmp_path, monkeypatch):
        import torch_fidelity.feature_extractor_inceptionv3 as inception

        def offline(*args, **kwargs):
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
        monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path))
        with pytest.raises(btvae.FIDUnavailable, match="--fid-weights"):
            btvae.make_fid_network((64,))


    # ---------------------------------------------------------------------------
    # 8. Latent space: each metric on a case whose answer is known
    # ---------------------------------------------------------------------------

    def test_active_units_count_dimensions_whose_mean_varies_more_than_the_threshold(self):
        torch.manual_seed(11)
        base = torch.randn(4000, 1)
        base = (base - base.mean()) / base.std()  # sample variance exactly 1
        variances = torch.tensor([0.0, 0.0099, 0.0101, 1.0, 25.0])
        mu = base * variances.sqrt() + torch.arange(5.0) * 10  # offsets do not count, only variation across images
        assert btvae.active_units(mu.var(dim=0)) == 3

    def test_unit_activity_counts_above_each_threshold_and_the_participation_ratio_by_hand(self):
        variances = torch.tensor([0.0, 0.0099, 0.01, 0.0101, 0.0499, 0.05, 0.0501, 0.0999, 0.1, 0.1001, 4.0])
        activity = btvae.unit_activity(variances)  # a variance at a threshold is not above it
        assert (activity["active_units"], activity["active_units_0.05"], activity["active_units_0.1"]) == (8, 5, 2)
        by_hand = sum(variances.tolist()) ** 2 / sum(v * v for v in variances.tolist())
        assert activity["participation_ratio"] == pytest.approx(by_hand, rel=1e-6)
        assert btvae.participation_ratio(torch.full((7,), 0.3)) == pytest.approx(7)  # equal spread: D
        assert btvae.participation_ratio(torch.tensor([2.0, 0, 0])) == pytest.approx(1)  # one holds it all
        assert btvae.participation_ratio(torch.tensor([3.0, 1.0])) == pytest.approx(1.6)  # 16 / 10

    def test_an_encoder_whose_mean_uses_k_of_d_dimensions_has_k_active_units(self):
        model, x = small_model_and_batch()
        k = 2
        with torch.no_grad():
            model.to_mu.weight[k:] = 0  # dimensions k.. ignore the image: their mean is the bias for every image
            model.to_mu.weight[:k] *= 100  # the first k vary well above the threshold
        images = btvae.to_uint8(torch.rand(64, 1, 16, 16))
        assert btvae.active_units(btvae.encode_split(model, images, torch.device("cpu")).var(dim=0)) == k

    def test_latent_correlation_is_near_zero_for_independent_and_near_one_for_duplicated_features(self):
        torch.manual_seed(12)
        independent = torch.randn(20000, 6)
        assert btvae.latent_correlation(independent) < 0.02
        duplicated = torch.randn(20000, 1).repeat(1, 6) * torch.tensor([1, -1, 2, -3, 0.5, 1])  # some anti-correlated
        assert btvae.latent_correlation(duplicated) > 0.999
        assert btvae.latent_correlation(torch.randn(100, 1)) is None  # no pairs in one dimension

    def test_latent_correlation_is_the_mean_absolute_off_diagonal_pearson_correlation(self):
        torch.manual_seed(13)
        mu = torch.randn(3000, 4) @ torch.randn(4, 4)  # correlated dimensions, some negatively
        pearson = np.corrcoef(mu.double().numpy(), rowvar=False)
        expected = np.abs(pearson[~np.eye(4, dtype=bool)]).mean()
        assert btvae.latent_correlation(mu) == pytest.approx(expected, rel=1e-4)  # eps = 1e-5 on unit-size variances

    def test_twin_correlation_is_one_for_identical_twins_and_averages_every_pair(self):
        torch.manual_seed(14)
        z = torch.randn(500, 4)
        assert btvae.twin_correlation([(z, z)]) == pytest.approx(1, abs=1e-4)
        assert btvae.twin_correlation([(z, z * torch.tensor([1, 1, -1, -1]))]) == pytest.approx(0, abs=1e-4)
        assert btvae.twin_correlation([(z, z), (z, -z)]) == pytest.approx(0, abs=1e-4)  # mean over both pairs' diagonals
        unrelated = btvae.twin_correlation([(z, torch.randn(500, 4))])
        assert abs(unrelated) < 0.15

    @pytest.mark.parametrize("bt_on", ["mu", "z", "mu+logvar"])
    def test_the_measured_twins_are_the_pairs_the_objective_compares(self, bt_on):
        model, _ = small_model_and_batch()
        images = btvae.to_uint8(torch.rand(30, 1, 16, 16))
        torch.manual_seed(15)
        mu, pairs = btvae.encode_split(model, images, torch.device("cpu"), bt_on)
        torch.manual_seed(15)
        x = btvae.to_model_range(images)
        with torch.no_grad():
            mu_expected, logvar = model.encode(x)
            z = btvae.reparameterise(mu_expected, logvar)
            expected = btvae.twins(model, mu_expected, logvar, z, model.decode(z), bt_on)
        assert torch.equal(mu, mu_expected) and len(pairs) == len(expected)
        for (a, b), (a_expected, b_expected) in zip(pairs, expected):
            assert torch.equal(a, a_expected) and torch.equal(b, b_expected)

    def test_linear_probe_reads_separable_labels_and_not_shuffled_ones(self):
        torch.manual_seed(16)
        labels = torch.arange(2000) % 10
        centres = torch.randn(10, 8) * 5
        features = centres[labels] + torch.randn(2000, 8)
        train, test = slice(0, 1500), slice(1500, 2000)
        assert btvae.probe_accuracy(features[train], labels[train], features[test], labels[test]) > 0.98
        shuffled = labels[torch.randperm(2000)]
        assert btvae.probe_accuracy(features[train], shuffled[train], features[test], shuffled[test]) < 0.2
        renamed = (labels + 1) % 10  # the test split names every cluster differently: a probe fitted on train misses all
        assert btvae.probe_accuracy(features[train], labels[train], features[test], renamed[test]) < 0.05
        assert btvae.probe_accuracy(features[train], None, features[test], None) is None  # no labels (CelebA)
        same = torch.zeros(1500, dtype=torch.long)
        assert btvae.probe_accuracy(features[train], same, features[test], labels[test]) is None  # one class

    def test_mixture_fitted_to_two_clusters_finds_their_means_weights_and_covariances(self):
        points, means, covariance = two_clusters()
        mixture = btvae.LatentMixture(points, seed=0, components=2)
        order = mixture.means[:, 0].argsort()
        assert torch.allclose(mixture.means[order].float(), means, atol=0.15)
        assert torch.allclose(mixture.weights[order].float(), torch.tensor([0.75, 0.25]), atol=0.03)
        for k in range(2):
            assert torch.allclose((mixture.cholesky[k] @ mixture.cholesky[k].T).float(), covariance, atol=0.2)

    def test_mixture_samples_follow_the_fitted_mixture(self):
        points, means, covariance = two_clusters()
        mixture = btvae.LatentMixture(points, seed=0, components=2)
        samples = mixture.sample(20000, torch.Generator().manual_seed(1))
        assert samples.dtype == torch.float32 and samples.shape == (20000, 2)
        right = samples[:, 0] > 0
        assert right.float().mean().item() == pytest.approx(0.25, abs=0.015)  # the weights pick the components
        for side, mean in ((~right, means[0]), (right, means[1])):
            assert torch.allclose(samples[side].mean(0), mean, atol=0.1)
            assert torch.allclose(torch.cov(samples[side].T), covariance, atol=0.15)  # L eps, not L^T eps
        again = mixture.sample(20000, torch.Generator().manual_seed(1))
        assert torch.equal(samples, again)  # seeded: runs stay deterministic

    def test_mixture_fit_is_deterministic_for_a_seed_and_caps_components_at_the_points(self):
        points, _, _ = two_clusters(400)
        first, second = btvae.LatentMixture(points, seed=3), btvae.LatentMixture(points, seed=3)
        assert len(first.weights) == btvae.MIXTURE_COMPONENTS and torch.equal(first.means, second.means)
        assert len(btvae.LatentMixture(points[:4], seed=0).weights) == 4

    def test_encode_split_encodes_every_image_in_evaluation_mode(self):
        model, _ = small_model_and_batch()
        model.train()  # as training leaves it
        images = btvae.to_uint8(torch.rand(1100, 1, 16, 16))  # three passes of ENCODE_BATCH
        mu = btvae.encode_split(model, images, torch.device("cpu"))
        model.eval()
        with torch.no_grad():
            expected = model.encode(btvae.to_model_range(images))[0]
        assert mu.shape == (1100, 6) and torch.allclose(mu, expected, atol=1e-6)

    def test_latent_measurements_are_of_the_test_images_and_the_figures_data(self):
        model, _ = small_model_and_batch()
        with torch.no_grad():
            model.to_mu.weight.mul_(100)  # means that vary across images, well above the active-unit threshold
        train = btvae.Split(torch.zeros(60, 1, 16, 16, dtype=torch.uint8), torch.arange(60) % 3)  # all alike
        test = btvae.Split(btvae.to_uint8(torch.rand(40, 1, 16, 16)), torch.arange(40) % 3)
        metrics, figures, train_mu = btvae.measure_latent_space(model, train, test, "mu", torch.device("cpu"))
        test_mu = btvae.encode_split(model, test.images, torch.device("cpu"))
        assert torch.equal(train_mu, btvae.encode_split(model, train.images, torch.device("cpu")))
        assert metrics["active_units"] == btvae.active_units(test_mu.var(dim=0)) > btvae.active_units(train_mu.var(dim=0)) == 0
        assert {k: metrics[k] for k in btvae.unit_activity(test_mu.var(dim=0))} == btvae.unit_activity(test_mu.var(dim=0))
        assert metrics["latent_correlation"] == btvae.latent_correlation(test_mu)
        assert metrics["probe_accuracy"] == btvae.probe_accuracy(train_mu, train.labels, test_mu, test.labels)
        assert -1 <= metrics["twin_correlation"] <= 1
        assert torch.equal(figures["mu_variance"], test_mu.var(dim=0))
        assert torch.equal(figures["mu_correlation"], btvae.cross_correlation(test_mu, test_mu))
        assert "test_mu" not in figures  # 6-d: not kept whole
        model2 = btvae.ConvVAE(1, 16, (8, 16), latent_dim=2)
        _, figures2, _ = btvae.measure_latent_space(model2, train, test, "mu", torch.device("cpu"))
        assert figures2["test_mu"].shape == (40, 2) and torch.equal(figures2["test_labels"], test.labels)

    def test_generate_decodes_mixture_samples_drawn_with_the_generator(self):
        model, _ = small_model_and_batch()
        decoded = []
        model.decode = lambda z: decoded.append(z) or z  # see the z that generate decodes
        points, _, _ = two_clusters()
        mixture = btvae.LatentMixture(torch.cat([points, points, points], dim=1), seed=0, components=2)
        btvae.generate(model, 50, torch.Generator().manual_seed(3), torch.device("cpu"), mixture)
        assert torch.equal(decoded[-1], mixture.sample(50, torch.Generator().manual_seed(3)))


# =============================================================================
# The harness: the command line end to end, bad input, checkpoints and --resume, --evaluate, speed settings,
# and tools/report.py and run_all.sh on fabricated runs
# =============================================================================


# ---------------------------------------------------------------------------
# The command line, end to end, on fabricated data
# ---------------------------------------------------------------------------

MEASURED_OUTPUTS = {"config.json", "metrics.json", "samples.png", "samples_gmm.png", "reconstructions.png", "latent.pt"}


EXPECTED_OUTPUTS = MEASURED_OUTPUTS | {"history.csv", "model.pt", "checkpoint.pt"}


MEASUREMENTS = {"fid", "fid_2048", "precision_2048", "recall_2048", "fid_seconds", "fid_samples", "active_units",
                "active_units_0.05", "active_units_0.1", "participation_ratio",
                "latent_correlation", "twin_correlation", "probe_accuracy", "pixel_probe_accuracy", "latent_seconds",
                "mixture_fit_seconds", "fid_gmm", "fid_2048_gmm", "precision_2048_gmm", "recall_2048_gmm",
                "fid_gmm_seconds"}


TRAINING_SUMMARY = {"best_val_loss", "best_epoch", "epochs_trained", "stopped_early", "train_seconds",
                    "images_per_second", "rate", "reconstruction_error"}


EXPECTED_METRICS = MEASUREMENTS | TRAINING_SUMMARY


def run_cli(*argv, cwd=HERE):
    return subprocess.run([sys.executable, str(HERE / "btvae.py"), *map(str, argv)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_command_line_end_to_end(tmp_path, monkeypatch):
    make_mnist(tmp_path / "data")
    for name in btvae.CPU_KERNEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")  # oneDNN's default (the CPU's best kernels), named
    result = run_cli("--dataset", "mnist", "--epochs", "2", "--fid-samples", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs" / "mnist_lam2=0.025_seed0"  # the default --out
    assert {p.name for p in out.iterdir()} == EXPECTED_OUTPUTS
    metrics = json.loads((out / "metrics.json").read_text())
    assert EXPECTED_METRICS == set(metrics) and metrics["fid"] is None and metrics["epochs_trained"] == 2
    assert metrics["images_per_second"] > 0 and math.isfinite(metrics["best_val_loss"])
    settings = json.loads((out / "config.json").read_text())
    assert settings["lam2"] == 0.025 and settings["versions"]["torch"] == torch.__version__
    assert settings["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # e.g. AVX2 or AVX512
    assert settings["cpu_kernel_variables"] == {"ONEDNN_MAX_CPU_ISA": "ALL"}  # and only those that are set
    assert len((out / "history.csv").read_text().splitlines()) == 3
    assert "epoch   2/2" in result.stdout


def test_a_run_records_the_versions_the_libraries_themselves_report():
    import platform
    import sklearn
    import torch_fidelity
    assert btvae.library_versions() == {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "torch_fidelity": torch_fidelity.__version__, "scikit_learn": sklearn.__version__}


def test_run_with_fid_and_a_reloadable_model(tmp_path, monkeypatch, capsys):
    make_mnist(tmp_path)
    monkeypatch.setattr(btvae, "make_fid_network", stand_in_network)
    out = tmp_path / "run"
    btvae.main(["--data-dir", str(tmp_path), "--lam2", "0", "--epochs", "2", "--fid-samples", "40", "--out", str(out),
                "--precision", "bf16", "--fid-2048"])
    assert json.loads((out / "config.json").read_text())["mixed_precision_bf16"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert EXPECTED_METRICS == set(metrics)
    assert math.isfinite(metrics["fid"]) and metrics["fid"] > 0 and metrics["fid_seconds"] >= 0
    assert math.isfinite(metrics["fid_2048_gmm"]) and metrics["fid_2048_gmm"] != metrics["fid_gmm"]
    assert all(0 <= metrics[f"{name}_2048{sampler}"] <= 1 for name in ("precision", "recall") for sampler in ("", "_gmm"))
    logged = capsys.readouterr().out
    for sampler, named in (("", ""), ("_gmm", " of the mixture sampler")):
        assert (f"FID-64{named} over 40 samples: {metrics[f'fid{sampler}']:.4f}; in 2048-d features FID "
                f"{metrics[f'fid_2048{sampler}']:.2f}, precision {metrics[f'precision_2048{sampler}']:.3f}, "
                f"recall {metrics[f'recall_2048{sampler}']:.3f} ({metrics[f'fid{sampler}_seconds']:.0f} s)") in logged
    assert any((tmp_path / "btvae_cache").glob("inception_real_mnist_32px_n40_layers64+2048_*.pt"))
    history = [line.split(",") for line in (out / "history.csv").read_text().splitlines()]
    val_losses = [float(row[history[0].index("val_loss")]) for row in history[1:]]
    assert metrics["best_epoch"] == 1 + val_losses.index(min(val_losses))
    model = btvae.load_model(out / "model.pt")
    assert model.architecture == {"channels": 1, "image_size": 32, "hidden_dims": (16, 32, 64, 128, 256), "latent_dim": 128}


def test_run_finishes_with_fid_null_when_the_fid_network_is_unavailable(tmp_path, monkeypatch, capsys):
    make_mnist(tmp_path)

    def unavailable(features, weights):
        raise btvae.FIDUnavailable("no network; pass --fid-weights with a local copy")
    monkeypatch.setattr(btvae, "make_fid_network", unavailable)
    btvae.main(["--data-dir", str(tmp_path), "--epochs", "1", "--fid-samples", "20", "--out", str(tmp_path / "run")])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["fid"] is None
    lines = [line for line in capsys.readouterr().out.splitlines() if "FID" in line]
    assert len(lines) == 1 and "null" in lines[0]


def test_nan_loss_stops_the_run_and_keeps_the_best_weights(tmp_path, monkeypatch, capsys):
    make_mnist(tmp_path)
    real_kl, calls = btvae.kl_to_standard_normal, []

    def kl_that_breaks_in_epoch_two(mu, logvar):  # 3 training + 1 validation batches per epoch
        calls.append(1)
        return real_kl(mu, logvar) * (math.nan if len(calls) > 4 else 1)
    monkeypatch.setattr(btvae, "kl_to_standard_normal", kl_that_breaks_in_epoch_two)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        btvae.main(["--data-dir", str(tmp_path), "--epochs", "5", "--batch-size", "60", "--out", str(out)])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "NaN" in error and "epoch 2" in error and len(error.strip().splitlines()) == 1
    assert {p.name for p in out.iterdir()} == {"config.json", "history.csv", "model.pt", "checkpoint.pt"}
    assert len(torch.load(out / "checkpoint.pt", weights_only=True)["history"]) == 1  # epoch 1, before the NaN
    model = btvae.load_model(out / "model.pt")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


# ---------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written
# ---------------------------------------------------------------------------

BAD_INPUT = {
    "unknown dataset": (["--dataset", "imagenet"], "invalid choice"),
    "unknown precision": (["--precision", "fp16"], "invalid choice"),
    "lam2 not a number": (["--lam2", "abc"], "argument --lam2: must be a finite number"),
    "lam2 nan": (["--lam2", "nan"], "argument --lam2: must be a finite number"),
    "lam2 infinite": (["--lam2=-inf"], "argument --lam2: must be a finite number"),
    "zero epochs": (["--epochs", "0"], "argument --epochs: must be at least 1"),
    "negative epochs": (["--epochs", "-3"], "argument --epochs: must be at least 1"),
    "zero batch size": (["--batch-size", "0"], "argument --batch-size: must be at least 2"),
    "zero latent size": (["--latent-dim", "0"], "argument --latent-dim: must be at least 1"),
    "negative fid samples": (["--fid-samples", "-1"], "argument --fid-samples: must be at least 0"),
    "one fid sample": (["--fid-samples", "1"], "argument --fid-samples: must be 0 (skip FID) or at least 2"),
    "image size not divisible": (["--image-size", "48"], "not divisible by 2^5 = 32"),
    "bad hidden dims": (["--hidden-dims", "16,x"], "argument --hidden-dims: must be comma-separated"),
    "missing folder": (["--dataset", "folder", "--data-dir", "{tmp}/nowhere"], "is not a folder"),
    "empty folder": (["--dataset", "folder", "--data-dir", "{tmp}/empty"], "has no images"),
    "unreadable fid weights": (["--fid-weights", "{tmp}/garbage.pth"], "cannot be read as PyTorch weights"),
    "missing fid weights": (["--fid-weights", "{tmp}/missing.pth"], "cannot be read as PyTorch weights"),
    "out is a file": (["--out", "{tmp}/garbage.pth"], "--out {tmp}/garbage.pth is a file; name a folder"),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    argv, expected = BAD_INPUT[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.pth").write_bytes(b"these are not weights")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        btvae.main(["--out", str(out)] + [a.format(tmp=tmp_path) for a in argv])  # a later --out wins
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.replace(str(tmp_path), "{tmp}")
    assert len(error.strip().splitlines()) == 1 and error.startswith("btvae.py: error: ")
    assert expected in error
    assert not out.exists()


def test_negative_lam2_is_accepted_for_the_ablation():
    assert config("--lam2", "-0.00025").lam2 == -0.00025


def test_bad_input_from_the_real_command_line_has_no_traceback(tmp_path):
    result = run_cli("--lam2", "nan", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "btvae.py: error: argument --lam2: must be a finite number, got 'nan' (see --help)"]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Checkpoints, interruption and --resume
# ---------------------------------------------------------------------------

def test_each_epochs_records_are_written_as_it_ends(tmp_path, monkeypatch):
    model = scripted_epochs(monkeypatch, [5.0, 4.0, 3.0, 3.5, 3.0, 3.2, 2.0])
    cfg = config("--epochs", 50, "--patience", 3, "--out", tmp_path)
    split = btvae.Split(NO_IMAGES)
    summary = btvae.train_and_record(model, split, split, cfg, torch.device("cpu"), log=lambda _: None)
    assert summary["epochs_trained"] == 6 and summary["stopped_early"]
    assert summary["best_epoch"] == 3 and summary["best_val_loss"] == 3.0
    assert summary["rate"] == 30.0 and summary["reconstruction_error"] == 0.3  # the kept epoch's, not the last's
    assert torch.all(btvae.load_model(tmp_path / "model.pt").to_mu.bias == 3)
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 1 + 6
    assert len(btvae.read_checkpoint(tmp_path / "checkpoint.pt", cfg).history) == 6


TIMINGS = {"train_seconds", "train_loop_seconds", "images_per_second", "fid_seconds", "fid_gmm_seconds", "latent_seconds",
           "mixture_fit_seconds", "elapsed_seconds"}


# What the harness's tests check (stops, resume, the files) does not depend on the model's size: a run of this
# small one takes 1.0 s in-process, the default's 2.5 s
SMALL_MODEL = ["--hidden-dims", "16,32", "--latent-dim", "16"]
RUN_ARGS = ["--epochs", "4", "--patience", "10", "--fid-samples", "40", "--batch-size", "60",  # 3 + 1 batches an epoch
            *SMALL_MODEL]


def run_result(out):
    """What must not depend on interruptions or on running twice: all but the timings, bit for bit."""
    metrics = {k: v for k, v in json.loads((out / "metrics.json").read_text()).items() if k not in TIMINGS}
    history = [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(open(out / "history.csv"))]
    weights = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    return metrics, history, weights, (out / "samples.png").read_bytes()


def assert_same_result(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3]
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


@pytest.fixture
def mnist_with_stand_in_fid(tmp_path, monkeypatch):
    make_mnist(tmp_path / "data")
    monkeypatch.setattr(btvae, "make_fid_network", stand_in_network)
    return ["--data-dir", str(tmp_path / "data"), *RUN_ARGS]


def signal_during_loss_call(monkeypatch, call, signals=1):
    """Send ourselves SIGINT (a real Ctrl-C) inside the given call of the loss, i.e. during a training step.

    Returns the real loss function, to put back.
    """
    real_loss, calls = btvae.btvae_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(btvae, "btvae_loss", loss)
    return real_loss


def test_same_command_twice_gives_the_same_result(tmp_path, mnist_with_stand_in_fid):
    btvae.main([*mnist_with_stand_in_fid, "--out", str(tmp_path / "first")])
    btvae.main([*mnist_with_stand_in_fid, "--out", str(tmp_path / "second")])
    assert_same_result(run_result(tmp_path / "first"), run_result(tmp_path / "second"))


def test_ctrl_c_in_training_then_in_the_measurements_and_resume_ends_bit_for_bit_like_an_uninterrupted_run(
        tmp_path, monkeypatch, capsys, mnist_with_stand_in_fid):
    btvae.main([*mnist_with_stand_in_fid, "--out", str(tmp_path / "straight")])
    out = tmp_path / "interrupted"
    real_loss = signal_during_loss_call(monkeypatch, call=2 * 4 + 2)  # the second training step of epoch 3
    with pytest.raises(SystemExit) as exit_info:
        btvae.main([*mnist_with_stand_in_fid, "--out", str(out)])
    assert exit_info.value.code == 130
    error = capsys.readouterr().err
    assert "stopping after this step" in error and f"--out {out} --resume" in error
    assert not (out / "metrics.json").exists()
    assert len(torch.load(out / "checkpoint.pt", weights_only=True)["history"]) == 2  # epoch 3 was abandoned

    monkeypatch.setattr(btvae, "btvae_loss", real_loss)
    real_mixture, real_features = btvae.LatentMixture, btvae.inception_features

    def ctrl_c_after_the_priors_fid(*args):  # the mixture is fitted after the prior's FID and the latent metrics
        raise KeyboardInterrupt
    monkeypatch.setattr(btvae, "LatentMixture", ctrl_c_after_the_priors_fid)
    with pytest.raises(SystemExit) as exit_info:
        btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--resume"])
    assert exit_info.value.code == 130
    output = capsys.readouterr()
    assert "resuming after epoch 2" in output.out
    assert "the last checkpointed epoch and the FIDs measured so far is in" in output.err
    assert (out / btvae.MEASURED_SO_FAR).is_file() and not (out / "metrics.json").exists()

    monkeypatch.setattr(btvae, "LatentMixture", real_mixture)
    measured = []

    def features(network, make_batch, count, device, description="FID"):
        measured.append(description)
        return real_features(network, make_batch, count, device, description)
    monkeypatch.setattr(btvae, "inception_features", features)
    btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--resume"])
    assert measured == ["FID, samples"]  # the mixture's samples only: the prior's FID was kept
    output = capsys.readouterr()
    assert "resuming after epoch 4 (training had finished)" in output.out
    assert "measured before the run was stopped" in output.out
    assert_same_result(run_result(out), run_result(tmp_path / "straight"))
    assert not (out / btvae.MEASURED_SO_FAR).exists()  # metrics.json holds the FIDs now


def test_second_ctrl_c_stops_at_once_and_the_checkpoint_stays_usable(tmp_path, monkeypatch, capsys,
                                                                     mnist_with_stand_in_fid):
    out = tmp_path / "run"
    signal_during_loss_call(monkeypatch, call=4 + 2, signals=2)
    with pytest.raises(SystemExit) as exit_info:
        btvae.main([*mnist_with_stand_in_fid, "--out", str(out)])
    assert exit_info.value.code == 130 and "To continue" in capsys.readouterr().err
    cfg = config(*mnist_with_stand_in_fid, "--out", out, "--resume")
    assert len(btvae.read_checkpoint(out / "checkpoint.pt", cfg).history) == 1


def test_a_kill_while_the_checkpoint_is_written_leaves_the_previous_one(tmp_path, monkeypatch,
                                                                        mnist_with_stand_in_fid):
    write_bytes, writes = Path.write_bytes, []

    def killed_during_the_second_checkpoint(self, data):
        if self.name.startswith(".checkpoint.pt."):
            writes.append(1)
            if len(writes) == 2:
                write_bytes(self, data[:100])  # half a checkpoint, then Ctrl-C
                raise KeyboardInterrupt
        return write_bytes(self, data)
    monkeypatch.setattr(Path, "write_bytes", killed_during_the_second_checkpoint)
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        btvae.main([*mnist_with_stand_in_fid, "--out", str(out)])
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    checkpoint = btvae.read_checkpoint(out / "checkpoint.pt", config(*mnist_with_stand_in_fid, "--out", out))
    assert len(checkpoint.history) == 1
    btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--resume"])
    assert (out / "metrics.json").is_file()


def test_a_real_sigterm_to_a_running_process_then_resume(tmp_path, capsys):
    make_mnist(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["--data-dir", str(tmp_path / "data"), "--patience", "30", "--fid-samples", "0", "--out", str(out)]
    process = subprocess.Popen([sys.executable, str(HERE / "btvae.py"), *argv, "--epochs", "8"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 143, error  # 128 + SIGTERM, as a shell reports it
    assert "To continue:" in error and "--resume" in error
    epochs_done = len(torch.load(out / "checkpoint.pt", weights_only=True)["history"])
    assert 1 <= epochs_done < 8
    with pytest.raises(SystemExit) as exit_info:  # other settings are refused...
        btvae.main([*argv, "--epochs", "40", "--resume"])
    assert exit_info.value.code == 2 and "--epochs 8 (now 40)" in capsys.readouterr().err
    btvae.main([*argv, "--epochs", "8", "--resume"])  # ...the same ones continue
    assert f"resuming after epoch {epochs_done}" in capsys.readouterr().out and (out / "metrics.json").is_file()


# ---------------------------------------------------------------------------
# Faults a user meets: two runs into one folder, a full disk, a stop in any phase
# ---------------------------------------------------------------------------

NO_FILE_LOCKS = pytest.mark.skipif(btvae.fcntl is None, reason="no flock on this system (Windows)")


@NO_FILE_LOCKS
def test_a_second_run_into_a_folder_in_use_is_refused_before_it_writes_anything(tmp_path, capsys):
    make_mnist(tmp_path / "data")
    out = tmp_path / "run"
    command = [sys.executable, str(HERE / "btvae.py"), "--data-dir", str(tmp_path / "data"), "--fid-samples", "0",
               "--epochs", "40", "--patience", "40", "--out", str(out), *SMALL_MODEL]
    first = subprocess.Popen([*command, "--lam2", "0.025"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        config_written = (out / "config.json").read_text()
        holder = f" (process {first.pid})" if sys.platform == "linux" else ""  # /proc/locks names it
        refusal = f"btvae.py: error: {out} is in use by another run{holder}; wait for it to end, or choose another --out"
        for other in (["--lam2", "0"], ["--lam2", "0.025", "--resume"]):  # --resume too, before it reads the checkpoint
            with pytest.raises(SystemExit) as exit_info:
                btvae.main([*command[2:], *other])
            assert exit_info.value.code == 75 and capsys.readouterr().err.strip() == refusal
        assert (out / "config.json").read_text() == config_written  # still the first run's settings alone
        assert first.poll() is None  # and the first run goes on
    finally:
        first.kill()  # SIGKILL: no handler runs, and the operating system releases the lock all the same
        first.communicate(timeout=60)
    lock = btvae.lock_folder(out)
    assert lock is not None
    btvae.release(lock)


def test_a_folder_made_for_a_run_refused_on_bad_input_is_removed_again(tmp_path, capsys):
    out = tmp_path / "runs" / "new"
    with pytest.raises(SystemExit):
        btvae.main(["--data-dir", str(tmp_path / "no data"), "--out", str(out)])
    assert "error:" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def failing_write(monkeypatch, name, when=1):
    """Make the `when`-th write of the file `name` fail as a full disk does: half the bytes reach the
    temporary file, then the operating system says No space left on device."""
    write_bytes, calls = Path.write_bytes, []

    def write(self, data):
        if self.name.startswith(f".{name}.") and self.name.endswith(".tmp"):
            calls.append(self)
            if len(calls) == when:
                write_bytes(self, data[:len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_bytes(self, data)
    monkeypatch.setattr(Path, "write_bytes", write)


@pytest.mark.parametrize("name, when", [("checkpoint.pt", 2), ("model.pt", 2), ("history.csv", 3),
                                        ("samples.png", 1), ("measured_so_far.pt", 2), ("metrics.json", 1)])
def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_resume_finishes(name, when, tmp_path, monkeypatch,
                                                                               capsys, mnist_with_stand_in_fid):
    out = tmp_path / "run"
    argv = [*mnist_with_stand_in_fid, "--out", str(out)]
    with monkeypatch.context() as disk:
        failing_write(disk, name, when)
        with pytest.raises(SystemExit) as exit_info:
            btvae.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(error.strip().splitlines()) == 1
    assert f"btvae.py: stopped: could not write {out / name} (No space left on device)" in error
    assert "To continue: " in error and "--resume" in error
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written file left
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)  # the last complete one, readable
    assert btvae.load_model(out / "model.pt") is not None
    during_training = name in ("checkpoint.pt", "model.pt", "history.csv")
    assert (len(checkpoint["history"]) < 4) == during_training  # the last epoch that was written whole
    btvae.main([*argv, "--resume"])  # space freed: the run finishes
    assert json.loads((out / "metrics.json").read_text())["epochs_trained"] == 4


def test_a_failed_cache_write_is_a_note_whatever_torch_save_raises(tmp_path, monkeypatch, capsys):
    def unexpected_pos(obj, file):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4000")
    monkeypatch.setattr(torch, "save", unexpected_pos)
    btvae.save_to_cache(torch.zeros(3), tmp_path / "cache" / "features.pt")
    assert "note: could not cache features.pt" in capsys.readouterr().out
    assert not list((tmp_path / "cache").iterdir())


PAUSE_IN = """
import sys, time
from pathlib import Path
import btvae
marker, name, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
original = getattr(btvae, name)

def paused(*args, **kwargs):  # a phase of the run that takes a while: the signal arrives during it
    marker.touch()
    time.sleep(120)
    return original(*args, **kwargs)
setattr(btvae, name, paused)
btvae.main(argv)
"""


def sigterm_during(function, argv, tmp_path):
    """Run btvae.main(argv) in a real process, send it SIGTERM while it is inside btvae.<function>, and
    return (exit status, stderr)."""
    marker = tmp_path / "inside"
    process = subprocess.Popen([sys.executable, "-c", PAUSE_IN, str(marker), function, *argv], cwd=HERE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, error = process.communicate(timeout=120)
    return process.returncode, error


def test_sigterm_while_loading_data_is_one_line_and_exit_143(tmp_path):
    make_mnist(tmp_path / "data")
    status, error = sigterm_during("load_data", ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")],
                                   tmp_path)
    assert status == 143 and error.strip().splitlines() == [
        "btvae.py: interrupted; no epoch was checkpointed, so there is nothing to resume"]


def test_sigterm_during_the_measurements_keeps_the_training_and_resume_finishes(tmp_path, capsys):
    make_mnist(tmp_path / "data")
    argv = ["--data-dir", str(tmp_path / "data"), "--epochs", "2", "--fid-samples", "0", "--out", str(tmp_path / "run"),
            *SMALL_MODEL]
    status, error = sigterm_during("measure_latent_space", argv, tmp_path)
    assert status == 143 and len(error.strip().splitlines()) == 1, error
    assert error.startswith(f"btvae.py: interrupted; everything up to the last checkpointed epoch is in {tmp_path / 'run'}")
    assert error.strip().endswith(shlex.join(["python", "btvae.py", *argv, "--resume"]))
    assert not (tmp_path / "run" / "metrics.json").exists()
    btvae.main([*argv, "--resume"])
    assert "resuming after epoch 2 (training had finished)" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs_trained"] == 2


def test_kept_fids_are_read_back_only_for_the_same_model_and_settings(tmp_path):
    cfg, cpu = btvae.parse_config(["--out", str(tmp_path), "--fid-samples", "40"]), torch.device("cpu")
    torch.manual_seed(0)
    model, other_model = btvae.ConvVAE(1, 16, (8, 16), latent_dim=4), btvae.ConvVAE(1, 16, (8, 16), latent_dim=4)
    btvae.KeptMeasurements(tmp_path, model, cfg, cpu).get("", lambda: {"fid": 1.5, "fid_2048": None})
    measured_again = []

    def measure(suffix=""):
        measured_again.append(1)
        return {f"fid{suffix}": 2.5, f"fid_2048{suffix}": None}
    assert btvae.KeptMeasurements(tmp_path, model, cfg, cpu).get("", measure) == {"fid": 1.5, "fid_2048": None}
    assert not measured_again
    more_samples = btvae.parse_config(["--out", str(tmp_path), "--fid-samples", "80"])
    for others in [(other_model, cfg, cpu), (model, more_samples, cpu), (model, cfg, torch.device("cuda"))]:
        btvae.KeptMeasurements(tmp_path, *others).get("", measure)
    assert len(measured_again) == 3
    skipped = btvae.KeptMeasurements(tmp_path, model, cfg, cpu)
    skipped.get("_gmm", lambda: {"fid_gmm": None})  # FID skipped (no network): nothing to keep
    btvae.KeptMeasurements(tmp_path, model, cfg, cpu).get("_gmm", lambda: measure("_gmm"))
    assert len(measured_again) == 4


def test_kept_fids_are_logged_as_fully_as_measured_ones(tmp_path, capsys):
    cfg = btvae.parse_config(["--out", str(tmp_path), "--fid-samples", "40", "--fid-2048"])
    model, cpu = btvae.ConvVAE(1, 16, (8, 16), latent_dim=4), torch.device("cpu")
    mixture = {"fid_gmm": 0.0714, "fid_2048_gmm": 57.32, "precision_2048_gmm": 0.041, "recall_2048_gmm": 0.011}
    btvae.KeptMeasurements(tmp_path, model, cfg, cpu).get("_gmm", lambda: mixture)
    capsys.readouterr()
    btvae.KeptMeasurements(tmp_path, model, cfg, cpu).get("_gmm", lambda: pytest.fail("measured again"))
    assert capsys.readouterr().out == ("FID-64 of the mixture sampler: 0.0714; in 2048-d features FID 57.32, "
                                       "precision 0.041, recall 0.011 (measured before the run was stopped; "
                                       f"kept in {btvae.MEASURED_SO_FAR})\n")


def test_resuming_a_finished_run_does_nothing_and_rerunning_it_is_refused_even_without_its_checkpoint(tmp_path, capsys, mnist_with_stand_in_fid):
    out = tmp_path / "run"
    btvae.main([*mnist_with_stand_in_fid, "--out", str(out)])
    written = (out / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--resume"])
    assert "finished run: nothing to resume" in capsys.readouterr().out
    assert (out / "metrics.json").stat().st_mtime_ns == written
    refusal = f"btvae.py: error: {out} already holds results; choose another --out (or delete it)"
    for deleted in ([], ["checkpoint.pt"]):  # the same run again, and again once its checkpoint is deleted
        for name in deleted:
            (out / name).unlink()
        with pytest.raises(SystemExit) as exit_info:
            btvae.main([*mnist_with_stand_in_fid, "--out", str(out)])
        assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == refusal
        assert (out / "metrics.json").stat().st_mtime_ns == written


@pytest.mark.parametrize("damage, expected", [
    ("truncated", "is not a readable btvae checkpoint"),
    ("foreign", "is not a readable btvae checkpoint (no early_stopping, history"),
    ("without its shuffle state", "is not a readable btvae checkpoint (no shuffle_rng)"),
    ("missing", "does not exist, so there is nothing to resume"),
])
def test_unusable_checkpoints_are_one_line_errors(damage, expected, tmp_path, capsys, mnist_with_stand_in_fid):
    out = tmp_path / "run"
    btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--epochs", "1"])
    (out / "metrics.json").unlink()
    checkpoint = out / "checkpoint.pt"
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    elif damage == "foreign":
        torch.save({"settings": {}, "model": {}, "optimiser": {}, "torch_rng": torch.get_rng_state()}, checkpoint)
    elif damage == "without its shuffle state":
        saved = torch.load(checkpoint, weights_only=True)
        del saved["shuffle_rng"]
        torch.save(saved, checkpoint)
    else:
        checkpoint.unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--epochs", "1", "--resume"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(error.strip().splitlines()) == 1 and expected in error


def test_files_from_before_delta_was_named_so_still_resume_and_evaluate(tmp_path, mnist_with_stand_in_fid):
    out = tmp_path / "run"
    btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--epochs", "2", "--delta", "0.01"])
    (out / "metrics.json").unlink()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["settings"]["bt_offdiag"] = checkpoint["settings"].pop("delta")  # as btvae.py wrote it then
    checkpoint["history"], checkpoint["finished"] = checkpoint["history"][:1], False  # interrupted after epoch 1
    torch.save(checkpoint, out / "checkpoint.pt")
    model = torch.load(out / "model.pt", weights_only=True)
    model["config"]["bt_offdiag"] = model["config"].pop("delta")
    torch.save(model, tmp_path / "old_model.pt")
    btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--epochs", "2", "--bt-offdiag", "0.01", "--resume"])
    assert json.loads((out / "metrics.json").read_text())["epochs_trained"] == 2
    assert config("--evaluate", tmp_path / "old_model.pt", "--data-dir", mnist_with_stand_in_fid[1]).delta == 0.01


def test_out_of_memory_is_one_line_saying_what_to_make_smaller(tmp_path, capsys):
    make_mnist(tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # a linear layer of 256 x 10^12 floats: far beyond any machine
        btvae.main(["--data-dir", str(tmp_path), "--latent-dim", str(10**12), "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(error.strip().splitlines()) == 1
    assert error.startswith("btvae.py: out of memory") and "smaller --batch-size or --latent-dim" in error


def test_model_file_from_another_architecture_is_a_usage_error(tmp_path):
    path = tmp_path / "model.pt"
    btvae.save_model(btvae.ConvVAE(1, 32, latent_dim=8), config(), path)
    saved = torch.load(path, weights_only=True)
    saved["architecture"]["latent_dim"] = 2  # weights of one architecture, labelled as another
    torch.save(saved, path)
    with pytest.raises(btvae.UsageError, match="do not fit its architecture"):
        btvae.load_model(path)


def test_progress_bars_only_on_a_terminal(monkeypatch):
    batches = [1, 2, 3]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert btvae.progress(batches, "train") is batches
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = btvae.progress(batches, "train")
    assert list(bar) == batches and type(bar).__name__ == "tqdm"


# ---------------------------------------------------------------------------
# --evaluate: measure a saved model without training
# ---------------------------------------------------------------------------

def test_evaluate_measures_a_saved_model_exactly_as_its_run_did(tmp_path, capsys, mnist_with_stand_in_fid):
    run = tmp_path / "run"
    btvae.main([*mnist_with_stand_in_fid, "--out", str(run)])
    data_dir = mnist_with_stand_in_fid[1]
    evaluation = tmp_path / "evaluation"
    btvae.main(["--evaluate", str(run / "model.pt"), "--data-dir", data_dir, "--fid-samples", "40",
                "--out", str(evaluation)])
    assert {p.name for p in evaluation.iterdir()} == MEASURED_OUTPUTS  # no training: no history, no checkpoint
    trained = json.loads((run / "metrics.json").read_text())
    measured = json.loads((evaluation / "metrics.json").read_text())
    assert set(measured) == MEASUREMENTS
    assert {k: v for k, v in measured.items() if k not in TIMINGS} == \
        {k: v for k, v in trained.items() if k in MEASUREMENTS and k not in TIMINGS}
    assert measured["fid"] is not None and measured["probe_accuracy"] is not None
    for name in ("samples.png", "samples_gmm.png", "reconstructions.png"):
        assert (evaluation / name).read_bytes() == (run / name).read_bytes()
    settings = json.loads((evaluation / "config.json").read_text())
    assert settings["evaluate"] == str(run / "model.pt") and settings["epochs"] == 4 and settings["batch_size"] == 60
    assert "evaluating" in capsys.readouterr().out


def test_evaluate_takes_the_models_settings_and_its_default_out(tmp_path, monkeypatch):
    make_mnist(tmp_path / "data")
    path = tmp_path / "model.pt"
    trained_with = config("--lam2", 0.25, "--seed", 3, "--subset", 50, "--bt-on", "z", "--latent-dim", 4)
    btvae.save_model(btvae.ConvVAE(1, 32, latent_dim=4), trained_with, path)
    cfg = config("--evaluate", path, "--data-dir", tmp_path / "data")
    assert (cfg.lam2, cfg.seed, cfg.subset, cfg.bt_on, cfg.latent_dim) == (0.25, 3, 50, "z", 4)
    assert cfg.out == Path("runs/evaluate/mnist_lam2=0.25_seed3")
    given = config("--evaluate", path, "--data-dir", tmp_path / "data", "--seed", 5, "--bt-on", "mu", "--subset", 20)
    assert (given.seed, given.bt_on, given.subset, given.lam2) == (5, "mu", 20, 0.25)


def evaluate_bad_input(tmp_path, damage):
    """A model.pt damaged in one way, and the flags that evaluate it."""
    make_mnist(tmp_path / "data")
    path = tmp_path / "model.pt"
    btvae.save_model(btvae.ConvVAE(1, 32, latent_dim=8), config("--latent-dim", 8), path)
    argv = ["--evaluate", str(path), "--data-dir", str(tmp_path / "data"), "--fid-samples", "0",
            "--out", str(tmp_path / "out")]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    elif damage == "missing":
        path.unlink()
    elif damage == "foreign":
        torch.save({"settings": {}, "model": {}}, path)  # a checkpoint.pt, say
    elif damage == "another architecture":
        saved = torch.load(path, weights_only=True)
        saved["architecture"]["hidden_dims"] = (8, 16, 32, 64, 128)
        torch.save(saved, path)
    elif damage == "training flag":
        argv += ["--lam2", "0.5", "--epochs=3"]
    elif damage == "other data set":
        argv += ["--dataset", "cifar10"]
    elif damage == "a run's config.json":
        argv[1] = str(tmp_path / "config.json")
        (tmp_path / "config.json").write_text(json.dumps({"lam2": 0.025}))
    elif damage == "out holds results":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "metrics.json").write_text("{}")
    elif damage == "out holds a training run":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "checkpoint.pt").write_text("")
    return argv


EVALUATE_BAD_INPUT = {
    "truncated": "model.pt is not a model.pt written by btvae.py; pass the model.pt a run wrote",
    "missing": "model.pt does not exist; pass the model.pt a run wrote",
    "a run's config.json": "config.json is not a model.pt written by btvae.py; pass the model.pt a run wrote",
    "foreign": "is not a model.pt written by btvae.py (it has no architecture, config, state_dict)",
    "another architecture": "its weights do not fit its architecture",
    "training flag": "--lam2, --epochs cannot be used with --evaluate",
    "other data set": "was trained on 1-channel images, and --dataset cifar10 has 3; pass the data set it was "
                      "trained on (--dataset mnist)",
    "out holds results": "already holds results; choose another --out",
    "out holds a training run": "holds a training run; choose another --out for this evaluation",
}


@pytest.mark.parametrize("damage", EVALUATE_BAD_INPUT, ids=list(EVALUATE_BAD_INPUT))
def test_evaluate_bad_input_is_one_line_exit_2_and_writes_nothing(damage, tmp_path, capsys):
    argv = evaluate_bad_input(tmp_path, damage)
    with pytest.raises(SystemExit) as exit_info:
        btvae.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(error.strip().splitlines()) == 1 and EVALUATE_BAD_INPUT[damage] in error
    assert "weights_only" not in error and len(error) < 200 + len(str(tmp_path))  # one short line
    out = tmp_path / "out"
    assert not out.exists() or [p.name for p in out.iterdir()] in (["metrics.json"], ["checkpoint.pt"])


# The pretrained models (README, "Pretrained models"): the median-FID seed of the full-budget MNIST sweep.
PRETRAINED = {"mnist_vae.pt": 0.0, "mnist_btvae_0.025.pt": 0.025}  # file in pretrained/: its lambda2


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_model_loads_and_decodes_digit_like_images(name):
    path = HERE / "pretrained" / name
    assert btvae.read_model_file(path)["config"]["lam2"] == PRETRAINED[name]
    model = btvae.load_model(path)
    assert model.architecture == dict(channels=1, image_size=32, hidden_dims=(16, 32, 64, 128, 256), latent_dim=128)
    images = btvae.generate(model, 64, torch.Generator().manual_seed(0), torch.device("cpu"))
    # MNIST's look: a black background with a few bright strokes (an untrained decoder gives a uniform grey).
    assert 0.05 < images.mean() < 0.2 and 0.04 < (images > 0.5).float().mean() < 0.2


# ---------------------------------------------------------------------------
# Speed settings that leave the method unchanged
# ---------------------------------------------------------------------------

def test_mixed_precision_changes_arithmetic_not_interfaces():
    model, x = small_model_and_batch(channels=3)
    model.eval()
    mu, logvar = model.encode(x)
    btvae.run_in_bfloat16(model, torch.device("cpu"))
    mu_bf16, logvar_bf16 = model.encode(x)
    recon_bf16 = model.decode(mu_bf16)
    assert mu_bf16.dtype == logvar_bf16.dtype == recon_bf16.dtype == torch.float32  # the losses see float32
    assert not torch.equal(mu, mu_bf16)  # bfloat16 really was used inside
    assert torch.allclose(mu, mu_bf16, atol=0.05, rtol=0.05)


def test_speed_settings_keep_the_model_the_same_function():
    model, x = small_model_and_batch()
    model.eval()
    reference = model.decode(model.encode(x)[0])
    btvae.prepare_for_speed(model, [], torch.device("cpu"), bf16=False)
    assert model.encoder[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(model.decode(model.encode(x)[0]), reference, atol=1e-5)


@pytest.mark.parametrize("precision, expected", [("fp32", False), ("bf16", True)])
def test_precision_flag_sets_mixed_precision(precision, expected):
    model, x = small_model_and_batch()
    assert btvae.use_bf16(precision, torch.device("cpu")) is expected
    model.eval()
    reference = model.decode(model.encode(x)[0])
    btvae.prepare_for_speed(model, [], torch.device("cpu"), bf16=expected)
    difference = (model.decode(model.encode(x)[0]) - reference).abs().max()
    assert bool(difference > 1e-4) is expected  # bfloat16 changes the arithmetic; channels_last alone only rounds


ALLOCATE_AND_FREE = """
import resource, torch, btvae
btvae.keep_freed_memory()
def step(k):  # activations of 4-16 MB, alive together and then freed, as in a training step; a page larger each step
    return [torch.ones(2**20 * (1 + i % 4) + 1024 * k) for i in range(8)]
for k in range(5):  # the heap grows to the steps' peak
    step(k)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for k in range(5, 15):
    step(k)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not (sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION")), reason="glibc only")
def test_keep_freed_memory_reuses_freed_activations_without_page_faults():
    # A fresh process, as the setting is process-wide. Ten steps write 10 x 80 MB = 200,000 pages of 4 KB.
    # glibc's default maps each step's largest blocks afresh, since each is larger than any freed before, and
    # unmaps them when freed: 40,000 faults at the least, 170,000 when it also trims its heap. Kept, only the
    # page a block grows by each step is new: 30-90 faults measured. Whether the heap would be trimmed depends
    # on what else lies above the freed blocks (measured: never with one thread, in about half of the
    # processes with two), so this count pins the mapping threshold and not reliably the trim threshold.
    finished = subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True)
    assert int(finished.stdout) < 4_000


# ---------------------------------------------------------------------------
# The GPU path, on a stand-in GPU: what only a GPU runs, checked on this CPU
# ---------------------------------------------------------------------------

class OnStandInGPU(torch.Tensor):
    """A tensor on the stand-in GPU (StandInGPU). Its data is in the CPU's memory and torch computes it there,
    so a run on the stand-in gives the CPU run's numbers; but, as on a real GPU, NumPy cannot read it and it
    does not mix with CPU tensors in one operation."""


class StandInGPU(TorchFunctionMode):
    """A GPU of type `kind` (cuda or mps) made of the CPU. Every torch call in its scope passes through
    __torch_function__ (torch's public hook, torch.overrides), which keeps track of where each tensor is:

    - a tensor sent to the device (.to(device), a factory's device=) becomes an OnStandInGPU, and so does every
      result computed from one; .cpu() and .to("cpu") give a plain CPU tensor back;
    - .numpy() and np.asarray() of it raise CUDA's TypeError, and so, stricter than CUDA, do .item() and
      .tolist(): btvae.py writes out each copy of its numbers to the CPU (.cpu()), since on a GPU each waits
      for the queued work (`if tensor:` and float(tensor), which libraries use, work as on CUDA);
    - an operation on it and on a CPU tensor of one or more dimensions raises CUDA's "Expected all tensors to
      be on the same device", except the calls that move or copy between devices, or only index;
    - its .device is the GPU's, as code that asks where a tensor is expects.

    `pickled` counts the GPU tensors pickled (by torch.save), so a test can tell which files hold any.
    """

    ACROSS_DEVICES = {"to", "cpu", "copy_", "__getitem__", "__setitem__", "__reduce_ex__",
                      "_has_compatible_shallow_copy_type"}  # the last: nn.Module.to comparing old and new tensors
    READ_BY_THE_HOST = {"numpy", "__array__", "item", "tolist"}

    def __init__(self, kind="cuda"):
        super().__init__()
        self.kind, self.pickled = kind, 0
        self.where_getters = {torch.Tensor.is_cpu.__get__: "cpu", torch.Tensor.is_cuda.__get__: "cuda",
                              torch.Tensor.is_mps.__get__: "mps"}

    def place(self, tensor):
        return self.kind if isinstance(tensor, OnStandInGPU) else "cpu"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func == torch.Tensor.device.__get__:  # a getter is a new object at each access: == not is
            return torch.device(self.kind, 0) if isinstance(args[0], OnStandInGPU) else torch.device("cpu")
        if func in self.where_getters:
            return self.place(args[0]) == self.where_getters[func]
        if func == torch.Tensor.grad.__get__:  # autograd computes the gradients of a GPU tensor on the GPU
            grad = func(*args, **kwargs)
            return as_on(grad, self.place(args[0]))
        if isinstance(args[0] if args else None, OnStandInGPU):
            if name in self.READ_BY_THE_HOST:
                raise TypeError(f"can't convert {self.kind}:0 device type tensor to numpy or a Python value "
                                f"({name}); use Tensor.cpu() to copy the tensor to host memory first.")
            if name == "__reduce_ex__":  # torch.save: its data, as a plain tensor
                self.pickled += 1
                return args[0].as_subclass(torch.Tensor).__reduce_ex__(*args[1:])
        target = self.target(func, args, kwargs)
        if target == self.kind:  # the stand-in computes on the CPU
            if func is torch.Tensor.to:
                args = (args[0], *("cpu" if isinstance(a, (str, torch.device)) else a for a in args[1:]))
            if kwargs.get("device") is not None:
                kwargs = {**kwargs, "device": "cpu"}
        inputs = list(tensors_in((args, kwargs)))
        on_gpu = any(isinstance(t, OnStandInGPU) for t in inputs)
        if on_gpu and name not in self.ACROSS_DEVICES and any(
                not isinstance(t, OnStandInGPU) and t.dim() > 0 for t in inputs):
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{self.kind}:0 and cpu! ({name})")
        result = func(*args, **kwargs)
        return as_on(result, target or (self.kind if on_gpu else "cpu"))

    @staticmethod
    def target(func, args, kwargs):
        """The type of the device the call puts its result on, if it names one (.cpu(), .to(...), device=)."""
        if func is torch.Tensor.cpu:
            return "cpu"
        named = [kwargs.get("device"), *(args[1:] if func is torch.Tensor.to else ())]
        return next((torch.device(value).type for value in named if isinstance(value, (str, torch.device))), None)


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


def as_on(value, place):
    """The tensors in value (or in a tuple or list of them) as OnStandInGPU, or as plain CPU tensors; the same
    data, not a copy."""
    if isinstance(value, (list, tuple)):
        return type(value)(as_on(item, place) for item in value)
    if not isinstance(value, torch.Tensor) or isinstance(value, OnStandInGPU) == (place != "cpu"):
        return value
    return value.as_subclass(torch.Tensor if place == "cpu" else OnStandInGPU)


STAND_IN_CUDA_RNG = torch.full((16,), 7, dtype=torch.uint8)  # what the stand-in's torch.cuda.get_rng_state gives


@contextlib.contextmanager
def stand_in_gpu(kind="cuda", free_bytes=2**34, gpus=1):
    """This process as a machine with `gpus` GPUs of type `kind` (cuda or mps), `free_bytes` of memory free on
    each: torch.cuda's (or torch.backends.mps') public functions answer as there, and the tensors sent to the
    device are a StandInGPU's, which it yields. Its `rng_states_set` lists torch.cuda.set_rng_state's calls."""
    gpu = StandInGPU(kind)
    gpu.rng_states_set = []

    def set_rng_state(state, device="cuda"):
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= gpus:  # as torch.cuda's default_generators[index]
            raise IndexError("list index out of range")
        gpu.rng_states_set.append((state, index))

    with contextlib.ExitStack() as stack:
        if kind == "cuda":
            for name, value in (("is_available", lambda: True), ("device_count", lambda: gpus),
                                ("is_bf16_supported", lambda *args, **kwargs: True),
                                ("mem_get_info", lambda device=None: (free_bytes, 2 * free_bytes)),
                                ("get_rng_state_all", lambda: [STAND_IN_CUDA_RNG] * gpus),
                                ("set_rng_state", set_rng_state)):
                stack.enter_context(mock.patch.object(torch.cuda, name, value))
            # Adam asks the current stream whether a CUDA graph is being captured
            stack.enter_context(mock.patch.object(torch.accelerator, "current_stream",
                                                  lambda *args: mock.Mock(is_capturing=lambda: False)))
            stack.callback(setattr, torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # as it was
        else:
            stack.enter_context(mock.patch.object(torch.backends.mps, "is_available", lambda: True))
        # nn.Module.to gives a module new Parameters (here OnStandInGPU ones), instead of new data in the old ones
        overwriting = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        stack.callback(torch.__future__.set_overwrite_module_params_on_conversion, overwriting)
        stack.enter_context(gpu)
        yield gpu


def files_saved(monkeypatch, gpu):
    """btvae.save_atomically recorded: a list that fills with (file name, whether it held GPU tensors)."""
    saved, save = [], btvae.save_atomically

    def recording_save(obj, path):
        before = gpu.pickled
        save(obj, path)
        saved.append((path.name, gpu.pickled > before))
    monkeypatch.setattr(btvae, "save_atomically", recording_save)
    return saved


@pytest.mark.parametrize("kind, free_bytes", [("cuda", 2**34), ("cuda", 2**10), ("mps", 2**34)],
                         ids=["cuda, images on it", "cuda, images left on the CPU", "mps"])
def test_a_run_and_its_evaluation_on_a_gpu_hand_numpy_only_cpu_tensors_and_on_cuda_give_the_cpus_numbers(
        kind, free_bytes, tmp_path, monkeypatch, mnist_with_stand_in_fid):
    run, evaluation = tmp_path / "gpu", tmp_path / "evaluation"
    with stand_in_gpu(kind, free_bytes) as gpu:  # first, so that it fills the caches (FID's, the pixel probe's)
        saved = files_saved(monkeypatch, gpu)
        btvae.main([*mnist_with_stand_in_fid, "--out", str(run)])
        btvae.main(["--evaluate", str(run / "model.pt"), "--data-dir", mnist_with_stand_in_fid[1],
                    "--fid-samples", "40", "--out", str(evaluation)])
    btvae.main([*mnist_with_stand_in_fid, "--out", str(tmp_path / "cpu")])
    assert json.loads((run / "config.json").read_text())["device"] == kind
    on_the_gpu, on_the_cpu = run_result(run), run_result(tmp_path / "cpu")
    if kind == "cuda":  # the CPU's layout and Adam, and the stand-in computes on the CPU: bit for bit
        assert_same_result(on_the_gpu, on_the_cpu)
    else:  # MPS keeps NCHW and Adam's default implementation: other roundings, which training amplifies
        assert {k for k, v in on_the_gpu[0].items() if v is not None} == {k for k, v in on_the_cpu[0].items()
                                                                          if v is not None}
    measured = json.loads((evaluation / "metrics.json").read_text())
    assert {k: v for k, v in measured.items() if k not in TIMINGS} == \
        {k: v for k, v in on_the_gpu[0].items() if k in MEASUREMENTS}
    # Only the files btvae.py reads back itself, with map_location="cpu", hold GPU tensors: report.py and the
    # caches read theirs on any machine.
    assert {name for name, held_gpu_tensors in saved if held_gpu_tensors} == {"model.pt", "checkpoint.pt"}


def test_a_run_stopped_on_a_gpu_resumes_there_bit_for_bit_with_the_gpus_generator(
        tmp_path, monkeypatch, capsys, mnist_with_stand_in_fid):
    with stand_in_gpu() as gpu:
        btvae.main([*mnist_with_stand_in_fid, "--out", str(tmp_path / "straight")])
        out = tmp_path / "interrupted"
        real_loss = signal_during_loss_call(monkeypatch, call=2 * 4 + 2)  # the second training step of epoch 3
        with pytest.raises(SystemExit):
            btvae.main([*mnist_with_stand_in_fid, "--out", str(out)])
        monkeypatch.setattr(btvae, "btvae_loss", real_loss)
        btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--resume"])
    assert "resuming after epoch 2" in capsys.readouterr().out
    assert_same_result(run_result(out), run_result(tmp_path / "straight"))
    [(state, index)] = gpu.rng_states_set
    assert torch.equal(state, STAND_IN_CUDA_RNG) and index == 0


@pytest.mark.parametrize("gpus", [2, 0])
def test_a_checkpoint_written_with_three_gpus_resumes_with_fewer_or_none(gpus, tmp_path, monkeypatch,
                                                                         mnist_with_stand_in_fid):
    out = tmp_path / "run"
    btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--epochs", "1"])
    cfg = config(*mnist_with_stand_in_fid, "--out", out, "--epochs", 1, "--resume")
    three_gpus = [torch.full((16,), gpu, dtype=torch.uint8) for gpu in range(3)]
    checkpoint = btvae.read_checkpoint(out / "checkpoint.pt", cfg)._replace(cuda_rng=three_gpus)
    model = btvae.ConvVAE(1, cfg.image_size, cfg.hidden_dims, cfg.latent_dim)
    if gpus:
        with stand_in_gpu(gpus=gpus) as gpu:
            btvae.resume_training(checkpoint, model, cfg, torch.device("cuda"))
        assert [(state.tolist(), index) for state, index in gpu.rng_states_set] == [([0] * 16, 0), ([1] * 16, 1)]
    else:  # this machine: no GPU
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *args: pytest.fail("no GPU to set a state of"))
        btvae.resume_training(checkpoint, model, cfg, torch.device("cpu"))


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_the_cpu_and_a_device_not_there_is_a_usage_error(cuda, mps, expected,
                                                                                       monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert btvae.pick_device("auto") == torch.device(expected) and btvae.pick_device("cpu") == torch.device("cpu")
    for missing in {"cuda", "mps"} - {name for name, there in (("cuda", cuda), ("mps", mps)) if there}:
        with pytest.raises(btvae.UsageError, match=f"--device {missing} is not available on this machine"):
            btvae.pick_device(missing)


@pytest.mark.parametrize("spare, moved", [(4, True), (0, False)])
def test_the_images_move_to_a_cuda_gpu_once_where_they_fit_in_a_quarter_of_its_free_memory(spare, moved):
    splits = [btvae.Split(uint8_images(30), torch.arange(30)), btvae.Split(uint8_images(10))]
    free_bytes = 4 * sum(split.images.nbytes for split in splits) + spare  # moved only while free // 4 exceeds it
    model = btvae.ConvVAE(1, 16, (8, 16), latent_dim=4)
    with stand_in_gpu("cuda", free_bytes):
        model.to(torch.device("cuda"))
        placed = btvae.prepare_for_speed(model, splits, torch.device("cuda"), bf16=False)
        assert torch.backends.cudnn.benchmark  # every batch has the same shape
        assert all(split.images.device.type == ("cuda" if moved else "cpu") for split in placed)
        assert placed[0].labels.device.type == "cpu"  # read by scikit-learn only
        assert all(torch.equal(a.images.cpu(), b.images) for a, b in zip(placed, splits))
    assert model.encoder[1][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_on_mps_the_images_stay_on_the_cpu_and_the_layout_is_the_default():
    splits = [btvae.Split(uint8_images(30))]
    model = btvae.ConvVAE(1, 16, (8, 16), latent_dim=4)
    with stand_in_gpu("mps"):
        model.to(torch.device("mps"))
        [placed] = btvae.prepare_for_speed(model, splits, torch.device("mps"), bf16=False)
        assert placed.images.device.type == "cpu"
    assert not model.encoder[1][0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind", ["cpu", "cuda", "mps"])
def test_float32_is_the_default_on_every_device(kind):
    with contextlib.nullcontext() if kind == "cpu" else stand_in_gpu(kind):
        assert btvae.use_bf16(config().precision, torch.device(kind)) is False
        assert btvae.use_bf16("bf16", torch.device(kind)) is True


def test_bf16_on_a_gpu_without_bfloat16_is_a_usage_error():
    with stand_in_gpu(), mock.patch.object(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False):
        with pytest.raises(btvae.UsageError, match="this GPU has no bfloat16 support; use --precision fp32"):
            btvae.use_bf16("bf16", torch.device("cuda"))


def test_a_checkpoint_of_the_old_default_precision_resumes_as_float32(tmp_path, mnist_with_stand_in_fid):
    out = tmp_path / "run"
    btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--epochs", "2"])
    (out / "metrics.json").unlink()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["settings"]["precision"] = "auto"  # the default before fp32 was, on this CPU fp32
    checkpoint["history"], checkpoint["finished"] = checkpoint["history"][:1], False
    torch.save(checkpoint, out / "checkpoint.pt")
    btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--epochs", "2", "--resume"])
    assert json.loads((out / "metrics.json").read_text())["epochs_trained"] == 2


class FirstLayerOfStandIn(StandInFeatures):
    """StandInFeatures as torchmetrics takes a feature network: one tensor of features, not a tuple."""

    def forward(self, images):
        return super().forward(images)[0]


def test_bench_measures_fid_on_a_gpu_with_the_metric_where_the_samples_are(tmp_path, monkeypatch):
    import bench
    from torchmetrics.image import fid as torchmetrics_fid
    make_mnist(tmp_path / "data")
    monkeypatch.setattr(btvae, "make_fid_network", stand_in_network)
    real_metric = torchmetrics_fid.FrechetInceptionDistance
    monkeypatch.setattr(torchmetrics_fid, "FrechetInceptionDistance",
                        lambda feature, antialias, feature_extractor_weights_path: real_metric(FirstLayerOfStandIn()))
    weights = tmp_path / "weights.pth"
    torch.save({}, weights)  # read only by the networks stood in for
    with stand_in_gpu():
        (plain, _), (project, _) = (bench.bench_fid(kind, tmp_path / "data", weights, 40, None, torch.device("cuda"))
                                    for kind in ("plain", "project"))
    assert plain == pytest.approx(project, rel=1e-6)  # the same samples, features and distance, two ways


def test_run_all_on_a_gpu_trains_measures_and_reports(tmp_path):
    make_mnist(tmp_path / "data")
    on_the_gpu = tmp_path / "python_on_a_gpu"  # run_all.sh's PYTHON: each script it runs, on a stand-in GPU
    on_the_gpu.write_text(f"""#!/usr/bin/env bash
[ "$1" = - ] && exec "{sys.executable}" "$@"  # run_all.sh's check of a folder's lock, from standard input
exec "{sys.executable}" -c 'import runpy, sys; sys.path.insert(0, "{HERE}"); import test_btvae
sys.argv = sys.argv[1:]
with test_btvae.stand_in_gpu():
    runpy.run_path(sys.argv[0], run_name="__main__")' "$@"
""")
    on_the_gpu.chmod(0o755)
    sweep = run_sweep(tmp_path, PYTHON=str(on_the_gpu), LAMBDAS="0.025", SEEDS="0", FID_SAMPLES="20")
    assert sweep.returncode == 0, sweep.stderr
    runs = tmp_path / "results" / "runs"
    assert not list(runs.glob("*/FAILED")) and len(list(runs.glob("*/metrics.json"))) == 3  # with Figure 3's two
    assert json.loads((runs / "mnist_lam2=0.025_seed0" / "config.json").read_text())["device"] == "cuda"
    assert "| mnist | BTVAE | 0.025 | 0 |" in (tmp_path / "results" / "table1.md").read_text()


# ---------------------------------------------------------------------------
# report.py and run_all.sh: the sweep's tables and figures
# ---------------------------------------------------------------------------

def permutation_p_value(a, b):
    """The exact two-sided permutation test written out: every split of the pooled values into as many as a and
    b have, the shares whose difference of means is at least and at most the observed one, the smaller doubled."""
    pooled, observed = [*a, *b], statistics.fmean(a) - statistics.fmean(b)
    differences = [statistics.fmean(pooled[i] for i in chosen)
                   - statistics.fmean(pooled[i] for i in range(len(pooled)) if i not in chosen)
                   for chosen in itertools.combinations(range(len(pooled)), len(a))]
    at_least = sum(d >= observed - 1e-12 for d in differences) / len(differences)
    at_most = sum(d <= observed + 1e-12 for d in differences) / len(differences)
    return min(1.0, 2 * min(at_least, at_most))


def paired_permutation_p_value(a, b):
    """The exact two-sided paired permutation test written out: every choice of which value of each pair is a's
    (a sign for each difference), the shares whose mean difference is at least and at most the observed one,
    the smaller doubled."""
    differences = [x - y for x, y in zip(a, b)]
    observed = statistics.fmean(differences)
    means = [statistics.fmean(s * d for s, d in zip(signs, differences))
             for signs in itertools.product((1, -1), repeat=len(differences))]
    at_least = sum(m >= observed - 1e-12 for m in means) / len(means)
    at_most = sum(m <= observed + 1e-12 for m in means) / len(means)
    return min(1.0, 2 * min(at_least, at_most))


def benjamini_hochberg(p_values):
    """Benjamini-Hochberg's adjusted p-values written out: the i-th smallest of m p-values times m / i, then the
    smallest of those from it upwards (so that they keep the p-values' order), at most 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    scaled = [p_values[i] * len(p_values) / rank for rank, i in enumerate(order, 1)]
    adjusted = [min(1.0, *scaled[rank:]) for rank in range(len(order))]
    return [adjusted[order.index(i)] for i in range(len(p_values))]


def test_the_readmes_reading_map_gives_each_sections_lines_in_btvae_py():
    """README's table of btvae.py's sections: each row's line range starts at the section's header and ends
    where the next section (or the method's end, the 'first reading' line) begins."""
    source = (HERE / "btvae.py").read_text().splitlines()
    headers = [number for number, line in enumerate(source, 1) if line.startswith("# ====")
               and number < len(source) and re.match(r"# (\d\. |What the experiments share)", source[number])]
    method_ends = next(n for n, line in enumerate(source, 1) if "A FIRST READING CAN STOP HERE" in line) - 2
    expected = [(source[start].removeprefix("# ").split(" (")[0].split(":")[0], start, end)
                for start, end in zip(headers, [h - 1 for h in headers[1:]] + [method_ends])]
    readme = (HERE / "README.md").read_text().split("## Reading `btvae.py`")[1].split("\n## ")[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in readme.splitlines()
            if line.startswith("| ") and re.search(r"\| \d+-\d+ \|$", line)]
    assert [(row[0], *map(int, row[-1].split("-"))) for row in rows] == expected


def test_the_readme_stays_as_short_as_the_references_it_follows():
    """The form it was asked for: a README of 35-235 lines, the length of the references it follows (issue 17
    measured pytorch/examples' VAE at 34, micrograd 69, minGPT 147, nanoGPT 234); the write-up is on the results
    page."""
    assert 35 <= len((HERE / "README.md").read_text().splitlines()) <= 235


def github_anchors(markdown):
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", ["README.md", "results/README.md", "results/speed.md", "results/sweep_log.md"])
def test_every_relative_link_of_the_documentation_resolves(page):
    path = HERE / page
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{page}: {target} names no file"
        if anchor:
            assert anchor in github_anchors(linked.read_text()), f"{page}: {target} names no heading of {file or page}"


def fabricate_run(runs_dir, dataset, lam2, seed, fid, latent_dim=128, data_dir="data", epochs=7, prefix="",
                  latent=None, val_bt=None):
    """A finished run's small files, as btvae.py writes them; `latent` overrides latent metrics, `val_bt` gives
    the validation BT term of each epoch (the training one is 1)."""
    folder = runs_dir / f"{prefix}{dataset}_lam2={lam2:g}_seed{seed}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "dataset": dataset, "lam2": lam2, "lam1": 0.1, "seed": seed, "latent_dim": latent_dim,
        "data_dir": str(data_dir), "cache_dir": str(Path(data_dir) / "btvae_cache"), "image_size": 32}))
    if fid is None:
        return folder
    measured = {"fid": fid, "fid_gmm": fid / 2, "fid_2048": 100 * fid, "fid_2048_gmm": 50 * fid,
                "precision_2048": 0.5 + seed / 100, "recall_2048": 0.4, "precision_2048_gmm": 0.6, "recall_2048_gmm": 0.3,
                "active_units": 10, "active_units_0.1": 10, "rate": 20.0 + 100 * lam2 + seed / 10,
                "latent_correlation": 0.2, "twin_correlation": 0.9, "probe_accuracy": 0.95, "pixel_probe_accuracy": 0.9,
                **(latent or {})}
    (folder / "metrics.json").write_text(json.dumps({**measured, "epochs_trained": epochs, "stopped_early": False}))
    for name in ("samples.png", "samples_gmm.png"):
        torchvision.utils.save_image(torch.rand(4, 1, 32, 32), folder / name, nrow=2)
    mu = torch.randn(50, latent_dim, generator=torch.Generator().manual_seed(seed))
    figures = {"mu_variance": mu.var(0), "mu_correlation": btvae.cross_correlation(mu, mu)}
    if latent_dim <= 2:
        figures.update(test_mu=mu, test_labels=torch.arange(50) % 10)
    torch.save(figures, folder / "latent.pt")
    val_bt = val_bt or [1.0] * epochs
    rows = [{"epoch": e + 1, "train_loss": 1.0, "train_recon": 0.5, "train_kl": 1.0, "train_bt": 1.0,
             "val_loss": 0.6 - 0.01 * e + 0.1 + lam2 * val_bt[e], "val_recon": 0.6 - 0.01 * e, "val_kl": 1.0,
             "val_bt": val_bt[e]} for e in range(epochs)]
    btvae.write_csv(rows, folder / "history.csv")
    return folder


def test_the_difference_the_tables_call_detectable_is_found_by_the_permutation_test_as_often_as_they_say():
    generator = np.random.default_rng(1)  # sweeps of its own, not those report.py counted
    for seeds, vae_seeds in ((3, 5), (5, 5)):
        difference = report.detectable_difference(seeds, vae_seeds)
        setting = generator.normal(difference, 1, (20_000, seeds))
        vae = generator.normal(0, 1, (20_000, vae_seeds))
        pooled = np.concatenate([setting, vae], axis=1)
        splits = [list(chosen) for chosen in itertools.combinations(range(seeds + vae_seeds), seeds)]
        others = [[i for i in range(seeds + vae_seeds) if i not in chosen] for chosen in splits]
        differences = np.stack([pooled[:, a].mean(1) - pooled[:, b].mean(1) for a, b in zip(splits, others)], 1)
        observed = setting.mean(1) - vae.mean(1)
        at_least = (differences >= observed[:, None] - 1e-12).mean(1)
        at_most = (differences <= observed[:, None] + 1e-12).mean(1)
        found = np.minimum(1, 2 * np.minimum(at_least, at_most)) < report.SIGNIFICANCE
        assert found.mean() == pytest.approx(report.DETECTION_POWER, abs=0.015)
    assert report.detectable_difference(3, 3) is None  # its smallest p-value, 2 / 20, is 0.1: it can find nothing


def btvae_cells(table):
    """{(lambda2, column title): cell} of every BTVAE row in a table1.md's tables."""
    cells, header = {}, []
    for line in table.splitlines():
        values = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| data set |"):
            header = values
        elif line.startswith("| mnist | BTVAE |"):
            cells.update({(float(values[2]), title): value for title, value in zip(header, values)})
    return cells


def test_report_summarises_seeds_and_compares_with_the_vae(tmp_path):
    runs = tmp_path / "runs"
    vae_fid, good_fid = [1.0, 1.1, 0.9, 1.05, 0.95, 1.02], [0.5, 0.52, 0.48, 0.51, 0.49, 0.5]
    worse_fid, close_fid = [1.5, 1.6, 1.55], [0.98, 1.05, 1.0]
    for seed in range(6):
        fabricate_run(runs, "mnist", 0.0, seed, vae_fid[seed])
        fabricate_run(runs, "mnist", 0.025, seed, good_fid[seed],  # the ceiling of active units; probe against 0.95
                      latent={"active_units": 128, "probe_accuracy": 0.8 + seed / 100})
    for seed in range(3):
        fabricate_run(runs, "mnist", 0.25, seed, worse_fid[seed])
        fabricate_run(runs, "mnist", 0.5, seed, close_fid[seed])
    failed = fabricate_run(runs, "mnist", -0.00025, 0, None)
    (failed / "FAILED").write_text("exit status 1: btvae.py: stopped: NaN")
    (failed / "config.json").unlink()  # its settings from the folder's name alone, as for a run refused on bad input
    fabricate_run(runs, "mnist", -0.00025, 1, None)  # no metrics and no FAILED: interrupted
    for seed in (2, 3):  # two finished beside them: a test of 2 seeds against the VAE's 6
        fabricate_run(runs, "mnist", -0.00025, seed, 1.0 + seed / 10, latent={"active_units": 128})
    fabricate_run(runs, "mnist", 0.0025, 0, 0.7)  # one seed: its values alone, no spread and no test
    report.make_report(tmp_path)

    rows = {float(r["lam2"]): r for r in csv.DictReader(open(tmp_path / "table1.csv"))}
    assert float(rows[0.0]["fid_mean"]) == pytest.approx(statistics.fmean(vae_fid))
    assert float(rows[0.0]["fid_std"]) == pytest.approx(statistics.stdev(vae_fid))
    assert float(rows[0.0]["paper_fid"]) == 0.0187 and rows[0.0]["seeds"] == "0,1,2,3,4,5"
    for lam2, fid in ((0.025, good_fid), (0.25, worse_fid), (0.5, close_fid)):
        assert float(rows[lam2]["fid_p_vs_vae"]) == pytest.approx(permutation_p_value(fid, vae_fid))
    assert float(rows[0.025]["fid_p_vs_vae"]) == pytest.approx(2 / math.comb(12, 6))  # every seed apart: the least
    # Benjamini-Hochberg over each family's tests together: the claims, and where the models sit
    families = {family: [(lam2, key) for lam2, row in rows.items() for key in keys if row[f"{key}_p_vs_vae"]]
                for family, keys in report.FAMILIES.items()}
    p_values = {family: [float(rows[lam2][f"{key}_p_vs_vae"]) for lam2, key in tests] for family, tests in families.items()}
    for family, tests in families.items():
        for (lam2, key), q in zip(tests, benjamini_hochberg(p_values[family])):
            assert float(rows[lam2][f"{key}_q_vs_vae"]) == pytest.approx(q)
    assert "active_units" in report.FAMILIES["placement"] and "fid" in report.FAMILIES["claims"]
    assert set(report.FAMILIES["placement"]) | set(report.FAMILIES["claims"]) == {key for key, _, _ in report.COMPARED}
    tests = families["claims"] + families["placement"]
    p_good, q_good = float(rows[0.025]["fid_p_vs_vae"]), float(rows[0.025]["fid_q_vs_vae"])
    assert rows[0.025]["fid_versus_vae"] == f"better than VAE (p = {p_good:.2g}, q = {q_good:.2g})" and q_good <= 0.05
    p_worse, q_worse = float(rows[0.25]["fid_p_vs_vae"]), float(rows[0.25]["fid_q_vs_vae"])
    assert p_worse < 0.05 < q_worse  # every seed apart too, but 3 seeds cannot say it firmly enough for the table
    assert rows[0.25]["fid_versus_vae"] == f"no difference from VAE found (p = {p_worse:.2g}, q = {q_worse:.2g})"
    assert rows[0.5]["fid_versus_vae"].startswith("no difference from VAE found (p = ")
    assert "NaN" in rows[-0.00025]["failed"] and "interrupted" in rows[-0.00025]["failed"]
    assert float(rows[0.025]["fid_2048_mean"]) == pytest.approx(50) and float(rows[0.025]["fid_gmm_mean"]) == pytest.approx(0.25)
    assert rows[0.025]["fid_2048_gmm_versus_vae"].startswith("better than VAE")
    # a side whose seeds all have one value is not tested: a ceiling, the VAE's side, both sides the same
    assert rows[0.025]["active_units_versus_vae"] == "no test: 128.0 in every seed (the ceiling)"
    # the ceiling is the latent dimension of the finished runs (a failed run's folder name does not give it)
    assert rows[-0.00025]["active_units_versus_vae"] == "no test: 128.0 in every seed (the ceiling)"
    assert rows[0.025]["active_units_p_vs_vae"] == "" and rows[0.025]["active_units_q_vs_vae"] == ""
    assert rows[0.025]["probe_accuracy_versus_vae"] == "no test: the VAE's 0.950 in every seed"
    assert rows[0.25]["twin_correlation_versus_vae"] == "no test: 0.900 in every seed"
    assert float(rows[0.0]["pixel_probe_accuracy"]) == pytest.approx(0.9)
    table = (tmp_path / "table1.md").read_text()
    spread = statistics.stdev(good_fid)
    assert (f"| mnist | BTVAE | 0.025 | 0,1,2,3,4,5 | 0.5000 ± {spread:.4f} **better** p = {p_good:.2g} "
            f"| 0.2500 ± {spread / 2:.4f} **better** p = {p_good:.2g} | 7.0 | 0.0324 |") in table
    assert f"| mnist | BTVAE | 0.25 | 0,1,2 | 1.5500 ± 0.0500 p = {p_worse:.2g} |" in table  # not bold: not kept
    assert "| mnist | BTVAE | 0.025 | 0,1,2,3,4,5 | 128.0 in every seed (the ceiling), no test | " in table
    assert "| 0.825 ± 0.019, no test (the VAE's 0.950 in every seed) | 0.900 |" in table
    cells, titles = btvae_cells(table), {key: title for key, title, _ in report.COMPARED}
    titles["active_correlation"] = "among active units"
    for lam2, key in tests:  # the side in bold exactly where the verdict survives the correction
        assert ("**" in cells[lam2, titles[key]]) == (float(rows[lam2][f"{key}_q_vs_vae"]) <= 0.05)
    for family, tests in families.items():
        survivors = sum(q <= 0.05 for q in benjamini_hochberg(p_values[family]))
        assert f"mnist, {family}: {len(tests)} tests, of which {survivors} survive" in table
    assert "eval.py (waymao/PyTorch-VAE, last changed in commit 9be0949)" in table
    assert "| mnist | BTVAE | 0.0025 | 0 | 0.7000 | 0.3500 | 7.0 | 0.1984 |" in table
    assert rows[0.0025]["fid_std"] == "" and rows[0.0025]["fid_versus_vae"] == "no comparison (needs 2+ seeds each)"
    # the legend: the test's smallest p-values and what it can find, for each pair of seed counts it compares
    assert (f"Its smallest possible p-value: {2 / math.comb(8, 2):.2g} with 2 seeds against the VAE's 6; "
            f"{2 / math.comb(9, 3):.2g} with 3 seeds against the VAE's 6; {2 / math.comb(12, 6):.2g} with 6 seeds "
            "against the VAE's 6.") in table
    assert (f"this far apart (normal values, the same spread on both sides): {report.detectable_difference(3, 6):.1f} "
            f"standard deviations with 3 seeds against the VAE's 6; {report.detectable_difference(6, 6):.1f} standard "
            "deviations with 6 seeds against the VAE's 6. With 2 seeds against the VAE's 6 it can find none") in table

    assert "REDUCED" not in table
    for figure in ("figure2_mnist.png", "latent_mnist.png"):
        assert (tmp_path / figure).is_file()


def test_report_compares_the_samplers_model_by_model_and_how_the_two_fids_order_the_settings(tmp_path):
    from scipy.stats import kendalltau
    runs = tmp_path / "runs"
    vae_fid, btvae_fid = [1.0, 1.2, 0.9, 1.1, 0.95, 1.05, 1.15], [2.0, 2.5, 2.2]
    for seed, fid in enumerate(vae_fid):  # FID-64: the VAE is better; FID-2048 (100x the VAE's): the BTVAE is
        fabricate_run(runs, "mnist", 0.0, seed, fid, latent={"precision_2048_gmm": 0.6 + seed / 1000})
    for seed, fid in enumerate(btvae_fid):
        fabricate_run(runs, "mnist", 0.025, seed, fid, latent={"fid_2048": 10 + seed, "fid_2048_gmm": 9,
                                                               "recall_2048": 0.0, "recall_2048_gmm": 0.0})
    for seed in range(6):  # FID-64 lower from the mixture in every seed; the other two measures no different
        fabricate_run(runs, "mnist", 0.5, seed, 3.0 + seed / 10, latent={
            "fid_2048": 10 + seed % 2, "fid_2048_gmm": 10.5, "precision_2048_gmm": 0.5 + seed / 100 + (-1) ** seed / 1000,
            "recall_2048": 0.0, "recall_2048_gmm": 0.0})
    fabricate_run(runs, "mnist", 0.25, 0, 5.0, latent={"fid_2048": None})  # measured without --fid-2048: left out
    report.make_report(tmp_path)
    page = (tmp_path / "diversity.md").read_text()

    differences = [f / 2 - f for f in vae_fid]  # fabricate_run's mixture FID-64 is half the prior's
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    p = paired_permutation_p_value([f / 2 for f in vae_fid], vae_fid)
    assert p == pytest.approx(2 / 2**7)  # lower in every seed: the least 7 pairs give
    precision = [0.6 + seed / 1000 - (0.5 + seed / 100) for seed in range(7)]  # mixture against prior
    p_precision = paired_permutation_p_value([0.6 + seed / 1000 for seed in range(7)],
                                             [0.5 + seed / 100 for seed in range(7)])
    tests = [p, p, p_precision, p]  # the VAE's four, then the BTVAE's three: its recall is 0 from both samplers
    p_btvae = paired_permutation_p_value([9] * 3, [10, 11, 12])
    p_btvae_fid = paired_permutation_p_value([f / 2 for f in btvae_fid], btvae_fid)
    p_btvae_precision = paired_permutation_p_value([0.6] * 3, [0.5, 0.51, 0.52])
    p_half = paired_permutation_p_value([(3.0 + seed / 10) / 2 for seed in range(6)], [3.0 + seed / 10 for seed in range(6)])
    p_half_others = [paired_permutation_p_value([10.5] * 6, [10 + seed % 2 for seed in range(6)]),
                     paired_permutation_p_value([0.5 + seed / 100 + (-1) ** seed / 1000 for seed in range(6)],
                                                [0.5 + seed / 100 for seed in range(6)])]
    q = benjamini_hochberg(tests + [p_btvae_fid, p_btvae, p_btvae_precision, p_half, *p_half_others])
    assert q[0] <= 0.05 < q[4]  # the VAE's 7 pairs can establish a verdict; the BTVAE's 3 cannot
    assert p_half == pytest.approx(2 / 2**6) and q[7] > 0.05  # lower in all 6 seeds, not kept among these tests
    assert f"| mnist | 0.5 | 0,1,2,3,4,5 | -1.6250 ± 0.0935 (lower in 6 of 6) p = {p_half:.2g} |" in page
    assert (f"| mnist | 0 | 0,1,2,3,4,5,6 | {mean:+.4f} ± {sd:.4f} (lower in 7 of 7) **better** p = {p:.2g} | "
            f"{100 * mean:+.2f} ± {100 * sd:.2f} (lower in 7 of 7) **better** p = {p:.2g} | "
            f"{statistics.fmean(precision):+.3f} ± {statistics.stdev(precision):.3f} (higher in 7 of 7) **higher** "
            f"p = {p_precision:.2g} | -0.100 ± 0.000 (lower in 7 of 7) **lower** p = {p:.2g} |") in page
    assert (f"| mnist | 0.025 | 0,1,2 | {statistics.fmean(btvae_fid) / -2:+.4f} ± {statistics.stdev(btvae_fid) / 2:.4f} "
            f"(lower in 3 of 3) p = {p_btvae_fid:.2g} | -2.00 ± 1.00 (lower in 3 of 3) p = {p_btvae:.2g} | ") in page
    assert "| both 0.000 in every seed, no test |" in page
    assert f"mnist: {len(q)} tests, of which {sum(value <= 0.05 for value in q)} survive" in page
    assert "It cannot be below 2 / 2^n (0.25 with 3 seeds, 0.031 with 6 seeds, 0.016 with 7 seeds)" in page
    assert "| mnist | 0.25 |" not in page
    half_fid = [3.0 + seed / 10 for seed in range(6)]
    by_64 = [vae_fid, btvae_fid, half_fid]
    by_2048 = [[100 * f for f in vae_fid], [10, 11, 12], [10 + seed % 2 for seed in range(6)]]
    tau_settings = kendalltau([statistics.fmean(s) for s in by_64], [statistics.fmean(s) for s in by_2048])
    tau_runs = kendalltau(sum(by_64, []), sum(by_2048, []))
    assert (f"| mnist | prior | 0 < 0.025 < 0.5 | 0.5 < 0.025 < 0 | {tau_settings.statistic:.2f} "
            f"(p = {tau_settings.pvalue:.2g}, n = 3) | {tau_runs.statistic:.2f} (p = {tau_runs.pvalue:.2g}, n = 16) |") in page
    assert "| mnist | mixture | 0 < 0.025 < 0.5 | 0.025 < 0.5 < 0 |" in page


def test_report_sets_the_full_budget_beside_the_reduced_one(tmp_path):
    quick = tmp_path / "quick"
    for seed in (0, 1):
        fabricate_run(tmp_path / "runs", "mnist", 0.0, seed, 1.0 + seed / 10)
        fabricate_run(quick / "runs", "mnist", 0.0, seed, 2.0 + seed / 10, epochs=3)
        fabricate_run(quick / "runs", "mnist", 0.25, seed, 5.0 + seed / 10, epochs=3)  # not yet run at full budget
    (quick / "BUDGET.txt").write_text("REDUCED BUDGET: at most 3 epochs")
    report.make_report(tmp_path)

    table = (tmp_path / "budgets.md").read_text()
    assert "(quick/: REDUCED BUDGET: at most 3 epochs)" in table
    assert "| metric | VAE | lambda2 = 0.25 |" in table
    p_quick = permutation_p_value([5.0, 5.1], [2.0, 2.1])  # 2 seeds against 2: 1/3 at the least, never a verdict
    assert f"| FID (prior) | 1.0500 ± 0.0707 / 2.0500 ± 0.0707 | - / 5.0500 ± 0.0707 p = {p_quick:.2g} |" in table
    assert "| epochs trained | 7.0 ± 0.0 / 3.0 ± 0.0 | - / 3.0 ± 0.0 |" in table

    (tmp_path / "budgets.md").unlink()
    (tmp_path / "BUDGET.txt").write_text("REDUCED BUDGET: at most 5 epochs")  # two reduced budgets: no comparison
    report.make_report(tmp_path)
    assert not (tmp_path / "budgets.md").exists()


def test_report_adds_up_what_each_run_cost(tmp_path):
    parts = ["train_seconds", "latent_seconds", "fid_seconds", "mixture_fit_seconds", "fid_gmm_seconds"]
    for seed, seconds in enumerate([(100, 1, 50, 5, 40), (200, 2, 60, 6, None)]):  # None: FID was skipped
        metrics_file = fabricate_run(tmp_path / "runs", "mnist", 0.0, seed, 1.0) / "metrics.json"
        metrics_file.write_text(json.dumps({**json.loads(metrics_file.read_text()), **dict(zip(parts, seconds))}))
    fabricate_run(tmp_path / "runs", "mnist", 0.025, 0, None)  # unfinished: not counted
    report.make_report(tmp_path)

    table = (tmp_path / "cost.md").read_text()
    assert "| run | epochs | training | latent metrics | FID (prior) | mixture fit | FID (mixture) | total |" in table
    assert "| mnist_lam2=0_seed0 | 7 | 100 | 1 | 50 | 5 | 40 | 196 |" in table
    assert "| mnist_lam2=0_seed1 | 7 | 200 | 2 | 60 | 6 | - | 268 |" in table
    assert "| all 2 runs | | 300 | 3 | 110 | 11 | 40 | 464 (0.1 hours) |" in table


def test_report_measures_correlation_among_the_active_units_alone(tmp_path):
    folder = fabricate_run(tmp_path / "runs", "mnist", 0.0, 0, 1.0, latent_dim=3)
    correlation = torch.tensor([[1.0, 0.5, 0.9], [0.5, 1.0, -0.9], [0.9, -0.9, 1.0]])
    torch.save({"mu_variance": torch.tensor([1.0, 2.0, 0.001]), "mu_correlation": correlation}, folder / "latent.pt")
    assert report.active_correlation(folder) == pytest.approx(0.5)  # dimension 2 is inactive
    [run] = report.read_runs(tmp_path / "runs")
    assert run["metrics"]["active_correlation"] == pytest.approx(0.5)
    (folder / "latent.pt").unlink()
    assert report.active_correlation(folder) is None


def test_report_makes_a_blind_pair_with_a_separate_stable_key(tmp_path):
    for seed in (0, 1):
        fabricate_run(tmp_path / "runs", "celeba", 0.0, seed, 1.2 + seed)
        fabricate_run(tmp_path / "runs", "celeba", 0.25, seed, 0.9 + seed)
    (tmp_path / "BUDGET.txt").write_text("REDUCED BUDGET (QUICK=1): at most 2 epochs")
    report.make_report(tmp_path)
    pair = tmp_path / "table2_celeba"
    assert sorted(p.name for p in pair.iterdir()) == ["A.png", "B.png", "index.html"]
    page = (pair / "index.html").read_text()
    assert "Rank the more diverse group 1" in page and "REDUCED BUDGET" in page and "VAE" not in page
    key = json.loads((tmp_path / "table2_celeba_key.json").read_text())
    assert {key["A"]["model"], key["B"]["model"]} == {"VAE", "BTVAE"} and key["A"]["seed"] == key["B"]["seed"] == 0
    shown = (pair / "A.png").read_bytes()
    assert shown == (tmp_path / "runs" / key["A"]["run"] / "samples.png").read_bytes()
    report.make_report(tmp_path)
    assert json.loads((tmp_path / "table2_celeba_key.json").read_text()) == key  # remaking keeps the same order
    assert "REDUCED BUDGET" in (tmp_path / "table1.md").read_text()


def test_report_draws_figure3_from_the_runs_small_files_alone(tmp_path):
    for lam2 in (0.0, 0.025):  # no model.pt and no data: latent.pt holds the 2-d test means and their labels
        fabricate_run(tmp_path / "runs", "mnist", lam2, 0, 1.0, latent_dim=2, prefix="figure3_")
    report.make_report(tmp_path)
    assert (tmp_path / "figure3.png").is_file()


def test_report_measures_how_the_validation_bt_term_drives_early_stopping(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        fabricate_run(runs, "mnist", 0.0, seed, 1.0, epochs=6)
        # lambda2 = 1: a validation BT of 5 in epochs 4-6 (1 before) outweighs their better reconstructions
        fabricate_run(runs, "mnist", 1.0, seed, 1.0, epochs=6, val_bt=[1, 1, 1, 5, 5, 5] if seed else [1] * 6)
    report.make_report(tmp_path)
    rows = {r["lam2"]: r for r in report.early_stopping_rows(report.read_runs(runs))}
    assert rows[0.0]["best_epoch"] == rows[0.0]["elbo_best_epoch"] == 6 and rows[0.0]["different_epoch"] == 0
    assert rows[0.0]["bt_share"] == 0 and rows[0.0]["bt_ratio_min"] is None and rows[0.0]["bt_ratio_max"] is None
    assert rows[1.0]["best_epoch"] == (3 + 6) / 2 and rows[1.0]["elbo_best_epoch"] == 6
    assert rows[1.0]["different_epoch"] == 1 and (rows[1.0]["bt_ratio_min"], rows[1.0]["bt_ratio_max"]) == (1, 5)
    share_seed0 = 1 / (0.55 + 0.1 + 1)  # epoch 6 of seed 0: val_loss = recon 0.55 + lam1 KL 0.1 + BT 1
    share_seed1 = 1 / (0.58 + 0.1 + 1)  # epoch 3 of seed 1
    assert rows[1.0]["bt_share"] == pytest.approx((share_seed0 + share_seed1) / 2)
    elbo_cost_seed1 = (0.58 + 0.1) / (0.55 + 0.1) - 1
    assert rows[1.0]["elbo_cost"] == pytest.approx(elbo_cost_seed1 / 2)
    table = (tmp_path / "early_stopping.md").read_text()
    assert "| mnist | 1 | 2 | 6.0 | 0 | 4.5 | 6.0 | 1 | 2.3% | 60.1% | 1.00 to 5.0 |" in table


def test_report_names_runs_that_predate_the_latent_measurements(tmp_path):
    old = fabricate_run(tmp_path / "runs", "mnist", 0.0, 0, 1.0)
    (old / "latent.pt").unlink()
    [(folder, command)] = report.runs_without_latent_measurements(tmp_path)
    assert folder == old and f"--evaluate {old / 'model.pt'}" in command


@pytest.mark.parametrize("stop", ["full disk", "Ctrl-C"])
def test_a_report_stopped_part_way_leaves_every_table_whole_and_says_how_to_remake_them(stop, tmp_path, monkeypatch,
                                                                                        capsys):
    for seed in (0, 1):
        fabricate_run(tmp_path / "runs", "mnist", 0.0, seed, 1.0)
    report.main([str(tmp_path)])
    before = (tmp_path / "table1.md").read_text()
    fabricate_run(tmp_path / "runs", "mnist", 0.0, 2, 1.0)  # a third seed: the table would change
    if stop == "full disk":
        failing_write(monkeypatch, "table1.md")
    else:
        write_atomically = btvae.write_atomically

        def press_ctrl_c_during_table1(path, data):
            if path.name == "table1.md":
                raise KeyboardInterrupt
            write_atomically(path, data)
        monkeypatch.setattr(btvae, "write_atomically", press_ctrl_c_during_table1)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])
    again = f"python tools/report.py {tmp_path} remakes them all from the runs, which it never changes"
    if stop == "full disk":
        assert exit_info.value.code == (f"report.py: stopped: could not write {tmp_path / 'table1.md'} (No space left "
                                        f"on device); every other file is whole, and {again}")
    else:
        assert exit_info.value.code == 130
        assert capsys.readouterr().err.strip() == f"report.py: interrupted; every file is whole, and {again}"
    assert (tmp_path / "table1.md").read_text() == before and not list(tmp_path.glob(".*.tmp"))


def python_that(tmp_path, name, *shell_lines):
    """A stand-in for run_all.sh's PYTHON: the given shell lines first, then the real Python with the same arguments."""
    script = tmp_path / name
    script.write_text("#!/usr/bin/env bash\n" + "".join(f"{line}\n" for line in shell_lines)
                      + f'exec "{sys.executable}" "$@"\n')
    script.chmod(0o755)
    return str(script)


def run_sweep(tmp_path, **knobs):
    env = {**os.environ, "PYTHON": sys.executable, "DATA_DIR": str(tmp_path / "data"), "OUT": str(tmp_path / "results"),
           "DATASETS": "mnist", "SEEDS": "0 1", "LAMBDAS": "0 0.025 nan", "EPOCHS": "1", "FID_SAMPLES": "0",
           "JOBS": "2", **knobs}
    return subprocess.run(["bash", str(HERE / "run_all.sh")], capture_output=True, text=True, env=env, timeout=600)


@NO_FILE_LOCKS
def test_run_all_stopped_by_sigterm_to_itself_alone_stops_every_run_keeping_its_checkpoint(tmp_path):
    make_mnist(tmp_path / "data")
    env = {**os.environ, "PYTHON": sys.executable, "DATA_DIR": str(tmp_path / "data"), "OUT": str(tmp_path / "results"),
           "DATASETS": "mnist", "SEEDS": "0", "LAMBDAS": "0", "EPOCHS": "50", "FID_SAMPLES": "0", "JOBS": "1"}
    sweep = subprocess.Popen(["bash", str(HERE / "run_all.sh")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    runs = tmp_path / "results" / "runs"
    try:
        deadline = time.monotonic() + 120
        while not list(runs.glob("*/checkpoint.pt")) and time.monotonic() < deadline:
            time.sleep(0.05)
        sweep.send_signal(signal.SIGTERM)  # to run_all.sh only, as `kill PID` does, not to its process group
        _, error = sweep.communicate(timeout=120)
    finally:
        sweep.kill()
    assert sweep.returncode == 143, error
    assert "run_all.sh: stopped; each run keeps its last checkpoint" in error
    [stopped] = runs.iterdir()  # the sweep's first run, stopped after its first epoch; the rest never started
    assert "btvae.py: interrupted; everything up to the last checkpointed epoch" in (stopped / "log.txt").read_text()
    assert (stopped / "checkpoint.pt").is_file()
    for folder in runs.iterdir():
        assert not (folder / "FAILED").exists()  # a stopped run has not failed: ./run_all.sh again continues it
        btvae.release(btvae.lock_folder(folder))  # no run holds its folder: every one has ended
    assert not (tmp_path / "results" / "table1.md").exists()  # a stopped sweep leaves the tables as they were


def test_run_all_end_to_end_resumes_and_carries_on_past_a_failing_run(tmp_path):
    make_mnist(tmp_path / "data")
    first = run_sweep(tmp_path, LAMBDAS="0 nan", SEEDS="0")
    assert first.returncode == 0, first.stderr
    results = tmp_path / "results"
    runs = sorted(p.name for p in (results / "runs").iterdir())
    assert len(runs) == 4  # 2 lambdas x 1 seed + Figure 3's two 2-d models
    assert all((results / "runs" / name / "metrics.json").is_file() for name in runs if "nan" not in name)
    failed = (results / "runs" / "mnist_lam2=nan_seed0" / "FAILED").read_text()
    assert "exit status 2" in failed and "argument --lam2: must be a finite number" in failed
    table = (results / "table1.md").read_text()
    assert "| mnist | VAE | 0 | 0 |" in table and "argument --lam2: must be a finite number" in table
    assert "REDUCED BUDGET" in table  # 1 epoch and no FID is not the paper's budget
    assert (results / "figure3.png").is_file()
    settings = json.loads((results / "runs" / "mnist_lam2=0_seed0" / "config.json").read_text())
    assert settings["fid_2048"] is True  # FID_2048=1, the default: the sweep measures the 2048-d layer too

    never_run = "figure3_mnist_latent2_lam2=0_seed0"
    shutil.rmtree(results / "runs" / never_run)
    (results / "runs" / "mnist_lam2=0_seed0" / "metrics.json").unlink()  # interrupted after its last epoch
    held = results / "runs" / "figure3_mnist_latent2_lam2=0.025_seed0"
    (held / "metrics.json").unlink()  # unfinished, and another btvae.py, say a second sweep's, is running there:
    held_files = sorted(p.name for p in held.iterdir())
    lock = btvae.lock_folder(held)
    skip_report = '[ "$1" = tools/report.py ] && exit 0'  # the tables were checked after the first sweep
    try:
        second = run_sweep(tmp_path, LAMBDAS="0 nan", SEEDS="0", PYTHON=python_that(tmp_path, "python", skip_report))
        # The other run may take the folder in the moment after run_all.sh checked it: a Python that finds every
        # folder free at the check stands in for that moment; btvae.py is refused, and it is still left to its run.
        checks_pass = python_that(tmp_path, "python_checks_pass", skip_report, '[ "$1" = - ] && exit 1')
        third = run_sweep(tmp_path, LAMBDAS="0", SEEDS="0", PYTHON=checks_pass)
    finally:
        btvae.release(lock)
    assert second.returncode == 0, second.stderr
    started = [line for line in second.stdout.splitlines() if line.startswith("start:")]
    assert sorted(started) == [f"start: {never_run}", "start: mnist_lam2=0_seed0", "start: mnist_lam2=nan_seed0"]
    if btvae.fcntl is not None:  # where there are flocks, the held folder is left to its run, untouched
        assert f"busy: {held.name}: another run holds its folder; left to it" in second.stdout
        assert f"start: {held.name}" in third.stdout and f"FAILED: {held.name}" not in third.stdout
        assert f"busy: {held.name}: another run holds its folder; left to it" in third.stdout
        assert sorted(p.name for p in held.iterdir()) == held_files  # no FAILED: the run there has not failed
        assert "is in use by another run" in (held / "log.txt").read_text().splitlines()[-1]
    assert (results / "runs" / never_run / "metrics.json").is_file()
    resumed_log = (results / "runs" / "mnist_lam2=0_seed0" / "log.txt").read_text()
    assert "resuming after epoch 1 (training had finished)" in resumed_log
    assert resumed_log.count("epoch   1/1 |") == 1  # the interrupted attempt's lines are kept

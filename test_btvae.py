"""The specification of btvae.py: the card's three checks first (shapes, the loss identities, a tiny overfit run),
then every part of the file in its order. Offline and fast: data sets are fabricated in their real on-disk formats,
FID runs on a stand-in feature network, the GPU paths on a stand-in GPU. The tests of tools/ and run_all.sh are in
tools/. Run with: python -m pytest test_btvae.py (or -k for a part, e.g. -k TestMethod).
"""

import contextlib, csv, errno, json, math, os, pickle, signal, struct, subprocess, sys, time  # noqa: E401
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

import btvae

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")

def config(*argv):
    return btvae.parse_config([str(a) for a in argv])

def small_model_and_batch(channels=1):
    torch.manual_seed(6)
    return btvae.ConvVAE(channels, 16, (8, 16), latent_dim=6), torch.rand(12, channels, 16, 16)

# =============================================================================
# The card: shapes, the loss identities, a tiny overfit run

@pytest.mark.parametrize("channels, size, hidden_dims", [(1, 32, (16, 32, 64, 128, 256)), (3, 64, (16, 32, 64, 128, 256)),
                                                         (3, 24, (8, 12, 20))])
def test_shapes_of_the_encoder_the_decoder_and_every_loss_term(channels, size, hidden_dims):
    model = btvae.ConvVAE(channels, size, hidden_dims, latent_dim=7)
    x = torch.rand(5, channels, size, size)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 7)
    assert model.decode(btvae.reparameterise(mu, logvar)).shape == x.shape
    terms = btvae.btvae_loss(model, x, config("--lam2", 0.1))
    assert list(terms) == list(btvae.LOSS_TERMS) and all(terms[name].shape == () for name in btvae.LOSS_TERMS)

def test_the_loss_identities():
    torch.manual_seed(1)
    a, b = torch.randn(64, 8), torch.randn(64, 8) + 0.5 * torch.randn(64, 1)
    assert btvae.kl_to_standard_normal(torch.zeros(4, 6), torch.zeros(4, 6)).item() == 0  # q(z|x) is the prior
    bt = btvae.barlow_twins_loss(a, b).item()
    assert btvae.barlow_twins_loss(b, a).item() == pytest.approx(bt, rel=1e-6)  # symmetric
    assert btvae.barlow_twins_loss(a * torch.rand(8) * 3 + 0.5 + torch.randn(8), b).item() == pytest.approx(bt, rel=1e-4)
    variance = a.var(0, unbiased=False)  # identical twins: C_ii = var / (var + eps), the diagonal term ~0
    expected = ((1 - variance / (variance + btvae.BT_EPS)) ** 2).sum().item()
    assert btvae.barlow_twins_loss(a, a, delta=0).item() == pytest.approx(expected, abs=1e-9) and expected < 1e-8
    copies = torch.randn(40, 1).repeat(1, 9)  # every C_ij equal: the off-diagonal part has D (D - 1) of them
    c = (copies[:, 0].var(unbiased=False) / (copies[:, 0].var(unbiased=False) + btvae.BT_EPS)).item()
    off_diagonal = btvae.barlow_twins_loss(copies, copies, 1).item() - btvae.barlow_twins_loss(copies, copies, 0).item()
    assert off_diagonal == pytest.approx(9 * 8 * c * c, rel=1e-5)
    model, x = small_model_and_batch()
    for lam2 in (0.7, -0.5):  # Eq. 4 is Eq. 2 plus lambda2 BT, the negative ablation included
        terms = btvae.btvae_loss(model, x, config("--lam1", 0.3, "--lam2", lam2, "--delta", 0.01))
        assert terms["bt"].item() > 0 and terms["loss"].item() == pytest.approx(
            terms["recon"].item() + 0.3 * terms["kl"].item() + lam2 * terms["bt"].item(), rel=1e-6)

def test_a_tiny_run_overfits_its_images():
    # 32 images, 300 full-batch epochs of the default BTVAE objective on a small model: the MSE falls ~50x (measured).
    generator = torch.Generator().manual_seed(40)
    images = torch.zeros(32, 1, 16, 16, dtype=torch.uint8)
    for image, (top, left) in zip(images, torch.randint(0, 10, (32, 2), generator=generator)):
        image[:, top:top + 6, left:left + 6] = 200  # a bright square on black: what there is to learn
    cfg, model = config("--batch-size", 32), btvae.ConvVAE(1, 16, (8, 16), latent_dim=16)
    training = btvae.Training.start(model, cfg)
    recon = [btvae.run_epoch(model, images, cfg, training.optimiser)["recon"] for _ in range(300)]
    assert sum(recon[-5:]) < sum(recon[:5]) / 10, (recon[:5], recon[-5:])

# =============================================================================
# Fabricated data sets and stand-ins, in the exact on-disk formats the real ones have

def blob_images(count, channels, height, width, seed):
    """Images with structure (a bright rectangle on a dark ground), so models have something to learn."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(count, channels, height, width), dtype=np.uint8)
    for image in images:
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[:, top:top + height // 3, left:left + width // 3] = rng.integers(150, 256, size=(channels, 1, 1))
    return images

def make_mnist(root, train=200, test=60):
    """MNIST's idx files: magic (0x08 = uint8, then the number of dimensions), big-endian sizes, raw bytes."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, count, seed in (("train", train, 1), ("t10k", test, 2)):
        for kind, array in (("images-idx3", blob_images(count, 1, 28, 28, seed)[:, 0]),
                            ("labels-idx1", np.arange(count, dtype=np.uint8) % 10)):
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim,
                                                                     *array.shape) + array.tobytes())
    return root

def make_cifar10(root, per_batch=20, test=30):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        count = test if name == "test_batch" else per_batch
        images = blob_images(count, 3, 32, 32, seed=10 + i)
        images[0, 0], images[0, 1], images[0, 2] = 0, 100, 200  # channel order marker: R, G, B planes
        batch = {b"batch_label": name.encode(), b"labels": [j % 10 for j in range(count)],
                 b"data": images.reshape(count, 3072), b"filenames": [b"x.png"] * count}
        (folder / name).write_bytes(pickle.dumps(batch))
    return root

def make_celeba(root, counts=(24, 6, 8)):
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    lines = []
    for code, count in enumerate(counts):
        for image in blob_images(count, 3, 218, 178, seed=20 + code):  # CelebA's aligned images: 178 wide, 218 high
            lines.append(f"{len(lines) + 1:06d}.jpg {code}")
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / "img_align_celeba" / lines[-1].split()[0])
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root

class StandInFeatures(torch.nn.Module):
    """torch-fidelity's Inception as btvae.py uses it, cheaply: uint8 RGB in, a tuple of one feature tensor per
    layer out. Its first layer: each channel's mean and standard deviation (6); its second (the "2048-d" one):
    those of each channel's top and bottom halves (12), so that a test can tell which layer a measure used."""
    num_features = 6

    def __init__(self, layers=1):
        super().__init__()
        self.layers = layers

    def forward(self, images):
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        x = images.float().flatten(2)
        top, bottom = x.chunk(2, dim=-1)
        return (torch.cat([x.mean(-1), x.std(-1)], 1),
                torch.cat([top.mean(-1), top.std(-1), bottom.mean(-1), bottom.std(-1)], 1))[:self.layers]

def stand_in_network(features=(64,), weights=None):
    return StandInFeatures(len(features))

def replay(images, shift=0.0):
    """A make_batch that hands out `images` (as [0, 1] floats, plus `shift`) in order."""
    position = 0

    def make_batch(count):
        nonlocal position
        position += count
        return btvae.to_model_range(images[position - count:position]) + shift
    return make_batch

def features_of(images, shift=0.0, layer=0):
    return btvae.inception_features(StandInFeatures(layer + 1), replay(images, shift), len(images), CPU)[layer]

def uint8_images(count, size=16, seed=0):
    return torch.randint(0, 256, (count, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))

def scripted_epochs(monkeypatch, val_losses):
    """run_epoch replaced: each training epoch adds 1 to a bias (its weights recognisable), each validation pass
    returns the next of `val_losses`, with a KL and MSE recognisably its own."""
    val_losses = iter(val_losses)

    def scripted_epoch(model, images, cfg, optimiser=None, shuffle=None):
        if optimiser is not None:
            with torch.no_grad():
                model.to_mu.bias.add_(1)
            return {**dict.fromkeys(btvae.LOSS_TERMS, 1.0), "images": 2, "seconds": 0.5}
        loss = next(val_losses)
        return {"loss": loss, "recon": loss / 10, "kl": 10 * loss, "bt": 0.0, "images": 2, "seconds": 0.5}
    monkeypatch.setattr(btvae, "run_epoch", scripted_epoch)
    model = btvae.ConvVAE(1, 16, (8, 16), latent_dim=4)
    torch.nn.init.zeros_(model.to_mu.bias)
    return model

NO_IMAGES = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)

# =============================================================================
# The method (parts A-E): every line has a test that fails when it is changed to something plausible but wrong

class TestMethod:
    def test_encoder_blocks_halve_the_image_with_the_papers_widths(self):
        model = btvae.ConvVAE(3, 32)
        *blocks, flatten = model.encoder
        assert isinstance(flatten, torch.nn.Flatten) and len(blocks) == 5
        for (conv, norm, activation), widths in zip(blocks, [(3, 16), (16, 32), (32, 64), (64, 128), (128, 256)]):
            assert type(conv) is torch.nn.Conv2d and (conv.in_channels, conv.out_channels) == widths
            assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (2, 2), (1, 1))
            assert type(norm) is torch.nn.BatchNorm2d and type(activation) is torch.nn.LeakyReLU
        assert model.bottleneck_shape == (256, 1, 1) and model.to_mu.in_features == model.to_logvar.in_features == 256

    def test_decoder_mirrors_the_encoder_and_ends_in_a_sigmoid(self):
        model = btvae.ConvVAE(3, 32)
        assert (model.from_latent.in_features, model.from_latent.out_features) == (128, 256)
        *blocks, last_conv, output = model.decoder
        for (conv, norm, activation), widths in zip(blocks, [(256, 128), (128, 64), (64, 32), (32, 16), (16, 16)]):
            assert type(conv) is torch.nn.ConvTranspose2d and (conv.in_channels, conv.out_channels) == widths
            assert (conv.kernel_size, conv.stride, conv.padding, conv.output_padding) == ((3, 3), (2, 2), (1, 1), (1, 1))
            assert type(norm) is torch.nn.BatchNorm2d and type(activation) is torch.nn.LeakyReLU
        assert (last_conv.in_channels, last_conv.out_channels, last_conv.kernel_size, last_conv.stride) == (16, 3, (3, 3), (1, 1))
        assert type(output) is torch.nn.Sigmoid  # the data's range [0, 1]

    def test_encode_returns_the_mean_head_then_the_log_variance_head_and_decode_starts_from_the_smallest_map(self):
        model, x = small_model_and_batch()
        model.eval()
        with torch.no_grad():
            model.to_mu.weight.zero_(), model.to_mu.bias.fill_(0.25)
            model.to_logvar.weight.zero_(), model.to_logvar.bias.fill_(-1.5)
        mu, logvar = model.encode(x)
        assert torch.all(mu == 0.25) and torch.all(logvar == -1.5)
        z = torch.randn(4, 6)
        assert torch.equal(model.decode(z), model.decoder(model.from_latent(z).view(4, 16, 4, 4)))

    def test_image_size_must_be_divisible_by_every_halving(self):
        assert btvae.bottleneck_side(32, 5) == 1 and btvae.bottleneck_side(64, 5) == 2 and btvae.bottleneck_side(24, 3) == 3
        with pytest.raises(ValueError, match="not divisible by 2\\^2 = 4"):
            btvae.ConvVAE(1, 30, (16, 32), latent_dim=4)

    def test_reparameterisation_is_mu_plus_sigma_times_standard_normal_noise_with_gradients_through_both(self):
        mu = torch.tensor([[0.5, -2.0, 3.0]], requires_grad=True)
        logvar = torch.tensor([[0.0, math.log(4), math.log(0.25)]], requires_grad=True)
        torch.manual_seed(0)
        z = btvae.reparameterise(mu, logvar)
        torch.manual_seed(0)
        eps = torch.randn(1, 3)
        assert torch.allclose(z, mu + torch.tensor([1.0, 2.0, 0.5]) * eps)  # sigma = exp(logvar / 2)
        z.sum().backward()
        assert torch.equal(mu.grad, torch.ones(1, 3)) and torch.allclose(logvar.grad, 0.5 * torch.tensor([1, 2, 0.5]) * eps)

    def test_kl_in_closed_form_summed_over_dimensions_averaged_over_the_batch(self):
        assert btvae.kl_to_standard_normal(torch.ones(3, 5), torch.zeros(3, 5)).item() == pytest.approx(2.5)
        logvar = torch.full((3, 5), math.log(4))  # 1/2 (4 - 1 - log 4) per dimension
        assert btvae.kl_to_standard_normal(torch.zeros(3, 5), logvar).item() == pytest.approx(2.5 * (3 - math.log(4)))
        mixed = torch.tensor([[1.0] * 5, [3.0] * 5])  # per image 2.5 and 22.5: the batch mean is 12.5
        assert btvae.kl_to_standard_normal(mixed, torch.zeros(2, 5)).item() == pytest.approx(12.5)

    def test_vae_loss_is_the_pixel_mean_squared_error_plus_lambda1_kl(self):
        torch.manual_seed(3)
        x, x_recon, mu, logvar = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), torch.randn(4, 3), torch.randn(4, 3)
        loss, recon, kl = btvae.vae_loss(x, x_recon, mu, logvar, lam1=0.3)
        assert recon.item() == pytest.approx(((x - x_recon) ** 2).mean().item(), rel=1e-6)
        assert kl.item() == btvae.kl_to_standard_normal(mu, logvar).item()
        assert loss.item() == pytest.approx(recon.item() + 0.3 * kl.item(), rel=1e-6)

    def test_free_bits_floor_each_dimensions_batch_mean_kl_and_leave_the_reported_kl_true(self):
        mu = torch.tensor([[0.1, 2.0, 0.0], [0.3, 0.0, 0.0]])  # dimension KLs, batch means: 0.025, 1.0, 0
        logvar = torch.zeros(2, 3)
        assert btvae.kl_with_free_bits(mu, logvar, 0.5).item() == pytest.approx(0.5 + 1.0 + 0.5)
        assert btvae.kl_with_free_bits(mu, logvar, 0.01).item() == pytest.approx(0.025 + 1.0 + 0.01)
        x = torch.zeros(2, 1, 2, 2)
        loss, recon, kl = btvae.vae_loss(x, x, mu, logvar, lam1=0.1, free_bits=0.5)
        assert kl.item() == pytest.approx(1.025) and loss.item() == pytest.approx(0.1 * 2.0)  # the rate, the floored KL
        model, x = small_model_and_batch()
        torch.manual_seed(1)
        floored = btvae.btvae_loss(model, x, config("--lam1", 0.3, "--free-bits", 100))
        assert floored["loss"].item() == pytest.approx(floored["recon"].item() + 0.3 * 100 * 6 + 0.025 * floored["bt"].item(),
                                                       rel=1e-5)

    def test_barlow_twins_equals_a_plain_double_loop_over_eq3_on_standardised_features(self):
        torch.manual_seed(5)
        n, d, delta = 16, 5, 0.37
        a, b = torch.randn(n, d).double(), torch.randn(n, d).double()

        def standardised(z, i):  # biased variance, eps 1e-5: BatchNorm1d's, as the official Barlow Twins code
            column = z[:, i].tolist()
            mean = sum(column) / n
            return [(v - mean) / math.sqrt(sum((w - mean) ** 2 for w in column) / n + 1e-5) for v in column]

        sa, sb = [standardised(a, i) for i in range(d)], [standardised(b, i) for i in range(d)]
        c = [[sum(sa[i][k] * sb[j][k] for k in range(n)) / n for j in range(d)] for i in range(d)]
        expected = sum((1 - c[i][i]) ** 2 for i in range(d)) + delta * sum(
            c[i][j] ** 2 for i in range(d) for j in range(d) if j != i)
        assert btvae.barlow_twins_loss(a, b, delta).item() == pytest.approx(expected, rel=1e-10)
        assert torch.allclose(btvae.cross_correlation(a, b), torch.tensor(c, dtype=torch.float64))
        assert btvae.barlow_twins_loss(a, torch.randn(n, d).double(), delta=0).item() > 2  # unrelated twins: far from 0

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
        spread = (b - mu_recon) / torch.exp(0.5 * logvar_recon)  # b is a sample of N(mu_recon, sigma_recon^2)
        assert a is z and spread.abs().max() < 6 and spread.std() > 0.5
        (a, b), (c, d) = btvae.twins(model, mu, logvar, z, x_recon, "mu+logvar")
        assert a is mu and torch.equal(b, mu_recon) and c is logvar and torch.equal(d, logvar_recon)

    @pytest.mark.parametrize("bt_on", ["mu", "z", "mu+logvar"])
    def test_the_objective_decodes_a_sample_and_compares_its_twins(self, bt_on):
        model, x = small_model_and_batch()
        model.eval()
        torch.manual_seed(7)
        terms = btvae.btvae_loss(model, x, config("--lam1", 0.3, "--lam2", 0.7, "--bt-on", bt_on, "--delta", 0.01))
        torch.manual_seed(7)  # the same eps (and, for "z", the same draw for z_recon)
        mu, logvar = model.encode(x)
        z = btvae.reparameterise(mu, logvar)
        x_recon = model.decode(z)
        bt = sum(btvae.barlow_twins_loss(*pair, 0.01) for pair in btvae.twins(model, mu, logvar, z, x_recon, bt_on))
        _, recon, kl = btvae.vae_loss(x, x_recon, mu, logvar, 0.3)
        assert [terms[k].item() for k in ("recon", "kl", "bt")] == [recon.item(), kl.item(), bt.item()]

    def test_lambda2_zero_is_exactly_the_vae_and_skips_the_re_encoding(self):
        model, x = small_model_and_batch()
        calls = []
        model.encoder.register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(8)
        terms = btvae.btvae_loss(model, x, config("--lam1", 0.5, "--lam2", 0))
        torch.manual_seed(8)
        mu, logvar = model.encode(x)
        vae = torch.nn.functional.mse_loss(model.decode(btvae.reparameterise(mu, logvar)), x) \
            + 0.5 * btvae.kl_to_standard_normal(mu, logvar)
        assert len(calls) == 2 and terms["bt"].item() == 0 and terms["loss"].item() == vae.item()

    def test_barlow_twins_gradient_reaches_both_encoder_passes_and_the_decoder(self):
        model, x = small_model_and_batch()
        mu, logvar = model.encode(x)
        x_recon = model.decode(btvae.reparameterise(mu, logvar))
        (z_gt, z_recon), = btvae.twins(model, mu, logvar, None, x_recon, "mu")
        gradients = torch.autograd.grad(btvae.barlow_twins_loss(z_gt, z_recon), (z_gt, x_recon), retain_graph=True)
        assert all(g.abs().sum() > 0 for g in gradients)  # neither twin detached
        btvae.btvae_loss(model, x, config("--lam1", 0, "--lam2", 1))["bt"].backward()
        assert model.to_mu.weight.grad.abs().sum() > 0 and model.from_latent.weight.grad.abs().sum() > 0

    def test_batches_are_full_follow_the_shuffling_generator_and_scale_to_the_unit_interval(self):
        assert [b.tolist() for b in btvae.batch_indices(10, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the last dropped
        assert [b.tolist() for b in btvae.batch_indices(3, 4)] == [[0, 1, 2]]  # smaller than a batch: one batch
        shuffled = torch.cat(btvae.batch_indices(100, 10, torch.Generator().manual_seed(3)))
        assert shuffled.tolist() == torch.randperm(100, generator=torch.Generator().manual_seed(3)).tolist()
        generator = torch.Generator().manual_seed(3)
        assert not torch.equal(*(torch.cat(btvae.batch_indices(100, 10, generator)) for _ in range(2)))  # each epoch anew
        scaled = btvae.to_model_range(torch.tensor([0, 51, 255], dtype=torch.uint8))
        assert scaled.dtype == torch.float32 and scaled.tolist() == pytest.approx([0, 0.2, 1])

    def test_a_training_epoch_is_one_adam_step_per_shuffled_batch(self):
        model, _ = small_model_and_batch()
        images, cfg = uint8_images(26), config("--batch-size", 8, "--lam1", 0.1, "--lam2", 0.2, "--delta", 0.3)
        replica = btvae.ConvVAE(1, 16, (8, 16), latent_dim=6)
        replica.load_state_dict(model.state_dict())
        torch.manual_seed(9)
        terms = btvae.run_epoch(model, images, cfg, btvae.Training.start(model, cfg).optimiser,
                                torch.Generator().manual_seed(4))
        torch.manual_seed(9)  # the same steps by hand: 3 full batches of 8 (2 images dropped), in the shuffled order
        optimiser, losses = btvae.Training.start(replica, cfg).optimiser, []
        replica.train()
        for index in torch.randperm(26, generator=torch.Generator().manual_seed(4))[:24].split(8):
            step = btvae.btvae_loss(replica, images[index].float() / 255, cfg)
            optimiser.zero_grad()
            step["loss"].backward()
            optimiser.step()
            losses.append([step[name].item() for name in btvae.LOSS_TERMS])
        assert all(torch.equal(value, replica.state_dict()[name]) for name, value in model.state_dict().items())
        for i, name in enumerate(btvae.LOSS_TERMS):
            assert terms[name] == pytest.approx(sum(row[i] for row in losses) / 3, rel=1e-5)
        assert terms["images"] == 24 and terms["seconds"] > 0

    def test_a_validation_pass_changes_nothing_and_reports_the_mean_terms(self, monkeypatch):
        model, _ = small_model_and_batch()
        model.train()
        images, cfg = uint8_images(20), config("--batch-size", 10, "--lam1", 0.1, "--lam2", 0.2)
        before = {name: value.clone() for name, value in model.state_dict().items()}
        grad_enabled, loss = [], btvae.btvae_loss
        monkeypatch.setattr(btvae, "btvae_loss", lambda *a: grad_enabled.append(torch.is_grad_enabled()) or loss(*a))
        torch.manual_seed(10)
        terms = btvae.run_epoch(model, images, cfg)
        assert not model.training and grad_enabled == [False, False]  # evaluation mode, no graph
        assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())  # BatchNorm too
        torch.manual_seed(10)
        with torch.no_grad():  # with training's lambda1 and lambda2
            expected = [loss(model, images[i:i + 10].float() / 255, cfg) for i in (0, 10)]
        for name in btvae.LOSS_TERMS:
            assert terms[name] == pytest.approx((expected[0][name].item() + expected[1][name].item()) / 2, rel=1e-5)

    def test_adam_has_the_papers_learning_rate_no_weight_decay_and_a_shuffle_from_the_seed(self):
        model, _ = small_model_and_batch()
        training = btvae.Training.start(model, config("--seed", 7))
        assert type(training.optimiser) is torch.optim.Adam
        group, = training.optimiser.param_groups
        assert group["lr"] == 0.005 and group["weight_decay"] == 0 and group["betas"] == (0.9, 0.999)
        assert len(group["params"]) == len(list(model.parameters()))
        assert torch.equal(training.shuffle.get_state(), torch.Generator().manual_seed(7).get_state())
        assert training.epoch == 0 and training.best_loss == math.inf and not training.finished

    def test_early_stopping_stops_after_patience_epochs_and_restores_the_best_weights(self, monkeypatch):
        model = scripted_epochs(monkeypatch, [5.0, 4.0, 3.0, 3.5, 3.0, 3.2, 2.0])  # best at 3; an equal loss is no better
        training = btvae.train(model, NO_IMAGES, NO_IMAGES, config("--patience", 3))
        assert training.epoch == 6 and training.finished and training.stopped_early
        assert training.best_epoch == 3 and training.best_loss == 3.0 and torch.all(model.to_mu.bias == 3)
        model = scripted_epochs(monkeypatch, [5.0, 5.5, 4.0, 4.5, 4.6, 4.7, 1.0])  # the count restarts at epoch 3
        training = btvae.train(model, NO_IMAGES, NO_IMAGES, config("--patience", 3))
        assert training.epoch == 6 and training.best_epoch == 3 and torch.all(model.to_mu.bias == 3)

    def test_training_ends_after_epochs_with_the_best_weights_even_when_the_harness_stops_it(self, monkeypatch):
        model = scripted_epochs(monkeypatch, [5.0, 4.0, 4.5, 4.2])
        training = btvae.train(model, NO_IMAGES, NO_IMAGES, config("--epochs", 4, "--patience", 3))
        assert training.epoch == 4 and training.finished and not training.stopped_early and torch.all(model.to_mu.bias == 2)
        model = scripted_epochs(monkeypatch, [5.0, 4.0, 4.5])

        def after_epoch(training, train_terms, val_terms):
            if training.epoch == 3:
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            btvae.train(model, NO_IMAGES, NO_IMAGES, config(), after_epoch=after_epoch)
        assert torch.all(model.to_mu.bias == 2)

    def test_training_continues_a_given_state_where_it_stopped(self, monkeypatch):
        model = scripted_epochs(monkeypatch, [5.0, 4.0])
        cfg, seen = config("--epochs", 4), []
        training = btvae.Training.start(model, cfg)
        training.epoch = 2
        btvae.train(model, NO_IMAGES, NO_IMAGES, cfg, training, after_epoch=lambda state, *terms: seen.append(state.epoch))
        assert seen == [3, 4]

    def test_generate_decodes_prior_samples_drawn_with_the_generator_in_evaluation_mode(self):
        model, x = small_model_and_batch()
        decode, decoded = model.decode, []
        model.decode = lambda z: decoded.append((z, model.training)) or decode(z)
        model.train()
        samples = btvae.generate(model, 20000, torch.Generator().manual_seed(2))
        prior, training = decoded[-1]
        assert not training and prior.shape == (20000, 6) and samples.shape == (20000, 1, 16, 16)
        assert prior.mean(0).abs().max() < 0.05 and (prior.std(0) - 1).abs().max() < 0.05  # N(0, I)
        assert torch.equal(prior, torch.randn(20000, 6, generator=torch.Generator().manual_seed(2)))

    def test_reconstruct_decodes_the_posterior_mean_in_evaluation_mode(self):
        model, x = small_model_and_batch()
        reconstructions = btvae.reconstruct(model.train(), x)
        model.eval()
        with torch.no_grad():
            assert torch.equal(reconstructions, model.decode(model.encode(x)[0]))  # the mean, not a sample

# =============================================================================
# The experiments (parts F-I): data, FID, the latent space

class TestExperiments:
    def test_mnist_loader_pads_holds_out_a_tenth_and_subset_takes_the_first_images(self, tmp_path):
        make_mnist(tmp_path, train=200, test=60)
        train, val, test = btvae.load_data(config("--data-dir", tmp_path, "--seed", 1))
        assert (len(train), len(val), len(test)) == (180, 20, 60)
        assert all(s.images.dtype == torch.uint8 and s.images.shape[1:] == (1, 32, 32) for s in (train, val, test))
        assert torch.equal(test.images[:, 0, 2:30, 2:30], torch.from_numpy(blob_images(60, 1, 28, 28, seed=2))[:, 0])
        assert test.images[:, :, :2].max() == test.images[:, :, 30:].max() == 0 and torch.equal(test.labels, torch.arange(60) % 10)
        source = torch.from_numpy(blob_images(200, 1, 28, 28, seed=1))
        held_out = torch.randperm(200, generator=torch.Generator().manual_seed(0))[:20]  # the fixed seed, 0, not --seed's
        kept = torch.tensor(sorted(set(range(200)) - set(held_out.tolist())))  # the training images keep their order
        assert torch.equal(val.images[:, :, 2:30, 2:30], source[held_out]) and torch.equal(train.images[:, :, 2:30, 2:30], source[kept])
        make_mnist(tmp_path / "big", train=60_000, test=10)
        assert [len(s) for s in btvae.load_data(config("--data-dir", tmp_path / "big"))] == [55_000, 5_000, 10]  # at most 5,000
        other_seed, _, _ = btvae.load_data(config("--data-dir", tmp_path, "--seed", 2))
        subset, val_2, _ = btvae.load_data(config("--data-dir", tmp_path, "--subset", 50))
        assert torch.equal(val_2.images, val.images) and torch.equal(subset.images, other_seed.images[:50])
        bigger, _, _ = btvae.load_data(config("--data-dir", tmp_path, "--image-size", 64))
        assert bigger.images.shape[1:] == (1, 64, 64)

    def test_cifar10_loader_reads_the_five_training_batches_and_the_test_batch_in_rgb_order(self, tmp_path):
        make_cifar10(tmp_path, per_batch=20, test=30)
        train, val, test = btvae.load_data(config("--dataset", "cifar10", "--data-dir", tmp_path))
        assert (len(train), len(val), len(test)) == (90, 10, 30) and test.images.shape[1:] == (3, 32, 32)
        assert [test.images[0, c].unique().item() for c in range(3)] == [0, 100, 200] and torch.equal(test.labels, torch.arange(30) % 10)

    def test_celeba_loader_takes_the_official_splits_crops_the_centre_148_resizes_and_caches(self, tmp_path):
        import torchvision.transforms.v2.functional as TF
        make_celeba(tmp_path, counts=(24, 6, 8))
        cfg = config("--dataset", "celeba", "--data-dir", tmp_path)
        train, val, test = btvae.load_data(cfg)
        assert (len(train), len(val), len(test)) == (24, 6, 8) and train.images.shape[1:] == (3, 64, 64)
        expected = [TF.resize(TF.center_crop(TF.pil_to_tensor(Image.open(path).convert("RGB")), [148, 148]), [64, 64],
                              antialias=True) for path in sorted((tmp_path / "celeba" / "img_align_celeba").iterdir())[:24]]
        assert torch.equal(train.images, torch.stack(expected))  # torchvision's own crop and resize of the same files
        for jpeg in (tmp_path / "celeba" / "img_align_celeba").iterdir():
            jpeg.unlink()  # a second load must not decode the JPEGs again
        assert all(torch.equal(a.images, b.images) for a, b in zip((train, val, test), btvae.load_data(cfg)))

    @pytest.mark.parametrize("dataset", ["mnist", "cifar10", "celeba"])
    def test_a_failed_download_or_a_truncated_file_is_one_line_naming_what_to_do(self, dataset, tmp_path, monkeypatch):
        import torchvision
        download = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10,
                    "celeba": torchvision.datasets.CelebA}[dataset]
        monkeypatch.setattr(download, "download", lambda self: (_ for _ in ()).throw(RuntimeError("no network\nat all")))
        with pytest.raises(btvae.UsageError, match=f"cannot read {dataset} from .*no network.; without internet, put its "
                                                   "files there .README, 'Data'.") as error:
            btvae.load_data(config("--dataset", dataset, "--data-dir", tmp_path))
        assert "\n" not in str(error.value)
        make_cifar10(tmp_path)
        (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04truncated")
        with pytest.raises(btvae.UsageError, match="delete a truncated one"):
            btvae.load_data(config("--dataset", "cifar10", "--data-dir", tmp_path))

    def test_fid_input_clamps_rounds_and_repeats_grayscale(self):
        converted = btvae.to_fid_input(torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.7]).view(1, 1, 1, 5))
        assert converted.dtype == torch.uint8 and converted[0, :, 0].tolist() == [[0, 0, 128, 255, 255]] * 3
        rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
        assert torch.equal(btvae.to_fid_input(rgb), rgb)

    def test_inception_features_come_in_batches_of_converted_images_one_tensor_per_layer(self):
        images = torch.from_numpy(blob_images(120, 1, 16, 16, seed=53))
        features = btvae.inception_features(StandInFeatures(2), replay(images), len(images), CPU)
        expected = StandInFeatures(2)(btvae.to_fid_input(images))
        assert [f.shape for f in features] == [(120, 6), (120, 12)]
        assert all(torch.allclose(ours, theirs) for ours, theirs in zip(features, expected))

    def test_frechet_distance_matches_torchmetrics_and_one_dimensional_gaussians(self):
        from torchmetrics.image.fid import FrechetInceptionDistance

        class TensorOut(torch.nn.Module):  # torchmetrics takes the features themselves, not a tuple
            num_features = StandInFeatures.num_features

            def forward(self, images):
                return StandInFeatures()(images)[0]
        real, fake = torch.from_numpy(blob_images(150, 3, 16, 16, seed=54)), torch.from_numpy(blob_images(130, 3, 16, 16, 55)) // 2
        metric = FrechetInceptionDistance(feature=TensorOut())
        metric.update(real, real=True)
        metric.update(fake, real=False)
        assert btvae.frechet_distance(features_of(real), features_of(fake)) == pytest.approx(float(metric.compute()), rel=1e-6)
        torch.manual_seed(9)
        a, b = torch.randn(500, 1) * 2 + 1, torch.randn(400, 1) * 0.5 - 3
        expected = (a.double().mean() - b.double().mean()) ** 2 + (a.double().std() - b.double().std()) ** 2
        assert btvae.frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9) and abs(btvae.frechet_distance(a, a)) < 1e-9

    def test_precision_and_recall_equal_a_plain_loop_over_their_definition(self):
        torch.manual_seed(10)
        real, fake = torch.randn(40, 3), torch.randn(30, 3) * 0.6 + 1.5

        def share_inside(points, centres, k=3):  # balls to the k-th nearest other point of the same set
            radius = lambda c: sorted(float((c - other).norm()) for other in centres)[k]  # noqa: E731  [0]: c itself
            return sum(any(float((p - c).norm()) <= radius(c) for c in centres) for p in points) / len(points)

        precision, recall = btvae.precision_recall(real, fake)
        assert (precision, recall) == (pytest.approx(share_inside(fake, real)), pytest.approx(share_inside(real, fake)))
        assert 0 < precision < 1 and 0 < recall < 1
        points = torch.randn(10, 3).repeat(4, 1)  # each point 4 times: radius 0, and only distance 0 is inside
        assert btvae.precision_recall(points, points) == (1.0, 1.0) and btvae.precision_recall(points, points + 1e-3) == (0, 0)
        real = torch.from_numpy(blob_images(300, 3, 16, 16, seed=52))
        precision, recall = btvae.precision_recall(features_of(real), features_of(real[:5].repeat(60, 1, 1, 1)))
        assert precision == 1.0 and recall < 0.2  # realistic, but 5 images: no variety

    def test_fid_measurer_measures_each_layer_and_keeps_the_test_features_for_the_next_run(self, tmp_path, monkeypatch):
        monkeypatch.setattr(btvae, "make_fid_network", stand_in_network)
        real = torch.from_numpy(blob_images(120, 3, 16, 16, seed=56))
        fake = (torch.from_numpy(blob_images(120, 3, 16, 16, seed=57)).int() * 3 // 4).to(torch.uint8)  # a little dimmer
        cfg = config("--cache-dir", tmp_path, "--fid-samples", 120, "--fid-2048")
        measured = btvae.fid_measurer(btvae.Split(real), cfg, CPU)(replay(fake), "_x")
        assert set(measured) == {"fid_x", "fid_2048_x", "precision_2048_x", "recall_2048_x", "fid_x_seconds"}
        assert measured["fid_x"] == btvae.frechet_distance(features_of(real), features_of(fake))
        assert measured["fid_2048_x"] == btvae.frechet_distance(features_of(real, layer=1), features_of(fake, layer=1))
        precision, recall = btvae.precision_recall(features_of(real, layer=1), features_of(fake, layer=1))
        assert (measured["precision_2048_x"], measured["recall_2048_x"]) == (precision, recall) and 0 < recall < precision < 1
        [cache] = tmp_path.glob("inception_real_mnist_32px_n120_layers64+2048_default_torch-fidelity*.pt")
        garbage = btvae.Split(torch.zeros_like(real))  # a cache hit never looks at the test images
        again = btvae.fid_measurer(garbage, cfg, CPU)(replay(fake), "_x")
        assert {k: v for k, v in again.items() if "seconds" not in k} == {k: v for k, v in measured.items() if "seconds" not in k}

    def test_fid_measurer_asks_for_the_64_d_layer_alone_without_fid_2048_and_records_null_without_a_network(
            self, tmp_path, monkeypatch, capsys):
        asked = []
        monkeypatch.setattr(btvae, "make_fid_network", lambda features, weights: asked.append(features) or StandInFeatures(1))
        real = torch.from_numpy(blob_images(60, 3, 16, 16, seed=58))
        measured = btvae.fid_measurer(btvae.Split(real), config("--cache-dir", tmp_path, "--fid-samples", 60), CPU)(
            replay(real // 2), "_gmm")
        assert asked == [(64,)] and measured["fid_gmm"] > 0 and measured["recall_2048_gmm"] is None
        monkeypatch.setattr(btvae, "make_fid_network", lambda *_: (_ for _ in ()).throw(OSError("no network")))
        assert set(btvae.fid_measurer(btvae.Split(real), config(), CPU)(None, "").values()) == {None}
        assert "FID skipped, recorded as null" in capsys.readouterr().out

    def test_unit_activity_counts_above_each_threshold_and_the_participation_ratio_by_hand(self):
        variances = torch.tensor([0.0, 0.0099, 0.01, 0.0101, 0.0499, 0.05, 0.0501, 0.0999, 0.1, 0.1001, 4.0])
        activity = btvae.unit_activity(variances)  # a variance at a threshold is not above it
        assert (activity["active_units"], activity["active_units_0.05"], activity["active_units_0.1"]) == (8, 5, 2)
        assert activity["participation_ratio"] == pytest.approx(sum(variances.tolist()) ** 2 / sum(v * v for v in variances.tolist()))
        assert btvae.participation_ratio(torch.full((7,), 0.3)) == pytest.approx(7)  # equal spread: D
        assert btvae.participation_ratio(torch.tensor([3.0, 1.0])) == pytest.approx(1.6)  # 16 / 10

    def test_an_encoder_whose_mean_uses_k_of_d_dimensions_has_k_active_units(self):
        model, _ = small_model_and_batch()
        with torch.no_grad():
            model.to_mu.weight[2:] = 0  # dimensions 2.. ignore the image
            model.to_mu.weight[:2] *= 100
        model.train()  # as training leaves it: encode_split measures in evaluation mode, in passes of ENCODE_BATCH
        images = uint8_images(1100)
        mu = btvae.encode_split(model, images)
        assert btvae.active_units(mu.var(dim=0)) == 2 and mu.shape == (1100, 6)
        with torch.no_grad():
            assert torch.allclose(mu, model.eval().encode(btvae.to_model_range(images))[0], atol=1e-5)

    def test_latent_correlation_is_the_mean_absolute_off_diagonal_pearson_correlation(self):
        torch.manual_seed(13)
        mu = torch.randn(3000, 4) @ torch.randn(4, 4)  # correlated dimensions, some negatively
        pearson = np.corrcoef(mu.double().numpy(), rowvar=False)
        assert btvae.latent_correlation(mu) == pytest.approx(np.abs(pearson[~np.eye(4, dtype=bool)]).mean(), rel=1e-4)
        assert btvae.latent_correlation(torch.randn(100, 1)) is None  # no pairs in one dimension

    def test_twin_correlation_averages_the_diagonal_over_every_pair(self):
        z = torch.randn(500, 4, generator=torch.Generator().manual_seed(14))
        assert btvae.twin_correlation([(z, z)]) == pytest.approx(1, abs=1e-4) == -btvae.twin_correlation([(z, -z)])
        assert btvae.twin_correlation([(z, z), (z, -z)]) == pytest.approx(0, abs=1e-4)

    @pytest.mark.parametrize("bt_on", ["mu", "z", "mu+logvar"])
    def test_the_measured_twins_are_the_pairs_the_objective_compares(self, bt_on):
        model, _ = small_model_and_batch()
        images = uint8_images(30)
        torch.manual_seed(15)
        mu, pairs = btvae.encode_split(model, images, bt_on)
        torch.manual_seed(15)
        with torch.no_grad():
            mu_expected, logvar = model.encode(btvae.to_model_range(images))
            z = btvae.reparameterise(mu_expected, logvar)
            expected = btvae.twins(model, mu_expected, logvar, z, model.decode(z), bt_on)
        assert torch.equal(mu, mu_expected) and len(pairs) == len(expected)
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(pairs, expected))

    def test_linear_probe_reads_separable_labels_and_not_shuffled_ones(self):
        torch.manual_seed(16)
        labels = torch.arange(2000) % 10
        features = (torch.randn(10, 8) * 5)[labels] + torch.randn(2000, 8)
        train, test = slice(0, 1500), slice(1500, 2000)
        assert btvae.probe_accuracy(features[train], labels[train], features[test], labels[test]) > 0.98
        assert btvae.probe_accuracy(features[train] / 1e4, labels[train], features[test] / 1e4, labels[test]) > 0.98  # 0.82 unscaled
        shuffled = labels[torch.randperm(2000)]
        assert btvae.probe_accuracy(features[train], shuffled[train], features[test], shuffled[test]) < 0.2
        renamed = (labels + 1) % 10  # fitted on the training images, not the test ones
        assert btvae.probe_accuracy(features[train], labels[train], features[test], renamed[test]) < 0.05
        assert btvae.probe_accuracy(features[train], None, features[test], None) is None  # no labels (CelebA)
        assert btvae.probe_accuracy(features[train], torch.zeros(1500, dtype=torch.long), features[test], labels[test]) is None

    def test_the_mixture_finds_two_clusters_and_samples_them_seeded(self):
        generator = torch.Generator().manual_seed(17)  # two tilted clusters in 2-d, 3:1 in size
        covariance, means = torch.tensor([[2.0, 1.2], [1.2, 1.0]]), torch.tensor([[-6.0, 0.0], [6.0, 3.0]])
        which = (torch.rand(4000, generator=generator) < 0.25).long()
        points = means[which] + torch.randn(4000, 2, generator=generator) @ torch.linalg.cholesky(covariance).T
        mixture = btvae.LatentMixture(points, seed=0, components=2)
        order = mixture.means[:, 0].argsort()
        assert torch.allclose(mixture.means[order].float(), means, atol=0.15)
        assert torch.allclose(mixture.weights[order].float(), torch.tensor([0.75, 0.25]), atol=0.03)
        samples = mixture.sample(20000, torch.Generator().manual_seed(1))
        right = samples[:, 0] > 0
        assert samples.dtype == torch.float32 and right.float().mean().item() == pytest.approx(0.25, abs=0.015)
        for side, mean in ((~right, means[0]), (right, means[1])):  # L eps, not L^T eps
            assert torch.allclose(samples[side].mean(0), mean, atol=0.1)
            assert torch.allclose(torch.cov(samples[side].T), covariance, atol=0.15)
        assert torch.equal(samples, mixture.sample(20000, torch.Generator().manual_seed(1)))
        assert torch.equal(btvae.LatentMixture(points[:400], seed=3).means, btvae.LatentMixture(points[:400], seed=3).means)
        assert len(btvae.LatentMixture(points[:400], seed=3).weights) == btvae.MIXTURE_COMPONENTS == 10
        assert len(btvae.LatentMixture(points[:4], seed=0).weights) == 4  # no more components than points
        model, _ = small_model_and_batch()
        model.decode = lambda z: z  # generate decodes the mixture's samples, drawn with the generator
        assert torch.equal(btvae.generate(model, 50, torch.Generator().manual_seed(3), mixture),
                           mixture.sample(50, torch.Generator().manual_seed(3)))

    def test_latent_measurements_are_of_the_test_images_and_the_figures_data(self):
        model, _ = small_model_and_batch()
        with torch.no_grad():
            model.to_mu.weight.mul_(100)
        train = btvae.Split(torch.zeros(60, 1, 16, 16, dtype=torch.uint8), torch.arange(60) % 3)  # all alike
        test = btvae.Split(uint8_images(40), torch.arange(40) % 3)
        torch.manual_seed(0)
        metrics, figures, train_mu = btvae.measure_latent_space(model, train, test, "mu+logvar")
        torch.manual_seed(0)
        test_mu, pairs = btvae.encode_split(model, test.images, "mu+logvar")
        assert torch.equal(train_mu, btvae.encode_split(model, train.images)) and metrics["active_units"] > 0
        assert {k: metrics[k] for k in btvae.unit_activity(test_mu.var(0))} == btvae.unit_activity(test_mu.var(0))
        assert metrics["latent_correlation"] == btvae.latent_correlation(test_mu)
        assert metrics["twin_correlation"] == btvae.twin_correlation(pairs) != metrics["twin_correlation_mu"]
        assert metrics["twin_correlation_mu"] == btvae.twin_correlation(pairs[:1])  # the means' pair alone
        assert metrics["probe_accuracy"] == btvae.probe_accuracy(train_mu, train.labels, test_mu, test.labels)
        assert torch.equal(figures["mu_variance"], test_mu.var(0)) and "test_mu" not in figures
        assert torch.equal(figures["mu_correlation"], btvae.cross_correlation(test_mu, test_mu))
        _, figures, _ = btvae.measure_latent_space(btvae.ConvVAE(1, 16, (8, 16), latent_dim=2), train, test, "z")
        assert figures["test_mu"].shape == (40, 2) and torch.equal(figures["test_labels"], test.labels)  # Figure 3's

# =============================================================================
# The harness: the command line, bad input, checkpoints and --resume, faults, --evaluate

MEASURED_OUTPUTS = {"config.json", "metrics.json", "samples.png", "samples_gmm.png", "reconstructions.png", "latent.pt"}
MEASUREMENTS = {"fid", "fid_2048", "precision_2048", "recall_2048", "fid_seconds", "fid_samples", "active_units",
                "active_units_0.05", "active_units_0.1", "participation_ratio", "latent_correlation", "twin_correlation",
                "twin_correlation_mu", "probe_accuracy", "pixel_probe_accuracy", "latent_seconds", "mixture_fit_seconds",
                "fid_gmm", "fid_2048_gmm", "precision_2048_gmm", "recall_2048_gmm", "fid_gmm_seconds"}
TRAINING_SUMMARY = {"best_val_loss", "best_epoch", "rate", "reconstruction_error", "epochs_trained", "stopped_early",
                    "train_seconds", "images_per_second"}
SMALL_MODEL = ["--hidden-dims", "16", "32", "--latent-dim", "16"]  # what the harness's tests check does not need more
RUN_ARGS = ["--epochs", "4", "--patience", "10", "--fid-samples", "40", "--batch-size", "60", *SMALL_MODEL]  # 3 + 1 batches

def run_cli(*argv, cwd=HERE):
    return subprocess.run([sys.executable, str(HERE / "btvae.py"), *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)

def run_result(out):
    """What must not depend on interruptions or on running twice: all but the timings, bit for bit."""
    metrics = {k: v for k, v in json.loads((out / "metrics.json").read_text()).items() if "second" not in k}
    history = [{k: v for k, v in row.items() if "second" not in k} for row in csv.DictReader(open(out / "history.csv"))]
    return metrics, history, torch.load(out / "model.pt", weights_only=True)["state_dict"], (out / "samples.png").read_bytes()

def assert_same_result(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3]
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])

@pytest.fixture
def mnist_with_stand_in_fid(tmp_path, monkeypatch):
    make_mnist(tmp_path / "data")
    monkeypatch.setattr(btvae, "make_fid_network", stand_in_network)
    return ["--data-dir", str(tmp_path / "data"), *RUN_ARGS]

def signal_during_loss_call(monkeypatch, call, signum=signal.SIGINT):
    """Send ourselves a signal (SIGINT: a real Ctrl-C) in the call-th training step; returns the real loss, to put back."""
    real_loss, calls = btvae.btvae_loss, []

    def loss(*args):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return real_loss(*args)
    monkeypatch.setattr(btvae, "btvae_loss", loss)
    return real_loss

def test_command_line_end_to_end_records_the_command_the_commit_the_machine_and_the_versions(tmp_path, monkeypatch):
    make_mnist(tmp_path / "data")
    for name in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")  # oneDNN's default (the CPU's best kernels), named
    result = run_cli("--epochs", "2", "--fid-samples", "0", *SMALL_MODEL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs" / "mnist_lam2=0.025_seed0"  # the default --out
    assert {p.name for p in out.iterdir()} == MEASURED_OUTPUTS | {"history.csv", "model.pt", "checkpoint.pt"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == MEASUREMENTS | TRAINING_SUMMARY and metrics["fid"] is None and metrics["epochs_trained"] == 2
    settings = json.loads((out / "config.json").read_text())
    assert settings["lam2"] == 0.025 and settings["command"] == "python btvae.py --epochs 2 --fid-samples 0 " + " ".join(SMALL_MODEL)
    git = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True, text=True, cwd=HERE)
    assert settings["commit"] == (git.stdout.strip() or None) and settings["device"] == "cpu"
    assert settings["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert settings["cpu_kernel_variables"] == {"ONEDNN_MAX_CPU_ISA": "ALL"}  # only those that are set
    import sklearn, torch_fidelity, torchvision  # noqa: E401
    assert settings["versions"] == {"python": sys.version.split()[0], "torch": torch.__version__,
                                    "torchvision": torchvision.__version__, "torch-fidelity": torch_fidelity.__version__,
                                    "scikit-learn": sklearn.__version__}
    assert len((out / "history.csv").read_text().splitlines()) == 3 and "epoch   2/2" in result.stdout
    result = run_cli("--lam2", "nan", "--out", tmp_path / "bad")  # bad input: one line, no traceback, nothing written
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and not (tmp_path / "bad").exists()

def test_a_run_with_fid_logs_each_samplers_measurements_and_keeps_a_reloadable_best_model(tmp_path, monkeypatch, capsys):
    make_mnist(tmp_path)
    monkeypatch.setattr(btvae, "make_fid_network", stand_in_network)
    out = tmp_path / "run"
    btvae.main(["--data-dir", str(tmp_path), "--lam2", "0", "--epochs", "3", "--fid-samples", "40", "--out", str(out),
                "--fid-2048", *SMALL_MODEL])
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["fid_2048_gmm"]) and metrics["fid_2048_gmm"] != metrics["fid_gmm"]
    logged = capsys.readouterr().out
    for sampler, named in (("", ""), ("_gmm", " of the mixture sampler")):
        assert (f"FID-64{named} over 40 samples: {metrics[f'fid{sampler}']:.4f}; in 2048-d features FID "
                f"{metrics[f'fid_2048{sampler}']:.2f}, precision {metrics[f'precision_2048{sampler}']:.3f}, recall "
                f"{metrics[f'recall_2048{sampler}']:.3f} ({metrics[f'fid{sampler}_seconds']:.0f} s)") in logged
    history = list(csv.DictReader(open(out / "history.csv")))
    best = min(history, key=lambda row: float(row["val_loss"]))
    assert metrics["best_epoch"] == int(best["epoch"]) and metrics["best_val_loss"] == float(best["val_loss"])
    assert (metrics["rate"], metrics["reconstruction_error"]) == (float(best["val_kl"]), float(best["val_recon"]))
    model, trained_with = btvae.load_model(out / "model.pt")
    assert model.architecture == {"channels": 1, "image_size": 32, "hidden_dims": (16, 32), "latent_dim": 16}
    assert trained_with["lam2"] == 0 and not model.training

def test_each_epochs_records_are_written_as_it_ends_and_the_summary_is_the_kept_epochs(tmp_path, monkeypatch):
    model = scripted_epochs(monkeypatch, [5.0, 4.0, 3.0, 3.5, 3.0, 3.2, 2.0])
    cfg, history = config("--patience", 3, "--out", tmp_path), []
    training = btvae.train(model, NO_IMAGES, NO_IMAGES, cfg, after_epoch=btvae.epoch_recorder(cfg, model, history))
    summary = btvae.summary(training, history)
    assert summary["epochs_trained"] == 6 and summary["stopped_early"] and summary["best_epoch"] == 3
    assert (summary["best_val_loss"], summary["rate"], summary["reconstruction_error"]) == (3.0, 30.0, 0.3)  # not the last's
    assert summary["images_per_second"] == 4.0 and torch.all(btvae.load_model(tmp_path / "model.pt")[0].to_mu.bias == 3)
    assert [row["val_loss"] for row in csv.DictReader(open(tmp_path / "history.csv"))] == ["5.0", "4.0", "3.0", "3.5", "3.0", "3.2"]
    assert len(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"]) == 6

def test_a_nan_loss_stops_the_run_with_one_line_and_keeps_the_best_weights(tmp_path, monkeypatch, capsys):
    make_mnist(tmp_path)
    real_kl, calls = btvae.kl_to_standard_normal, []
    monkeypatch.setattr(btvae, "kl_to_standard_normal",  # 3 training + 1 validation batches an epoch: NaN in epoch 2
                        lambda mu, logvar: calls.append(1) or real_kl(mu, logvar) * (math.nan if len(calls) > 4 else 1))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        btvae.main(["--data-dir", str(tmp_path), "--epochs", "5", "--batch-size", "60", "--out", str(out), *SMALL_MODEL])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and "NaN" in error and "epoch 2" in error and len(error.strip().splitlines()) == 1
    assert {p.name for p in out.iterdir()} == {"config.json", "history.csv", "model.pt", "checkpoint.pt"}
    assert all(torch.isfinite(t).all() for t in btvae.load_model(out / "model.pt")[0].state_dict().values())

BAD_INPUT = {
    "unknown data set": (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
    "lam2 nan": (["--lam2", "nan"], "--lam2 must be finite (nan)"),
    "lam2 infinite": (["--lam2=-inf"], "--lam2 must be finite (-inf)"),
    "lr zero": (["--lr", "0"], "--lr above 0 (0.0)"),
    "lam1 negative": (["--lam1", "-1"], "--lam1 must be at least 0, got -1.0"),
    "lam1 nan": (["--lam1", "nan"], "--lam1 must be at least 0, got nan"),
    "zero epochs": (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    "one image a batch": (["--batch-size", "1"], "--batch-size must be at least 2, got 1"),
    "zero latent size": (["--latent-dim", "0"], "--latent-dim must be at least 1, got 0"),
    "negative free bits": (["--free-bits", "-0.1"], "--free-bits must be at least 0, got -0.1"),
    "one fid sample": (["--fid-samples", "1"], "--fid-samples 0 (no FID) or at least 2"),
    "image size not divisible": (["--image-size", "48"], "not divisible by 2^5 = 32"),
    "bad hidden dims": (["--hidden-dims", "16", "x"], "argument --hidden-dims: invalid int value: 'x'"),
    "unreadable fid weights": (["--fid-weights", "{tmp}/garbage.pth"], "are not PyTorch weights"),
    "out is a file": (["--out", "{tmp}/garbage.pth"], "--out {tmp}/garbage.pth is a file; name a folder"),
    "no data": (["--data-dir", "{tmp}/nowhere", "--dataset", "cifar10"], "cannot read cifar10 from {tmp}/nowhere"),
    "resume of nothing": (["--resume"], "does not exist, so there is nothing to resume; run without it"),
}

@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    argv, expected = BAD_INPUT[case]
    (tmp_path / "garbage.pth").write_bytes(b"these are not weights")
    import torchvision
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda self: (_ for _ in ()).throw(OSError("offline")))
    out = tmp_path / "runs" / "out"
    with pytest.raises(SystemExit) as exit_info:
        btvae.main(["--out", str(out)] + [a.format(tmp=tmp_path) for a in argv])  # a later --out wins
    error = capsys.readouterr().err.replace(str(tmp_path), "{tmp}")
    assert exit_info.value.code == 2 and len(error.strip().splitlines()) == 1 and error.startswith("btvae.py: error: ")
    assert expected in error and not (tmp_path / "runs").exists()  # a folder made for the run is removed again

def test_ctrl_c_in_training_then_in_the_measurements_and_resume_ends_bit_for_bit_like_an_uninterrupted_run(
        tmp_path, monkeypatch, capsys, mnist_with_stand_in_fid):
    for name in ("straight", "again"):
        btvae.main([*mnist_with_stand_in_fid, "--out", str(tmp_path / name)])
    assert_same_result(run_result(tmp_path / "straight"), run_result(tmp_path / "again"))  # the same command, again
    out, argv = tmp_path / "interrupted", [*mnist_with_stand_in_fid, "--out", str(tmp_path / "interrupted")]
    real_loss = signal_during_loss_call(monkeypatch, call=2 * 4 + 2)  # the second training step of epoch 3
    with pytest.raises(SystemExit) as exit_info:
        btvae.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 130 and len(error.strip().splitlines()) == 1
    assert error.strip() == f"btvae.py: interrupted; {out} keeps every finished epoch; to continue: python btvae.py " \
                            + " ".join(argv) + " --resume"
    assert len(torch.load(out / "checkpoint.pt", weights_only=True)["history"]) == 2  # epoch 3 was abandoned
    monkeypatch.setattr(btvae, "btvae_loss", real_loss)
    mixture = btvae.LatentMixture
    monkeypatch.setattr(btvae, "LatentMixture", lambda *args: os.kill(os.getpid(), signal.SIGTERM))  # after the prior's FID
    with pytest.raises(SystemExit) as exit_info:
        btvae.main([*argv, "--resume"])
    assert exit_info.value.code == 143 and "resuming after epoch 2" in capsys.readouterr().out
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(btvae, "LatentMixture", mixture)
    btvae.main([*argv, "--resume"])
    assert_same_result(run_result(out), run_result(tmp_path / "straight"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main gives the handlers back

def test_a_real_sigterm_to_a_running_process_then_resume_with_the_same_flags_only(tmp_path, capsys):
    make_mnist(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["--data-dir", str(tmp_path / "data"), "--patience", "30", "--fid-samples", "0", "--out", str(out)]
    process = subprocess.Popen([sys.executable, str(HERE / "btvae.py"), *argv, "--epochs", "8"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 143 and "to continue:" in error and "--resume" in error, error  # 128 + SIGTERM
    epochs_done = len(torch.load(out / "checkpoint.pt", weights_only=True)["history"])
    with pytest.raises(SystemExit) as exit_info:  # other settings are refused...
        btvae.main([*argv, "--epochs", "40", "--resume"])
    assert exit_info.value.code == 2 and "--epochs 8 (now 40)" in capsys.readouterr().err
    btvae.main([*argv, "--epochs", "8", "--resume"])  # ...the same ones continue
    assert f"resuming after epoch {epochs_done}" in capsys.readouterr().out and (out / "metrics.json").is_file()

@pytest.mark.skipif(os.name == "nt", reason="no flock on Windows")
def test_a_second_run_into_a_folder_in_use_is_refused_before_it_writes_anything(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    lock = btvae.hold(tmp_path / "run")  # as another run's process holds it, from its start to its end
    for other in (["--lam2", "0"], ["--resume"]):  # --resume too, before it reads the checkpoint
        with pytest.raises(SystemExit) as exit_info:
            btvae.main(["--out", str(tmp_path / "run"), *other])
        assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == \
            f"btvae.py: error: {tmp_path / 'run'} is in use by another run; wait for it to end, or choose another --out"
    os.close(lock)
    assert not list((tmp_path / "run").iterdir())
    os.close(btvae.hold(tmp_path / "run"))  # free again

@pytest.mark.parametrize("name, when, fault", [("checkpoint.pt", 2, "full disk"), ("model.pt", 2, "full disk"),
                                               ("history.csv", 3, "full disk"), ("samples.png", 1, "full disk"),
                                               ("metrics.json", 1, "full disk"), ("checkpoint.pt", 2, "Ctrl-C")])
def test_a_full_disk_or_ctrl_c_mid_write_is_one_line_leaves_nothing_half_written_and_resume_finishes(
        name, when, fault, tmp_path, monkeypatch, capsys, mnist_with_stand_in_fid):
    out, argv, write_bytes, calls = tmp_path / "run", [*mnist_with_stand_in_fid, "--out", str(tmp_path / "run")], Path.write_bytes, []

    def write(self, data):  # the when-th write of the file: half of it, then the operating system's ENOSPC, or Ctrl-C
        if self.name.startswith(f".{name}.") and self.name.endswith(".tmp"):
            calls.append(self)
            if len(calls) == when:
                write_bytes(self, data[:len(data) // 2])
                if fault == "Ctrl-C":
                    os.kill(os.getpid(), signal.SIGINT)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_bytes(self, data)
    with monkeypatch.context() as disk:
        disk.setattr(Path, "write_bytes", write)
        with pytest.raises(SystemExit) as exit_info:
            btvae.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == (1 if fault == "full disk" else 130) and len(error.strip().splitlines()) == 1
    assert "to continue: " in error and (fault == "Ctrl-C" or
                                         f"btvae.py: stopped: could not write {out / name} (No space left on device)" in error)
    assert not list(out.glob(".*.tmp"))  # no half-written file left
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)  # the last complete one, readable
    assert (len(checkpoint["history"]) < 4) == (name in ("checkpoint.pt", "model.pt", "history.csv"))
    btvae.main([*argv, "--resume"])  # space freed: the run finishes
    assert json.loads((out / "metrics.json").read_text())["epochs_trained"] == 4

def test_a_failed_or_unreadable_cache_costs_time_never_the_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.pt").write_bytes(b"not torch")
    assert btvae.cached(tmp_path / "broken.pt", lambda: 7) == 7 and btvae.cached(tmp_path / "broken.pt", lambda: 8) == 7
    monkeypatch.setattr(torch, "save", lambda obj, file: (_ for _ in ()).throw(RuntimeError("unexpected pos 4096")))
    assert btvae.cached(tmp_path / "cache" / "features.pt", lambda: 3) == 3
    assert "note: could not cache" in capsys.readouterr().out and not list((tmp_path / "cache").iterdir())

def test_sigterm_while_loading_data_is_one_line_and_exit_143(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(btvae, "load_data", lambda cfg: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as exit_info:
        btvae.main(["--out", str(tmp_path / "run")])
    assert exit_info.value.code == 143 and capsys.readouterr().err == "btvae.py: interrupted; nothing to resume\n"

@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_unusable_checkpoints_are_usage_errors(damage, tmp_path):
    torch.save({"model": {}, "optimiser": {}}, tmp_path / "checkpoint.pt")  # a foreign one, say
    if damage == "truncated":
        (tmp_path / "checkpoint.pt").write_bytes((tmp_path / "checkpoint.pt").read_bytes()[:100])
    with pytest.raises(btvae.UsageError, match="checkpoint.pt is not a checkpoint of this run .*; delete the folder"):
        btvae.resume(tmp_path / "checkpoint.pt", btvae.ConvVAE(1, 32), config())

def test_checkpoints_of_the_code_before_the_lean_rewrite_resume_to_the_same_result_and_a_finished_run_stays(
        tmp_path, monkeypatch, capsys, mnist_with_stand_in_fid):
    btvae.main([*mnist_with_stand_in_fid, "--out", str(tmp_path / "straight")])
    out, argv = tmp_path / "old", [*mnist_with_stand_in_fid, "--out", str(tmp_path / "old")]
    real_loss = signal_during_loss_call(monkeypatch, call=2 * 4 + 2)
    with pytest.raises(SystemExit):
        btvae.main(argv)
    monkeypatch.setattr(btvae, "btvae_loss", real_loss)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)  # as the code of 2026-12-05 wrote it:
    checkpoint["early_stopping"]["patience"] = 10  # its EarlyStopping's attributes, its --precision, no --free-bits
    checkpoint["settings"]["precision"] = "fp32"
    del checkpoint["settings"]["free_bits"]
    torch.save(checkpoint, out / "checkpoint.pt")
    btvae.main([*argv, "--resume"])
    assert_same_result(run_result(out), run_result(tmp_path / "straight"))
    written = (out / "metrics.json").read_bytes()
    btvae.main([*argv, "--resume"])
    assert "finished run: nothing to resume" in capsys.readouterr().out
    for delete_the_checkpoint in (False, True):  # the run again, and again once its checkpoint is deleted
        if delete_the_checkpoint:
            (out / "checkpoint.pt").unlink()
        with pytest.raises(SystemExit) as exit_info:
            btvae.main(argv)
        assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == \
            f"btvae.py: error: {out} already holds results; choose another --out (or delete it)"
    assert (out / "metrics.json").read_bytes() == written
    (out / "metrics.json").rename(out / "checkpoint.pt")  # a folder with a run in it, and no --resume
    with pytest.raises(SystemExit):
        btvae.main(argv)
    assert "already holds a run; add --resume to continue it" in capsys.readouterr().err

def test_out_of_memory_is_one_line_saying_what_to_make_smaller(tmp_path, capsys):
    make_mnist(tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # a linear layer of 256 x 10^12 floats: beyond any machine
        btvae.main(["--data-dir", str(tmp_path), "--latent-dim", str(10**12), "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(error.strip().splitlines()) == 1
    assert error.startswith("btvae.py: out of memory") and "smaller --batch-size or --latent-dim" in error

def test_evaluate_measures_a_saved_model_exactly_as_its_run_did_with_the_settings_it_was_trained_with(
        tmp_path, capsys, mnist_with_stand_in_fid):
    run, evaluation = tmp_path / "run", tmp_path / "evaluation"
    btvae.main([*mnist_with_stand_in_fid, "--out", str(run), "--lam2", "0.25", "--seed", "3", "--bt-on", "z"])
    btvae.main(["--evaluate", str(run / "model.pt"), "--data-dir", mnist_with_stand_in_fid[1], "--fid-samples", "40",
                "--out", str(evaluation)])
    assert {p.name for p in evaluation.iterdir()} == MEASURED_OUTPUTS  # no training: no history, no checkpoint
    trained, measured = json.loads((run / "metrics.json").read_text()), json.loads((evaluation / "metrics.json").read_text())
    assert set(measured) == MEASUREMENTS and measured["fid"] is not None
    assert {k: v for k, v in measured.items() if "second" not in k} == {k: trained[k] for k in {k for k in MEASUREMENTS if "second" not in k}}
    assert all((evaluation / name).read_bytes() == (run / name).read_bytes()
               for name in ("samples.png", "samples_gmm.png", "reconstructions.png"))
    assert "evaluating" in capsys.readouterr().out
    saved = torch.load(run / "model.pt", weights_only=True)  # as if saved before --free-bits: it had its default
    torch.save({**saved, "config": {k: v for k, v in saved["config"].items() if k != "free_bits"}}, run / "model.pt")
    cfg = config("--evaluate", run / "model.pt", "--data-dir", mnist_with_stand_in_fid[1])
    assert (cfg.lam2, cfg.seed, cfg.bt_on, cfg.hidden_dims, cfg.epochs, cfg.free_bits) == (0.25, 3, "z", (16, 32), 4, 0.0)
    assert cfg.out == Path("runs/evaluate/mnist_lam2=0.25_bt-on=z_seed3")  # a baseline's folder names what differs:
    assert config("--lam2", "0", "--lam1", "7.9e-5", "--free-bits", ".05").out == Path("runs/mnist_lam2=0_lam1=7.9e-05_free-bits=0.05_seed0")

EVALUATE_BAD_INPUT = {
    "truncated": "model.pt is not a model.pt of btvae.py", "missing": "model.pt does not exist; pass a run's model.pt",
    "another architecture": "model.pt: its weights do not fit its architecture (Error(s) in loading state_dict",
    "a training flag": "--epochs cannot be used with --evaluate", "resume": "--resume cannot be used with --evaluate",
    "out holds results": "already holds results; choose another --out",
    "out holds a training run": "already holds a run; choose another --out for this evaluation"}

@pytest.mark.parametrize("damage", EVALUATE_BAD_INPUT, ids=list(EVALUATE_BAD_INPUT))
def test_evaluate_bad_input_is_one_short_line_exit_2(damage, tmp_path, capsys):
    make_mnist(tmp_path / "data")
    path, out = tmp_path / "model.pt", tmp_path / "out"
    btvae.save_model(btvae.ConvVAE(1, 32, latent_dim=8), config("--latent-dim", 8), path)
    argv = ["--evaluate", str(path), "--data-dir", str(tmp_path / "data"), "--fid-samples", "0", "--out", str(out)]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    elif damage == "missing":
        path.unlink()
    elif damage == "another architecture":
        saved = torch.load(path, weights_only=True)
        saved["architecture"]["hidden_dims"] = (8, 16, 32, 64, 128)
        torch.save(saved, path)
    elif damage in ("a training flag", "resume"):
        argv += ["--epochs=3"] if damage == "a training flag" else ["--resume"]
    else:
        out.mkdir()
        (out / ("metrics.json" if damage == "out holds results" else "checkpoint.pt")).write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        btvae.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(error.strip().splitlines()) == 1 and EVALUATE_BAD_INPUT[damage] in error
    assert "weights_only" not in error and len(error) < 300 + len(str(tmp_path))

@pytest.mark.parametrize("name, lam2", [("mnist_vae.pt", 0.0), ("mnist_btvae_0.025.pt", 0.025)])
def test_the_pretrained_models_are_in_todays_format_and_decode_digit_like_images(name, lam2):
    model, trained_with = btvae.load_model(HERE / "pretrained" / name)
    assert trained_with["lam2"] == lam2 and set(btvae.TRAINING_SETTINGS) <= set(trained_with)
    assert model.architecture == dict(channels=1, image_size=32, hidden_dims=(16, 32, 64, 128, 256), latent_dim=128)
    images = btvae.generate(model, 64, torch.Generator().manual_seed(0))
    # MNIST's look: a black background with a few bright strokes (an untrained decoder gives a uniform grey)
    assert 0.05 < images.mean() < 0.2 and 0.04 < (images > 0.5).float().mean() < 0.2

# =============================================================================
# The GPU path, on a stand-in GPU made of this CPU

class OnStandInGPU(torch.Tensor):
    """A tensor on the stand-in GPU: in the CPU's memory, computed there, but refused by NumPy, as on a GPU."""

class StandInGPU(TorchFunctionMode):
    """A GPU of type `kind` (cuda or mps), through torch's public hook on every call: a tensor sent to the device, and
    all computed from it, is an OnStandInGPU; NumPy, .item() and .tolist() refuse it (stricter than CUDA); mixing it
    with a CPU tensor raises CUDA's device error. `pickled` counts GPU tensors saved."""
    ACROSS = {"to", "cpu", "copy_", "__getitem__", "__setitem__", "__reduce_ex__", "_has_compatible_shallow_copy_type"}

    def __init__(self, kind):
        super().__init__()
        self.kind, self.pickled, self.rng_states_set = kind, 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs, name, first = kwargs or {}, getattr(func, "__name__", ""), args[0] if args else None
        if func == torch.Tensor.device.__get__:  # a getter is a new object at each access: == not is
            return torch.device(self.kind, 0) if isinstance(first, OnStandInGPU) else torch.device("cpu")
        if func in (torch.Tensor.is_cpu.__get__, torch.Tensor.is_cuda.__get__, torch.Tensor.is_mps.__get__):
            return func.__self__.__name__ == ("is_" + self.kind if isinstance(first, OnStandInGPU) else "is_cpu")
        if func == torch.Tensor.grad.__get__:  # autograd computes a GPU tensor's gradient on the GPU
            return as_on(func(*args), isinstance(first, OnStandInGPU))
        if isinstance(first, OnStandInGPU) and name in ("numpy", "__array__", "item", "tolist"):
            raise TypeError(f"can't convert {self.kind}:0 device type tensor to numpy; use Tensor.cpu() first ({name})")
        if isinstance(first, OnStandInGPU) and name == "__reduce_ex__":  # torch.save: its data, as a plain tensor
            self.pickled += 1
            return first.as_subclass(torch.Tensor).__reduce_ex__(*args[1:])
        named = [kwargs.get("device"), *(args[1:] if func is torch.Tensor.to else ())]
        target = "cpu" if func is torch.Tensor.cpu else next(
            (torch.device(v).type for v in named if isinstance(v, (str, torch.device))), None)
        if target == self.kind:  # the stand-in computes on the CPU
            args = (first, *("cpu" if isinstance(a, (str, torch.device)) else a for a in args[1:])) if func is torch.Tensor.to else args
            kwargs = {**kwargs, "device": "cpu"} if kwargs.get("device") is not None else kwargs
        inputs = list(tensors_in((args, kwargs)))
        on_gpu = any(isinstance(t, OnStandInGPU) for t in inputs)
        if on_gpu and name not in self.ACROSS and any(not isinstance(t, OnStandInGPU) and t.dim() > 0 for t in inputs):
            raise RuntimeError(f"Expected all tensors to be on the same device, but found {self.kind}:0 and cpu ({name})")
        return as_on(func(*args, **kwargs), target == self.kind if target else on_gpu)

def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple, dict)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from tensors_in(item)

def as_on(value, on_gpu):
    """The tensors in value (or in a tuple or list of them) as OnStandInGPU or plain ones: the same data."""
    if isinstance(value, (list, tuple)):
        return type(value)(as_on(item, on_gpu) for item in value)
    if not isinstance(value, torch.Tensor) or isinstance(value, OnStandInGPU) == on_gpu:
        return value
    return value.as_subclass(OnStandInGPU if on_gpu else torch.Tensor)

STAND_IN_CUDA_RNG = torch.full((16,), 7, dtype=torch.uint8)  # what the stand-in's torch.cuda.get_rng_state_all gives

@contextlib.contextmanager
def stand_in_gpu(kind="cuda", free_bytes=2**34, gpus=1):
    """This process as a machine with `gpus` GPUs of type `kind`, `free_bytes` free on each: torch.cuda's (or
    torch.backends.mps') public functions answer as there. Yields the StandInGPU."""
    gpu = StandInGPU(kind)

    def set_rng_state(state, device="cuda"):
        if device >= gpus:  # as torch.cuda's default_generators[index]
            raise IndexError("list index out of range")
        gpu.rng_states_set.append((state, device))
    with contextlib.ExitStack() as stack:
        if kind == "cuda":
            for name, value in (("is_available", lambda: True), ("device_count", lambda: gpus),
                                ("mem_get_info", lambda device=None: (free_bytes, 2 * free_bytes)),
                                ("get_rng_state_all", lambda: [STAND_IN_CUDA_RNG] * gpus), ("set_rng_state", set_rng_state)):
                stack.enter_context(mock.patch.object(torch.cuda, name, value))
            stack.enter_context(mock.patch.object(torch.accelerator, "current_stream",  # Adam asks about graph capture
                                                  lambda *args: mock.Mock(is_capturing=lambda: False)))
            stack.callback(setattr, torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
        else:
            stack.enter_context(mock.patch.object(torch.backends.mps, "is_available", lambda: True))
        overwriting = torch.__future__.get_overwrite_module_params_on_conversion()  # Module.to: new Parameters
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        stack.callback(torch.__future__.set_overwrite_module_params_on_conversion, overwriting)
        stack.enter_context(gpu)
        yield gpu

@pytest.mark.parametrize("kind, free_bytes", [("cuda", 2**34), ("cuda", 2**10), ("mps", 2**34)],
                         ids=["cuda, images on it", "cuda, images left on the CPU", "mps"])
def test_a_run_and_its_evaluation_on_a_gpu_hand_numpy_only_cpu_tensors_and_on_cuda_give_the_cpus_numbers(
        kind, free_bytes, tmp_path, monkeypatch, mnist_with_stand_in_fid):
    run, saved, save = tmp_path / "gpu", [], btvae.save_atomically
    with stand_in_gpu(kind, free_bytes) as gpu:  # first, so that it fills the caches (FID's, the pixel probe's)
        monkeypatch.setattr(btvae, "save_atomically",
                            lambda obj, path: saved.append((path.name, gpu.pickled)) or save(obj, path) or
                            saved.append((path.name, gpu.pickled)))
        btvae.main([*mnist_with_stand_in_fid, "--out", str(run)])
        btvae.main(["--evaluate", str(run / "model.pt"), "--data-dir", mnist_with_stand_in_fid[1], "--fid-samples", "40",
                    "--out", str(tmp_path / "evaluation")])
    btvae.main([*mnist_with_stand_in_fid, "--out", str(tmp_path / "cpu")])
    assert json.loads((run / "config.json").read_text())["device"] == kind
    on_the_gpu, on_the_cpu = run_result(run), run_result(tmp_path / "cpu")
    if kind == "cuda":  # the CPU's layout and Adam, and the stand-in computes on the CPU: bit for bit
        assert_same_result(on_the_gpu, on_the_cpu)
    else:  # MPS keeps NCHW and Adam's default implementation: other roundings, which training amplifies
        assert {k for k, v in on_the_gpu[0].items() if v is None} == {k for k, v in on_the_cpu[0].items() if v is None}
    measured = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert {k: v for k, v in measured.items() if "second" not in k} == {k: on_the_gpu[0][k] for k in {k for k in MEASUREMENTS if "second" not in k}}
    # only what btvae.py reads back itself, with map_location="cpu", holds GPU tensors: the caches not
    assert {name for (name, before), (_, after) in zip(saved[::2], saved[1:][::2]) if after > before} == \
        {"model.pt", "checkpoint.pt"}

@pytest.mark.parametrize("gpus", [1, 3])
def test_a_run_stopped_on_a_gpu_resumes_bit_for_bit_with_the_generators_this_machine_has(
        gpus, tmp_path, monkeypatch, capsys, mnist_with_stand_in_fid):
    with stand_in_gpu(gpus=gpus):
        btvae.main([*mnist_with_stand_in_fid, "--out", str(tmp_path / "straight")])
        real_loss = signal_during_loss_call(monkeypatch, call=2 * 4 + 2)  # the second training step of epoch 3
        with pytest.raises(SystemExit):
            btvae.main([*mnist_with_stand_in_fid, "--out", str(tmp_path / "stopped")])
        monkeypatch.setattr(btvae, "btvae_loss", real_loss)
    for machine_gpus in (2, 0):  # this machine may have fewer GPUs than the one that wrote the checkpoint, or none
        checkpoint = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
        assert len(checkpoint["cuda_rng"]) == gpus and all(torch.equal(s, STAND_IN_CUDA_RNG) for s in checkpoint["cuda_rng"])
        model, cfg = btvae.ConvVAE(1, 32, (16, 32), 16), config(*mnist_with_stand_in_fid, "--out", tmp_path / "stopped", "--resume")
        with stand_in_gpu(gpus=machine_gpus) if machine_gpus else mock.patch.object(
                torch.cuda, "set_rng_state", lambda *args: pytest.fail("no GPU to set a state of")) as gpu:
            btvae.resume(tmp_path / "stopped" / "checkpoint.pt", model, cfg)
        assert not machine_gpus or [index for _, index in gpu.rng_states_set] == list(range(min(gpus, machine_gpus)))
    with stand_in_gpu(gpus=gpus):
        btvae.main([*mnist_with_stand_in_fid, "--out", str(tmp_path / "stopped"), "--resume"])
    assert "resuming after epoch 2" in capsys.readouterr().out
    assert_same_result(run_result(tmp_path / "stopped"), run_result(tmp_path / "straight"))

@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_the_cpu_and_a_device_not_there_is_a_usage_error(cuda, mps, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert btvae.pick_device("auto") == torch.device(expected) and btvae.pick_device("cpu") == CPU
    for missing in {"cuda", "mps"} - {name for name, there in (("cuda", cuda), ("mps", mps)) if there}:
        with pytest.raises(btvae.UsageError, match=f"--device {missing} is not available on this machine"):
            btvae.pick_device(missing)

@pytest.mark.parametrize("kind, spare, moved", [("cuda", 4, True), ("cuda", 0, False), ("mps", 4, False)])
def test_the_images_move_to_a_cuda_gpu_once_where_they_fit_in_a_quarter_of_its_free_memory(kind, spare, moved):
    splits = [btvae.Split(uint8_images(30), torch.arange(30)), btvae.Split(uint8_images(10))]
    free_bytes = 4 * sum(split.images.nbytes for split in splits) + spare  # moved only while free // 4 exceeds it
    model = btvae.ConvVAE(1, 16, (8, 16), latent_dim=4)
    with stand_in_gpu(kind, free_bytes):
        placed = btvae.prepare_for_speed(model.to(torch.device(kind)), splits, torch.device(kind))
        assert torch.backends.cudnn.benchmark == (kind == "cuda")  # every batch has the same shape
        assert all(split.images.device.type == ("cuda" if moved else "cpu") for split in placed)
        assert placed[0].labels.device.type == "cpu" and all(torch.equal(a.images.cpu(), b.images) for a, b in zip(placed, splits))
    # channels_last where oneDNN and cuDNN run faster; MPS keeps the default layout
    assert model.encoder[1][0].weight.is_contiguous(memory_format=torch.channels_last) == (kind == "cuda")
    model, x = small_model_and_batch()
    reference = model.eval().decode(model.encode(x)[0])
    btvae.prepare_for_speed(model, [], CPU)
    assert torch.allclose(model.decode(model.encode(x)[0]), reference, atol=1e-5)  # the same function

ALLOCATE_AND_FREE = """
import resource, sys, torch, btvae
btvae.prepare_for_speed(torch.nn.Linear(1, 1), [], torch.device("cpu")) if sys.argv[1] == "prepared" else None
step = lambda k: len([torch.ones(2**20 * (1 + i % 4) + 1024 * k) for i in range(8)])  # a step's 4-16 MB activations
[step(k) for k in range(5)]  # the heap grows to the steps' peak
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
[step(k) for k in range(5, 15)]
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

@pytest.mark.skipif(not (sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION")), reason="glibc only")
def test_on_a_cpu_freed_activations_stay_in_the_process_instead_of_faulting_in_again_every_step():
    # 10 steps write 200,000 pages; glibc's default maps the largest blocks afresh (40,000+ faults), kept: 30-90 measured
    faults = {way: int(subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE, way], capture_output=True, text=True,
                                      cwd=HERE, check=True).stdout) for way in ("prepared", "default")}
    assert faults["prepared"] < 4_000 < faults["default"], faults

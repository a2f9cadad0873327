"""The method's specification: every line of btvae.py's sections 1-5 (model, reparameterisation, the
objective of Eq. 2-4, training, sampling) has a test here that fails when the line is changed to something
plausible but wrong. Offline and fast: small models on random tensors.

Run: python -m pytest -q test_method.py
"""

import math

import pytest
import torch

import btvae
from fabricated import NO_IMAGES, blob_images, config, scripted_epochs, small_model_and_batch


# ---------------------------------------------------------------------------
# 1. Model
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("channels, size, hidden_dims", [
    (1, 32, (16, 32, 64, 128, 256)),
    (3, 32, (16, 32, 64, 128, 256)),
    (3, 64, (16, 32, 64, 128, 256)),
    (3, 24, (8, 12, 20)),
])
def test_encoder_decoder_and_loss_shapes(channels, size, hidden_dims):
    model = btvae.ConvVAE(channels, size, hidden_dims, latent_dim=7)
    x = torch.rand(5, channels, size, size)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 7)
    x_recon = model.decode(btvae.reparameterise(mu, logvar))
    assert x_recon.shape == x.shape
    terms = btvae.btvae_loss(model, x, lam1=0.1, lam2=0.1)
    assert all(terms[name].shape == () for name in btvae.LOSS_TERMS)


def test_encoder_blocks_halve_the_image_with_the_papers_widths():
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


def test_decoder_mirrors_the_encoder_and_ends_in_a_sigmoid():
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


def test_encode_returns_the_mean_head_then_the_log_variance_head():
    model, x = small_model_and_batch()
    model.eval()
    with torch.no_grad():
        model.to_mu.weight.zero_(), model.to_mu.bias.fill_(0.25)
        model.to_logvar.weight.zero_(), model.to_logvar.bias.fill_(-1.5)
    mu, logvar = model.encode(x)
    assert torch.all(mu == 0.25) and torch.all(logvar == -1.5)
    assert mu.dtype == logvar.dtype == torch.float32


def test_decode_starts_from_the_smallest_feature_map_of_z():
    model, _ = small_model_and_batch()
    model.eval()
    z = torch.randn(4, 6)
    expected = model.decoder(model.from_latent(z).view(4, 16, 4, 4))
    assert torch.equal(model.decode(z), expected)


def test_image_size_must_be_divisible_by_every_halving():
    assert btvae.bottleneck_side(32, 5) == 1 and btvae.bottleneck_side(64, 5) == 2 and btvae.bottleneck_side(24, 3) == 3
    with pytest.raises(ValueError, match="not divisible by 2\\^2 = 4"):
        btvae.ConvVAE(1, 30, (16, 32), latent_dim=4)


# ---------------------------------------------------------------------------
# 2. Reparameterisation
# ---------------------------------------------------------------------------

def test_reparameterisation_is_mu_plus_sigma_times_standard_normal_noise():
    mu, logvar = torch.tensor([[0.5, -2.0, 3.0]]), torch.tensor([[0.0, math.log(4), math.log(0.25)]])
    torch.manual_seed(0)
    z = btvae.reparameterise(mu, logvar)
    torch.manual_seed(0)
    eps = torch.randn(1, 3)
    assert torch.allclose(z, mu + torch.tensor([1.0, 2.0, 0.5]) * eps)  # sigma = exp(logvar / 2)


def test_reparameterised_samples_follow_the_posterior():
    torch.manual_seed(1)
    mu, logvar = torch.full((200_000, 2), 1.5), torch.tensor([math.log(4), math.log(0.01)]).expand(200_000, 2)
    z = btvae.reparameterise(mu, logvar)
    assert torch.allclose(z.mean(0), torch.tensor([1.5, 1.5]), atol=0.01)
    assert torch.allclose(z.std(0), torch.tensor([2.0, 0.1]), rtol=0.01)
    assert abs(((z[:, 0] - 1.5) / 2).pow(4).mean() - 3) < 0.1  # Gaussian: kurtosis 3


def test_gradients_flow_through_mu_and_sigma():
    mu, logvar = torch.zeros(1, 4, requires_grad=True), torch.zeros(1, 4, requires_grad=True)
    torch.manual_seed(2)
    btvae.reparameterise(mu, logvar).sum().backward()
    torch.manual_seed(2)
    eps = torch.randn(1, 4)
    assert torch.equal(mu.grad, torch.ones(1, 4)) and torch.allclose(logvar.grad, 0.5 * eps)


# ---------------------------------------------------------------------------
# 3. Objective: Eq. 2 (the VAE), Eq. 3 (Barlow Twins), Eq. 4 (BTVAE)
# ---------------------------------------------------------------------------

def test_kl_is_zero_for_the_prior_itself():
    assert btvae.kl_to_standard_normal(torch.zeros(4, 6), torch.zeros(4, 6)).item() == 0


def test_kl_closed_form_on_known_values():
    # mu = 1, sigma = 1: 1/2 per dimension, summed over 5. mu = 0, sigma^2 = 4: 1/2 (4 - 1 - log 4) per dimension.
    assert btvae.kl_to_standard_normal(torch.ones(3, 5), torch.zeros(3, 5)).item() == pytest.approx(2.5)
    logvar = torch.full((3, 5), math.log(4))
    expected = 5 * 0.5 * (4 - 1 - math.log(4))
    assert btvae.kl_to_standard_normal(torch.zeros(3, 5), logvar).item() == pytest.approx(expected, rel=1e-6)
    mixed = torch.tensor([[1.0] * 5, [3.0] * 5])  # per image 2.5 and 22.5: the batch mean is 12.5
    assert btvae.kl_to_standard_normal(mixed, torch.zeros(2, 5)).item() == pytest.approx(12.5)


def test_kl_matches_monte_carlo_estimate():
    torch.manual_seed(0)
    mu, logvar = torch.randn(2, 4) * 0.8, torch.randn(2, 4) * 0.5
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(2, 4), torch.ones(2, 4))
    z = q.sample((400_000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean()  # mean over samples and batch
    assert btvae.kl_to_standard_normal(mu, logvar).item() == pytest.approx(monte_carlo.item(), rel=0.02)


def test_vae_loss_is_pixel_mean_squared_error_plus_lambda1_kl():
    torch.manual_seed(3)
    x, x_recon = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    loss, recon, kl = btvae.vae_loss(x, x_recon, mu, logvar, lam1=0.3)
    assert recon.item() == pytest.approx(((x - x_recon) ** 2).mean().item(), rel=1e-6)
    assert kl.item() == pytest.approx(btvae.kl_to_standard_normal(mu, logvar).item())
    assert loss.item() == pytest.approx(recon.item() + 0.3 * kl.item(), rel=1e-6)


def test_barlow_twins_is_symmetric():
    torch.manual_seed(1)
    a, b = torch.randn(32, 8), torch.randn(32, 8)
    assert btvae.barlow_twins_loss(a, b).item() == pytest.approx(btvae.barlow_twins_loss(b, a).item(), rel=1e-6)


def test_barlow_twins_diagonal_term_vanishes_for_identical_inputs():
    torch.manual_seed(2)
    z = torch.randn(64, 10)
    loss_without_offdiagonal = btvae.barlow_twins_loss(z, z, delta=0).item()
    variance = z.var(0, unbiased=False)
    expected = ((1 - variance / (variance + btvae.BT_EPS)) ** 2).sum().item()  # C_ii = var / (var + eps)
    assert loss_without_offdiagonal == pytest.approx(expected, abs=1e-9)
    assert loss_without_offdiagonal < 1e-8
    # and for unrelated inputs the diagonal term is far from zero
    assert btvae.barlow_twins_loss(z, torch.randn(64, 10), delta=0).item() > 5


def test_barlow_twins_is_invariant_to_shifting_and_scaling_features():
    torch.manual_seed(3)
    a, b = torch.randn(50, 6), torch.randn(50, 6) + 0.5 * torch.randn(50, 1)
    scale, shift = torch.rand(6) * 3 + 0.5, torch.randn(6) * 10
    original = btvae.barlow_twins_loss(a, b).item()
    assert btvae.barlow_twins_loss(a * scale + shift, b).item() == pytest.approx(original, rel=1e-4)
    assert btvae.barlow_twins_loss(a, b * scale.flip(0) - shift).item() == pytest.approx(original, rel=1e-4)


def test_barlow_twins_off_diagonal_part_has_d_times_d_minus_one_terms():
    # Every feature a copy of one column: every C_ij is the same, var / (var + eps), on and off the diagonal.
    torch.manual_seed(4)
    dims = 9
    z = torch.randn(40, 1).repeat(1, dims)
    c = (z[:, 0].var(unbiased=False) / (z[:, 0].var(unbiased=False) + btvae.BT_EPS)).item()
    off_diagonal_only = btvae.barlow_twins_loss(z, z, delta=1).item() - btvae.barlow_twins_loss(z, z, 0).item()
    assert off_diagonal_only == pytest.approx(dims * (dims - 1) * c * c, rel=1e-5)


def test_barlow_twins_equals_a_plain_double_loop_over_eq3():
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


def test_twins_compare_the_embeddings_bt_on_names():
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
def test_objective_is_the_weighted_sum_of_its_parts(bt_on):
    model, x = small_model_and_batch()
    terms = btvae.btvae_loss(model, x, lam1=0.3, lam2=0.7, bt_on=bt_on, delta=0.01)
    assert terms["bt"].item() > 0
    assert terms["loss"].item() == pytest.approx(
        terms["recon"].item() + 0.3 * terms["kl"].item() + 0.7 * terms["bt"].item(), rel=1e-6)


@pytest.mark.parametrize("bt_on", ["mu", "z", "mu+logvar"])
def test_objective_decodes_a_sample_and_compares_its_twins(bt_on):
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


def test_negative_lambda2_subtracts_the_barlow_twins_term():
    model, x = small_model_and_batch()
    terms = btvae.btvae_loss(model, x, lam1=0.3, lam2=-0.5)
    assert terms["bt"].item() > 0  # the paper's ablation still computes the term
    assert terms["loss"].item() == pytest.approx(
        terms["recon"].item() + 0.3 * terms["kl"].item() - 0.5 * terms["bt"].item(), rel=1e-6)


def test_lam2_zero_is_exactly_the_vae_and_skips_the_re_encoding():
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


def test_barlow_twins_gradient_reaches_both_encoder_passes_and_the_decoder():
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

def test_batches_are_full_the_last_incomplete_one_dropped():
    batches = btvae.batch_indices(10, 4)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [b.tolist() for b in btvae.batch_indices(3, 4)] == [[0, 1, 2]]  # smaller than a batch: one batch
    assert [b.tolist() for b in btvae.batch_indices(8, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_batches_follow_the_shuffling_generator():
    shuffled = torch.cat(btvae.batch_indices(100, 10, torch.Generator().manual_seed(3)))
    assert shuffled.tolist() == torch.randperm(100, generator=torch.Generator().manual_seed(3)).tolist()
    generator = torch.Generator().manual_seed(3)
    first, second = (torch.cat(btvae.batch_indices(100, 10, generator)) for _ in range(2))
    assert not torch.equal(first, second)  # a new order every epoch


def test_a_batch_is_the_indexed_images_scaled_to_the_unit_interval():
    images = torch.tensor([0, 51, 255, 102], dtype=torch.uint8).view(4, 1, 1, 1)
    batch = btvae.load_batch(images, torch.tensor([2, 1]), torch.device("cpu"))
    assert batch.dtype == torch.float32 and batch.flatten().tolist() == pytest.approx([1.0, 0.2])


def uint8_images(count, size=16, seed=0):
    return torch.randint(0, 256, (count, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_a_training_epoch_is_one_adam_step_per_shuffled_batch():
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


def test_a_validation_pass_changes_nothing_and_reports_the_mean_terms(monkeypatch):
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


def test_adam_has_the_papers_learning_rate_and_no_weight_decay():
    model, _ = small_model_and_batch()
    optimiser = btvae.make_optimiser(model, config(), torch.device("cpu"))
    assert type(optimiser) is torch.optim.Adam
    group, = optimiser.param_groups
    assert group["lr"] == 0.005 and group["weight_decay"] == 0 and group["betas"] == (0.9, 0.999)
    assert len(group["params"]) == len(list(model.parameters()))


def test_early_stopping_stops_after_patience_epochs_and_restores_the_best_weights(monkeypatch):
    # best at epoch 3; 3 epochs without improvement after (an equal loss is no improvement)
    model = scripted_epochs(monkeypatch, [5.0, 4.0, 3.0, 3.5, 3.0, 3.2, 2.0])
    cfg = config("--epochs", 50, "--patience", 3)
    training = btvae.train(model, NO_IMAGES, NO_IMAGES, cfg, torch.device("cpu"))
    assert training.epoch == 6 and training.finished and training.stopped_early
    assert training.stopper.best_epoch == 3 and training.stopper.best_loss == 3.0
    assert torch.all(model.to_mu.bias == 3)  # the weights after epoch 3, not epoch 6


def test_patience_counts_epochs_since_the_last_improvement(monkeypatch):
    # epoch 2 does not improve, epoch 3 does: the count starts again there, and ends at epoch 6
    model = scripted_epochs(monkeypatch, [5.0, 5.5, 4.0, 4.5, 4.6, 4.7, 1.0])
    training = btvae.train(model, NO_IMAGES, NO_IMAGES, config("--patience", 3), torch.device("cpu"))
    assert training.epoch == 6 and training.stopper.best_epoch == 3 and torch.all(model.to_mu.bias == 3)


def test_training_ends_after_epochs_without_early_stopping_with_the_best_weights(monkeypatch):
    model = scripted_epochs(monkeypatch, [5.0, 4.0, 4.5, 4.2])
    training = btvae.train(model, NO_IMAGES, NO_IMAGES, config("--epochs", 4, "--patience", 3), torch.device("cpu"))
    assert training.epoch == 4 and training.finished and not training.stopped_early
    assert torch.all(model.to_mu.bias == 2)


def test_the_best_weights_are_restored_even_when_the_harness_stops_training(monkeypatch):
    model = scripted_epochs(monkeypatch, [5.0, 4.0, 4.5])

    def after_epoch(training, train_terms, val_terms):
        if training.epoch == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        btvae.train(model, NO_IMAGES, NO_IMAGES, config(), torch.device("cpu"), after_epoch=after_epoch)
    assert torch.all(model.to_mu.bias == 2)


def test_training_continues_a_given_state_where_it_stopped(monkeypatch):
    model = scripted_epochs(monkeypatch, [5.0, 4.0])
    cfg = config("--epochs", 4)
    training = btvae.start_training(model, cfg, torch.device("cpu"))
    training.epoch = 2
    seen = []
    btvae.train(model, NO_IMAGES, NO_IMAGES, cfg, torch.device("cpu"), training,
                after_epoch=lambda state, *terms: seen.append(state.epoch))
    assert seen == [3, 4]


def test_the_shuffling_generator_starts_from_the_seed():
    model, _ = small_model_and_batch()
    training = btvae.start_training(model, config("--seed", 7), torch.device("cpu"))
    assert torch.equal(training.shuffle.get_state(), torch.Generator().manual_seed(7).get_state())
    assert training.stopper.patience == 5 and training.epoch == 0 and not training.finished


def test_tiny_overfit_run_reduces_the_reconstruction_loss_tenfold():
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

def test_generate_decodes_standard_normal_prior_samples_drawn_with_the_generator():
    model, _ = small_model_and_batch()
    decoded = []
    model.decode = lambda z: decoded.append(z) or z  # see the z that generate decodes
    btvae.generate(model, 20000, torch.Generator().manual_seed(2), torch.device("cpu"))
    prior = decoded[-1]
    assert prior.shape == (20000, 6)
    assert prior.mean(0).abs().max() < 0.05 and (prior.std(0) - 1).abs().max() < 0.05  # N(0, I)
    assert torch.corrcoef(prior.T)[~torch.eye(6, dtype=torch.bool)].abs().max() < 0.05
    assert torch.equal(prior, torch.randn(20000, 6, generator=torch.Generator().manual_seed(2)))


def test_generate_and_reconstruct_use_the_model_in_evaluation_mode():
    model, x = small_model_and_batch()
    model.train()
    samples = btvae.generate(model, 5, torch.Generator().manual_seed(1), torch.device("cpu"))
    reconstructions = btvae.reconstruct(model.train(), x)
    model.eval()
    with torch.no_grad():
        assert torch.equal(samples, model.decode(torch.randn(5, 6, generator=torch.Generator().manual_seed(1))))
        assert torch.equal(reconstructions, model.decode(model.encode(x)[0]))  # the posterior mean, not a sample

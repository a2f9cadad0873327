"""The experiments' parts of btvae.py (sections 6-8): the data loaders on fabricated files in each data set's
real format, FID with a stand-in feature network, and each latent-space metric on a case whose answer is known.

Run: python -m pytest -q test_measurements.py
"""


import numpy as np
import pytest
import torch
import torchvision

import btvae
from fabricated import (StandInFeatures, blob_images, config, make_celeba, make_cifar10, make_folder, make_mnist,
                        replay, save, small_model_and_batch, stand_in_network)


# ---------------------------------------------------------------------------
# 6. Data loaders, on fabricated files, through the same load_data a run uses
# ---------------------------------------------------------------------------

def test_mnist_loader(tmp_path):
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


def test_holdout_is_the_same_whatever_the_seed_and_subset_takes_the_first_images(tmp_path):
    make_mnist(tmp_path)
    _, val_a, _ = btvae.load_data(config("--dataset", "mnist", "--data-dir", tmp_path, "--seed", 1))
    train_b, val_b, _ = btvae.load_data(config("--dataset", "mnist", "--data-dir", tmp_path, "--seed", 2))
    assert torch.equal(val_a.images, val_b.images)
    subset, _, _ = btvae.load_data(config("--dataset", "mnist", "--data-dir", tmp_path, "--subset", 50))
    assert torch.equal(subset.images, train_b.images[:50])


def test_mnist_loader_resizes_to_another_image_size(tmp_path):
    make_mnist(tmp_path)
    train, _, _ = btvae.load_data(config("--dataset", "mnist", "--data-dir", tmp_path, "--image-size", 64))
    assert train.images.shape[1:] == (1, 64, 64)


def test_cifar10_loader(tmp_path):
    make_cifar10(tmp_path, per_batch=20, test=30)
    train, val, test = btvae.load_data(config("--dataset", "cifar10", "--data-dir", tmp_path))
    assert (len(train), len(val), len(test)) == (90, 10, 30)
    assert test.images.shape[1:] == (3, 32, 32) and test.images.dtype == torch.uint8
    assert [test.images[0, c].unique().item() for c in range(3)] == [0, 100, 200]  # R, G, B planes in order
    assert torch.equal(test.labels, torch.arange(30) % 10)


def test_corrupt_cifar10_file_is_a_usage_error(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04truncated")
    with pytest.raises(btvae.UsageError, match="test_batch.*truncated or corrupt"):
        btvae.load_data(config("--dataset", "cifar10", "--data-dir", tmp_path))


def test_celeba_loader_uses_the_official_split_and_caches_decoded_images(tmp_path):
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


def test_celeba_crop_keeps_the_centre_148_pixels(tmp_path):
    make_celeba(tmp_path, counts=(2, 1, 1))
    image = torch.zeros(3, 218, 178, dtype=torch.uint8)
    image[:, 35:183, 15:163] = 255  # exactly the central 148 x 148 square is white
    save(image.numpy(), tmp_path / "celeba" / "img_align_celeba" / "000001.jpg", format="PNG")
    train, _, _ = btvae.load_data(config("--dataset", "celeba", "--data-dir", tmp_path))
    assert train.images[0].float().mean() > 250


def test_folder_loader(tmp_path):
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
def test_failed_download_names_the_files_to_provide(dataset, download_class, expected, tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError("Error downloading the-file.gz:\nTried https://example.invalid, got: no network")
    monkeypatch.setattr(download_class, "download", offline)
    with pytest.raises(btvae.UsageError, match="downloading it failed") as error:
        btvae.load_data(config("--dataset", dataset, "--data-dir", tmp_path))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_truncated_mnist_file_is_a_usage_error(tmp_path):
    make_mnist(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(btvae.UsageError, match="cannot read MNIST.*truncated or corrupt"):
        btvae.load_data(config("--dataset", "mnist", "--data-dir", tmp_path))


def test_undecodable_image_in_a_folder_is_a_usage_error(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(btvae.UsageError, match="cannot decode image .*broken.png"):
        btvae.load_data(config("--dataset", "folder", "--data-dir", tmp_path))


# ---------------------------------------------------------------------------
# 7. FID: the uint8 conversion, the Frechet distance, precision and recall, with a stand-in feature network
# ---------------------------------------------------------------------------

def test_fid_input_conversion_clamps_rounds_and_repeats_grayscale():
    images = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.7]).view(1, 1, 1, 5)
    converted = btvae.to_fid_input(images)
    assert converted.dtype == torch.uint8 and converted.shape == (1, 3, 1, 5)
    assert converted[0, :, 0].tolist() == [[0, 0, 128, 255, 255]] * 3  # no wrap-around below 0 or above 1
    rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(btvae.to_fid_input(rgb), rgb)


def features_of(images, shift=0.0, layer=0):
    network = StandInFeatures(layer + 1)
    return btvae.inception_features(network, replay(images, shift), len(images), torch.device("cpu"))[layer]


def test_inception_features_go_through_in_batches_of_converted_images_one_tensor_per_layer():
    images = torch.from_numpy(blob_images(120, 1, 16, 16, seed=53))  # grayscale: repeated to RGB on the way
    features = btvae.inception_features(StandInFeatures(2), replay(images), len(images), torch.device("cpu"))
    expected = StandInFeatures(2)(btvae.to_fid_input(images))
    assert [f.shape for f in features] == [(120, 6), (120, 12)]
    assert all(torch.allclose(ours, theirs) for ours, theirs in zip(features, expected))


def test_frechet_distance_matches_torchmetrics():
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


def test_frechet_distance_of_one_dimensional_gaussians_is_mean_and_spread_difference():
    torch.manual_seed(9)
    a, b = torch.randn(500, 1) * 2 + 1, torch.randn(400, 1) * 0.5 - 3
    expected = (a.double().mean() - b.double().mean()) ** 2 + (a.double().std() - b.double().std()) ** 2
    assert btvae.frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9)
    assert abs(btvae.frechet_distance(a, a)) < 1e-9


def test_precision_and_recall_equal_a_plain_loop_over_their_definition():
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


def test_a_point_on_the_edge_of_a_ball_is_inside_it():
    # Each point four times: with k = 3 every ball has radius 0, and only a point at distance exactly 0 is inside.
    points = torch.randn(10, 3).repeat(4, 1)
    assert btvae.precision_recall(points, points) == (1.0, 1.0)
    assert btvae.precision_recall(points, points + 1e-3) == (0.0, 0.0)


def test_fid_is_zero_for_identical_sets_and_grows_with_a_shift():
    real = torch.from_numpy(blob_images(200, 3, 16, 16, seed=50))
    identical, slightly, strongly = (btvae.frechet_distance(features_of(real), features_of(real, shift))
                                     for shift in (0, 0.05, 0.2))
    assert abs(identical) < 1e-6
    assert 0 < slightly < strongly
    assert btvae.precision_recall(features_of(real), features_of(real)) == (1.0, 1.0)


def test_precision_and_recall_tell_unrealistic_from_undiverse():
    real = torch.from_numpy(blob_images(300, 3, 16, 16, seed=52))
    collapsed = real[:5].repeat(60, 1, 1, 1)  # realistic, but only 5 distinct images: no variety
    precision, recall = btvae.precision_recall(features_of(real), features_of(collapsed))
    assert precision == 1.0 and recall < 0.2
    precision, _ = btvae.precision_recall(features_of(real), features_of(real, 0.5))  # every pixel far off
    assert precision < 0.1


def test_fid_measurer_caches_the_test_features_and_reuses_them(tmp_path, monkeypatch):
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


def test_fid_measurer_measures_fid_64_in_the_first_layer_and_the_rest_in_the_2048_d_one(tmp_path, monkeypatch):
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


def test_fid_measurer_without_fid_2048_asks_for_the_64_d_layer_alone(tmp_path, monkeypatch):
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


def test_fid_without_reachable_weights_is_unavailable_not_a_crash(tmp_path, monkeypatch):
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

def test_active_units_count_dimensions_whose_mean_varies_more_than_the_threshold():
    torch.manual_seed(11)
    base = torch.randn(4000, 1)
    base = (base - base.mean()) / base.std()  # sample variance exactly 1
    variances = torch.tensor([0.0, 0.0099, 0.0101, 1.0, 25.0])
    mu = base * variances.sqrt() + torch.arange(5.0) * 10  # offsets do not count, only variation across images
    assert btvae.active_units(mu) == 3


def test_an_encoder_whose_mean_uses_k_of_d_dimensions_has_k_active_units():
    model, x = small_model_and_batch()
    k = 2
    with torch.no_grad():
        model.to_mu.weight[k:] = 0  # dimensions k.. ignore the image: their mean is the bias for every image
        model.to_mu.weight[:k] *= 100  # the first k vary well above the threshold
    images = btvae.to_uint8(torch.rand(64, 1, 16, 16))
    assert btvae.active_units(btvae.encode_split(model, images, torch.device("cpu"))) == k


def test_latent_correlation_is_near_zero_for_independent_and_near_one_for_duplicated_features():
    torch.manual_seed(12)
    independent = torch.randn(20000, 6)
    assert btvae.latent_correlation(independent) < 0.02
    duplicated = torch.randn(20000, 1).repeat(1, 6) * torch.tensor([1, -1, 2, -3, 0.5, 1])  # some anti-correlated
    assert btvae.latent_correlation(duplicated) > 0.999
    assert btvae.latent_correlation(torch.randn(100, 1)) is None  # no pairs in one dimension


def test_latent_correlation_is_the_mean_absolute_off_diagonal_pearson_correlation():
    torch.manual_seed(13)
    mu = torch.randn(3000, 4) @ torch.randn(4, 4)  # correlated dimensions, some negatively
    pearson = np.corrcoef(mu.double().numpy(), rowvar=False)
    expected = np.abs(pearson[~np.eye(4, dtype=bool)]).mean()
    assert btvae.latent_correlation(mu) == pytest.approx(expected, rel=1e-4)  # eps = 1e-5 on unit-size variances


def test_twin_correlation_is_one_for_identical_twins_and_averages_every_pair():
    torch.manual_seed(14)
    z = torch.randn(500, 4)
    assert btvae.twin_correlation([(z, z)]) == pytest.approx(1, abs=1e-4)
    assert btvae.twin_correlation([(z, z * torch.tensor([1, 1, -1, -1]))]) == pytest.approx(0, abs=1e-4)
    assert btvae.twin_correlation([(z, z), (z, -z)]) == pytest.approx(0, abs=1e-4)  # mean over both pairs' diagonals
    unrelated = btvae.twin_correlation([(z, torch.randn(500, 4))])
    assert abs(unrelated) < 0.15


@pytest.mark.parametrize("bt_on", ["mu", "z", "mu+logvar"])
def test_the_measured_twins_are_the_pairs_the_objective_compares(bt_on):
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


def test_linear_probe_reads_separable_labels_and_not_shuffled_ones():
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


def two_clusters(count=4000):
    """Two well-separated, elongated and tilted Gaussian clusters in 2-d, 3:1 in size."""
    generator = torch.Generator().manual_seed(17)
    covariance = torch.tensor([[2.0, 1.2], [1.2, 1.0]])
    means = torch.tensor([[-6.0, 0.0], [6.0, 3.0]])
    which = (torch.rand(count, generator=generator) < 0.25).long()
    noise = torch.randn(count, 2, generator=generator) @ torch.linalg.cholesky(covariance).T
    return means[which] + noise, means, covariance


def test_mixture_fitted_to_two_clusters_finds_their_means_weights_and_covariances():
    points, means, covariance = two_clusters()
    mixture = btvae.LatentMixture(points, seed=0, components=2)
    order = mixture.means[:, 0].argsort()
    assert torch.allclose(mixture.means[order].float(), means, atol=0.15)
    assert torch.allclose(mixture.weights[order].float(), torch.tensor([0.75, 0.25]), atol=0.03)
    for k in range(2):
        assert torch.allclose((mixture.cholesky[k] @ mixture.cholesky[k].T).float(), covariance, atol=0.2)


def test_mixture_samples_follow_the_fitted_mixture():
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


def test_mixture_fit_is_deterministic_for_a_seed_and_caps_components_at_the_points():
    points, _, _ = two_clusters(400)
    first, second = btvae.LatentMixture(points, seed=3), btvae.LatentMixture(points, seed=3)
    assert len(first.weights) == btvae.MIXTURE_COMPONENTS and torch.equal(first.means, second.means)
    assert len(btvae.LatentMixture(points[:4], seed=0).weights) == 4


def test_encode_split_encodes_every_image_in_evaluation_mode():
    model, _ = small_model_and_batch()
    model.train()  # as training leaves it
    images = btvae.to_uint8(torch.rand(1100, 1, 16, 16))  # three passes of ENCODE_BATCH
    mu = btvae.encode_split(model, images, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        expected = model.encode(btvae.to_model_range(images))[0]
    assert mu.shape == (1100, 6) and torch.allclose(mu, expected, atol=1e-6)


def test_latent_measurements_are_of_the_test_images_and_the_figures_data():
    model, _ = small_model_and_batch()
    with torch.no_grad():
        model.to_mu.weight.mul_(100)  # means that vary across images, well above the active-unit threshold
    train = btvae.Split(torch.zeros(60, 1, 16, 16, dtype=torch.uint8), torch.arange(60) % 3)  # all alike
    test = btvae.Split(btvae.to_uint8(torch.rand(40, 1, 16, 16)), torch.arange(40) % 3)
    metrics, figures, train_mu = btvae.measure_latent_space(model, train, test, "mu", torch.device("cpu"))
    test_mu = btvae.encode_split(model, test.images, torch.device("cpu"))
    assert torch.equal(train_mu, btvae.encode_split(model, train.images, torch.device("cpu")))
    assert metrics["active_units"] == btvae.active_units(test_mu) > btvae.active_units(train_mu) == 0
    assert metrics["latent_correlation"] == btvae.latent_correlation(test_mu)
    assert metrics["probe_accuracy"] == btvae.probe_accuracy(train_mu, train.labels, test_mu, test.labels)
    assert -1 <= metrics["twin_correlation"] <= 1
    assert torch.equal(figures["mu_variance"], test_mu.var(dim=0))
    assert torch.equal(figures["mu_correlation"], btvae.cross_correlation(test_mu, test_mu))
    assert "test_mu" not in figures  # 6-d: not kept whole
    model2 = btvae.ConvVAE(1, 16, (8, 16), latent_dim=2)
    _, figures2, _ = btvae.measure_latent_space(model2, train, test, "mu", torch.device("cpu"))
    assert figures2["test_mu"].shape == (40, 2) and torch.equal(figures2["test_labels"], test.labels)


def test_generate_decodes_mixture_samples_drawn_with_the_generator():
    model, _ = small_model_and_batch()
    decoded = []
    model.decode = lambda z: decoded.append(z) or z  # see the z that generate decodes
    points, _, _ = two_clusters()
    mixture = btvae.LatentMixture(torch.cat([points, points, points], dim=1), seed=0, components=2)
    btvae.generate(model, 50, torch.Generator().manual_seed(3), torch.device("cpu"), mixture)
    assert torch.equal(decoded[-1], mixture.sample(50, torch.Generator().manual_seed(3)))

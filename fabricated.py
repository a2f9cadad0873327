"""Fabricated data sets and small stand-ins shared by the tests: every data set in the exact on-disk format
the real one has, so that no test needs a download or ../shared."""

import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import btvae

HERE = Path(__file__).resolve().parent


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
        return {**{name: 0.0 for name in btvae.LOSS_TERMS}, "loss": next(val_losses)}
    monkeypatch.setattr(btvae, "run_epoch", scripted_epoch)
    model = btvae.ConvVAE(1, 16, (8, 16), latent_dim=4)
    with torch.no_grad():
        model.to_mu.bias.zero_()
    return model


NO_IMAGES = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)

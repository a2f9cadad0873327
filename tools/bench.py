"""Benchmark btvae.py on this machine: training throughput and FID speed. Prints one table; asserts nothing.

    python tools/bench.py                                   # training steps only
    python tools/bench.py --data-dir ../shared/data \\
        --fid-weights ../shared/fid/weights-inception-2015-12-05-6726825d.pth   # and FID on MNIST

Every figure is measured in this one run, alternating the configurations it
compares, so the ratios hold even on a shared, noisy machine.

- "plain": the eager float32 step anyone would write first: contiguous (NCHW)
  tensors, torch.optim.Adam's default implementation, the C library's default
  memory allocator.
- "project": what btvae.py does (prepare_for_speed and Training.start):
  channels_last, fused Adam, and on Linux freed memory kept in the process.

The allocator setting is process-wide and cannot be undone, so each
configuration runs in a process of its own (`--measure plain|project`), and
the rounds alternate plain and project processes. Both run btvae.run_epoch, the
loop a real run uses, on a synthetic uint8 data set, so data slicing and
scaling are included.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # btvae.py is at the project's top
import btvae  # noqa: E402

SHAPES = {"MNIST 1x32x32": (1, 32), "CIFAR-10 3x32x32": (3, 32), "CelebA 3x64x64": (3, 64)}
DATASET_SIZES = {"MNIST 1x32x32": 55_000, "CIFAR-10 3x32x32": 45_000, "CelebA 3x64x64": 162_770}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as file:
            return next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def make_config(lam2, batch_size=64):
    return btvae.parse_config(["--lam2", str(lam2), "--batch-size", str(batch_size), "--data-dir", "."])


def training_setup(channels, size, lam2, project, device):
    """A model and optimiser as a run makes them: plain, or with the project's speed settings."""
    torch.manual_seed(0)
    cfg = make_config(lam2)
    model = btvae.ConvVAE(channels, size, cfg.hidden_dims, cfg.latent_dim).to(device)
    if project:
        btvae.prepare_for_speed(model, [], device)
        optimiser = btvae.Training.start(model, cfg).optimiser
    else:
        optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return model, optimiser, cfg


def images_per_second(setup, images, device):
    model, optimiser, cfg = setup
    start = time.perf_counter()
    btvae.run_epoch(model, images, cfg, optimiser, torch.Generator().manual_seed(0))
    seen = len(images) - len(images) % cfg.batch_size  # full batches only
    return seen / (time.perf_counter() - start)


def bench_training(kind, steps, repeats, device):
    """Images per second of VAE and BTVAE steps in one configuration, for every shape (the best of `repeats`)."""
    rows = {}
    for name, (channels, size) in SHAPES.items():
        images = torch.randint(0, 256, (64 * steps, channels, size, size), dtype=torch.uint8)
        setups = {objective: training_setup(channels, size, lam2, kind == "project", device)
                  for objective, lam2 in (("VAE", 0.0), ("BTVAE", 0.025))}
        for setup in setups.values():  # warm-up: oneDNN primitive caches, allocator
            images_per_second(setup, images[:64 * 3], device)
        speed = {objective: [] for objective in setups}
        for _ in range(repeats):
            for objective, setup in setups.items():
                speed[objective].append(images_per_second(setup, images, device))
        rows[name] = {objective: max(values) for objective, values in speed.items()}
        if kind == "project":
            rows[name]["data share"] = data_share(channels, size, DATASET_SIZES[name], rows[name]["BTVAE"], device)
    return rows


def data_share(channels, size, dataset_size, step_images_per_second, device):
    """Share of an epoch spent slicing batches out of a data-set-sized uint8 tensor and scaling them."""
    images = torch.empty(dataset_size, channels, size, size, dtype=torch.uint8)  # the real size; values do not matter
    batches = btvae.batch_indices(dataset_size, 64, torch.Generator().manual_seed(0), images.device)[:200]
    start = time.perf_counter()
    for index in batches:
        btvae.to_model_range(images[index].to(device))
    data_seconds_per_image = (time.perf_counter() - start) / (64 * len(batches))
    return data_seconds_per_image / (data_seconds_per_image + 1 / step_images_per_second)


def bench_fid(kind, data_dir, weights, count, model_path, device):
    """A finished run's FID, as (value, seconds). plain: straightforward torchmetrics use (a fresh metric on
    the device, real and fake images both through the network; antialias=False resizes as torch-fidelity's
    network does). project: btvae.fid_measurer as a run without --fid-2048 uses it, the test images' features
    cached. The generated images are on the device, where the model is."""
    cache_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_fid_cache_{os.getpid()}"
    cfg = btvae.parse_config(["--dataset", "mnist", "--data-dir", str(data_dir), "--cache-dir", str(cache_dir),
                              "--fid-samples", str(count), "--fid-weights", str(weights)])
    _, _, test = btvae.load_data(cfg)
    real = test.images[:count]
    torch.manual_seed(0)  # without --model, the same untrained weights in both processes
    model = btvae.load_model(model_path, device)[0] if model_path else btvae.ConvVAE(1, 32).to(device).eval()
    fake = torch.cat([btvae.generate(model, 100, torch.Generator().manual_seed(0))
                      for _ in range(0, count, 100)])[:count]  # the same images in both processes

    if kind == "plain":
        from torchmetrics.image.fid import FrechetInceptionDistance
        start = time.perf_counter()
        metric = FrechetInceptionDistance(feature=64, antialias=False,
                                          feature_extractor_weights_path=str(weights)).to(device)
        for i in range(0, count, 100):
            metric.update(btvae.to_fid_input(real[i:i + 100].to(device)), real=True)
            metric.update(btvae.to_fid_input(fake[i:i + 100]), real=False)
        return float(metric.compute().cpu()), time.perf_counter() - start

    btvae.prepare_for_speed(model, [], device)  # as a run's measurements follow its training
    try:
        batches = iter(fake.split(btvae.FID_BATCH))  # untimed: fills the cache of test features, as a first run does
        btvae.fid_measurer(test, cfg, device)(lambda n: next(batches), "")
        batches = iter(fake.split(btvae.FID_BATCH))
        start = time.perf_counter()  # a finished run's way: test features from the cache
        fid = btvae.fid_measurer(test, cfg, device)(lambda n: next(batches), "")["fid"]
        return fid, time.perf_counter() - start
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def measure_in_subprocess(kind, args, what):
    """Run `python bench.py --measure kind --what what` and return what it printed (JSON)."""
    command = [sys.executable, __file__, "--measure", kind, "--what", what, "--steps", str(args.steps),
               "--repeats", str(args.repeats), "--device", args.device, "--fid-images", str(args.fid_images)]
    for flag, value in (("--data-dir", args.data_dir), ("--fid-weights", args.fid_weights), ("--model", args.model)):
        if value is not None:
            command += [flag, str(value)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        sys.exit(f"bench.py --measure {kind} --what {what} failed:\n{finished.stderr.strip()}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def measure(args, device):
    """The body of a measuring process: prints one line of JSON."""
    if args.what == "training":
        result = bench_training(args.measure, args.steps, args.repeats, device)
    else:
        result = bench_fid(args.measure, args.data_dir, args.fid_weights, args.fid_images, args.model, device)
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per configuration and process")
    parser.add_argument("--rounds", type=int, default=2, help="plain and project processes, alternating (the best counts)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--data-dir", type=Path, default=None, help="data root with MNIST, for the FID benchmark")
    parser.add_argument("--fid-weights", type=Path, default=None, help="FID Inception weights, for the FID benchmark")
    parser.add_argument("--fid-images", type=int, default=2000, help="images per set in the FID benchmark")
    parser.add_argument("--model", type=Path, default=None, help="a run's model.pt to generate FID images with")
    parser.add_argument("--measure", choices=("plain", "project"), help=argparse.SUPPRESS)
    parser.add_argument("--what", choices=("training", "fid"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = btvae.pick_device(args.device)
    if args.measure:
        return measure(args, device)

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"device {device}")
    print(f"training: images/s over {args.steps}-step epochs of btvae.run_epoch (batch 64), "
          f"best of {args.repeats} epochs x {args.rounds} processes\n")
    rounds = [{kind: measure_in_subprocess(kind, args, "training") for kind in ("plain", "project")}
              for _ in range(args.rounds)]
    print("| shape | VAE plain | VAE project | speed-up | BTVAE plain | BTVAE project | speed-up "
          "| BTVAE/VAE step cost, plain | project | data loading share |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in SHAPES:
        best = {(objective, kind): max(r[kind][name][objective] for r in rounds)
                for objective in ("VAE", "BTVAE") for kind in ("plain", "project")}
        share = min(r["project"][name]["data share"] for r in rounds)
        vae_plain, vae_project = best[("VAE", "plain")], best[("VAE", "project")]
        bt_plain, bt_project = best[("BTVAE", "plain")], best[("BTVAE", "project")]
        print(f"| {name} | {vae_plain:,.0f} | {vae_project:,.0f} | {vae_project / vae_plain:.2f}x "
              f"| {bt_plain:,.0f} | {bt_project:,.0f} | {bt_project / bt_plain:.2f}x "
              f"| {vae_plain / bt_plain:.2f}x | {vae_project / bt_project:.2f}x | {share:.2%} |")

    if args.data_dir and args.fid_weights:
        (plain_fid, plain_s), (project_fid, project_s) = (measure_in_subprocess(kind, args, "fid")
                                                          for kind in ("plain", "project"))
        n = args.fid_images
        print(f"\nFID-64 of {n} generated MNIST images against {n} test images:")
        print("| way | seconds | generated images/s | FID |\n| --- | --- | --- | --- |")
        print(f"| straightforward torchmetrics, antialias=False (fresh metric, real and fake through) | {plain_s:.1f} "
              f"| {n / plain_s:.0f} "
              f"| {plain_fid:.6f} |")
        print(f"| btvae.fid_measurer (FID-64, as a run without --fid-2048), test features cached | {project_s:.1f} "
              f"| {n / project_s:.0f} | {project_fid:.6f} |")
        print(f"speed-up {plain_s / project_s:.2f}x; FID relative difference {abs(project_fid - plain_fid) / abs(plain_fid):.1e}")


if __name__ == "__main__":
    main()

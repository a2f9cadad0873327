"""The harness around the method: the command line end to end, bad input, checkpoints and --resume,
--evaluate, speed settings, and report.py and run_all.sh on fabricated runs.

Run: python -m pytest -q test_harness.py
"""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

import btvae
import report
from fabricated import HERE, NO_IMAGES, config, make_mnist, scripted_epochs, small_model_and_batch, stand_in_network


# ---------------------------------------------------------------------------
# The command line, end to end, on fabricated data
# ---------------------------------------------------------------------------

MEASURED_OUTPUTS = {"config.json", "metrics.json", "samples.png", "samples_gmm.png", "reconstructions.png", "latent.pt"}


EXPECTED_OUTPUTS = MEASURED_OUTPUTS | {"history.csv", "model.pt", "checkpoint.pt"}


MEASUREMENTS = {"fid", "fid_2048", "precision_2048", "recall_2048", "fid_seconds", "fid_samples", "active_units",
                "latent_correlation", "twin_correlation", "probe_accuracy", "pixel_probe_accuracy", "latent_seconds",
                "mixture_fit_seconds", "fid_gmm", "fid_2048_gmm", "precision_2048_gmm", "recall_2048_gmm",
                "fid_gmm_seconds"}


TRAINING_SUMMARY = {"best_val_loss", "best_epoch", "epochs_trained", "stopped_early", "train_seconds",
                    "images_per_second"}


EXPECTED_METRICS = MEASUREMENTS | TRAINING_SUMMARY


def run_cli(*argv, cwd=HERE):
    return subprocess.run([sys.executable, str(HERE / "btvae.py"), *map(str, argv)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_command_line_end_to_end(tmp_path):
    make_mnist(tmp_path / "data")
    result = run_cli("--dataset", "mnist", "--epochs", "2", "--fid-samples", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs" / "mnist_lam2=0.025_seed0"  # the default --out
    assert {p.name for p in out.iterdir()} == EXPECTED_OUTPUTS
    metrics = json.loads((out / "metrics.json").read_text())
    assert EXPECTED_METRICS == set(metrics) and metrics["fid"] is None and metrics["epochs_trained"] == 2
    assert metrics["images_per_second"] > 0 and math.isfinite(metrics["best_val_loss"])
    settings = json.loads((out / "config.json").read_text())
    assert settings["lam2"] == 0.025 and settings["versions"]["torch"] == torch.__version__
    assert len((out / "history.csv").read_text().splitlines()) == 3
    assert "epoch   2/2" in result.stdout


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
    assert "FID-64 over 40 samples" in capsys.readouterr().out
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
    assert torch.all(btvae.load_model(tmp_path / "model.pt").to_mu.bias == 3)
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 1 + 6
    assert len(btvae.read_checkpoint(tmp_path / "checkpoint.pt", cfg).history) == 6


TIMINGS = {"train_seconds", "train_loop_seconds", "images_per_second", "fid_seconds", "fid_gmm_seconds", "latent_seconds",
           "mixture_fit_seconds", "elapsed_seconds"}


RUN_ARGS = ["--epochs", "4", "--patience", "10", "--fid-samples", "40", "--batch-size", "60"]  # 3 + 1 batches an epoch


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


def test_ctrl_c_then_resume_ends_bit_for_bit_like_an_uninterrupted_run(tmp_path, monkeypatch, capsys,
                                                                       mnist_with_stand_in_fid):
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
    btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--resume"])
    assert "resuming after epoch 2" in capsys.readouterr().out
    assert_same_result(run_result(out), run_result(tmp_path / "straight"))


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
    real_save, writes = torch.save, []

    def save_killed_on_second_checkpoint(obj, path, *args, **kwargs):
        if Path(path).name == "checkpoint.tmp":
            writes.append(1)
            if len(writes) == 2:
                Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
                raise KeyboardInterrupt
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save_killed_on_second_checkpoint)
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        btvae.main([*mnist_with_stand_in_fid, "--out", str(out)])
    monkeypatch.setattr(torch, "save", real_save)
    checkpoint = btvae.read_checkpoint(out / "checkpoint.pt", config(*mnist_with_stand_in_fid, "--out", out))
    assert len(checkpoint.history) == 1
    btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--resume"])
    assert (out / "metrics.json").is_file()


def test_a_real_sigterm_to_a_running_process_then_resume(tmp_path):
    make_mnist(tmp_path / "data")
    out = tmp_path / "run"
    command = [sys.executable, str(HERE / "btvae.py"), "--data-dir", str(tmp_path / "data"), "--patience", "30",
               "--fid-samples", "0", "--out", str(out)]
    process = subprocess.Popen([*command, "--epochs", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 130, error
    assert "To continue:" in error and "--resume" in error
    epochs_done = len(torch.load(out / "checkpoint.pt", weights_only=True)["history"])
    assert 1 <= epochs_done < 30
    refused = subprocess.run([*command, "--epochs", "40", "--resume"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--epochs 30 (now 40)" in refused.stderr  # other settings are refused...
    resumed = subprocess.run([*command, "--epochs", "30", "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr  # ...the same ones continue
    assert f"resuming after epoch {epochs_done}" in resumed.stdout and (out / "metrics.json").is_file()


def test_resuming_a_finished_run_does_nothing_and_rerunning_it_is_refused(tmp_path, capsys, mnist_with_stand_in_fid):
    out = tmp_path / "run"
    btvae.main([*mnist_with_stand_in_fid, "--out", str(out)])
    written = (out / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    btvae.main([*mnist_with_stand_in_fid, "--out", str(out), "--resume"])
    assert "finished run: nothing to resume" in capsys.readouterr().out
    assert (out / "metrics.json").stat().st_mtime_ns == written
    with pytest.raises(SystemExit) as exit_info:
        btvae.main([*mnist_with_stand_in_fid, "--out", str(out)])
    assert exit_info.value.code == 2 and "add --resume to continue it" in capsys.readouterr().err


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
    elif damage == "out holds results":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "metrics.json").write_text("{}")
    return argv


EVALUATE_BAD_INPUT = {
    "truncated": "is not a btvae.py model.pt",
    "missing": "is not a btvae.py model.pt",
    "foreign": "is not a btvae.py model.pt (no architecture, config, state_dict)",
    "another architecture": "its weights do not fit its architecture",
    "training flag": "--lam2, --epochs cannot be used with --evaluate",
    "other data set": "was trained on 1-channel images, and --dataset cifar10 has 3; pass the data set it was "
                      "trained on (--dataset mnist)",
    "out holds results": "already holds results; choose another --out",
}


@pytest.mark.parametrize("damage", EVALUATE_BAD_INPUT, ids=list(EVALUATE_BAD_INPUT))
def test_evaluate_bad_input_is_one_line_exit_2_and_writes_nothing(damage, tmp_path, capsys):
    argv = evaluate_bad_input(tmp_path, damage)
    with pytest.raises(SystemExit) as exit_info:
        btvae.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(error.strip().splitlines()) == 1 and EVALUATE_BAD_INPUT[damage] in error
    out = tmp_path / "out"
    assert not out.exists() or [p.name for p in out.iterdir()] == ["metrics.json"]


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
def step():  # activations of 4-16 MB, alive together and then freed, as in a training step
    return [torch.ones(2**20 * (1 + i % 4)) for i in range(8)]
for _ in range(3):  # the heap grows to the steps' peak once
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not (sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION")), reason="glibc only")
def test_keep_freed_memory_reuses_freed_activations_without_page_faults():
    # A fresh process, as the setting is process-wide. Ten steps write 10 x 80 MB = 200,000 pages of 4 KB;
    # every page glibc handed back to the kernel would fault in again (glibc's default usually does that here).
    finished = subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True)
    assert int(finished.stdout) < 2_000  # under 1% of the pages written: the memory was reused


# ---------------------------------------------------------------------------
# report.py and run_all.sh: the sweep's tables and figures
# ---------------------------------------------------------------------------

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
    measured = {"fid": fid, "fid_gmm": fid / 2, "precision": 0.5 + seed / 100, "recall": 0.4, "active_units": 10,
                "latent_correlation": 0.2, "twin_correlation": 0.9, "probe_accuracy": 0.95, "pixel_probe_accuracy": 0.9,
                **(latent or {})}
    (folder / "metrics.json").write_text(json.dumps({**measured, "epochs_trained": epochs, "stopped_early": False}))
    for name in ("samples.png", "samples_gmm.png"):
        torchvision.utils.save_image(torch.rand(4, 1, 32, 32), folder / name, nrow=2)
    mu = torch.randn(50, latent_dim)
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


def test_report_summarises_seeds_and_compares_with_the_vae(tmp_path):
    runs = tmp_path / "runs"
    for seed, (vae, good, close) in enumerate([(1.0, 0.5, 0.98), (1.1, 0.52, 1.05), (0.9, 0.48, 1.0)]):
        fabricate_run(runs, "mnist", 0.0, seed, vae)
        fabricate_run(runs, "mnist", 0.025, seed, good, latent={"active_units": 128, "probe_accuracy": 0.8 + seed / 100})
        fabricate_run(runs, "mnist", 0.25, seed, close, latent={"probe_accuracy": 0.945 + seed / 100})
    (fabricate_run(runs, "mnist", -0.00025, 0, None) / "FAILED").write_text("exit status 1: btvae.py: stopped: NaN")
    fabricate_run(runs, "mnist", -0.00025, 1, None)  # no metrics and no FAILED: interrupted
    report.make_report(tmp_path)

    rows = {float(r["lam2"]): r for r in csv.DictReader(open(tmp_path / "table1.csv"))}
    assert float(rows[0.0]["fid_mean"]) == pytest.approx(1.0) and float(rows[0.0]["fid_std"]) == pytest.approx(0.1)
    assert float(rows[0.0]["paper_fid"]) == 0.0187 and rows[0.0]["seeds"] == "0,1,2"
    assert rows[0.025]["fid_versus_vae"] == "better than VAE beyond the seed spread"
    assert rows[0.25]["fid_versus_vae"] == "within the seed spread of VAE"
    assert "NaN" in rows[-0.00025]["failed"] and "interrupted" in rows[-0.00025]["failed"]
    assert float(rows[0.025]["precision_mean"]) == pytest.approx(0.51)
    assert float(rows[0.025]["fid_gmm_mean"]) == pytest.approx(0.25)
    assert rows[0.025]["fid_gmm_versus_vae"] == "lower than VAE beyond the seed spread"
    assert float(rows[0.025]["active_units_mean"]) == 128 and float(rows[0.025]["active_units_std"]) == 0
    assert rows[0.025]["active_units_versus_vae"] == "higher than VAE beyond the seed spread"
    assert rows[0.025]["probe_accuracy_versus_vae"] == "lower than VAE beyond the seed spread"
    assert rows[0.25]["probe_accuracy_versus_vae"] == "within the seed spread of VAE"  # 0.955 ± 0.01 against 0.95 ± 0
    assert rows[0.25]["twin_correlation_versus_vae"] == "within the seed spread of VAE"  # equal
    assert float(rows[0.0]["pixel_probe_accuracy"]) == pytest.approx(0.9)
    table = (tmp_path / "table1.md").read_text()
    assert "| mnist | BTVAE | 0.025 | 0,1,2 | 0.5000 ± 0.0200 | 0.2500 ± 0.0100 **lower** |" in table
    assert "| mnist | BTVAE | 0.025 | 0,1,2 | 128.0 ± 0.0 **higher** | 0.200 ± 0.000 | " in table
    assert "| 0.900 ± 0.000 | 0.810 ± 0.010 **lower** | 0.900 |" in table

    assert "REDUCED" not in table
    for figure in ("figure2_mnist.png", "latent_mnist.png"):
        assert (tmp_path / figure).is_file()


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
    assert "| FID (prior) | 1.0500 ± 0.0707 / 2.0500 ± 0.0707 | - / 5.0500 ± 0.0707 **worse** |" in table
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


def run_sweep(tmp_path, **knobs):
    env = {**os.environ, "PYTHON": sys.executable, "DATA_DIR": str(tmp_path / "data"), "OUT": str(tmp_path / "results"),
           "DATASETS": "mnist", "SEEDS": "0 1", "LAMBDAS": "0 0.025 nan", "EPOCHS": "1", "FID_SAMPLES": "0",
           "JOBS": "2", **knobs}
    return subprocess.run(["bash", str(HERE / "run_all.sh")], capture_output=True, text=True, env=env, timeout=600)


def test_run_all_end_to_end_resumes_and_carries_on_past_a_failing_run(tmp_path):
    make_mnist(tmp_path / "data")
    first = run_sweep(tmp_path)
    assert first.returncode == 0, first.stderr
    results = tmp_path / "results"
    runs = sorted(p.name for p in (results / "runs").iterdir())
    assert len(runs) == 8  # 3 lambdas x 2 seeds + Figure 3's two 2-d models
    assert all((results / "runs" / name / "metrics.json").is_file() for name in runs if "nan" not in name)
    failed = (results / "runs" / "mnist_lam2=nan_seed0" / "FAILED").read_text()
    assert "exit status 2" in failed and "argument --lam2: must be a finite number" in failed
    table = (results / "table1.md").read_text()
    assert "| mnist | VAE | 0 | 0,1 |" in table and "argument --lam2: must be a finite number" in table
    assert "REDUCED BUDGET" in table  # 1 epoch and no FID is not the paper's budget
    assert (results / "figure3.png").is_file()
    settings = json.loads((results / "runs" / "mnist_lam2=0_seed1" / "config.json").read_text())
    assert settings["fid_2048"] is True  # FID_2048=1, the default: the sweep measures the 2048-d layer too

    shutil.rmtree(results / "runs" / "mnist_lam2=0.025_seed1")  # never run
    (results / "runs" / "mnist_lam2=0_seed0" / "metrics.json").unlink()  # interrupted after its last epoch
    second = run_sweep(tmp_path)
    assert second.returncode == 0, second.stderr
    started = [line for line in second.stdout.splitlines() if line.startswith("start:")]
    assert sorted(started) == ["start: mnist_lam2=0.025_seed1", "start: mnist_lam2=0_seed0",
                               "start: mnist_lam2=nan_seed0", "start: mnist_lam2=nan_seed1"]
    assert (results / "runs" / "mnist_lam2=0.025_seed1" / "metrics.json").is_file()
    resumed_log = (results / "runs" / "mnist_lam2=0_seed0" / "log.txt").read_text()
    assert "resuming after epoch 1 (training had finished)" in resumed_log
    assert resumed_log.count("epoch   1/1 |") == 1  # the interrupted attempt's lines are kept

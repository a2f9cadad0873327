"""Mutation check: is every line of the method pinned by a test?

    python tools/check_mutants.py            # every mutant below
    python tools/check_mutants.py 3 17       # only these

Each mutant changes one line of btvae.py to something plausible but wrong. The
script applies it to a copy of the project in a temporary folder, runs the
tests that specify that part of the file (test_btvae.py's TestMethod or
TestMeasurements, or for the harness's device handling, which only a GPU runs,
the tests on the stand-in GPU), and reports the mutant as killed (a test
failed) or as survived. It exits with status 1 if any survived.
It is a developer's check, not part of the test suite or CI: it runs a test
file once per mutant, which takes a while (README.md, "Tests", says how long).
Add a mutant here when you add a line to the method.
"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent

# (what the mutant does, the line as it is, the line mutated): sections 1-5 of btvae.py, against TestMethod
METHOD = [
    ('encoder conv stride 1',
     'conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)',
     'conv = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)'),
    ('no BatchNorm in blocks',
     'return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.LeakyReLU())',
     'return nn.Sequential(conv, nn.Identity(), nn.LeakyReLU())'),
    ('ReLU instead of LeakyReLU',
     'return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.LeakyReLU())',
     'return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU())'),
    ('transposed conv without output padding',
     'stride=2, padding=1, output_padding=1)',
     'stride=2, padding=1, output_padding=0)'),
    ('Tanh output',
     '            nn.Sigmoid())',
     '            nn.Tanh())'),
    ('decoder widths not mirrored',
     'reversed_widths = [*reversed(hidden_dims), hidden_dims[0]]',
     'reversed_widths = [*reversed(hidden_dims), hidden_dims[-1]]'),
    ('encode swaps mu and logvar',
     'return self.to_mu(features).float(), self.to_logvar(features).float()',
     'return self.to_logvar(features).float(), self.to_mu(features).float()'),
    ('logvar from the mu head',
     'return self.to_mu(features).float(), self.to_logvar(features).float()',
     'return self.to_mu(features).float(), self.to_mu(features).float()'),
    ('bottleneck check missing',
     '    if image_size % 2 ** depth:\n        raise ValueError',
     '    if False:\n        raise ValueError'),
    ('sigma = exp(logvar)',
     'sigma = torch.exp(0.5 * logvar)',
     'sigma = torch.exp(logvar)'),
    ('sigma = logvar',
     'sigma = torch.exp(0.5 * logvar)',
     'sigma = logvar'),
    ('uniform noise',
     'return mu + sigma * torch.randn_like(sigma)',
     'return mu + sigma * torch.rand_like(sigma)'),
    ('noise not scaled',
     'return mu + sigma * torch.randn_like(sigma)',
     'return mu + torch.randn_like(sigma)'),
    ('KL mean over dimensions',
     'return 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(dim=1).mean()',
     'return 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).mean(dim=1).mean()'),
    ('KL summed over batch',
     'return 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(dim=1).mean()',
     'return 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(dim=1).sum()'),
    ('KL sign of log term',
     'return 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(dim=1).mean()',
     'return 0.5 * (logvar.exp() + mu.pow(2) - 1 + logvar).sum(dim=1).mean()'),
    ('MSE summed',
     '    recon = F.mse_loss(x_recon, x)',
     "    recon = F.mse_loss(x_recon, x, reduction='sum')"),
    ('L1 instead of MSE',
     '    recon = F.mse_loss(x_recon, x)',
     '    recon = F.l1_loss(x_recon, x)'),
    ('lambda1 ignored',
     '    return recon + lam1 * kl, recon, kl',
     '    return recon + kl, recon, kl'),
    ('Eq. 2 terms swapped',
     '    return recon + lam1 * kl, recon, kl',
     '    return recon + lam1 * kl, kl, recon'),
    ('unbiased variance',
     'torch.sqrt(z.var(dim=0, unbiased=False) + eps)',
     'torch.sqrt(z.var(dim=0, unbiased=True) + eps)'),
    ('no mean subtraction',
     'return (z - z.mean(dim=0)) / torch.sqrt',
     'return z / torch.sqrt'),
    ('C divided by N - 1',
     'return standardise(z_a).T @ standardise(z_b) / z_a.shape[0]',
     'return standardise(z_a).T @ standardise(z_b) / (z_a.shape[0] - 1)'),
    ('C of z_a with itself',
     'return standardise(z_a).T @ standardise(z_b) / z_a.shape[0]',
     'return standardise(z_a).T @ standardise(z_a) / z_a.shape[0]'),
    ('diagonal term not squared',
     'on_diagonal = (1 - diagonal).pow(2).sum()',
     'on_diagonal = (1 - diagonal).abs().sum()'),
    ('off-diagonal keeps the diagonal',
     'off_diagonal = c.pow(2).sum() - diagonal.pow(2).sum()',
     'off_diagonal = c.pow(2).sum()'),
    ('delta ignored',
     'return on_diagonal + delta * off_diagonal',
     'return on_diagonal + 5e-3 * off_diagonal'),
    ('bt_on mu compares mu with logvar_recon',
     '        return [(mu, mu_recon)]',
     '        return [(mu, logvar_recon)]'),
    ('bt_on z compares z with mu_recon',
     '        return [(z, reparameterise(mu_recon, logvar_recon))]',
     '        return [(z, mu_recon)]'),
    ('bt_on z compares mu',
     '        return [(z, reparameterise(mu_recon, logvar_recon))]',
     '        return [(mu, reparameterise(mu_recon, logvar_recon))]'),
    ('bt_on mu+logvar drops logvar',
     '    return [(mu, mu_recon), (logvar, logvar_recon)]',
     '    return [(mu, mu_recon)]'),
    ('re-encodes the input, not the reconstruction',
     '    mu_recon, logvar_recon = model.encode(x_recon)',
     '    mu_recon, logvar_recon = model.encode(x_recon.detach())'),
    ('decodes the mean, not a sample',
     '    x_recon = model.decode(z)\n    loss, recon, kl',
     '    x_recon = model.decode(mu)\n    loss, recon, kl'),
    ('only positive lambda2 adds BT',
     '    if lam2 != 0:  # the baseline VAE',
     '    if lam2 > 0:  # the baseline VAE'),
    ('lambda2 ignored',
     '        loss = loss + lam2 * bt',
     '        loss = loss + bt'),
    ('delta not passed to BT',
     'bt = sum(barlow_twins_loss(z_gt, z_recon, delta) for',
     'bt = sum(barlow_twins_loss(z_gt, z_recon) for'),
    ('last batch kept',
     'return list(order[: count - count % batch_size].split(batch_size))',
     'return list(order.split(batch_size))'),
    ('no shuffling',
     'order = torch.randperm(count, generator=shuffle) if shuffle is not None else torch.arange(count)',
     'order = torch.arange(count)'),
    ('unseeded shuffling',
     'order = torch.randperm(count, generator=shuffle) if shuffle is not None else torch.arange(count)',
     'order = torch.randperm(count) if shuffle is not None else torch.arange(count)'),
    ('batch not scaled',
     '    return to_model_range(images[index].to(device, non_blocking=True))',
     '    return images[index].to(device, non_blocking=True).float()'),
    ('weight decay',
     'lr=cfg.lr, weight_decay=0, fused',
     'lr=cfg.lr, weight_decay=1e-4, fused'),
    ('learning rate ignored',
     'lr=cfg.lr, weight_decay=0, fused',
     'lr=1e-3, weight_decay=0, fused'),
    ('validation in training mode',
     '    model.train(training)\n    batches',
     '    model.train(True)\n    batches'),
    ('validation builds a graph',
     '    with torch.set_grad_enabled(training):',
     '    with torch.set_grad_enabled(True):'),
    ('no zero_grad',
     '                optimiser.zero_grad(set_to_none=True)\n',
     ''),
    ('no optimiser step',
     '                optimiser.step()\n',
     ''),
    ('validation uses other lambdas',
     'cfg.lam1, cfg.lam2, cfg.bt_on, cfg.delta)',
     'cfg.lam1, cfg.lam2 if training else 0, cfg.bt_on, cfg.delta)'),
    ('terms returned in the wrong order',
     'return dict(zip(LOSS_TERMS, (totals / seen).cpu().tolist()))',
     'return dict(zip(LOSS_TERMS[::-1], (totals / seen).cpu().tolist()))'),
    ('equal loss counts as improvement',
     '        if val_loss < self.best_loss:',
     '        if val_loss <= self.best_loss:'),
    ('patience off by one',
     'return self.epochs_without_improvement >= self.patience',
     'return self.epochs_without_improvement > self.patience'),
    ('count not reset on improvement',
     '            self.epochs_without_improvement = 0\n        else:',
     '            pass\n        else:'),
    ('best weights not copied',
     'self.best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}',
     'self.best_state = model.state_dict()'),
    ('best weights not restored',
     '        training.stopper.restore_best(model)\n    return training',
     '        pass\n    return training'),
    ('runs one epoch past the maximum',
     'training.finished = training.stopped_early or training.epoch == cfg.epochs',
     'training.finished = training.stopped_early or training.epoch > cfg.epochs'),
    ('early stopping ignored',
     'training.finished = training.stopped_early or training.epoch == cfg.epochs',
     'training.finished = training.epoch == cfg.epochs'),
    ('shuffle not seeded',
     '                    torch.Generator().manual_seed(cfg.seed))',
     '                    torch.Generator())'),
    ('prior uniform',
     '        z = torch.randn(count, model.architecture["latent_dim"], generator=generator)',
     '        z = torch.rand(count, model.architecture["latent_dim"], generator=generator)'),
    ('prior without the generator',
     '        z = torch.randn(count, model.architecture["latent_dim"], generator=generator)',
     '        z = torch.randn(count, model.architecture["latent_dim"])'),
    ('generate in training mode',
     '    model.eval()\n    if mixture is None:',
     '    if mixture is None:'),
    ('reconstruct decodes a sample',
     '    mu, _ = model.encode(images)\n    return model.decode(mu)',
     '    mu, logvar = model.encode(images)\n    return model.decode(reparameterise(mu, logvar))'),
    ('reconstruct in training mode',
     '    model.eval()\n    mu, _ = model.encode(images)',
     '    mu, _ = model.encode(images)'),
]

# sections 6-8 (FID, latent space) and the sampler that uses them, against TestMeasurements. Not among
# them: > against >= at the active-unit threshold, since a variance of exactly 0.01 does not occur.
MEASUREMENTS = [
    ('FID input not clamped',
     '    return images.clamp(0, 1).mul(255).round().to(torch.uint8)',
     '    return images.mul(255).round().to(torch.uint8)'),
    ('grayscale not repeated',
     '    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images',
     '    return images'),
    ('biased covariance',
     '        return mean, centred.T @ centred / (len(features) - 1)',
     '        return mean, centred.T @ centred / len(features)'),
    ('FID without the factor 2',
     'cov_real.trace() + cov_fake.trace() - 2 * trace_sqrt)',
     'cov_real.trace() + cov_fake.trace() - trace_sqrt)'),
    ('FID mean term not squared',
     'return float((mean_real - mean_fake).square().sum() + cov_real',
     'return float((mean_real - mean_fake).abs().sum() + cov_real'),
    ('FID sqrt of the trace',
     'trace_sqrt = torch.linalg.eigvals(cov_real @ cov_fake).sqrt().real.sum()',
     'trace_sqrt = torch.linalg.eigvals(cov_real @ cov_fake).real.sum().sqrt()'),
    ('k-th neighbour counts the point itself',
     '.kthvalue(neighbours + 1, dim=1).values',
     '.kthvalue(neighbours, dim=1).values'),
    ('strictly inside the ball',
     '(torch.cdist(rows, centres) <= centre_radii).any(dim=1)',
     '(torch.cdist(rows, centres) < centre_radii).any(dim=1)'),
    ('precision and recall swapped',
     '    return share_inside(fake, real), share_inside(real, fake)',
     '    return share_inside(real, fake), share_inside(fake, real)'),
    ('FID-64 in the 2048-d layer',
     'measured = {f"fid{suffix}": frechet_distance(real[0], fake[0])}',
     'measured = {f"fid{suffix}": frechet_distance(real[-1], fake[-1])}'),
    ('FID-2048 in the 64-d layer',
     'f"fid_2048{suffix}": frechet_distance(real[1], fake[1]),',
     'f"fid_2048{suffix}": frechet_distance(real[0], fake[0]),'),
    ('precision and recall in the 64-d layer',
     'precision, recall = precision_recall(real[1], fake[1])',
     'precision, recall = precision_recall(real[0], fake[0])'),
    ('--fid-2048 ignored',
     'layers = (FID_FEATURE, STANDARD_FID_FEATURE) if cfg.fid_2048 else (FID_FEATURE,)',
     'layers = (FID_FEATURE,)'),
    ('the 2048-d layer always computed',
     'layers = (FID_FEATURE, STANDARD_FID_FEATURE) if cfg.fid_2048 else (FID_FEATURE,)',
     'layers = (FID_FEATURE, STANDARD_FID_FEATURE)'),
    ('radii of the wrong set',
     '        centre_radii = radii(centres)',
     '        centre_radii = radii(points)'),
    ('active units over the wrong axis',
     '    return int((mu.var(dim=0) > ACTIVE_UNIT_VARIANCE).sum())',
     '    return int((mu.var(dim=1) > ACTIVE_UNIT_VARIANCE).sum())'),
    ('latent correlation signed',
     'return float((c.abs().sum() - c.diagonal().abs().sum()) / (dims * (dims - 1)))',
     'return float((c.sum() - c.diagonal().sum()) / (dims * (dims - 1)))'),
    ('latent correlation with the diagonal',
     'return float((c.abs().sum() - c.diagonal().abs().sum()) / (dims * (dims - 1)))',
     'return float(c.abs().sum() / (dims * dims))'),
    ('twin correlation off the diagonal',
     'cross_correlation(z_gt, z_recon).diagonal() for z_gt, z_recon in pairs',
     'cross_correlation(z_gt, z_recon)[0] for z_gt, z_recon in pairs'),
    ('twin correlation of the first pair only',
     '    return float(torch.cat([cross_correlation(z_gt, z_recon).diagonal() for z_gt, z_recon in pairs]).mean())',
     '    return float(cross_correlation(*pairs[0]).diagonal().mean())'),
    ('probe fitted on the test images',
     '    classifier.fit(train_features.double().numpy(), train_labels.numpy())',
     '    classifier.fit(test_features.double().numpy(), test_labels.numpy())'),
    ('mixture sample with L^T',
     '(self.cholesky[k] @ eps).squeeze(-1)',
     '(self.cholesky[k].transpose(1, 2) @ eps).squeeze(-1)'),
    ('mixture components uniform',
     'k = torch.multinomial(self.weights, count, replacement=True, generator=generator)',
     'k = torch.multinomial(torch.ones_like(self.weights), count, replacement=True, generator=generator)'),
    ('mixture not seeded',
     'fitted = GaussianMixture(min(components, len(mu)), covariance_type="full", random_state=seed)',
     'fitted = GaussianMixture(min(components, len(mu)), covariance_type="full")'),
    ('mixture diagonal covariance',
     'covariance_type="full", random_state=seed)',
     'covariance_type="diag", random_state=seed)'),
    ('encode_split in training mode',
     '    model.eval()\n    means, pairs = [], []',
     '    means, pairs = [], []'),
    ('latent metrics on the training means',
     '    metrics = {"active_units": active_units(test_mu),',
     '    metrics = {"active_units": active_units(train_mu),'),
    ('mixture sampler gets the prior',
     '        z = mixture.sample(count, generator)',
     '        z = torch.randn(count, model.architecture["latent_dim"], generator=generator)'),
]

# The harness's device handling, which only a GPU runs: against the tests on the stand-in GPU
DEVICES = [
    ('epoch sums read on the device',
     '(totals / seen).cpu().tolist()',
     '(totals / seen).tolist()'),
    ('pixel probe on device images',
     'to_model_range(train_split.images.cpu()).flatten(1)',
     'to_model_range(train_split.images).flatten(1)'),
    ('every saved GPU generator restored',
     'checkpoint.cuda_rng[:torch.cuda.device_count()]',
     'checkpoint.cuda_rng'),
    ('every GPU generator restored into the first',
     'torch.cuda.set_rng_state(state, index)',
     'torch.cuda.set_rng_state(state, 0)'),
    ('no GPU generator saved',
     'cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []',
     'cuda_rng=[]'),
    ('bf16 by default on CUDA',
     '    return precision == "bf16"\n',
     '    return precision == "bf16" or device.type == "cuda"\n'),
    ('images moved when they fill a quarter of free memory',
     'if sum(s.images.nbytes for s in splits) < free_bytes // 4:',
     'if sum(s.images.nbytes for s in splits) <= free_bytes // 4:'),
    ('labels moved to the GPU',
     'splits = [Split(s.images.to(device), s.labels) for s in splits]',
     'splits = [Split(s.images.to(device), None if s.labels is None else s.labels.to(device)) for s in splits]'),
    ('channels_last on MPS',
     '    return device.type in ("cpu", "cuda")',
     '    return True'),
]
DEVICE_TESTS = "gpu or cuda or mps or float32 or bf16 or old_default"

MUTANTS = ([(*mutant, "test_btvae.py::TestMethod") for mutant in METHOD]
           + [(*mutant, "test_btvae.py::TestMeasurements") for mutant in MEASUREMENTS]
           + [(*mutant, f"test_btvae.py -k {DEVICE_TESTS}") for mutant in DEVICES])


def run(number, name, line, mutated, tests, work):
    source = (PROJECT / "btvae.py").read_text()
    if source.count(line) != 1:
        return f"NOT APPLIED ({source.count(line)} matches: update this mutant to the current line)"
    shutil.copytree(PROJECT, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*", "results", "runs", "data"))
    (work / "btvae.py").write_text(source.replace(line, mutated))
    tests = tests.split(" ", 2)  # a test file or class, and perhaps -k and an expression
    finished = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=work,
                              capture_output=True, text=True)
    if finished.returncode == 0:
        return "SURVIVED"
    failed = next((row for row in finished.stdout.splitlines() if row.startswith("FAILED")), "an error")
    return f"killed by {failed.removeprefix('FAILED ').split(' - ')[0]}"


def main():
    chosen = [int(arg) for arg in sys.argv[1:]] or range(len(MUTANTS))
    outcomes = []
    with tempfile.TemporaryDirectory() as folder:
        for number in chosen:
            name, line, mutated, tests = MUTANTS[number]
            start = time.perf_counter()
            outcome = run(number, name, line, mutated, tests, Path(folder))
            outcomes.append(outcome)
            print(f"[{number}] {name}: {outcome} ({time.perf_counter() - start:.0f} s)", flush=True)
    survived = sum(not outcome.startswith("killed") for outcome in outcomes)
    print(f"{len(outcomes) - survived} of {len(outcomes)} mutants killed")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()

"""DP-FedAvg: clipping, the noise scale, Poisson sampling and the ε that bounds it against independent
accountants, settings the guarantee cannot honour, noise that no reader of the config can regenerate, and
outputs that release nothing the guarantee does not cover."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from conftest import make_datamodule, make_module
from firm_lightning.aggregation import CoordinateMedian, FedAvg
from firm_lightning.client import ClientUpdate
from firm_lightning.datamodule import PromptDataModule
from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig
from firm_lightning.privacy import DifferentialPrivacy, SecretGenerator, clip_delta, released_row
from firm_lightning.trainer_factory import TrainerFactory


def test_updates_are_clipped_to_the_norm_and_averaged_with_equal_weights():
    g = {"w": torch.zeros(2)}
    long, short = (
        ClientUpdate(0, [{"w": torch.tensor([30.0, 40.0])}], 100, {}),
        ClientUpdate(1, [{"w": torch.tensor([0.3, 0.4])}], 1, {}),
    )
    assert torch.allclose(clip_delta(long.adapters[0], 1.0)["w"], torch.tensor([0.6, 0.8]))
    assert torch.allclose(clip_delta(short.adapters[0], 1.0)["w"], torch.tensor([0.3, 0.4]))
    dp = DifferentialPrivacy(clipping_norm=1.0, noise_multiplier=0.0)
    out = dp.wrap(FedAvg(), 2, SecretGenerator()).aggregate(g, [long, short])
    assert torch.allclose(out.adapter["w"], torch.tensor([0.45, 0.6]))  # (0.6+0.3)/2, (0.8+0.4)/2
    # A sampled client that failed counts as a zero delta: the mean is over the m sampled.
    assert torch.allclose(dp.wrap(FedAvg(), 3, SecretGenerator()).aggregate(g, [long, short]).adapter["w"],
                          torch.tensor([0.3, 0.4]))


def test_noise_std_is_sigma_times_clip_over_sampled_clients():
    dp = DifferentialPrivacy(clipping_norm=0.5, noise_multiplier=2.0)
    private = dp.wrap(FedAvg(server_lr=1.0), 4, SecretGenerator())
    assert private.noise_std == pytest.approx(2.0 * 0.5 / 4)
    g = {"w": torch.zeros(400_000)}
    noise = private.aggregate(g, [ClientUpdate(i, [dict(g)], 1, {}) for i in range(4)]).adapter["w"]
    # sample std of 400k Gaussians: relative standard error ≈ 1/sqrt(2n) ≈ 0.11%
    assert float(noise.std()) == pytest.approx(0.25, rel=0.01)
    assert abs(float(noise.mean())) < 5 * 0.25 / 400_000**0.5
    with pytest.raises(ValueError, match="needs FedAvg aggregation; got CoordinateMedian"):
        dp.wrap(CoordinateMedian(), 2, SecretGenerator())
    with pytest.raises(ValueError, match="federation.privacy.clipping_norm must be > 0"):
        DifferentialPrivacy(clipping_norm=0.0, noise_multiplier=1.0)


def test_the_secret_generator_resumes_exactly_and_two_generators_differ():
    a, b = SecretGenerator(), SecretGenerator()
    saved = a.state_dict()
    first = torch.randn(5, generator=a.generator)
    assert not torch.equal(first, torch.randn(5, generator=b.generator))  # seeded from the OS, not from a config
    a.load_state_dict(saved)
    assert torch.equal(first, torch.randn(5, generator=a.generator))


def _private_run(tmp_path, sigma=1.1, delta=1e-5, rounds=2, num_clients=2, fraction=0.5):
    config = FederationConfig(
        num_rounds=rounds,
        num_clients=num_clients,
        client_fraction=fraction,
        output_dir=str(tmp_path),
        privacy=DifferentialPrivacy(clipping_norm=0.1, noise_multiplier=sigma, delta=delta),
    )
    orch = FederatedOrchestrator(make_module(), make_datamodule(num_clients), config,
                                 TrainerFactory({"max_steps": 1, "accelerator": "cpu"}, tmp_path), echo=lambda _: None)
    return orch, orch.run()


# (N, q, σ, rounds, δ): the case (N 100, 10 per round, σ 1, 100 rounds), cross-device, all clients, few clients.
ACCOUNTING_CASES = [(100, 0.1, 1.0, 100, 1e-5), (1000, 0.01, 1.0, 1000, 1e-6), (4, 1.0, 1.0, 3, 1e-5),
                    (50, 0.2, 2.0, 200, 1e-5), (10, 0.3, 0.7, 10, 1e-3)]


def _dp_accounting_pld(q: float, sigma: float, rounds: int, delta: float) -> float:
    """The tight bound: dp-accounting's privacy-loss-distribution accountant (pessimistic estimate)."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant = PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("num_clients, q, sigma, rounds, delta", ACCOUNTING_CASES)
def test_epsilon_bounds_the_poisson_sampled_mechanism_that_runs(num_clients, q, sigma, rounds, delta):
    """The ε reported for q = client_fraction (the engine's own rate: test_a_private_run_releases_...), against
    independent accountants of the Poisson-subsampled Gaussian (add or remove one client): at least Opacus' RDP
    bound and within 1 % of it, and at least the tight PLD bound of dp-accounting, within 25 % (what RDP's
    conversion to (ε, δ) costs)."""
    dp = DifferentialPrivacy(clipping_norm=1.0, noise_multiplier=sigma, delta=delta)
    FederationConfig(num_clients=num_clients, client_fraction=q, privacy=dp)  # a valid setting (δ < 1/N)
    reported = dp.epsilon(q, rounds)
    opacus = RDPAccountant()
    opacus.history = [(sigma, q, rounds)]
    rdp = opacus.get_epsilon(delta)
    pld = _dp_accounting_pld(q, sigma, rounds, delta)
    assert rdp * (1 - 1e-9) <= reported <= rdp * 1.01
    assert pld <= reported <= pld * 1.25


def test_settings_the_guarantee_cannot_honour_are_refused():
    dp = DifferentialPrivacy(clipping_norm=1.0, noise_multiplier=1.0, delta=0.01)
    with pytest.raises(ValueError, match=r"delta=0.01 is not below 1/num_clients = 0.01"):
        FederationConfig(num_clients=100, privacy=dp)
    FederationConfig(num_clients=99, privacy=dp)  # 1/99 > 0.01
    with pytest.raises(ValueError, match="min_clients=2 cannot be guaranteed under federation.privacy"):
        FederationConfig(num_clients=10, client_fraction=0.5, min_clients=2, privacy=dp)
    FederationConfig(num_clients=10, client_fraction=1.0, min_clients=2, privacy=dp)  # every client, every round
    from firm_lightning.flower.settings import FlowerSettings, SecureAggregation

    with pytest.raises(ValueError, match="secure_aggregation with federation.privacy needs client_fraction 1"):
        FlowerSettings(secure_aggregation=SecureAggregation()).check(
            FederationConfig(num_clients=10, client_fraction=0.5, privacy=dp))
    from firm_lightning.studies.compare import CompareSettings, run_comparison

    with pytest.raises(ValueError, match="compare tests its claims on training statistics"):  # before any training
        run_comparison(None, None, FederationConfig(num_clients=10, privacy=dp), {}, CompareSettings())


def test_the_released_adapter_hides_noise_that_the_config_cannot_regenerate(tmp_path):
    """Two runs of one config release different adapters; and the noise is not what torch would
    draw from any seed a reader can derive from the config (federation.seed, the round)."""
    orch_a, a = _private_run(tmp_path / "a", sigma=5.0, rounds=1, num_clients=2, fraction=1.0)
    orch_b, b = _private_run(tmp_path / "b", sigma=5.0, rounds=1, num_clients=2, fraction=1.0)
    released = load_file(str(tmp_path / "a" / "adapters" / "round_001.safetensors"))
    assert any(not torch.equal(a.global_adapter[k], b.global_adapter[k]) for k in a.global_adapter)
    # The noiseless mean of the same clipped updates (both runs trained the same clients alike).
    start = load_file(str(tmp_path / "a" / "adapters" / "round_000.safetensors"))
    dp = DifferentialPrivacy(clipping_norm=0.1, noise_multiplier=0.0)
    orch_a.module.load_adapter_state(start)
    orch_a.datamodule.setup()
    uploads = [orch_a.train_one(start, c, 1) for c in (0, 1)]
    noiseless = dp.wrap(FedAvg(), 2, SecretGenerator()).aggregate(start, uploads).adapter
    noise = {k: released[k] - noiseless[k] for k in released}
    std = 5.0 * 0.1 / 2
    assert float(torch.cat([n.flatten() for n in noise.values()]).std()) == pytest.approx(std, rel=0.1)
    # What a reader could regenerate: torch's generator seeded by anything derived from the config.
    seed = orch_a.config.seed
    candidates = [seed, 1, int(np.random.SeedSequence([seed, 1], spawn_key=(1,)).generate_state(1)[0]),
                  int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])]
    for candidate in candidates:
        gen = torch.Generator().manual_seed(candidate)
        guess = {k: std * torch.randn(v.shape, generator=gen) for k, v in noise.items()}
        residual = torch.cat([(noise[k] - guess[k]).flatten() for k in noise])
        assert float(residual.std()) > std  # subtracting the guess adds noise instead of removing it


# ---------------------------------------------------------------- what a private run releases

OUTSIDE_THE_GUARANTEE = ("checkpoint", "server_private")  # the server's own, documented as such
_LOGGERS = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "unused"}},
            {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "unused"}}]


class NeighbouringData(PromptDataModule):
    """The same prompts but client 0's, which are replaced: a neighbouring data set (one client's data changed).
    The held-out prompts and the other client's are untouched."""

    def setup(self, stage=None) -> None:
        first = self._train_prompts is None
        super().setup(stage)
        if first:
            for i in self._client_indices[0]:
                self._train_prompts[i] = "zebra " + self._train_prompts[i][::-1]


def _released_values(out, lines: list[str]) -> dict:
    """Every value a run releases, keyed by where it is: each CSV cell, each line of a text file (summary, model
    cards, the loggers' hyperparameters, JSON), each TensorBoard scalar, each adapter tensor, each plot, and each
    progress line; everything under the run folder but what the docs name outside the guarantee."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {("progress", i): line for i, line in enumerate(lines)}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out)
        if rel.parts[0] in OUTSIDE_THE_GUARANTEE:
            continue
        if "tfevents" in path.name:  # named by time and process: one events file per logger run
            events = EventAccumulator(str(path))
            events.Reload()
            for tag in events.Tags()["scalars"]:
                values.update({(str(rel.parent), tag, e.step): e.value for e in events.Scalars(tag)})
        elif path.suffix == ".csv":
            with open(path) as f:
                values.update({(str(rel), i, k): v for i, row in enumerate(csv.DictReader(f)) for k, v in row.items()})
        elif path.suffix == ".safetensors":
            values.update({(str(rel), k): t.numpy().tobytes() for k, t in load_file(str(path)).items()})
        elif path.suffix == ".png":
            values[(str(rel),)] = path.read_bytes()
        else:
            values.update({(str(rel), i): line for i, line in enumerate(path.read_text().splitlines())})
    return values


def test_a_private_run_releases_nothing_that_is_a_function_of_one_client_s_data(tmp_path):
    """One DP round, three times on the same data and once with client 0's prompts replaced, a CSV and a
    TensorBoard logger configured, SaveBestAdapter's card too: no released value is equal on the same data and
    different on the neighbour (three same-data runs: a tie of two noisy evaluations is not taken for a
    deterministic value). The sampled clients are not named anywhere released; the server-private record has
    the training statistics; the reported ε is the accountant's for q = client_fraction."""
    from firm_lightning.callbacks import SaveBestAdapter

    module = make_module()
    start = module.adapter_state()
    data_args = dict(num_clients=2, batch_size=4, eval_size=8, eval_batch_size=8, max_prompts=48, group_column=None)
    dp = DifferentialPrivacy(clipping_norm=0.1, noise_multiplier=5.0)

    def run(name: str, data: PromptDataModule) -> dict:
        out, lines = tmp_path / name, []
        module.load_adapter_state(start)
        config = FederationConfig(num_rounds=1, num_clients=2, output_dir=str(out), progress="lines", privacy=dp,
                                  callbacks=[SaveBestAdapter("eval/reward/a_to_m")])
        trainers = TrainerFactory({"max_steps": 1, "accelerator": "cpu", "logger": _LOGGERS}, out)
        FederatedOrchestrator(module, data, config, trainers, echo=lines.append).run()
        return _released_values(out, lines)

    same = [run(f"same_{i}", PromptDataModule(**data_args)) for i in range(3)]
    neighbour = run("neighbour", NeighbouringData(**data_args))
    assert same[0].keys() == same[1].keys() == neighbour.keys()
    leaks = [key for key, value in same[0].items()
             if all(s[key] == value for s in same[1:]) and neighbour[key] != value]
    assert not leaks, f"released values that are functions of client 0's data: {leaks}"

    out = tmp_path / "same_0"
    for rel in {key[0] for key in same[0] if str(key[0]).endswith(".csv")}:
        with open(out / rel) as f:
            assert "client" not in next(csv.reader(f)), rel
    assert not (out / "client_metrics.csv").exists() and not (out / "clients").exists()
    assert not any("clients [" in str(v) or "client 0" in str(v) for v in same[0].values())
    with open(out / "server_private" / "client_metrics.csv") as f:
        assert sorted(int(r["client"]) for r in csv.DictReader(f)) == [0, 1]
    assert float(same[0][("metrics.csv", 1, "privacy/epsilon")]) == pytest.approx(dp.epsilon(1.0, 1), rel=1e-12)
    epsilon = f"ε = {dp.epsilon(1.0, 1):.3f}, δ = 1e-05"
    assert epsilon in (out / "summary.txt").read_text()
    card = (out / "adapters" / "final" / "README.md").read_text()
    for stated in (epsilon, "after 1 round;", "Poisson sampling, q = 1 of 2 clients", "C = 0.1", "σ = 5"):
        assert stated in card, stated


def test_the_released_row_keeps_the_held_out_evaluation_and_the_accounting_only():
    row = {"round": 3, "eval/reward/a": 0.5, "eval/group/cooking/a": 0.4, "eval/client_mean/a": 0.45,
           "eval/worst_client/mean": 0.3, "train/reward/a": 0.6, "lambda/a": 0.5, "lambda_dispersion": 0.1,
           "update_dispersion": 2.0, "clients": 2, "comm/bytes_up": 10, "failed_clients": 0, "time/round_s": 1.0,
           "privacy/epsilon": 4.0, "privacy/delta": 1e-5, "privacy/noise_std": 0.1}
    assert released_row(row) == {"round": 3, "eval/reward/a": 0.5, "eval/group/cooking/a": 0.4,
                                 "privacy/epsilon": 4.0, "privacy/delta": 1e-5, "privacy/noise_std": 0.1}

"""Several devices per client (``trainer.strategy: ddp``), offline on CPU with gloo.

The key property: a client's fit on 2 ranks (each sampling and differentiating its share of
the batch, the S per-objective gradients summed over the ranks) makes the same steps as one
process on the same global batch, and both ranks make the same step. Plus: the CLI launches
its ranks itself, and unsupported strategies are refused naming what is supported.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from firm_lightning.distributed import ClientDDPStrategy, check_strategy, shares
from firm_lightning.trainer_factory import TrainerFactory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def test_shares_are_contiguous_and_differ_by_at_most_one():
    for num, world in ((3, 2), (8, 3), (1, 2), (4, 4)):
        parts = shares(num, world)
        assert [i for p in parts for i in range(num)[p]] == list(range(num))
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


@pytest.fixture(scope="module")
def two_rank_fits(tmp_path_factory):
    """What tests/ddp_fit.py's two ranks (started by the script itself, as `fit` starts them) recorded."""
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_fit.py"), str(out / "ddp"), "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"ddp.rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_a_two_rank_client_fit_equals_the_one_process_fit(tmp_path, two_rank_fits):
    """2 gloo ranks, batches of 3 prompts (shares of 2 and 1), 2 steps, micro-batches of 2 rows on each rank;
    against one process on the same batches, in this process."""
    from ddp_fit import CASES, fit

    ranks = two_rank_fits
    for case in CASES:
        one = fit(case, 1, tmp_path / "one")
        rank0, rank1 = ranks[0][case], ranks[1][case]
        assert one["world_size"] == 1 and rank0["world_size"] == rank1["world_size"] == 2
        assert len(one["directions"]) == len(rank0["directions"]) == 2
        errors = [float((d - w).abs().max() / w.abs().max()) for d, w in zip(rank0["directions"], one["directions"])]
        lambda_error = max(float((a - b).abs().max()) for a, b in zip(rank0["lambdas"], one["lambdas"]))
        adapter_error = max(float((rank0["adapter"][k] - one["adapter"][k]).abs().max()) for k in one["adapter"])
        print(f"\n{case}: max|d_ddp - d_one|/max|d_one| per step {[f'{e:.1e}' for e in errors]}, "
              f"|λ_ddp - λ_one| {lambda_error:.1e} (λ {[lam.tolist() for lam in one['lambdas']]}), "
              f"max|θ_ddp - θ_one| {adapter_error:.1e}")
        # Every rank computes the same λ and step: the same tensors bit for bit.
        assert all(torch.equal(a, b) for a, b in zip(rank0["directions"], rank1["directions"]))
        assert all(torch.equal(a, b) for a, b in zip(rank0["lambdas"], rank1["lambdas"]))
        assert all(torch.equal(rank0["adapter"][k], rank1["adapter"][k]) for k in rank0["adapter"])
        assert 0.02 < float(one["lambdas"][0].max()) < 0.98, "an interior λ: its equality says something"
        assert max(errors) <= 1e-5 and lambda_error <= 1e-5 and adapter_error <= 1e-5
        for key, value in one["summary"].items():  # whole-batch rewards, λ, KL, norm on every rank
            if math.isnan(value):  # not measured (the weighting effect with gram_from logits): on no rank
                assert math.isnan(rank0["summary"][key]), key
                continue
            assert abs(rank0["summary"][key] - value) <= 1e-5 * max(1.0, abs(value)), key


def test_sampling_on_two_ranks_or_in_chunks_gives_the_one_process_step(tmp_path, two_rank_fits):
    """A real fit, sampling included (one local SGD step, lr 1.0): each rank samples its share of the prompts
    from the per-prompt generators, so the adapter equals the one-process fit's to 1e-5 of the update; so does
    one process sampling in chunks of 2 sequences (groups of 3 cut)."""
    from ddp_fit import sampled_fit

    one = sampled_fit(1, tmp_path / "one")
    update = max(float((one["adapter"][k] - one["initial"][k]).abs().max()) for k in one["adapter"])
    assert update > 1e-3
    for name, other in (("2 ranks", two_rank_fits[0]["sampled"]), ("chunks", sampled_fit(1, tmp_path / "chunks", 2))):
        error = max(float((other["adapter"][k] - one["adapter"][k]).abs().max()) for k in one["adapter"])
        print(f"\n{name}: max|θ - θ_one| {error:.1e}, update max {update:.1e}")
        assert error <= 1e-5 * update, name
    assert two_rank_fits[0]["sampled"]["world_size"] == 2


def test_fit_launches_its_ranks_itself_and_only_rank_0_writes(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "firm_lightning", "fit", "--config", "configs/tiny.yaml",
               "--trainer.strategy", "ddp", "--trainer.devices", "2", "--federation.num_rounds", "1",
               "--federation.num_clients", "2", "--trainer.max_steps", "1", "--data.eval_size", "8",
               "--federation.output_dir", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "FIRM_DDP_LAUNCHED")}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (
        proc.stdout.count("FIRM federation: 1 rounds, 2 clients") == 1 and "2 devices per client (ddp)" in proc.stdout
    )
    assert "rank 1: served 2 client fits" in proc.stderr  # rank 1 took part in both clients' fits
    assert (out / "metrics.csv").read_text().count("\n") == 3  # header, round 0, round 1
    assert not list(out.rglob("*rank*")), "ranks > 0 write nothing"


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(strategy="fsdp"), r"trainer\.strategy='fsdp' is not supported.*Supported: \['auto', 'ddp'\]"),
    (dict(strategy="deepspeed_stage_2"), r"'deepspeed_stage_2' is not supported.*\['auto', 'ddp'\]"),
    (dict(strategy="ddp_spawn"), r"'ddp_spawn' is not supported"),
    (dict(strategy={"class_path": "lightning.pytorch.strategies.FSDPStrategy"}), r"FSDPStrategy' is not supported"),
    (dict(devices=2), r"trainer\.devices=2.*--trainer\.strategy ddp"),
    (dict(strategy="ddp", devices=2, num_nodes=2), r"trainer\.num_nodes=2 is not supported"),
])
def test_unsupported_strategies_are_refused_naming_what_is_supported(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_strategy(kwargs)
    with pytest.raises(ValueError, match=pattern):
        TrainerFactory({"max_steps": 1, "accelerator": "cpu", **kwargs})


def test_several_devices_outside_fit_are_refused_naming_fit():
    """compare/pareto/flower build client Trainers without launching ranks: the Trainer says to use `fit`."""
    import lightning as L

    assert "FIRM_DDP_LAUNCHED" not in os.environ
    with pytest.raises(ValueError, match=r"python -m firm_lightning fit.*--trainer\.devices 1"):
        L.Trainer(strategy=ClientDDPStrategy(), devices=2, accelerator="cpu", logger=False)
    factory = TrainerFactory({"max_steps": 1, "accelerator": "cpu", "strategy": "ddp", "devices": 1})
    assert factory.client_trainer(0, 1).world_size == 1  # ddp on one device: a plain single-device fit

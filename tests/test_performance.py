"""The cheap (representation) weighting mode, the 16-bit upload and the benchmark script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_datamodule
from firm_lightning.aggregation import FedAvg
from firm_lightning.client import ClientUpdate
from firm_lightning.federation_metrics import payload_bytes
from firm_lightning.module import PolicyGradientSettings
from firm_lightning.orchestrator import FederationConfig, run_federation
from firm_lightning.algorithms import FIRM
from firm_lightning.rewards import CharsetReward, RewardFunction, score_all
from firm_lightning.weighting import RegularizedMinNorm
from test_module import PROMPTS, make_module, randomize_adapter

ROOT = Path(__file__).resolve().parents[1]


class Scaled(RewardFunction):
    """``factor`` × another reward: its policy gradient is parallel to the other's."""

    def __init__(self, reward: RewardFunction, factor: float, name: str) -> None:
        self.reward, self.factor, self.name = reward, factor, name

    def __call__(self, prompts, responses):
        return self.factor * self.reward(prompts, responses)


class _Optimizer:
    def zero_grad(self):
        pass

    def step(self):
        pass


def _lambdas(gram_from: str, beta: float, objectives) -> torch.Tensor:
    torch.manual_seed(0)
    loss = PolicyGradientSettings(kl_coef=0.0, whiten_advantages=False, max_grad_norm=None, gram_from=gram_from)
    module = make_module(objectives, weighting=RegularizedMinNorm(beta=beta), loss=loss)
    randomize_adapter(module)
    module.optimizers = lambda: _Optimizer()
    torch.manual_seed(1)
    rollout = module.rollout(PROMPTS[:4], 4)
    rewards = score_all(module.objectives, rollout.prompts, rollout.responses)
    lambdas, _, _ = module.update(rollout, rewards)
    return lambdas.double()


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("gram_from", ["hidden", "logits"])
def test_cheap_lambda_equals_exact_lambda_for_parallel_objectives(gram_from, beta):
    # r2 = 1.5·r1 without whitening or KL: every per-token loss weight of objective 2 is 1.5× that of
    # objective 1, so the gradients are parallel in parameter space and in any representation,
    # both Gram matrices are ‖g1‖²·[[1, 1.5], [1.5, 2.25]] up to scale, and λ must coincide.
    base = CharsetReward("a_to_m", "abcdefghijklm")
    objectives = [base, Scaled(base, 1.5, "a_to_m_x1.5")]
    exact, cheap = _lambdas("parameters", beta, objectives), _lambdas(gram_from, beta, objectives)
    assert torch.allclose(cheap, exact, atol=1e-5), (cheap, exact)
    if beta > 0:
        assert 0.0 < exact[1] < exact[0] < 1.0  # an interior point, not a trivial vertex


def test_cheap_lambda_is_a_different_problem_for_conflicting_objectives():
    objectives = [CharsetReward("a_to_m", "abcdefghijklm"), CharsetReward("n_to_z", "nopqrstuvwxyz")]
    exact, cheap = _lambdas("parameters", 0.0, objectives), _lambdas("logits", 0.0, objectives)
    assert abs(float(exact.sum()) - 1) < 1e-6 and abs(float(cheap.sum()) - 1) < 1e-6
    assert not torch.allclose(exact, cheap, atol=1e-4)  # otherwise the exactness test above proves nothing


def test_16bit_uploads_carry_the_update_to_its_own_relative_precision():
    """The aggregated update of 16-bit uploads equals the float32 one to the 16-bit precision of the
    *update* (the upload is Δ_i = θ_i − θ); casting θ_i itself (the old upload) loses the update in
    the rounding of the weights, and moves the global adapter even for a client that did not train."""
    torch.manual_seed(0)
    global_state = {"a": torch.randn(8, 4), "b": torch.randn(4, 8)}  # |θ| ~ 1, updates ~ 1e-3
    trained = [{k: v + 1e-3 * torch.randn_like(v) for k, v in global_state.items()} for _ in range(3)]
    idle = dict(global_state)  # a client that did not train at all
    uploads = [ClientUpdate(i, [t], 10 + i, {}) for i, t in enumerate([*trained, idle])]
    exact = FedAvg(1.0).aggregate(global_state, uploads).adapter
    update = torch.cat([(exact[k] - v).flatten() for k, v in global_state.items()])
    for dtype, unit in ((torch.bfloat16, 2**-8), (torch.float16, 2**-11)):  # unit roundoff of the format
        sent = [u.for_upload(global_state, dtype) for u in uploads]
        assert all(s.delta and all(t.dtype == dtype for t in s.adapters[0].values()) for s in sent)
        assert payload_bytes(sent[0].adapters[0]) * 2 == payload_bytes(trained[0])
        assert all(float(t.abs().max()) == 0 for t in sent[3].adapters[0].values())  # the idle client sends zeros
        merged = FedAvg(1.0).aggregate(global_state, [s.applied_to(global_state) for s in sent]).adapter
        assert all(v.dtype == torch.float32 for v in merged.values())
        merged_update = torch.cat([(merged[k] - v).flatten() for k, v in global_state.items()])
        error = float((merged_update - update).norm() / update.norm())
        assert error <= unit, (dtype, error)
        # What casting the weights did instead: the rounding of |θ| ~ 1 swamps a 1e-3 update.
        cast = [
            ClientUpdate(u.client_id, [{k: t.to(dtype).float() for k, t in u.adapters[0].items()}], u.num_examples, {})
            for u in uploads
        ]
        cast_update = torch.cat([(FedAvg(1.0).aggregate(global_state, cast).adapter[k] - v).flatten()
                                 for k, v in global_state.items()])
        assert float((cast_update - update).norm() / update.norm()) > 10 * unit
    assert uploads[0].for_upload(global_state, None) is uploads[0]


def test_federation_upload_dtype_halves_counted_uplink(tmp_path):
    bytes_up = {}
    for dtype in (None, "bfloat16"):
        torch.manual_seed(0)
        module = make_module()
        config = FederationConfig(num_rounds=1, num_clients=2, output_dir=str(tmp_path / str(dtype)),
                                  save_adapters=False, upload_dtype=dtype)
        state = run_federation(
            module,
            make_datamodule(2),
            config,
            {"max_steps": 1, "accelerator": "cpu", "logger": False},
            FIRM(beta=1.0),
            module.adapter_state(),
            tmp_path / str(dtype),
            echo=lambda m: None,
        )
        bytes_up[dtype] = state.history[-1]["comm/bytes_up_per_client"]
        assert all(v.dtype == torch.float32 for v in state.global_adapter.values())
    assert bytes_up["bfloat16"] * 2 == bytes_up[None] == payload_bytes(module.adapter_state())


KEYS = ("update_ratio_s2", "update_ratio_s3", "update_floor_ratio_s2", "step_ratio_s2", "orchestration_overhead",
        "rss_ratio_32_vs_2", "adapter_bytes", "uplink_bytes_firm_s2", "uplink_bytes_fmgda_s2",
        "trl_grpo_tokens_per_s", "firm_s2_tokens_per_s", "update_shared_over_unshared_tiny",
        "sampling_shared_over_unshared_tiny")
BYTE_KEYS = ("adapter_bytes", "uplink_bytes_firm_s2", "uplink_bytes_fmgda_s2")


def test_benchmark_smoke_mode_emits_every_key_with_sane_values(tmp_path):
    """Every key is there and well formed. Timings are the benchmark's to report, not the test's
    to judge: a busy machine moves any ratio (step_ratio_s2 measured 0.974 under load), so no
    timing value is compared with a threshold here."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flat = json.loads(out.read_text())["summary"]
    missing = [k for k in KEYS if flat.get(k) is None]
    assert not missing, missing
    for key in KEYS:
        value = flat[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value), (key, value)
        if key != "orchestration_overhead":  # a difference of two timings: its sign is noise-level
            assert value > 0, (key, value)
    # Counted bytes are exact, not timings: FIRM uploads one adapter, FMGDA one per objective.
    assert all(isinstance(flat[k], int) for k in BYTE_KEYS)
    assert (
        flat["uplink_bytes_firm_s2"] == flat["adapter_bytes"]
        and flat["uplink_bytes_fmgda_s2"] == 2 * flat["adapter_bytes"]
    )


HIDE_TRL = """
import importlib.abc, runpy, sys

class HideTRL(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "trl" or name.startswith("trl."):
            raise ImportError(f"No module named {name!r} (hidden by the test)")
        return None

sys.meta_path.insert(0, HideTRL())
sys.argv = [sys.argv[1], "--smoke", "--sections", "trl", "orchestration"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_benchmark_without_trl_prints_skipped_instead_of_crashing():
    proc = subprocess.run([sys.executable, "-c", HIDE_TRL, str(ROOT / "benchmarks" / "run.py")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("trl_grpo_tokens_per_s")]
    assert row and row[0].split()[-1] == "skipped", proc.stdout[:3000]
    assert "trl is not installed" in proc.stdout
    # The sections that did run still report their numbers.
    overhead = [line for line in proc.stdout.splitlines() if line.startswith("orchestration_overhead")]
    assert overhead and overhead[0].split()[-1] not in ("skipped", "None", "-"), proc.stdout[:3000]


def test_client_garbage_is_freed_inside_steady_memory_and_gc_is_unfrozen_after():
    import gc
    import weakref

    from firm_lightning.memory import release_client_memory, steady_memory

    class Node:
        pass

    with steady_memory():
        assert gc.get_freeze_count() > 0
        node = Node()
        node.self = node  # a reference cycle, like a finished Trainer's
        alive = weakref.ref(node)
        del node
        release_client_memory()
        assert alive() is None
    assert gc.get_freeze_count() == 0


def test_gpt2_shape_has_gpt2s_vocabulary_and_parameter_count():
    """The benchmark's GPT-2 124M shape: 50,257 byte-level BPE tokens (id 50256 ends a text, id 0 is "!"),
    and GPT-2's 124,439,808 parameters (counted on the meta device: no weights are allocated)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from transformers import GPT2Config, GPT2LMHeadModel

    from shapes import GPT2_VOCAB, gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    assert len(tokenizer) == GPT2_VOCAB == 50257 and tokenizer.eos_token_id == 50256
    assert tokenizer.convert_ids_to_tokens(0) == "!" and tokenizer.padding_side == "left"
    text = "How do I keep snails away from my zucchini? Ünïcödé & emoji 🙂"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < len(text.encode())  # byte-level and merging
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB))
    assert sum(p.numel() for p in model.parameters()) == 124_439_808

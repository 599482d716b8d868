"""Policy builders: a model saved with save_pretrained loads by path; a bad name gets a helpful error."""

from __future__ import annotations

import pytest
import torch

from firm_lightning.policy import LoRASettings, PretrainedPolicy, TinyPolicy, add_lora


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_pretrained_policy_loads_a_saved_model_by_path(tmp_path, architecture):
    model, tokenizer = TinyPolicy(architecture).build()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = PretrainedPolicy(str(tmp_path)).build()
    assert loaded_tok.padding_side == "left" and loaded_tok.pad_token_id is not None
    ids = torch.tensor([loaded_tok("hello", add_special_tokens=False)["input_ids"]])
    assert torch.allclose(model.eval()(ids).logits, loaded.eval()(ids).logits)


def test_pretrained_policy_missing_path_says_how_to_fix(tmp_path):
    with pytest.raises(OSError, match="offline|local folder"):
        PretrainedPolicy(str(tmp_path / "no_such_model")).build()


def test_lora_freezes_the_base_and_switches_dropout_off():
    model, _ = TinyPolicy().build()
    policy = add_lora(model, LoRASettings(target_modules=["c_attn"]))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(m.p == 0.0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))


def test_tiny_policy_is_deterministic_in_its_seed():
    a, _ = TinyPolicy(seed=1).build()
    b, _ = TinyPolicy(seed=1).build()
    c, _ = TinyPolicy(seed=2).build()
    wa, wb, wc = (m.transformer.wte.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)

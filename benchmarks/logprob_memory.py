"""Peak memory of the response log-probs, before and after response-only logits + chunked log-softmax.

    python benchmarks/logprob_memory.py                      # Qwen (151,936) and GPT-2 (50,257) vocabularies
    python benchmarks/logprob_memory.py --vocab 151936 --rows 8 --prompt 128 --response 64

A two-layer Qwen2 model with a real vocabulary size (random weights, CPU). Each measurement
runs in a fresh process and reports the growth of its peak RSS (``ru_maxrss``) over the
set-up, for the two passes of a training step: the reference pass (no grad) and the policy
pass (forward + backward). ``before`` is the previous ``token_logprobs`` (full ``(N, P+T, V)``
logits, fp32 cross-entropy on the response slice); ``after`` is the current one. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's firm_lightning

import torch
import torch.nn.functional as F


def before(model, rollout) -> torch.Tensor:
    """``token_logprobs`` as of commit e3278c4."""
    from firm_lightning.sequences import position_ids

    logits = model(
        input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
        position_ids=position_ids(rollout.attention_mask),
    ).logits
    logits = logits[:, rollout.prompt_length - 1 : -1].float()
    targets = rollout.sequences[:, rollout.prompt_length :]
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def measure(variant: str, mode: str, vocab: int, rows: int, prompt: int, response: int, autocast: bool) -> dict:
    """One measurement (run in its own process)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from firm_lightning.sequences import Rollout, token_logprobs

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    model.model.embed_tokens.weight.requires_grad_(mode == "policy")  # stands in for a trainable adapter
    compute = before if variant == "before" else token_logprobs

    def run(rows: int, prompt: int, response: int) -> None:
        sequences = torch.randint(0, vocab, (rows, prompt + response))
        mask = torch.ones_like(sequences)
        mask[: rows // 2, : prompt // 2] = 0  # left padding on half the rows
        rollout = Rollout([""] * rows, [""] * rows, sequences, mask, mask[:, prompt:], prompt, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if mode == "reference":
                with torch.no_grad():
                    compute(model, rollout)
            else:
                (compute(model, rollout) * torch.randn(rows, response)).sum().backward()
        model.zero_grad(set_to_none=True)

    run(2, 4, 2)  # warm-up: the libraries' one-off allocations are not the step's memory
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tic = time.perf_counter()
    run(rows, prompt, response)
    return {
        "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024,
        "s": time.perf_counter() - tic,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 50257])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--autocast", choices=["off", "bf16"], nargs="+", default=["off", "bf16"])
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # variant mode vocab: child process
    args = parser.parse_args()
    shape = dict(rows=args.rows, prompt=args.prompt, response=args.response)
    if args.one:
        variant, mode, vocab = args.one
        print(json.dumps(measure(variant, mode, int(vocab), **shape, autocast=args.autocast == ["bf16"])))
        return
    results = []
    for vocab in args.vocab:
        for precision in args.autocast:
            for mode in ("reference", "policy"):
                row = {"vocab": vocab, "autocast": precision, "pass": mode}
                for variant in ("before", "after"):
                    command = [sys.executable, __file__, "--one", variant, mode, str(vocab), "--autocast", precision,
                               "--rows", str(args.rows), "--prompt", str(args.prompt), "--response", str(args.response)]
                    out = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                    row[f"{variant}_peak_mb"], row[f"{variant}_s"] = round(out["peak_mb"], 1), round(out["s"], 3)
                row["peak_ratio_after_vs_before"] = round(row["after_peak_mb"] / row["before_peak_mb"], 3)
                results.append(row)
    full_logits_mb = [v * args.rows * (args.prompt + args.response) * 4 / 2**20 for v in args.vocab]
    print(
        json.dumps(
            {"shape": shape, "fp32_full_logits_mb": [round(m, 1) for m in full_logits_mb], "results": results}, indent=2
        )
    )


if __name__ == "__main__":
    main()

"""Peak RSS of ``validate`` against ``fit`` on the HH-RLHF Qwen config, offline.

    python benchmarks/hh_validate_memory.py                      # this checkout
    python benchmarks/hh_validate_memory.py --checkout /tmp/old  # another checkout (`git archive` of an old commit)
    python benchmarks/hh_validate_memory.py --hidden 1024 --layers 12 --dtype bfloat16

Builds a Qwen2-shaped policy with random weights (``--hidden``/``--layers``; byte-level BPE
tokenizer with a chat template, from tests/real_like.py), tiny reward models and an HH-RLHF
folder, all saved by path, and runs ``configs/hh_rlhf_qwen.yaml`` with every hub name replaced
by those paths and CPU-sized settings (fp32 by default: bf16 matmuls are slow on most CPUs;
``--dtype bfloat16`` keeps the config's bf16): first ``fit`` (1 round, 2 clients, 1 step), then
``validate --ckpt_path`` on its final adapter. Each command runs in its own process; its peak
RSS is ``ru_maxrss`` of that child. ``validate`` attaches the data module to a Trainer before
preparing the data, so anything that pickles the data module there (datasets' fingerprinting
of a ``map`` closure did) pickles the policy's weights too. Prints JSON.

Measured (defaults: 53.4M parameters, 204 MB of fp32 weights; 2 shared CPU cores):
before the fix (commit e330117, ``--checkout`` of its ``git archive``) validate peaked at
1198.6 MB, after it at 807.5 MB (fit: 1402.9 / 1248.6 MB). The difference, 391 MB, is about
twice the weights: the pickled bytes and the hashing's copy of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # real_like fixtures


def build_models(folder: Path, hidden: int, layers: int) -> dict[str, Path]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from real_like import bpe_tokenizer, eos_ids, tiny_reward_model

    tokenizer = bpe_tokenizer()
    im_end, end_of_text = eos_ids(tokenizer)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=end_of_text, pad_token_id=end_of_text,
    )
    torch.manual_seed(0)
    paths = {"policy": folder / "policy", "helpful": folder / "rm_helpful", "harmless": folder / "rm_harmless"}
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(paths["policy"])
    tokenizer.save_pretrained(paths["policy"])
    for seed, key in enumerate(("helpful", "harmless")):
        tiny_reward_model(tokenizer, seed).save_pretrained(paths[key])
        tokenizer.save_pretrained(paths[key])
    paths["parameters"] = sum(p.numel() for p in model.parameters())
    return paths


def build_hh(folder: Path, rows: int) -> Path:
    for subset in ("helpful-base", "harmless-base"):
        (folder / subset).mkdir(parents=True)
        with open(folder / subset / "train.jsonl", "w") as f:
            for i in range(rows):
                text = f"\n\nHuman: Question {i} about {subset}?\n\nAssistant: Answer {i}."
                f.write(json.dumps({"chosen": text, "rejected": text + " (worse)"}) + "\n")
    return folder


def local_config(paths: dict, hh: Path, target: Path, checkout: Path = ROOT) -> Path:
    text = (checkout / "configs" / "hh_rlhf_qwen.yaml").read_text()
    text = text.replace("name_or_path: Qwen/Qwen2.5-0.5B-Instruct,", f"name_or_path: {paths['policy']},")
    text = text.replace("Ray2333/gpt2-large-helpful-reward_model", str(paths["helpful"]))
    text = text.replace("Ray2333/gpt2-large-harmless-reward_model", str(paths["harmless"]))
    text = text.replace("path: Anthropic/hh-rlhf", f"path: {hh}")
    target.write_text(text)
    return target


def peak_rss_mb(command: list[str], env: dict, cwd: str) -> tuple[float, int]:
    """Peak RSS of ``command`` in a fresh measuring process (``RUSAGE_CHILDREN`` holds only that child)."""
    probe = (
        "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)"
    )
    # cwd: `python -m` puts the working directory first on sys.path, before PYTHONPATH.
    out = subprocess.run([sys.executable, "-c", probe, *command], env=env, cwd=cwd, capture_output=True, text=True)
    last = out.stdout.strip().splitlines()[-1].split()
    if int(last[1]) != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return int(last[0]) / 1024, int(last[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkout", default=str(ROOT), help="the firm_lightning checkout (and its configs/) to measure"
    )
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rows", type=int, default=32, help="HH conversations per subset")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": args.checkout, "OMP_NUM_THREADS": "2", "FLWR_TELEMETRY_ENABLED": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = build_models(tmp / "models", args.hidden, args.layers)
        config = local_config(paths, build_hh(tmp / "hh", args.rows), tmp / "hh_rlhf_qwen.yaml", Path(args.checkout))
        out = tmp / "run"
        common = [
            "--config", str(config), f"--federation.output_dir={out}", "--trainer.accelerator=cpu",
            "--trainer.max_steps=1", "--federation.num_rounds=1", "--federation.num_clients=2",
            "--model.sampling.max_new_tokens=8", "--model.lora.target_modules=[q_proj, v_proj]",
            "--data.init_args.eval_size=4", "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=4",
        ]
        if args.dtype == "float32":
            common += ["--model.policy.init_args.torch_dtype=float32", "--trainer.precision=32-true",
                       "--model.policy.init_args.gradient_checkpointing=false"]
        cli = [sys.executable, "-m", "firm_lightning"]
        fit_mb, _ = peak_rss_mb([*cli, "fit", *common], env, args.checkout)
        validate_mb, _ = peak_rss_mb(
            [*cli, "validate", *common, f"--ckpt_path={out / 'adapters' / 'final'}"], env, args.checkout
        )
    print(json.dumps({
        "checkout": args.checkout, "policy_parameters": paths["parameters"],
        "dtype": args.dtype,
        "policy_weights_mb": round(paths["parameters"] * (4 if args.dtype == "float32" else 2) / 2**20, 1),
        "fit_peak_rss_mb": round(fit_mb, 1), "validate_peak_rss_mb": round(validate_mb, 1),
        "validate_minus_fit_mb": round(validate_mb - fit_mb, 1),
    }, indent=2))


if __name__ == "__main__":
    main()

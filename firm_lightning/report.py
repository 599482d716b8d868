"""What a federation run leaves on disk and prints: adapters, CSVs, plots, a summary table.

Layout of ``output_dir``::

    config.yaml                  the resolved config (written by the CLI)
    metrics.csv                  one row per round: eval/reward/<objective>, lambda_dispersion, ...
    client_metrics.csv           one row per client per round: lambda/<objective>, train/reward/<objective>, bytes
    adapters/round_<r>.safetensors, adapters/adapter_config.json, adapters/final/ (a peft adapter folder
                                 with a Hugging Face model card, README.md), adapters/<best>/ (the same for
                                 SaveBestAdapter's best round)
    plots/eval_rewards.png, plots/lambdas.png
    summary.txt                  the table printed at the end
    clients/client_<id>/round_<r>/  each client fit's own Lightning logs
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from firm_lightning.callbacks import SaveBestAdapter
from firm_lightning.checkpoint import atomic_write

if TYPE_CHECKING:
    from firm_lightning.federation import FederationConfig
    from firm_lightning.state import FederationState


class RunWriter:
    def __init__(
        self, output_dir: str | Path, objective_names: list[str], adapter_config=None, echo=print,
        save_every_round: bool = True,
    ) -> None:
        self.dir = Path(output_dir)
        self.save_every_round = save_every_round
        self.names = objective_names
        self.adapter_config = adapter_config  # a peft config, saved beside the adapters
        self.echo = echo
        self.dir.mkdir(parents=True, exist_ok=True)

    def record_round(self, state: "FederationState", row: dict, client_rows: list[dict]) -> None:
        write_csv(self.dir / "metrics.csv", state.history)
        if state.client_history:
            write_csv(self.dir / "client_metrics.csv", state.client_history)
        if self.save_every_round:
            self.save_adapter(state.global_adapter, self._round_path(state.round), state.round)

    def _round_path(self, round_idx: int) -> Path:
        return self.dir / "adapters" / f"round_{round_idx:03d}.safetensors"

    def save_adapter(self, adapter: dict[str, torch.Tensor], path: Path, round_idx: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(path), metadata={"round": str(round_idx)})
        if self.adapter_config is not None and not (path.parent / "adapter_config.json").exists():
            self.adapter_config.save_pretrained(str(path.parent))

    def finish(self, state: "FederationState", wall_s: float, config: "FederationConfig") -> None:
        final = self.dir / "adapters" / "final"
        self.save_adapter(state.global_adapter, final / "adapter_model.safetensors", state.round)
        card = ModelCard(self.dir, self.names, self.adapter_config, config, state)
        card.write(final, state.round, f"the global adapter after round {state.round}")
        self._package_best_adapters(card, config, state)
        plot_eval_rewards(state.history, self.names, self.dir / "plots" / "eval_rewards.png")
        plot_lambdas(state.client_history, self.names, self.dir / "plots" / "lambdas.png")
        text = summary_table(state, self.names, wall_s)
        (self.dir / "summary.txt").write_text(text + "\n")
        self.echo(text)
        self.echo(f"outputs in {self.dir}/ (metrics.csv, client_metrics.csv, adapters/, plots/, summary.txt)")


    def _package_best_adapters(self, card: "ModelCard", config: "FederationConfig", state: "FederationState") -> None:
        """SaveBestAdapter keeps ``adapters/<filename>.safetensors``; beside it, a peft folder with its card."""
        for callback in config.callbacks:
            if not isinstance(callback, SaveBestAdapter):
                continue
            file = self.dir / "adapters" / f"{callback.filename}.safetensors"
            if not file.is_file():
                continue
            info = json.loads(file.with_suffix(".json").read_text())
            folder = self.dir / "adapters" / callback.filename
            self.save_adapter(load_file(str(file)), folder / "adapter_model.safetensors", info["round"])
            card.write(folder, info["round"], f"the best global adapter by {info['monitor']} "
                       f"({info['monitor']} = {info['value']:.4f} in round {info['round']}; SaveBestAdapter)")


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` atomically: a reader (a resumed run, another process of the same
    comparison) sees the old file or the new one, never a half-written one."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(path), text.getvalue().encode())


def summary_table(state: "FederationState", names: list[str], wall_s: Optional[float] = None) -> str:
    first, last = state.history[0], state.history[-1]
    lines = [f"FIRM federation: {state.round} rounds" + (f" in {wall_s:.1f}s" if wall_s is not None else "")]
    lines.append(f"{'objective':<16}{'eval round 0':>14}{f'eval round {state.round}':>16}{'change':>10}")
    for n in names:
        a, b = first[f"eval/reward/{n}"], last[f"eval/reward/{n}"]
        lines.append(f"{n:<16}{a:>14.4f}{b:>16.4f}{b - a:>+10.4f}")
    if state.client_history:
        lines.append("")
        lam_cols = "".join(f"{'λ ' + n:>16}" for n in names)
        lines.append(f"{'client':<8}{'rounds':>7}{lam_cols}{'up B/round':>13}{'down B/round':>14}")
        for client in sorted({int(r["client"]) for r in state.client_history}):
            rows = [r for r in state.client_history if int(r["client"]) == client]
            lams = "".join(f"{sum(r[f'lambda/{n}'] for r in rows) / len(rows):>16.3f}" for n in names)
            up = sum(r["comm/bytes_up"] for r in rows) / len(rows)
            down = sum(r["comm/bytes_down"] for r in rows) / len(rows)
            lines.append(f"{client:<8}{len(rows):>7}{lams}{up:>13,.0f}{down:>14,.0f}")
        lines.append("(λ: mean over the client's local steps and rounds; bytes: adapter tensors sent, numel × element size)")
    return "\n".join(lines)


def new_figure(*args, figsize, **kwargs):
    """A figure and its axes without pyplot: saving plots never switches a notebook's or an app's backend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def plot_eval_rewards(history: list[dict], names: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = new_figure(figsize=(6, 4))
    rounds = [r["round"] for r in history]
    for n in names:
        ax.plot(rounds, [r[f"eval/reward/{n}"] for r in history], marker="o", label=n)
    ax.set(xlabel="round", ylabel="eval reward (global adapter)", title="Eval reward per objective")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_lambdas(client_history: list[dict], names: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = new_figure(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    clients = sorted({int(r["client"]) for r in client_history})
    for ax, n in zip(axes[0], names):
        for c in clients:
            rows = [r for r in client_history if int(r["client"]) == c]
            ax.plot([r["round"] for r in rows], [r[f"lambda/{n}"] for r in rows], marker=".", label=f"client {c}")
        ax.set(xlabel="round", ylabel=f"λ {n}", title=f"λ {n} per client", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------- model cards

CARD_TAGS = ["firm_lightning", "peft", "lora", "federated-learning", "multi-objective-alignment", "reinforcement-learning"]


class ModelCard:
    """The ``README.md`` of a saved peft adapter folder, in the Hugging Face model-card format.

    YAML front matter (``library_name: peft``, ``base_model``, ``tags``) and the run that made
    the adapter: objectives and reward models, weighting (β, preference), algorithm, rounds,
    clients, eval rewards (raw and normalised where logged), uplink bytes and the command that
    reproduces it. The model, objective and data settings come from the resolved ``config.yaml``
    the CLI saves in the output folder (or an ancestor, for the runs of ``compare``/``pareto``);
    without one (a federation run from Python) the card names the objectives only.
    """

    def __init__(self, run_dir: Path, objective_names: list[str], adapter_config, config: "FederationConfig",
                 state: "FederationState") -> None:
        self.run_dir = Path(run_dir)
        self.names = objective_names
        self.peft = adapter_config
        self.federation = config
        self.state = state
        self.config_path, self.config = _resolved_config(self.run_dir)

    def write(self, folder: Path, round_idx: int, what: str) -> Path:
        path = Path(folder) / "README.md"
        path.write_text(self.text(round_idx, what))
        return path

    # ---- parts ----

    def base_model(self) -> str:
        """The policy's name_or_path; for a model built in code (TinyPolicy), that fact in words."""
        policy = (self.config or {}).get("model", {}).get("policy") or {}
        args = policy.get("init_args") or {}
        name = args.get("name_or_path") or getattr(self.peft, "base_model_name_or_path", None)
        if name:
            return str(name)
        if str(policy.get("class_path", "")).endswith("TinyPolicy"):
            return (f"none: a tiny {args.get('num_layers', '?')}-layer {args.get('architecture', 'gpt2')} with random "
                    "weights built in code (firm_lightning TinyPolicy)")
        return "none: a model built in code, not loaded from the Hub (e.g. firm_lightning TinyPolicy)"

    def objectives(self) -> list[str]:
        entries = (self.config or {}).get("model", {}).get("objectives")
        if not entries:
            return [f"`{n}` (defined in Python; no saved config.yaml describes it)" for n in self.names]
        return [_describe_objective(e) for e in entries]

    def weighting(self) -> str:
        """The in-client weighting: the algorithm's if it sets one, else the model's configured one."""
        algorithm = self.federation.algorithm
        kind = type(algorithm).__name__ if algorithm is not None else None
        preference = getattr(algorithm, "preference", None)
        p = f"p = {list(preference)}" if preference is not None else "p uniform"
        if kind == "FMGDA":
            return "none in the clients (one adapter per objective); min-norm over the averaged deltas on the server"
        if kind == "Linear":
            return f"linear scalarisation, fixed λ = p, {p}"
        if kind == "LocalMGDA":
            return "MGDA min-norm (β = 0)"
        if algorithm is not None and hasattr(algorithm, "beta"):
            return f"FIRM regularised min-norm, β = {algorithm.beta:g}, preference {p}"
        weighting = (self.config or {}).get("model", {}).get("weighting") or {}
        args = weighting.get("init_args") or {}
        cls = str(weighting.get("class_path", "")).rsplit(".", 1)[-1]
        if cls == "RegularizedMinNorm":
            pref = args.get("preference")
            return (f"FIRM regularised min-norm, β = {float(args.get('beta', 1.0)):g}, preference "
                    + (f"p = {pref}" if pref is not None else "p uniform"))
        if cls == "LinearScalarization":
            return f"linear scalarisation, fixed λ = {args.get('weights')}"
        return cls or "the model's configured weighting (defined in Python)"

    def algorithm(self) -> str:
        algorithm = self.federation.algorithm
        if algorithm is None:
            return "the model's configured weighting, one adapter per client per round, FedAvg"
        return f"{type(algorithm).__name__} (`{algorithm.name}`)"

    def command(self) -> str:
        if self.config_path is None:
            return ("Trained from Python (no config.yaml was saved). The CLI saves the resolved config; "
                    "e.g. `python -m firm_lightning fit --config configs/tiny.yaml` for the offline default.")
        config = _display_path(self.config_path)
        if "pareto" in self.config or "compare" in self.config:
            command = "pareto" if "pareto" in self.config else "compare"
            where = self.run_dir.relative_to(self.config_path.parent)
            fresh = _display_path(self.config_path.parent.parent / f"{self.config_path.parent.name}_reproduced")
            return (f"This is run `{where}` of a `{command}` sweep, which trains it again in a fresh folder:\n\n"
                    f"```bash\npython -m firm_lightning {command} --config {config} --federation.output_dir {fresh}\n```")
        command = "flower" if "flower" in self.config else "fit"
        fresh = _display_path(self.run_dir.parent / f"{self.run_dir.name}_reproduced")
        return f"```bash\npython -m firm_lightning {command} --config {config} --federation.output_dir {fresh}\n```"

    def use_snippet(self) -> list[str]:
        policy = (self.config or {}).get("model", {}).get("policy") or {}
        args = policy.get("init_args") or {}
        name = args.get("name_or_path") or getattr(self.peft, "base_model_name_or_path", None)
        if name:
            build = ["from transformers import AutoModelForCausalLM",
                     f"base_model = AutoModelForCausalLM.from_pretrained({str(name)!r})"]
        elif str(policy.get("class_path", "")).endswith("TinyPolicy"):
            shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
            build = ["import firm_lightning as fl", f"base_model, tokenizer = fl.TinyPolicy({shown}).build()"]
        else:
            build = ["base_model = ...  # the model this adapter was trained on (built in code)"]
        return ["from peft import PeftModel", *build, 'model = PeftModel.from_pretrained(base_model, "path/to/this/folder")']

    def eval_table(self, round_idx: int) -> list[str]:
        rows = {int(r["round"]): r for r in self.state.history}
        first, this = rows.get(0, {}), rows.get(round_idx, {})
        raw = any(f"eval/raw_reward/{n}" in this for n in self.names)
        head = "| objective | round 0 | this adapter (round %d) |" % round_idx
        head += " raw round 0 | raw, this adapter |" if raw else ""
        lines = [head, "|---" * (5 if raw else 3) + "|"]
        for n in self.names:
            line = f"| `{n}` | {_fmt(first.get(f'eval/reward/{n}'))} | {_fmt(this.get(f'eval/reward/{n}'))} |"
            if raw:
                line += f" {_fmt(first.get(f'eval/raw_reward/{n}'))} | {_fmt(this.get(f'eval/raw_reward/{n}'))} |"
            lines.append(line)
        return lines

    def uplink(self, round_idx: int) -> str:
        rows = [r for r in self.state.history if 0 < int(r["round"]) <= round_idx]
        total = sum(float(r.get("comm/bytes_up", 0) or 0) for r in rows)
        per_client = [float(r["comm/bytes_up_per_client"]) for r in rows if r.get("comm/bytes_up_per_client")]
        text = f"{total:,.0f} bytes uploaded by the clients over {len(rows)} round{'s' * (len(rows) != 1)}"
        if per_client:
            text += f" ({per_client[-1]:,.0f} bytes per client per round: the adapter tensors as uploaded)"
        return text

    def text(self, round_idx: int, what: str) -> str:
        fed, model = self.federation, (self.config or {}).get("model", {})
        base = self.base_model()
        front = {"library_name": "peft", "base_model": base, "tags": CARD_TAGS}
        if getattr(self.peft, "task_type", None) == "CAUSAL_LM":
            front["pipeline_tag"] = "text-generation"
        lora = f"r = {self.peft.r}, alpha = {self.peft.lora_alpha}" if self.peft is not None else "see adapter_config.json"
        trainer = (self.config or {}).get("trainer") or {}
        data = (self.config or {}).get("data") or {}
        data_args = data.get("init_args", data) if isinstance(data, dict) else {}
        privacy = fed.privacy
        table = [
            "| | |", "|---|---|",
            f"| base model | {base} |",
            f"| algorithm | {self.algorithm()} |",
            f"| weighting | {self.weighting()} |",
            f"| objectives | {'; '.join(self.objectives())} |",
            f"| rounds | {self.state.round} of federation.num_rounds = {fed.num_rounds} (this adapter: round {round_idx}) |",
            f"| clients | {fed.num_clients}, {fed.clients_per_round} per round |",
            f"| local steps per client per round | {trainer.get('max_steps', 'see the Trainer settings')} |",
            f"| data | {_display_path(Path(str(data_args.get('path', ''))))} ({data_args.get('partition', '?')} split) |"
            if data_args else "| data | the data module given in Python |",
            f"| LoRA | {lora} |",
            f"| seed | {fed.seed} |",
            f"| uplink | {self.uplink(round_idx)} |",
            f"| differential privacy | {'off' if privacy is None else f'C = {privacy.clipping_norm}, σ = {privacy.noise_multiplier}, δ = {privacy.delta}'} |",
        ]
        sampling = model.get("sampling") or {}
        eval_note = ("greedy responses" if sampling.get("eval_greedy") else "sampled responses with a fixed seed")
        lines = [
            "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=10_000).strip(), "---", "",
            f"# Federated multi-objective LoRA adapter: {', '.join(self.names)}", "",
            f"A LoRA adapter (peft) for `{base}`, trained by federated multi-objective RL with "
            "firm_lightning (FIRM: federated in-client regularised multi-objective alignment; "
            f"the prompts never left the clients). This folder holds {what}.", "",
            "## Training", "", *table, "",
            "## Evaluation", "",
            f"Mean reward of the global adapter on the held-out prompts ({eval_note}), as logged in "
            "`metrics.csv`" + ("; raw: the reward model's own score before normalisation" if any(
                f"eval/raw_reward/{n}" in r for r in self.state.history for n in self.names) else "") + ":", "",
            *self.eval_table(round_idx), "",
            "## Reproduce", "", self.command(), "",
            "## Use", "", "```python", *self.use_snippet(), "```", "",
        ]
        return "\n".join(lines)


def _resolved_config(run_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
    """The ``config.yaml`` the CLI saved for this run: in ``run_dir`` or the sweep folder above it."""
    for folder in [run_dir, *list(run_dir.parents)[:4]]:
        path = folder / "config.yaml"
        if not path.is_file():
            continue
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            return None, None
        out = (config.get("federation") or {}).get("output_dir")
        if out is not None and Path(out).resolve() == folder.resolve():
            return path, config
    return None, None


def _describe_objective(entry: Any) -> str:
    if not isinstance(entry, dict):
        return f"`{entry}`"
    cls = str(entry.get("class_path", "")).rsplit(".", 1)[-1]
    args = dict(entry.get("init_args") or {})
    if cls == "NormalizedReward":
        inner = _describe_objective(args.pop("reward", {}))
        return f"{inner}, normalised ({args.get('mode', 'calibration')})"
    name = args.pop("name", None) or (f"obj{args['objective']}" if "objective" in args else cls)
    if "name_or_path" in args:
        return f"`{name}`: {cls} `{args['name_or_path']}`"
    shown = ", ".join(f"{k} {v}" for k, v in args.items() if k not in ("batch_size", "device", "prompts_path"))
    return f"`{name}`: {cls}" + (f" ({shown})" if shown else "")


def _display_path(path: Path) -> str:
    """Relative to the working directory (or, for the shipped prompts, to the package's parent) when inside it."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        try:
            return str(path.resolve().relative_to(root))
        except ValueError:
            continue
    return str(path)


def _fmt(value) -> str:
    return "–" if value is None or value == "" else f"{float(value):.4f}"

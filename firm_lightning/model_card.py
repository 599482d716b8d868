"""The Hugging Face model card (``README.md``) of every adapter folder a run saves.

``adapters/final/``, SaveBestAdapter's best adapter and every run of a ``compare``/``pareto``
sweep get one: YAML front matter (``library_name: peft``, ``base_model``, tags) and the run
that made the adapter, so the folder can be shared on the Hub as LoRA adapters are.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml

from firm_lightning.run_folder import ADAPTER_CONFIG, RunFolder, atomic_write

if TYPE_CHECKING:
    from firm_lightning.federation import FederationConfig
    from firm_lightning.state import FederationState

CARD_TAGS = [
    "firm_lightning",
    "peft",
    "lora",
    "federated-learning",
    "multi-objective-alignment",
    "reinforcement-learning",
]


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
        self.folder = RunFolder(self.run_dir)
        self.config_path, self.config = self.folder.resolved_config()

    def write(self, folder: Path, round_idx: int, what: str) -> Path:
        path = Path(folder) / "README.md"
        atomic_write(path, self.text(round_idx, what).encode())
        return path

    # ---- parts ----

    def _policy(self) -> tuple[dict, dict, Optional[str]]:
        """The configured policy, its init_args, and the hub name or folder it loads (None: built in code)."""
        policy = (self.config or {}).get("model", {}).get("policy") or {}
        args = policy.get("init_args") or {}
        name = args.get("name_or_path") or getattr(self.peft, "base_model_name_or_path", None)
        return policy, args, str(name) if name else None

    def base_model(self) -> str:
        """The policy's name_or_path; for a model built in code (TinyPolicy), that fact in words."""
        policy, args, name = self._policy()
        if name:
            return name
        if str(policy.get("class_path", "")).endswith("TinyPolicy"):
            return (f"none: a tiny {args.get('num_layers', '?')}-layer {args.get('architecture', 'gpt2')} with random "
                    "weights built in code (firm_lightning TinyPolicy)")
        return "none: a model built in code, not loaded from the Hub (e.g. firm_lightning TinyPolicy)"

    def objectives(self) -> list[str]:
        entries = (self.config or {}).get("model", {}).get("objectives")
        if not entries:
            return [f"`{n}` (defined in Python; no saved {self.folder.config.name} describes it)" for n in self.names]
        return [_describe_objective(e) for e in entries]

    def weighting(self) -> str:
        """The in-client weighting: the algorithm's own line if it sets one, else the model's configured one."""
        algorithm = self.federation.algorithm
        line = algorithm.describe() if algorithm is not None else None
        return line if line is not None else self._configured_weighting()

    def _configured_weighting(self) -> str:
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
            return (f"Trained from Python (no {self.folder.config.name} was saved). The CLI saves the resolved config; "
                    "e.g. `python -m firm_lightning fit --config configs/tiny.yaml` for the offline default.")
        config = _display_path(self.config_path)
        if "pareto" in self.config or "compare" in self.config:
            command = "pareto" if "pareto" in self.config else "compare"
            where = self.run_dir.relative_to(self.config_path.parent)
            fresh = _display_path(self.config_path.parent.parent / f"{self.config_path.parent.name}_reproduced")
            return (
                f"This is run `{where}` of a `{command}` sweep, which trains it again in a fresh folder:\n\n"
                f"```bash\npython -m firm_lightning {command} --config {config} --federation.output_dir {fresh}\n```"
            )
        command = "flower" if "flower" in self.config else "fit"
        fresh = _display_path(self.run_dir.parent / f"{self.run_dir.name}_reproduced")
        return f"```bash\npython -m firm_lightning {command} --config {config} --federation.output_dir {fresh}\n```"

    def use_snippet(self) -> list[str]:
        policy, args, name = self._policy()
        if name:
            build = ["from transformers import AutoModelForCausalLM",
                     f"base_model = AutoModelForCausalLM.from_pretrained({name!r})"]
        elif str(policy.get("class_path", "")).endswith("TinyPolicy"):
            shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
            build = ["import firm_lightning as fl", f"base_model, tokenizer = fl.TinyPolicy({shown}).build()"]
        else:
            build = ["base_model = ...  # the model this adapter was trained on (built in code)"]
        return [
            "from peft import PeftModel",
            *build,
            'model = PeftModel.from_pretrained(base_model, "path/to/this/folder")',
        ]

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
        if self.federation.privacy is not None:
            return ("not released under differential privacy (the totals count the sampled clients); each sampled "
                    "client uploads its adapter once per round")
        rows = [r for r in self.state.history if 0 < int(r["round"]) <= round_idx]
        total = sum(float(r.get("comm/bytes_up", 0) or 0) for r in rows)
        per_client = [float(r["comm/bytes_up_per_client"]) for r in rows if r.get("comm/bytes_up_per_client")]
        text = f"{total:,.0f} bytes uploaded by the clients over {len(rows)} round{'s' * (len(rows) != 1)}"
        if per_client:
            text += f" ({per_client[-1]:,.0f} bytes per client per round: the adapter tensors as uploaded)"
        return text

    def clients_line(self) -> str:
        fed = self.federation
        if fed.privacy is not None:
            return f"{fed.num_clients}, each sampled with probability {fed.client_fraction:g} per round"
        return f"{fed.num_clients}, {fed.clients_per_round} per round"

    def privacy_line(self) -> str:
        """The guarantee of the run's released outputs, this adapter included (chosen among them, it is covered by
        the ε of every round released): the accounted ε at δ after the last round, and the mechanism."""
        fed, state = self.federation, self.state
        privacy = fed.privacy
        if privacy is None:
            return "off"
        epsilon = float(state.history[-1].get("privacy/epsilon", 0.0) or 0.0)
        return (f"client-level (ε = {epsilon:.3f}, δ = {privacy.delta:g}) for everything the run released, after "
                f"{state.round} round{'s' * (state.round != 1)}; neighbouring: add or remove one client; Poisson "
                f"sampling, q = {fed.client_fraction:g} of {fed.num_clients} clients per round; clipping C = "
                f"{privacy.clipping_norm:g}, noise σ = {privacy.noise_multiplier:g} (std σ·C on the sum of the clipped "
                "updates); RDP accountant (dp-accounting)")

    def text(self, round_idx: int, what: str) -> str:
        fed, model = self.federation, (self.config or {}).get("model", {})
        base = self.base_model()
        front = {"library_name": "peft", "base_model": base, "tags": CARD_TAGS}
        if getattr(self.peft, "task_type", None) == "CAUSAL_LM":
            front["pipeline_tag"] = "text-generation"
        lora = (f"r = {self.peft.r}, alpha = {self.peft.lora_alpha}" if self.peft is not None
                else f"see {ADAPTER_CONFIG}")
        trainer = (self.config or {}).get("trainer") or {}
        data = (self.config or {}).get("data") or {}
        data_args = data.get("init_args", data) if isinstance(data, dict) else {}
        table = [
            "| | |",
            "|---|---|",
            f"| base model | {base} |",
            f"| algorithm | {self.algorithm()} |",
            f"| weighting | {self.weighting()} |",
            f"| objectives | {'; '.join(self.objectives())} |",
            f"| rounds | {self.state.round} of federation.num_rounds = {fed.num_rounds} "
            f"(this adapter: round {round_idx}) |",
            f"| clients | {self.clients_line()} |",
            f"| local steps per client per round | {trainer.get('max_steps', 'see the Trainer settings')} |",
            f"| data | {_display_path(Path(str(data_args.get('path', ''))))} "
            f"({data_args.get('partition', '?')} split) |"
            if data_args
            else "| data | the data module given in Python |",
            f"| LoRA | {lora} |",
            f"| seed | {fed.seed} |",
            f"| uplink | {self.uplink(round_idx)} |",
            f"| differential privacy | {self.privacy_line()} |",
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
            f"`{self.folder.metrics.name}`" + ("; raw: the reward model's own score before normalisation" if any(
                f"eval/raw_reward/{n}" in r for r in self.state.history for n in self.names) else "") + ":", "",
            *self.eval_table(round_idx), "",
            "## Reproduce", "", self.command(), "",
            "## Use", "", "```python", *self.use_snippet(), "```", "",
        ]
        return "\n".join(lines)


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

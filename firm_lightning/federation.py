"""The ``federation:`` section of the config: the same meaning under ``fit``, ``compare``,
``pareto`` and ``flower`` (simulation and deployment)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal, Optional

import torch

from firm_lightning.algorithms import Algorithm
from firm_lightning.callbacks import FederationCallback
from firm_lightning.privacy import DifferentialPrivacy
from firm_lightning.progress import ProgressMode


@dataclass
class FederationConfig:
    """The ``federation:`` section of the config (``--federation.*`` on the command line).

    Args:
        num_rounds: Number of federated rounds N (server aggregations).
        num_clients: Number of clients; the prompts are partitioned over them (linked to data.num_clients).
        client_fraction: Fraction q of the clients sampled per round: max(min_clients, ⌈q·num_clients⌉) clients; with
            privacy, each client independently with probability q (Poisson sampling, q·num_clients on average).
        min_clients: At least this many clients per round, and at least this many usable uploads for a round to count;
            with privacy and q < 1 it must be 1 (a Poisson sample may be smaller; a round then needs at least one
            usable upload from the clients it sampled, if it sampled any).
        server_lr: Server learning rate η_g: θ ← θ + η_g Σ_i w_i (θ_i − θ); 1.0 is plain FedAvg of the adapters.
        seed: Seeds the LoRA initialisation, the data split, client sampling (without privacy) and every client fit
            (linked to data.seed).
        algorithm: The federated algorithm, by class_path (firm_lightning.algorithms.FIRM, LocalMGDA, Linear, FMGDA);
            null: the model's configured weighting, one adapter per client, FedAvg.
        output_dir: Folder for metrics, adapters, plots, logs and the resolved config.
        save_adapters: Save the global adapter after every round (False: only the final one).
        upload_dtype: Clients upload their update θ_i − θ in bfloat16 or float16 (half the uplink bytes; the server
            adds it to θ in float32); null uploads θ_i in float32. Flower carries float16 only.
        quiet: Hide Lightning's start-up messages, which one Trainer per client per round would repeat.
        progress: Round progress: a bar in a terminal and plain lines otherwise (auto), always a bar, always lines,
            or off.
        client_optimizer_state: reset: a fresh client optimiser every round (stateless clients);
            persist: each client keeps its optimiser (and lr scheduler) state between its rounds (cross-silo).
        resume: Continue from <output_dir>/checkpoint (the last finished round); more num_rounds extends the run.
        resume_from: Which saved state resume continues from: latest, or previous (the state one round older, kept
            beside the latest, for when the latest is damaged; the round after it is trained again).
        overwrite: Start over in an output_dir that holds an earlier run, removing that run's files first (without
            it, or resume, such a folder is refused: a run never mixes with another's files).
        max_failed_rounds: Stop the run (an error, exit code 1) when a client has failed with the same error in
            this many of its rounds in a row: a fault that repeats is a bug, not one to tolerate (null: never).
        aggregator: fedavg, or a robust rule in place of FedAvg: median (coordinate-wise) or trimmed_mean.
        trim_fraction: Share of clients cut from each end per coordinate (trimmed_mean).
        max_update_norm: Reject an upload whose ‖θ_i − θ‖ exceeds this (null: no bound).
        privacy: Client-level differential privacy {clipping_norm: C, noise_multiplier: σ, delta: δ}: Poisson
            sampling, clipped equal-weight sum plus noise σC over q·num_clients, privacy/epsilon reported, per-client
            and training statistics kept in the server-private record only; null: off.
        callbacks: Federation callbacks (firm_lightning.callbacks.FederationCallback subclasses, by class_path),
            e.g. EarlyStopping or SaveBestAdapter; Lightning callbacks go under trainer.callbacks.
    """

    num_rounds: int = 5
    num_clients: int = 4
    client_fraction: float = 1.0
    min_clients: int = 1
    server_lr: float = 1.0
    seed: int = 0
    algorithm: Optional[Algorithm] = None
    output_dir: str = "runs/firm"
    save_adapters: bool = True
    upload_dtype: Optional[Literal["bfloat16", "float16"]] = None
    quiet: bool = True
    resume: bool = False
    resume_from: Literal["latest", "previous"] = "latest"
    overwrite: bool = False
    max_failed_rounds: Optional[int] = 3
    aggregator: Literal["fedavg", "median", "trimmed_mean"] = "fedavg"
    trim_fraction: float = 0.1
    max_update_norm: Optional[float] = None
    privacy: Optional[DifferentialPrivacy] = None
    progress: ProgressMode = "auto"
    client_optimizer_state: Literal["reset", "persist"] = "reset"
    callbacks: list[FederationCallback] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_rounds < 1 or self.num_clients < 1:
            raise ValueError("federation.num_rounds and federation.num_clients must be >= 1.")
        if not 0 < self.client_fraction <= 1:
            raise ValueError(f"federation.client_fraction must be in (0, 1]; got {self.client_fraction}.")
        if not 1 <= self.min_clients <= self.num_clients:
            raise ValueError(
                f"federation.min_clients must be between 1 and num_clients={self.num_clients}; got {self.min_clients}."
            )
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ValueError(
                f"federation.max_update_norm must be > 0 (or null for no bound); got {self.max_update_norm}."
            )
        if self.client_optimizer_state not in ("reset", "persist"):
            raise ValueError(
                f"federation.client_optimizer_state must be 'reset' or 'persist'; got {self.client_optimizer_state!r}."
            )
        if self.upload_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"federation.upload_dtype must be bfloat16, float16 or null; got {self.upload_dtype!r}.")
        if self.resume_from not in ("latest", "previous"):
            raise ValueError(f"federation.resume_from must be latest or previous; got {self.resume_from!r}.")
        if self.resume_from == "previous" and not self.resume:
            raise ValueError("federation.resume_from=previous continues a run: add --federation.resume true.")
        if self.resume and self.overwrite:
            raise ValueError(
                "federation.resume and federation.overwrite both set: resume continues the run in output_dir, "
                "overwrite removes it; choose one."
            )
        if self.max_failed_rounds is not None and self.max_failed_rounds < 1:
            raise ValueError(
                f"federation.max_failed_rounds must be >= 1 (or null: never stop); got {self.max_failed_rounds}."
            )
        if isinstance(self.privacy, dict):  # a plain dict from Python code
            self.privacy = DifferentialPrivacy(**self.privacy)
        if self.privacy is not None:
            self._check_privacy()

    def _check_privacy(self) -> None:
        self.privacy.check_clients(self.num_clients)
        if self.min_clients > 1 and self.client_fraction < 1:
            raise ValueError(
                f"federation.min_clients={self.min_clients} cannot be guaranteed under federation.privacy: each client "
                f"is sampled independently with probability client_fraction={self.client_fraction} (Poisson sampling, "
                "which the ε accounts for), so a round may sample fewer. Set min_clients 1, or client_fraction 1."
            )

    @property
    def clients_per_round(self) -> int:
        """``max(min_clients, ⌈q·N⌉)``, with ``q`` read as the decimal it was written as (0.14 × 50 = 7, not 8)."""
        exact = Fraction(repr(self.client_fraction)) * self.num_clients
        return min(self.num_clients, max(self.min_clients, math.ceil(exact)))

    @property
    def expected_clients(self) -> float:
        """``q·N``: the mean size of a Poisson sample, which divides the noisy sum under privacy."""
        return self.client_fraction * self.num_clients

    @property
    def resolved_algorithm(self) -> Algorithm:
        """``algorithm``, or the default (the model's configured weighting, one adapter per client, FedAvg)."""
        return self.algorithm if self.algorithm is not None else Algorithm()

    @property
    def upload_torch_dtype(self) -> Optional[torch.dtype]:
        return getattr(torch, self.upload_dtype) if self.upload_dtype else None


def refuse_for_hidden_uploads(config: FederationConfig) -> None:
    """Settings that need to see one upload at a time, refused when the server sees only the sum (SecAgg+)."""
    reasons = []
    if config.max_update_norm is not None:
        reasons.append("federation.max_update_norm (screens one upload at a time)")
    if config.aggregator != "fedavg":
        reasons.append(f"federation.aggregator={config.aggregator} (needs every upload, coordinate by coordinate)")
    if config.upload_dtype is not None:
        reasons.append("federation.upload_dtype (SecAgg+ quantises the uploads itself)")
    if reasons:
        raise ValueError(
            "Secure aggregation (SecAgg+) shows the server only the clients' sum, so it cannot honour "
            + "; ".join(reasons) + ". Unset these, or turn flower.secure_aggregation off."
        )


# Settings that may change when a run is resumed: they do not affect what a round computes.
RESUMABLE_SETTINGS = ("num_rounds", "output_dir", "save_adapters", "quiet", "resume", "progress", "callbacks",
                      "resume_from", "overwrite", "max_failed_rounds")

# Keys that moved: refused with a message naming the new key (old configs fail loudly, never silently).
MOVED_KEYS = {
    "federation.dp_clip_norm": "federation.privacy.clipping_norm",
    "federation.dp_noise_multiplier": "federation.privacy.noise_multiplier",
    "federation.dp_delta": "federation.privacy.delta",
    "flower.privacy": "federation.privacy (differential privacy) or flower.secure_aggregation (SecAgg+)",
    "flower.algorithm": "federation.algorithm",
}

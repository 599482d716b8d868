"""The ``flower:`` section of the config: how the federation is carried, never what it computes.

What the federation computes (the algorithm, aggregation, privacy, faults, resume, callbacks)
is the ``federation:`` section, the same on Flower as in-process. Imports no ``flwr``: the
CLI reads these classes for every command.
"""

from __future__ import annotations

from typing import Literal, Optional

from firm_lightning.federation import FederationConfig, refuse_for_hidden_uploads

ENGINES = ("simulation", "local-deployment", "deployment")


class SecureAggregation:
    """Flower's SecAgg+: the server learns only the sum of the masked uploads, never one adapter.

    ``num_shares`` / ``reconstruction_threshold``: fractions of the sampled clients (or counts);
    ``clipping_range`` bounds every adapter entry before quantisation to ``quantization_range``
    levels. Four message exchanges per round instead of one. What the server cannot see, it
    cannot check: ``federation.max_update_norm``, robust aggregators and ``upload_dtype`` are
    refused under SecAgg+; with ``federation.privacy`` the clients clip their own updates.
    """

    def __init__(self, num_shares: float = 1.0, reconstruction_threshold: float = 1.0,
                 clipping_range: float = 8.0, quantization_range: int = 2**22) -> None:
        if clipping_range <= 0 or quantization_range < 2:
            raise ValueError(f"flower.secure_aggregation needs clipping_range > 0 and quantization_range >= 2; "
                             f"got {clipping_range}, {quantization_range}.")
        self.num_shares, self.reconstruction_threshold = num_shares, reconstruction_threshold
        self.clipping_range, self.quantization_range = clipping_range, quantization_range


class FlowerSettings:
    """Settings both Flower apps read from the same YAML as ``fit``.

    Args:
        engine: simulation (Flower's simulation engine, Ray), local-deployment (a SuperLink and one SuperNode per
            client started on 127.0.0.1, insecure, then torn down) or deployment (submit the app to an existing
            SuperLink named by superlink).
        secure_aggregation: Flower's SecAgg+ (firm_lightning.flower.settings.SecureAggregation), or null.
        client_cpus: Ray CPUs per simulated client.
        client_gpus: Ray GPUs per simulated client.
        superlink: A SuperLink connection in $FLWR_HOME/config.toml (engine deployment).
        port: The SuperLink's port in local-deployment (default: a free one).
        timeout_s: How long the server waits for a round's replies; a client that has not replied by then
            counts as failed for the round.
    """

    def __init__(
        self,
        engine: Literal["simulation", "local-deployment", "deployment"] = "simulation",
        secure_aggregation: Optional[SecureAggregation] = None,
        client_cpus: float = 1.0,
        client_gpus: float = 0.0,
        superlink: Optional[str] = None,
        port: Optional[int] = None,
        timeout_s: float = 3600.0,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"flower.engine={engine!r} is unknown; use one of {ENGINES}.")
        if engine == "deployment" and not superlink:
            raise ValueError(
                "flower.engine=deployment submits the app to a running SuperLink: name its connection "
                "with --flower.superlink (a [superlink.<name>] entry of $FLWR_HOME/config.toml)."
            )
        if client_cpus <= 0 or client_gpus < 0:
            raise ValueError(f"flower.client_cpus must be > 0 and client_gpus >= 0; got {client_cpus}, {client_gpus}.")
        if timeout_s <= 0:
            raise ValueError(f"flower.timeout_s must be > 0; got {timeout_s}.")
        self.engine = engine
        self.secure_aggregation = secure_aggregation
        self.client_cpus, self.client_gpus = client_cpus, client_gpus
        self.superlink = superlink
        self.port = port
        self.timeout_s = timeout_s

    def check(self, federation: FederationConfig) -> None:
        """Refuse, before anything starts, the ``federation:`` settings this transport cannot carry."""
        if federation.upload_dtype == "bfloat16":  # Flower's ArrayRecord holds numpy arrays: no bfloat16
            raise ValueError(
                "federation.upload_dtype=bfloat16 cannot travel in Flower messages; use float16 on Flower."
            )
        if self.secure_aggregation is not None:
            refuse_for_hidden_uploads(federation)
            if federation.privacy is not None and federation.client_fraction < 1:
                raise ValueError(
                    f"flower.secure_aggregation with federation.privacy needs client_fraction 1 (got "
                    f"{federation.client_fraction}): under privacy the clients are Poisson-sampled, a round may sample "
                    "fewer than the two clients SecAgg+ needs, and leaving such a round's client out would change the "
                    "sensitivity the ε is computed for. Set client_fraction 1, or turn one of them off."
                )

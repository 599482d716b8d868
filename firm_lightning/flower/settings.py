"""The ``flower:`` section of the config: which engine, which algorithm, which privacy wrapper."""

from __future__ import annotations

from typing import Literal, Optional

from firm_lightning.algorithms import Algorithm
from firm_lightning.flower.privacy import Privacy

ENGINES = ("simulation", "local-deployment", "deployment")


class FlowerSettings:
    """Settings both Flower apps read from the same YAML as ``fit``.

    - ``engine``: ``simulation`` (Flower's simulation engine, Ray), ``local-deployment`` (a
      SuperLink and one SuperNode per client started on 127.0.0.1, insecure, then torn down)
      or ``deployment`` (submit the app to an existing SuperLink named ``superlink``).
    - ``algorithm``: any ``firm_lightning.algorithms`` class (default: the model's weighting,
      one adapter per client, FedAvg).
    - ``privacy``: ``DifferentialPrivacy(...)`` or ``SecureAggregation(...)``, or none.
    - ``client_cpus``/``client_gpus``: Ray resources per simulated client.
    - ``superlink``: a SuperLink connection in ``$FLWR_HOME/config.toml`` (engine ``deployment``).
    - ``port``: the SuperLink's port in ``local-deployment`` (default: a free one).
    - ``timeout_s``: how long the server waits for a round's replies.
    """

    def __init__(
        self,
        engine: Literal["simulation", "local-deployment", "deployment"] = "simulation",
        algorithm: Optional[Algorithm] = None,
        privacy: Optional[Privacy] = None,
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
        self.engine = engine
        self.algorithm = algorithm or Algorithm()
        self.privacy = privacy or Privacy()
        self.client_cpus, self.client_gpus = client_cpus, client_gpus
        self.superlink = superlink
        self.port = port
        self.timeout_s = timeout_s

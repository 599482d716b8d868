"""``python -m firm_lightning.flower.simulation CONFIG``: the federation in Flower's simulation
engine (Ray), one virtual SuperNode per client. Run by ``launch`` in a process session of its
own, so that Ray's processes can be stopped with it; exits 1 unless the server finished."""

from __future__ import annotations

import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from firm_lightning.config import load_components
from firm_lightning.flower.client_app import client_app
from firm_lightning.flower.server_app import run_server
from firm_lightning.flower.settings import FlowerSettings


def simulate(config_text: str) -> bool:
    comps = load_components(config_text, {"flower": FlowerSettings})
    finished = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        finished.append(run_server(grid, load_components(config_text, {"flower": FlowerSettings}), context))

    settings = comps.sections["flower"]
    run_simulation(
        server_app=server,
        client_app=client_app(config_text),
        num_supernodes=comps.federation.num_clients,
        backend_config={
            "client_resources": {"num_cpus": settings.client_cpus, "num_gpus": settings.client_gpus},
            "init_args": {"include_dashboard": False},
        },
    )
    return bool(finished)


if __name__ == "__main__":
    sys.exit(0 if simulate(Path(sys.argv[1]).read_text()) else 1)

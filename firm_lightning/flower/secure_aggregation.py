"""SecAgg+ for FIRM: Flower's ``SecAggPlusWorkflow`` sums the clients' masked uploads, so the
server learns only their weighted mean, never one client's adapter.

Flower ships SecAgg+ for its legacy strategy API only (``LegacyContext`` + ``DefaultWorkflow``),
so ``SecAggStrategy`` is a legacy-API face of ``FIRMStrategy``: same client sampling, same
aggregator. The aggregators are linear in the uploads, so the weighted mean is all they need:
FedAvg steps along ``mean − θ``; FMGDA's per-objective deltas are the per-objective means
minus ``θ`` (a client uploads its ``S`` adapters as one vector). What SecAgg+ hides cannot be
recorded: per-client update norms and the update dispersion are NaN.

Clients reply in the legacy ``FitRes`` layout that ``secaggplus_mod`` masks
(``legacy_train_content``).
"""

from __future__ import annotations

from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.server.strategy import Strategy as LegacyStrategy

from firm_lightning.client import ClientUpdate
from firm_lightning.flower.records import ARRAYS, CLIENT_ID, CONFIG
from firm_lightning.flower.strategy import FIRMStrategy, RoundUpdates

LEGACY_PARAMETERS = "fitins.parameters"


class SecAggStrategy(LegacyStrategy):
    def __init__(self, strategy: FIRMStrategy, initial: dict[str, torch.Tensor], evaluate_fn: Callable, timeout_s: float) -> None:
        self.strategy = strategy
        self.keys = list(initial)
        self.initial = initial
        self.evaluate_fn = evaluate_fn
        self.timeout_s = timeout_s

    def initialize_parameters(self, client_manager):
        return ndarrays_to_parameters([t.numpy() for t in self.initial.values()])

    def configure_fit(self, server_round, parameters, client_manager):
        nodes = self.strategy.client_nodes
        client_manager.wait_for(len(nodes), timeout=int(self.timeout_s))
        proxies = {p.node_id: p for p in client_manager.all().values()}
        self.strategy.rounds[server_round] = RoundUpdates(global_adapter=self._adapters(parameters)[0], uploads_visible=False)
        fit = FitIns(parameters, {"server-round": server_round})
        return [(proxies[nodes[c]], fit) for c in self.strategy.sample_clients(server_round)]

    def aggregate_fit(self, server_round, results, failures):
        if failures:
            raise RuntimeError(f"Round {server_round}: {len(failures)} client(s) failed under SecAgg+: {failures[:3]}")
        record = self.strategy.rounds[server_round]
        mean = self._adapters(results[0][1].parameters)  # the workflow's secure weighted mean, same for all
        record.updates = sorted(
            (ClientUpdate(int(res.metrics[CLIENT_ID]), mean, res.num_examples,
                          {k: float(v) for k, v in res.metrics.items() if k != CLIENT_ID})
             for _, res in results),
            key=lambda u: u.client_id,
        )
        record.result = self.strategy.aggregator.aggregate(record.global_adapter, [ClientUpdate(-1, mean, 1, {})])
        return ndarrays_to_parameters([t.numpy() for t in record.result.adapter.values()]), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        self.evaluate_fn(server_round, ArrayRecord(self._adapters(parameters)[0]))
        return None

    def _adapters(self, parameters) -> list[dict[str, torch.Tensor]]:
        arrays = parameters_to_ndarrays(parameters)
        k = len(self.keys)
        # SecAgg+ dequantises to float64: back to the adapter's own dtypes.
        dtypes = [t.dtype for t in self.initial.values()]
        return [
            {key: torch.from_numpy(a).to(dtype) for key, a, dtype in zip(self.keys, arrays[s:s + k], dtypes)}
            for s in range(0, len(arrays), k)
        ]


def is_legacy_fit(content: RecordDict) -> bool:
    return LEGACY_PARAMETERS in content.array_records


def from_legacy_fit(content: RecordDict, keys: list[str]) -> RecordDict:
    """The legacy ``FitIns`` as the message the ``ClientApp`` trains on."""
    fitins = recorddict_to_fitins(content, keep_input=True)
    arrays = parameters_to_ndarrays(fitins.parameters)
    return RecordDict({ARRAYS: ArrayRecord(dict(zip(keys, (torch.from_numpy(a.copy()) for a in arrays)))),
                       CONFIG: ConfigRecord(dict(fitins.config))})


def to_legacy_fit_reply(update: ClientUpdate) -> RecordDict:
    """The upload as a legacy ``FitRes`` (all adapters as one vector), which ``secaggplus_mod`` masks."""
    arrays = [t.numpy() for adapter in update.adapters for t in adapter.values()]
    metrics = {CLIENT_ID: update.client_id, **update.metrics}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), update.num_examples, metrics)
    return fitres_to_recorddict(fitres, keep_input=True)


"""SecAgg+ for FIRM: Flower's ``SecAggPlusWorkflow`` sums the clients' masked uploads, so the
server learns only their weighted mean, never one client's adapter.

Flower ships SecAgg+ for its legacy strategy API only (``LegacyContext`` + ``DefaultWorkflow``),
so ``SecAggStrategy`` is a legacy-API face of the same round engine: same client sampling,
same aggregator, same records. The aggregators are linear in the uploads, so the secure mean is
all they need: FedAvg steps along ``mean − θ``; FMGDA's per-objective deltas are the
per-objective means minus ``θ`` (a client uploads its ``S`` adapters as one vector); with
``federation.privacy`` the clients clip their own updates and weigh one each, and the engine adds
the noise to their sum. What SecAgg+ hides cannot be recorded or checked: the update dispersion
is NaN, and per-upload screening (``max_update_norm``, robust aggregators) is refused.

Clients reply in the legacy ``FitRes`` layout that ``secaggplus_mod`` masks.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.server.strategy import Strategy as LegacyStrategy

from firm_lightning.adapters import ClientUpdate
from firm_lightning.engine import RoundEngine
from firm_lightning.flower.records import ARRAYS, CLIENT_ID, CONFIG
from firm_lightning.flower.settings import SecureAggregation
from firm_lightning.state import FederationState

LEGACY_PARAMETERS = "fitins.parameters"


class SecAggStrategy(LegacyStrategy):
    def __init__(self, engine: RoundEngine, state: FederationState, client_nodes: dict[int, int], timeout_s: float,
                 grid=None) -> None:
        self.engine = engine
        self.grid = grid  # a MeasuredGrid: SecAgg+'s extra message exchanges are counted too
        self.state = state
        self.client_nodes = client_nodes
        self.keys = list(state.global_adapter)
        self.dtypes = [t.dtype for t in state.global_adapter.values()]
        self.timeout_s = timeout_s
        self.offset = state.round
        self.sampled: dict[int, list[int]] = {}

    def initialize_parameters(self, client_manager):
        return ndarrays_to_parameters([t.numpy() for t in self.state.global_adapter.values()])

    def configure_fit(self, server_round, parameters, client_manager):
        round_idx = self.offset + server_round
        if self.engine.stop_reason:
            return []
        client_manager.wait_for(len(self.client_nodes), timeout=int(self.timeout_s))
        proxies = {p.node_id: p for p in client_manager.all().values()}
        clients = self.sampled[round_idx] = self.engine.begin_round(self.state, round_idx)
        if self.grid is not None:
            self.grid.round = round_idx
        fit = FitIns(parameters, {"server-round": round_idx})
        for client in clients:
            self.engine.client_started(round_idx, client)
        return [(proxies[self.client_nodes[c]], fit) for c in clients]

    def aggregate_fit(self, server_round, results, failures):
        round_idx = self.offset + server_round
        if round_idx not in self.sampled:
            return None, {}
        mean = self._adapters(results[0][1].parameters) if results else []  # the workflow's secure mean, same for all
        reports = [ClientUpdate(int(res.metrics[CLIENT_ID]), mean, res.num_examples,
                                {k: float(v) for k, v in res.metrics.items() if k != CLIENT_ID}) for _, res in results]
        for report in reports:
            self.engine.client_finished(round_idx, report)
        answered = {r.client_id for r in reports}
        lost = [f"client {c} dropped out of the secure round" for c in self.sampled[round_idx] if c not in answered]
        # With privacy the clients weigh one each, so the mean times their count is their sum.
        secure = ClientUpdate(-1, mean, sum(r.num_examples for r in reports), {})
        traffic = {}, {}
        if self.grid is not None:
            traffic = (
                {r.client_id: self.grid.client_metrics(round_idx, self.client_nodes[r.client_id]) for r in reports},
                self.grid.round_metrics(round_idx, [self.client_nodes[c] for c in self.sampled[round_idx]]),
            )
        self.state = self.engine.conclude(self.state, round_idx, reports, lost, secure_mean=secure if reports else None,
                                          client_extras=traffic[0], round_extras=traffic[1])
        return ndarrays_to_parameters([t.numpy() for t in self.state.global_adapter.values()]), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None  # the engine evaluates inside conclude

    def _adapters(self, parameters) -> list[dict[str, torch.Tensor]]:
        arrays = parameters_to_ndarrays(parameters)
        k = len(self.keys)
        # SecAgg+ dequantises to float64: back to the adapter's own dtypes.
        return [
            {key: torch.from_numpy(a).to(dtype) for key, a, dtype in zip(self.keys, arrays[s:s + k], self.dtypes)}
            for s in range(0, len(arrays), k)
        ]


def run_secure(engine: RoundEngine, state: FederationState, client_nodes: dict[int, int], num_examples: dict[int, int],
               settings: SecureAggregation, grid, context, timeout_s: float) -> FederationState:
    """The remaining rounds under SecAgg+ (Flower's legacy workflow); the state after the last."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    strategy = SecAggStrategy(engine, state, client_nodes, timeout_s, grid)
    rounds = len(engine.remaining_rounds(state))
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=rounds, round_timeout=timeout_s), strategy=strategy
    )
    max_weight = 1.0 if engine.config.privacy is not None else float(max(num_examples.values()))
    workflow = SecAggPlusWorkflow(
        settings.num_shares, settings.reconstruction_threshold, max_weight=max_weight,
        clipping_range=settings.clipping_range, quantization_range=settings.quantization_range, timeout=timeout_s,
    )
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    return strategy.state


def secure_aggregation_mod(msg, context, call_next):
    """Flower's ``secaggplus_mod`` when the server's training message asks for SecAgg+, else nothing."""
    from flwr.app import MessageType
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


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

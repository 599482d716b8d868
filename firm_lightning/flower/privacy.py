"""Flower's privacy building blocks, chosen by config (``flower.privacy``).

- ``DifferentialPrivacy``: Flower's central DP with client-side fixed clipping
  (``DifferentialPrivacyClientSideFixedClipping`` on the server, ``fixedclipping_mod`` on the
  clients): each client clips its update ``θ_i − θ`` to norm ``clipping_norm``; the server adds
  Gaussian noise of std ``noise_multiplier · clipping_norm / clients`` to the aggregate.
  Single-adapter algorithms only (the mod clips one ``ArrayRecord``).
- ``SecureAggregation``: Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server,
  ``secaggplus_mod`` on the clients): the server learns only the sum of the masked uploads.
  Four message exchanges per round instead of one (see ``secure_aggregation``).

The ``ClientApp`` applies the matching Flower mod when the server's message asks for it.
"""

from __future__ import annotations

# flwr is imported inside the functions: the CLI reads these classes for every command.


class Privacy:
    """No privacy building block: Flower's ``Strategy.start`` with the strategy as it is."""

    def run(self, strategy, grid, context, initial_arrays, num_rounds: int, timeout_s: float, evaluate_fn, num_sampled_clients: int):
        wrapped = self.wrap(strategy, num_sampled_clients)
        return wrapped.start(grid, initial_arrays, num_rounds, timeout=timeout_s, evaluate_fn=evaluate_fn)

    def wrap(self, strategy, num_sampled_clients: int):
        return strategy


class DifferentialPrivacy(Privacy):
    def __init__(self, noise_multiplier: float = 1.0, clipping_norm: float = 1.0) -> None:
        if noise_multiplier < 0 or clipping_norm <= 0:
            raise ValueError(
                f"DifferentialPrivacy needs noise_multiplier >= 0 and clipping_norm > 0; "
                f"got {noise_multiplier}, {clipping_norm}."
            )
        self.noise_multiplier, self.clipping_norm = noise_multiplier, clipping_norm

    def wrap(self, strategy, num_sampled_clients: int):
        from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

        return DifferentialPrivacyClientSideFixedClipping(
            strategy, self.noise_multiplier, self.clipping_norm, num_sampled_clients
        )


class SecureAggregation(Privacy):
    """Flower's SecAgg+ with its own parameters (fractions of the sampled clients, or counts).

    ``clipping_range`` bounds every adapter entry before quantisation to ``quantization_range``
    levels; the weights are the clients' example counts (``max_weight`` is their maximum).
    """

    def __init__(self, num_shares: float = 1.0, reconstruction_threshold: float = 1.0,
                 clipping_range: float = 8.0, quantization_range: int = 2**22) -> None:
        self.num_shares, self.reconstruction_threshold = num_shares, reconstruction_threshold
        self.clipping_range, self.quantization_range = clipping_range, quantization_range

    def run(self, strategy, grid, context, initial_arrays, num_rounds: int, timeout_s: float, evaluate_fn, num_sampled_clients: int):
        from flwr.server import LegacyContext, ServerConfig
        from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

        from firm_lightning.flower.records import record_adapter
        from firm_lightning.flower.secure_aggregation import SecAggStrategy

        legacy = SecAggStrategy(strategy, record_adapter(initial_arrays), evaluate_fn, timeout_s)
        context = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds, round_timeout=timeout_s), strategy=legacy)
        workflow = SecAggPlusWorkflow(
            self.num_shares, self.reconstruction_threshold, max_weight=float(max(strategy.num_examples.values())),
            clipping_range=self.clipping_range, quantization_range=self.quantization_range, timeout=timeout_s,
        )
        DefaultWorkflow(fit_workflow=workflow)(grid, context)


def client_privacy_mod(msg, context, call_next):
    """Apply the Flower mod the server's training message asks for (none, clipping, SecAgg+)."""
    from flwr.app import MessageType
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from firm_lightning.flower.records import CONFIG

    if msg.metadata.message_type == MessageType.TRAIN:
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            return secaggplus_mod(msg, context, call_next)
        config = msg.content.config_records.get(CONFIG)
        if config is not None and KEY_CLIPPING_NORM in config:
            return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)

"""Flower's privacy building blocks, chosen by config (``flower.privacy``).

- ``DifferentialPrivacy``: Flower's central DP with client-side fixed clipping
  (``DifferentialPrivacyClientSideFixedClipping`` on the server, ``fixedclipping_mod`` on the
  clients): each client clips its update ``θ_i − θ`` to norm ``clipping_norm``; the server adds
  Gaussian noise of std ``noise_multiplier · clipping_norm / clients`` to the aggregate.
  Single-adapter algorithms only (the mod clips one ``ArrayRecord``).

The ``ClientApp`` applies the matching Flower mod when the server's message asks for it.
"""

from __future__ import annotations

# flwr is imported inside the functions: the CLI reads these classes for every command.


class Privacy:
    """No privacy wrapper: the strategy as it is."""

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


def client_privacy_mod(msg, context, call_next):
    """Apply the Flower mod the server's training message asks for (none, clipping)."""
    from flwr.app import MessageType
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from firm_lightning.flower.records import CONFIG

    if msg.metadata.message_type == MessageType.TRAIN:
        config = msg.content.config_records.get(CONFIG)
        if config is not None and KEY_CLIPPING_NORM in config:
            return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)

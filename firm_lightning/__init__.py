"""FIRM on PyTorch Lightning: federated multi-objective alignment with in-client regularised weighting.

``import firm_lightning as fl`` gives the names a user touches::

    module = fl.FIRMClientModule(objectives=[...], weighting=fl.RegularizedMinNorm(beta=1.0))
    data = fl.PromptDataModule(num_clients=4)
    config = fl.FederationConfig(num_rounds=5, num_clients=4, algorithm=fl.FIRM(beta=1.0))
    state = fl.FederatedOrchestrator(module, data, config, fl.TrainerFactory({"max_steps": 4})).run()

Flower (``firm_lightning.flower``) is imported only when used.
"""

import importlib
from typing import TYPE_CHECKING

# Each public name and the module it lives in, imported on first use: ``python -m firm_lightning --help``
# and a command's ``--help`` load only what they need.
_WHERE = {
    "ClientUpdate": "firm_lightning.adapters",
    "CoordinateMedian": "firm_lightning.aggregation",
    "FedAvg": "firm_lightning.aggregation",
    "MinNormOverObjectives": "firm_lightning.aggregation",
    "TrimmedMean": "firm_lightning.aggregation",
    "FIRM": "firm_lightning.algorithms",
    "FMGDA": "firm_lightning.algorithms",
    "Algorithm": "firm_lightning.algorithms",
    "Linear": "firm_lightning.algorithms",
    "LocalMGDA": "firm_lightning.algorithms",
    "EarlyStopping": "firm_lightning.callbacks",
    "FederationCallback": "firm_lightning.callbacks",
    "SaveBestAdapter": "firm_lightning.callbacks",
    "fit_client": "firm_lightning.client",
    "build_components": "firm_lightning.config",
    "ClientData": "firm_lightning.datamodule",
    "PromptDataModule": "firm_lightning.datamodule",
    "RoundEngine": "firm_lightning.engine",
    "HHRLHFEvaluation": "firm_lightning.evaluation",
    "FederationConfig": "firm_lightning.federation",
    "HHRLHFDataModule": "firm_lightning.hh_rlhf",
    "FIRMClientModule": "firm_lightning.module",
    "PolicyGradientSettings": "firm_lightning.module",
    "SamplingSettings": "firm_lightning.module",
    "FederatedOrchestrator": "firm_lightning.orchestrator",
    "run_federation": "firm_lightning.orchestrator",
    "LoRASettings": "firm_lightning.policy",
    "PretrainedPolicy": "firm_lightning.policy",
    "TinyPolicy": "firm_lightning.policy",
    "DifferentialPrivacy": "firm_lightning.privacy",
    "CharsetReward": "firm_lightning.rewards",
    "HFRewardModel": "firm_lightning.rewards",
    "NormalizedReward": "firm_lightning.rewards",
    "RewardFunction": "firm_lightning.rewards",
    "FederationError": "firm_lightning.state",
    "FederationState": "firm_lightning.state",
    "hypervolume": "firm_lightning.studies.fronts",
    "TrainerFactory": "firm_lightning.trainer_factory",
    "LinearScalarization": "firm_lightning.weighting",
    "RegularizedMinNorm": "firm_lightning.weighting",
    "Weighting": "firm_lightning.weighting",
}

if TYPE_CHECKING:  # what type checkers and IDEs see
    from firm_lightning.adapters import ClientUpdate
    from firm_lightning.aggregation import CoordinateMedian, FedAvg, MinNormOverObjectives, TrimmedMean
    from firm_lightning.algorithms import FIRM, FMGDA, Algorithm, Linear, LocalMGDA
    from firm_lightning.callbacks import EarlyStopping, FederationCallback, SaveBestAdapter
    from firm_lightning.client import fit_client
    from firm_lightning.config import build_components
    from firm_lightning.datamodule import ClientData, PromptDataModule
    from firm_lightning.engine import RoundEngine
    from firm_lightning.evaluation import HHRLHFEvaluation
    from firm_lightning.federation import FederationConfig
    from firm_lightning.hh_rlhf import HHRLHFDataModule
    from firm_lightning.module import FIRMClientModule, PolicyGradientSettings, SamplingSettings
    from firm_lightning.orchestrator import FederatedOrchestrator, run_federation
    from firm_lightning.policy import LoRASettings, PretrainedPolicy, TinyPolicy
    from firm_lightning.privacy import DifferentialPrivacy
    from firm_lightning.rewards import CharsetReward, HFRewardModel, NormalizedReward, RewardFunction
    from firm_lightning.state import FederationError, FederationState
    from firm_lightning.studies.fronts import hypervolume
    from firm_lightning.trainer_factory import TrainerFactory
    from firm_lightning.weighting import LinearScalarization, RegularizedMinNorm, Weighting


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'firm_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    # the client
    "FIRMClientModule", "SamplingSettings", "PolicyGradientSettings", "LoRASettings", "TinyPolicy", "PretrainedPolicy",
    # data
    "PromptDataModule", "HHRLHFDataModule", "ClientData", "HHRLHFEvaluation",
    # objectives and weighting
    "RewardFunction", "CharsetReward", "HFRewardModel", "NormalizedReward",
    "Weighting", "RegularizedMinNorm", "LinearScalarization",
    # the federation
    "Algorithm", "FIRM", "LocalMGDA", "Linear", "FMGDA",
    "FedAvg", "CoordinateMedian", "TrimmedMean", "MinNormOverObjectives", "DifferentialPrivacy",
    "FederationConfig", "FederatedOrchestrator", "RoundEngine", "FederationState", "FederationError", "run_federation",
    "TrainerFactory", "ClientUpdate", "fit_client", "build_components",
    # callbacks
    "FederationCallback", "EarlyStopping", "SaveBestAdapter",
    # studies
    "hypervolume",
]

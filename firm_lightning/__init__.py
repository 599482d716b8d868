"""FIRM on PyTorch Lightning: federated multi-objective alignment with in-client regularised weighting.

``import firm_lightning as fl`` gives the names a user touches::

    module = fl.FIRMClientModule(objectives=[...], weighting=fl.RegularizedMinNorm(beta=1.0))
    data = fl.PromptDataModule(num_clients=4)
    config = fl.FederationConfig(num_rounds=5, num_clients=4, algorithm=fl.FIRM(beta=1.0))
    state = fl.FederatedOrchestrator(module, data, config, fl.TrainerFactory({"max_steps": 4})).run()

Flower (``firm_lightning.flower``) is imported only when used.
"""

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

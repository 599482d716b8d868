"""Algorithms describe and re-prefer themselves: a fifth one is one class, and compare, pareto and the model
card work with it unchanged."""

from __future__ import annotations

import csv
import math
from typing import Optional

import pytest

from conftest import make_datamodule, make_module
from firm_lightning.algorithms import FIRM, FMGDA, Algorithm, Linear, LocalMGDA
from firm_lightning.checkpoint import describe
from firm_lightning.federation import FederationConfig
from firm_lightning.run_folder import RunFolder
from firm_lightning.studies.compare import CompareSettings, _runs_of, plot_beta_ablation
from firm_lightning.studies.pareto import ParetoSettings, run_sweep
from firm_lightning.weighting import RegularizedMinNorm


class Anchored(Algorithm):
    """A fifth algorithm, defined only here: min-norm held to the preference by a fixed, strong β."""

    BETA = 10.0

    def __init__(self, preference: Optional[list[float]] = None, name: str = "anchored") -> None:
        super().__init__(name)
        self.preference = preference

    def weighting(self, num_objectives: int) -> RegularizedMinNorm:
        return RegularizedMinNorm(beta=self.BETA, preference=self.preference)

    def describe(self) -> str:
        return f"anchored min-norm, β = {self.BETA:g}, p = {self.preference}"

    def with_preference(self, preference) -> "Anchored":
        return Anchored([float(x) for x in preference], self.name)

    @property
    def beta_axis(self) -> float:
        return self.BETA


@pytest.mark.parametrize("algorithm", [FIRM(beta=2.0), LocalMGDA(), Linear(), Anchored()])
def test_with_preference_returns_a_new_algorithm_and_leaves_the_original(algorithm):
    before = describe(algorithm)
    swept = algorithm.with_preference([0.25, 0.75])
    assert swept is not algorithm and type(swept) is type(algorithm) and swept.name == algorithm.name
    assert swept.preference == [0.25, 0.75] and algorithm.preference is None
    assert describe(algorithm) == before


def test_a_re_preferred_algorithm_is_described_as_one_built_with_that_preference():
    """The resume fingerprint describes the algorithm: re-preferring must not add or drop a setting."""
    assert describe(FIRM(beta=2.0).with_preference([0.2, 0.8])) == describe(FIRM(beta=2.0, preference=[0.2, 0.8]))
    assert describe(Linear().with_preference([0.2, 0.8])) == describe(Linear(preference=[0.2, 0.8]))


@pytest.mark.parametrize("algorithm", [FMGDA(), Algorithm()])
def test_algorithms_without_a_preference_refuse_one(algorithm):
    with pytest.raises(ValueError, match=rf"{algorithm.name!r} \({type(algorithm).__name__}\) takes no preference"):
        algorithm.with_preference([0.5, 0.5])
    with pytest.raises(ValueError, match="compare.sweep_algorithms: .* takes no preference"):
        CompareSettings([FIRM(), algorithm], sweep_algorithms=[algorithm.name], sweep_preferences=[[0.5, 0.5]])


def test_beta_axis_and_card_lines_of_the_four_algorithms():
    algorithms = [FIRM(beta=2.0, preference=[0.2, 0.8]), LocalMGDA(), Linear(), FMGDA(), Algorithm()]
    assert [a.beta_axis for a in algorithms] == [2.0, 0.0, math.inf, None, None]
    assert [a.describe() for a in algorithms] == [
        "FIRM regularised min-norm, β = 2, preference p = [0.2, 0.8]",
        "MGDA min-norm (β = 0)",
        "linear scalarisation, fixed λ = p, p uniform",
        "none in the clients (one adapter per objective); min-norm over the averaged deltas on the server",
        None,  # the model's configured weighting, which the card reads from the saved config
    ]


def test_a_fifth_algorithm_in_compare_without_touching_it(tmp_path):
    algorithms = [FIRM(beta=1.0), Anchored(), Anchored(name="anchored_copy")]
    settings = CompareSettings(algorithms, reference="anchored", aa_control="anchored_copy",
                               sweep_algorithms=["anchored"], sweep_preferences=[[0.2, 0.8]], sweep_alphas=[1.0])
    swept = [(a, label) for a, label in _runs_of(settings, 1.0) if label != "default"]
    assert [(type(a), a.preference, label) for a, label in swept] == [(Anchored, [0.2, 0.8], "0.2_0.8")]
    assert algorithms[1].preference is None
    with pytest.raises(ValueError, match="not an identical copy"):
        CompareSettings([Anchored(), Anchored([0.2, 0.8], name="other")], aa_control="other")
    per_run = {(a.name, 1.0, s): {"lambda_dispersion": 0.1, "update_dispersion_weighted": 1.0, "final/mean": 0.5,
                                  "worst_client": 0.4} for a in algorithms for s in range(3)}
    assert plot_beta_ablation(per_run, algorithms, tmp_path / "beta.png").is_file()  # β = 1 and β = 10 on the axis


def test_a_fifth_algorithm_sweeps_in_pareto_and_describes_itself_on_the_card(tmp_path):
    template = Anchored()
    settings = ParetoSettings(preferences=[[0.2, 0.8], [0.8, 0.2]], algorithms=[template])
    federation = FederationConfig(num_rounds=1, num_clients=2, output_dir=str(tmp_path))
    trainer = {"max_steps": 1, "accelerator": "cpu"}
    rows = run_sweep(make_module(), make_datamodule(2), federation, trainer, settings, echo=lambda _: None)
    assert [r["preference"] for r in rows] == [[0.2, 0.8], [0.8, 0.2]] and template.preference is None
    runs = sorted(RunFolder(tmp_path).runs.glob("anchored/p_*"))
    assert [r.name for r in runs] == ["p_0.200_0.800", "p_0.800_0.200"]
    mean_lambda = []
    for run, p in zip(runs, ([0.2, 0.8], [0.8, 0.2])):
        card = (RunFolder(run).final / "README.md").read_text()
        assert "| algorithm | Anchored (`anchored`) |" in card
        assert f"| weighting | anchored min-norm, β = 10, p = {p} |" in card
        with open(RunFolder(run).client_metrics) as f:
            values = [float(r["lambda/a_to_m"]) for r in csv.DictReader(f)]
        mean_lambda.append(sum(values) / len(values))
    assert mean_lambda[1] - mean_lambda[0] > 0.3  # each run's clients weighted with its own preference

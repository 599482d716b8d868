"""Hypervolume and non-dominated filtering against hand computations; preference checks; sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from firm_lightning.studies.fronts import hypervolume, non_dominated
from firm_lightning.studies.pareto import ParetoSettings
from firm_lightning.weighting import RegularizedMinNorm, validate_preference

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "pareto_tiny.yaml")


def test_hypervolume_2d_by_hand():
    # staircase of (1,3), (2,2), (3,1) over reference (0,0): 3 + 2 + 1 unit columns = 6
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == pytest.approx(6.0)
    # a dominated point adds nothing
    assert hypervolume([[1, 3], [2, 2], [3, 1], [1, 1]], [0, 0]) == pytest.approx(6.0)
    # shifted reference: (1,3)→ 0 wide, (2,2) → 1×1, (3,1) → 0 high; only (2,2) counts: 1
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [1, 1]) == pytest.approx(1.0)


def test_points_that_do_not_dominate_the_reference_add_nothing():
    assert hypervolume([[0.5, 5.0], [5.0, -1.0]], [1.0, 0.0]) == 0.0
    assert hypervolume([[0.5, 5.0], [2.0, 2.0]], [1.0, 0.0]) == pytest.approx(2.0)
    assert hypervolume(np.empty((0, 2)), [0.0, 0.0]) == 0.0


def test_hypervolume_3d_by_hand():
    assert hypervolume([[1, 2, 3]], [0, 0, 0]) == pytest.approx(6.0)
    # two boxes 2×1×1 and 1×2×1 overlapping in 1×1×1: 2 + 2 − 1 = 3
    assert hypervolume([[2, 1, 1], [1, 2, 1]], [0, 0, 0]) == pytest.approx(3.0)
    # boxes (2,2,1) and (1,1,3): 4 + 3 − 1·1·1 = 6
    assert hypervolume([[2, 2, 1], [1, 1, 3]], [0, 0, 0]) == pytest.approx(6.0)


def test_hypervolume_matches_monte_carlo_in_4d():
    rng = np.random.default_rng(0)
    points = rng.uniform(0.2, 1.0, size=(6, 4))
    samples = rng.uniform(0, 1, size=(200_000, 4))
    covered = (samples[:, None, :] <= points[None]).all(-1).any(-1).mean()
    assert hypervolume(points, [0, 0, 0, 0]) == pytest.approx(covered, abs=5e-3)


def test_non_dominated_with_ties_and_duplicates():
    pts = [[1, 3], [2, 2], [2, 2], [1, 2], [3, 1], [3, 0], [0, 3]]
    # (1,2) is dominated by (2,2); (3,0) by (3,1); (0,3) by (1,3); duplicates of (2,2) both stay
    assert non_dominated(pts).tolist() == [True, True, True, False, True, False, False]
    assert non_dominated([[1, 1], [1, 1]]).tolist() == [True, True]
    with pytest.raises(ValueError, match="2-D"):
        non_dominated([1, 2, 3])


def test_hypervolume_rejects_mismatched_reference():
    with pytest.raises(ValueError, match="reference"):
        hypervolume([[1, 2]], [0, 0, 0])


@pytest.mark.parametrize(
    "preference, match",
    [([0.5, 0.3, 0.2], "length|objectives"), ([1.2, -0.2], "negative"), ([0.6, 0.6], "sum to 1")],
)
def test_preference_validation_names_the_problem(preference, match):
    with pytest.raises(ValueError, match=match):
        validate_preference(preference, 2)
    with pytest.raises(ValueError, match=match):
        RegularizedMinNorm(beta=1.0, preference=preference)(torch.eye(2))


def test_pareto_settings_refuse_algorithms_without_a_preference():
    from firm_lightning.algorithms import FMGDA

    with pytest.raises(ValueError, match="preference"):
        ParetoSettings(algorithms=[FMGDA()])


def test_sweep_writes_outputs_and_resumes(tmp_path, capsys):
    from firm_lightning.cli import FIRMCLI

    args = ["pareto", "--config", CONFIG, f"--federation.output_dir={tmp_path}", "--federation.num_rounds=1",
            "--trainer.max_steps=1", "--data.eval_size=8", "--data.max_prompts=96",
            "--pareto.preferences=[[0.2, 0.8], [0.8, 0.2]]"]
    first = FIRMCLI(args=args).report
    for name in ("pareto.csv", "pareto.png", "hypervolume.json", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "hypervolume.json").read_text())
    assert set(saved["algorithms"]) == {"firm_beta1", "linear"} and len(saved["reference"]) == 2
    assert len((tmp_path / "pareto.csv").read_text().strip().splitlines()) == 1 + 4
    capsys.readouterr()
    second = FIRMCLI(args=args).report  # everything finished: nothing retrains
    out = capsys.readouterr().out
    assert out.count("already finished") == 4 and "training ..." not in out
    assert second["algorithms"] == first["algorithms"]


# Seed noise of a final eval reward on the tiny setup: std over 3 seeds of FIRM (β = 1)'s final
# a_to_m reward in `python -m firm_lightning compare --config configs/compare_tiny.yaml` (README): 0.087.
SEED_STD = 0.087


def test_objective_one_reward_does_not_decrease_as_its_preference_grows(tmp_path):
    from firm_lightning.cli import FIRMCLI

    preferences = [[0.1, 0.9], [0.5, 0.5], [0.9, 0.1]]
    report = FIRMCLI(args=[
        "pareto", "--config", CONFIG, f"--federation.output_dir={tmp_path}", "--federation.num_rounds=3",
        "--data.eval_size=32", f"--pareto.preferences={json.dumps(preferences)}",
        '--pareto.algorithms=[{"class_path": "firm_lightning.algorithms.FIRM", "init_args": {"beta": 1.0}}]',
    ]).report
    import csv

    with open(tmp_path / "pareto.csv") as f:
        rewards = [float(r["eval/reward/a_to_m"]) for r in csv.DictReader(f)]
    print("a_to_m by p_1 in", [p[0] for p in preferences], "→", rewards)
    assert all(b - a > -SEED_STD for a, b in zip(rewards, rewards[1:])), rewards
    assert rewards[-1] - rewards[0] > 2 * SEED_STD, rewards  # the preference really steers
    assert list(report["algorithms"]) == ["firm_beta1"]


def test_three_objectives_get_pairwise_panels_and_an_s_dimensional_hypervolume(tmp_path):
    from firm_lightning.studies.pareto import front_report, write_outputs

    names = ["a", "b", "c"]
    prefs = [[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]]
    points = [[3, 1, 1], [1, 3, 1], [1, 1, 3]]
    rows = [
        {"algorithm": "firm", "preference": p, "initial": {f"eval/reward/{n}": 0.0 for n in names},
         **{f"eval/reward/{n}": v for n, v in zip(names, pt)}}
        for p, pt in zip(prefs, points)
    ]
    report = front_report(rows, names, reference=None)
    # three 3×1×1-style boxes from the origin: 3·3 − 3·1 (pairwise overlaps 1·1·1) + 1 (triple) = 7
    assert report["algorithms"]["firm"]["hypervolume"] == pytest.approx(7.0)
    assert report["reference"] == [0.0, 0.0, 0.0]
    write_outputs(rows, names, report, tmp_path)
    import matplotlib.image as mpimg

    height, width = mpimg.imread(tmp_path / "pareto.png").shape[:2]
    assert width > 2.5 * height  # three side-by-side panels: (a,b), (a,c), (b,c)
    assert len((tmp_path / "pareto.csv").read_text().splitlines()) == 4

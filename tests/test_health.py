"""The health checks that keep a broken round from being promoted."""

from __future__ import annotations

import math

from distill.health import loss_problems, pseudo_label_problems, round_problems


def test_a_density_near_the_labeled_mean_is_healthy_and_far_from_it_is_not() -> None:
    assert pseudo_label_problems(3.0, 3.0) == [] and pseudo_label_problems(0.75, 3.0) == []
    assert pseudo_label_problems(12.0, 3.0) == []
    (collapse,) = pseudo_label_problems(0.5, 3.0)
    assert collapse.startswith("pseudo-labels collapsed: 0.50 per image against 3.00 labeled")
    (explosion,) = pseudo_label_problems(12.5, 3.0)
    assert explosion.startswith("pseudo-labels exploded")
    assert pseudo_label_problems(0.0, 2.0) and pseudo_label_problems(5.0, 0.0) == []  # nothing to match


def test_a_non_finite_final_loss_is_named() -> None:
    assert loss_problems({"total": 1.2, "loss_box_reg": 0.3}) == [] and loss_problems(None) == []
    (problem,) = loss_problems({"total": math.nan, "loss_box_reg": 0.3, "loss_mask": math.inf})
    assert problem == "the student's final loss is not finite (total=nan, loss_mask=inf)"


def test_a_round_reports_every_problem() -> None:
    calibration = {"kept_per_image": 0.1, "labeled_per_image": 2.0}
    problems = round_problems(calibration, {"final_loss": {"total": math.inf}})
    assert len(problems) == 2 and "collapsed" in problems[0] and "not finite" in problems[1]
    assert round_problems({"kept_per_image": 2.0, "labeled_per_image": 2.0}, {}) == []

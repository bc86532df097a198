"""OVD: on-policy verbal distillation (arXiv 2601.21968), the group-building half.

The teacher gives no token probabilities, only a verbal score ``s ∈ [0, 9]`` per trajectory
(or per step). For each prompt the student samples N trajectories; then

    accept_i = s_i ≥ θ                                  (θ = 7)
    y_i ← y_i                   if accept_i
    y_i ← teacher demonstration if not accept_i          (whole-trajectory replacement)
    y_i ← y_i[:first bad step] + teacher continuation    (step-level replacement)

and the group is trained with GRPO on the outcome reward ``r_i`` (optionally
``r_i + w · s_i / 9``). The score filters; by default it is not part of the reward.

The group baseline is the student's own value estimate (``student_baseline_advantages``): with
``r^S_i`` the reward of the student's original sample i (before any replacement) and ``r_i`` that of
the row trained (the accepted sample, or the demonstration that replaced it),

    b = mean_G r^S,    A_i = (r_i − b) / (σ + ε)    σ = std_G r^S when scaling and > 0; else A_i = r_i − b

so a demonstration that succeeds where the student failed is pushed up, one that fails where the
student failed gets 0 — the mixed-policy GRPO of off-policy guidance (LUFFY, arXiv 2504.14945).
The baseline over the final group instead (GRPO's own, ``objectives.grpo.group_advantages``) gives a
group whose every member was replaced zero advantage (docs/methods.md#ovd).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from .grpo import group_advantages

Replacement = Literal["trajectory", "step", "none"]


@dataclass(frozen=True)
class GroupMember:
    """One trajectory of an OVD group: where it came from and what to do with it."""

    source: Literal["student", "teacher", "student_prefix+teacher"]
    keep_prefix_chars: int  # student characters kept (whole text for accepted, 0 for replaced)


def accept(scores: Sequence[float], threshold: float) -> list[bool]:
    """``s_i ≥ θ`` for each trajectory."""
    return [score >= threshold for score in scores]


def first_rejected_step(step_scores: Sequence[float], threshold: float) -> int | None:
    """Index of the first step scoring below θ, or None when every step passes."""
    for i, score in enumerate(step_scores):
        if score < threshold:
            return i
    return None


def plan_group(
    texts: Sequence[str],
    scores: Sequence[float],
    threshold: float,
    replacement: Replacement = "trajectory",
    step_scores: Sequence[Sequence[float]] | None = None,
    step_starts: Sequence[Sequence[int]] | None = None,
) -> list[GroupMember]:
    """Decide, for each sampled trajectory, whether it is kept, replaced, or cut at its first bad step.

    Step-level replacement keeps the text before the first step scoring below θ —
    ``step_starts[i][k]`` is where scored step k of trajectory i begins (for a step the
    trajectory lacks, where it would begin) — and lets the teacher continue from there. A
    trajectory whose first step is already bad is replaced whole.
    """
    plan = []
    for i, (text, ok) in enumerate(zip(texts, accept(scores, threshold))):
        if ok or replacement == "none":
            plan.append(GroupMember("student", len(text)))
        elif replacement == "trajectory":
            plan.append(GroupMember("teacher", 0))
        else:
            if step_scores is None or step_starts is None:
                raise ValueError("step-level replacement needs per-step scores and where each step starts")
            bad = first_rejected_step(step_scores[i], threshold)
            keep = 0 if bad is None else step_starts[i][bad]
            plan.append(GroupMember("student_prefix+teacher", keep) if keep > 0 else GroupMember("teacher", 0))
    return plan


def ovd_rewards(outcomes: Sequence[float], scores: Sequence[float], score_weight: float = 0.0) -> list[float]:
    """``r_i + w · s_i / 9`` (w = 0 by default: the score only filters)."""
    return [r + score_weight * s / 9.0 for r, s in zip(outcomes, scores)]


def student_baseline_advantages(
    rewards_B: torch.Tensor, student_rewards_B: torch.Tensor, group_ids_B: torch.Tensor, scale: bool = True,
    unbiased: bool = True, eps: float = 1e-6,
) -> torch.Tensor:
    """``A_i = (r_i − b) / (σ + ε)``, ``b`` the mean and σ the std (sample std when ``unbiased``) of the student's own
    rewards in row i's group; ``A_i = r_i − b`` when ``scale`` is off or σ is 0 (an all-failed or all-solved student
    group: nothing to divide by). GRPO's group advantage with the student's rewards as the baseline."""
    return group_advantages(rewards_B, group_ids_B, eps, scale, unbiased, baseline_B=student_rewards_B)

"""OVD: on-policy verbal distillation (arXiv 2601.21968), the group-building half.

The teacher gives no token probabilities, only a verbal score ``s ∈ [0, 9]`` per trajectory
(or per step). For each prompt the student samples N trajectories; then

    accept_i = s_i ≥ θ                                  (θ = 7)
    y_i ← y_i                   if accept_i
    y_i ← teacher demonstration if not accept_i          (whole-trajectory replacement)
    y_i ← y_i[:first bad step] + teacher continuation    (step-level replacement)

and the group is trained with GRPO on the outcome reward ``r_i`` (optionally
``r_i + w · s_i / 9``). The score filters; by default it is not part of the reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

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

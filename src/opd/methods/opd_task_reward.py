"""OPD with a task reward: the verifier's group-normalised reward added to the reverse-KL advantage.

``A = A_task + A_kl`` (docs/methods.md#opd-with-a-task-reward): Thinking Machines' on-policy distillation
combined with GRPO's advantage (arXiv 2402.03300). For
sample i of a group (the ``samples_per_prompt`` completions of one prompt) and token t:

    A_{i,t} = α · (r_i - mean_group(r)) / (std_group(r) + ε)  +  Σ_{u≥t} γ^{u-t} · (-c · (ℓ^S_{i,u} - ℓ^T_{i,u}))

with r_i the task's verifier reward, the group's sample std (``std``; ``scale_by_std`` false only centres),
α = ``task_reward_coef``, c = ``coef``, γ = ``discount`` — in the shared policy-gradient surrogate.
α = 0 is OPD; a very large α approaches GRPO. The teacher keeps the student close where the
reward says nothing (all-equal groups); the reward corrects where the teacher is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config.sections import require
from ..objectives import reverse_kl_advantages
from .base import Method, Needs, Session, register
from .batch import Batch
from .losses import reward_advantages, sampled_token_loss


@dataclass
class OPDTaskRewardConfig:
    coef: float = 1.0  # c on the reverse-KL advantage
    discount: float = 0.0  # γ on the reverse-KL advantage: 0 per-token, 1 full return
    task_reward_coef: float = 1.0  # α on the group-normalised task advantage
    scale_by_std: bool = True  # divide the group-centred reward by the group's std (GRPO)
    std: Literal["sample", "population"] = "sample"  # that std: sample (Bessel-corrected, as TRL) or population


def task_reward_advantages(
    student_logp_BC: torch.Tensor,
    teacher_logp_BC: torch.Tensor,
    mask_BC: torch.Tensor,
    task_B: torch.Tensor,
    coef: float = 1.0,
    discount: float = 0.0,
    task_reward_coef: float = 1.0,
) -> torch.Tensor:
    """``A_BC``: the combined per-token advantage (zero off the mask) from each row's group-normalised task
    advantage ``task_B`` (``objectives.group_advantages`` of the rewards) and the reverse-KL advantage."""
    kl_BC = reverse_kl_advantages(student_logp_BC, teacher_logp_BC, mask_BC, coef, discount)
    return kl_BC + task_reward_coef * task_B.to(student_logp_BC.dtype)[:, None] * mask_BC


@register
class OPDTaskReward(Method):
    name = "opd_task_reward"
    config_class = OPDTaskRewardConfig

    @classmethod
    def validate(cls, cfg) -> None:
        c = cls.section(cfg)
        require(0 <= c.discount <= 1, "method.opd_task_reward.discount", f"must be in [0, 1], got {c.discount}")
        require(c.task_reward_coef >= 0, "method.opd_task_reward.task_reward_coef", f"must be >= 0, got {c.task_reward_coef}")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(teacher=True, group=True, routable=True, answers=True, spans=True)

    def row_advantages(self, batch: Batch):
        return reward_advantages(batch, self.config.scale_by_std, self.config.std)

    def loss(self, s: Session, batch: Batch, step: int):
        c = self.config
        task_B = self.advantages(batch).to(batch.rollouts.loss_mask_BC.device)

        def advantages(lp, tlp, mask):
            adv_BC = task_reward_advantages(lp, tlp, mask, task_B, c.coef, c.discount, c.task_reward_coef)
            return adv_BC, mask, {"task_advantage_abs": float(task_B.abs().mean())}

        return sampled_token_loss(s, batch, advantages)

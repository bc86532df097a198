"""OVD: on-policy verbal distillation (arXiv 2601.21968).

The teacher gives only a verbal score s ∈ [0, 9] per trajectory (or per step, or per turn). For
each prompt the student samples N trajectories; those scoring ≥ θ are kept, the others are replaced
by a teacher demonstration (whole trajectory, or the suffix after the first bad step or turn), and
the group is trained on the outcome reward ``r_i`` (+ ``w · s_i / 9`` optionally), measured against
the student's own value estimate (``method.ovd.baseline: student``, the default):

    b = mean_group(r^S),   A_i = (r_i − b) / (std_group(r^S) + ε)   (A_i = r_i − b when that std is 0)

with ``r^S`` the rewards of the student's samples before any replacement (mixed-policy GRPO, LUFFY,
arXiv 2504.14945); ``baseline: final_group`` is GRPO's ``(r_i − mean_group(r)) / (std_group(r) + ε)``
over the trained rows. Group planning, rewards and advantages are pure functions in ``objectives.ovd``
(docs/methods.md#ovd).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..config.sections import require, validate_client_settings
from ..episodes.driver import run_task_episodes
from ..episodes.environments import is_episodic
from ..episodes.scripted import agent_turns, scripted_episodes
from ..models.loading import freeze, load_model, load_tokenizer
from ..models.rollouts import Rollouts, build_rollouts, stack_rows
from ..objectives.ovd import first_rejected_step, ovd_rewards, plan_group, student_baseline_advantages
from ..services.http import OutagePolicy
from ..tasks.base import TASK_REGISTRY, Example
from ..teachers.judges import JUDGE_KINDS, HTTPJudge, ModelJudge, user_judge
from ..teachers.model import ModelTeacher
from .base import Method, Needs, Session, register, student_samples
from .batch import Batch
from .losses import group_policy_loss, reward_advantages


@dataclass
class HTTPJudgeConfig:
    url: str | None = None  # base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000
    model: str = "judge"
    api_key_env: str | None = None  # name of the environment variable holding the key (never the key)
    deadline: float = 30.0  # total seconds per request: connecting, sending and the whole reply
    retries: int = 3  # further attempts after a transient failure, with exponential backoff
    backoff: float = 1.0  # seconds before the first retry (doubled for each next one)
    max_reply_mb: float = 1.0  # a longer reply is an error, never read into memory
    # when the judge, having answered, stops answering: wait up to outage_seconds, or stop resumably (docs/cluster.md)
    outage: Literal["wait", "stop"] = "wait"
    outage_seconds: float = 600.0


@dataclass
class OVDConfig:
    """On-policy verbal distillation (docs/methods.md#ovd)."""

    # programmatic | model | http, or a judge of one's own: module:attribute naming a function fn(completion, row)
    # -> score in [0, 9] or an object with score(examples, completions) (docs/methods.md#ovd; the object itself
    # through the Python API)
    judge: str = "programmatic"
    judge_path: str | None = None  # model judge checkpoint; None = teacher.path
    threshold: float = 7.0  # θ: accept trajectories scoring ≥ θ
    replacement: Literal["trajectory", "step", "none"] = "trajectory"
    score_weight: float = 0.0  # w in r + w·score/9 (0: the score only filters)
    # leave teacher demonstrations that fail the task's verifier out of the group (no loss, not in its mean/std)
    # instead of training on them with a negative advantage
    drop_failed_demonstrations: bool = False
    scale_by_std: bool = True  # the GRPO step: divide the group-centred rewards by the group's std
    std: Literal["sample", "population"] = "sample"  # that std: sample (Bessel-corrected, as TRL) or population
    # what each trained row's reward is measured against: the mean (and std) of the group's rewards as the student
    # sampled them, before any replacement (student), or of the trained rows themselves (final_group, GRPO's: a
    # group whose every row was replaced then has zero advantage)
    baseline: Literal["student", "final_group"] = "student"
    http: HTTPJudgeConfig = field(default_factory=HTTPJudgeConfig)


def sampled_prefix(tokenizer, ids: list[int], text_prefix: str) -> tuple[list[int], str]:
    """The longest leading run of the sampled ``ids`` whose decoding is a prefix of ``text_prefix``, and that decoding."""
    decode = lambda n: tokenizer.decode(ids[:n], skip_special_tokens=True)  # noqa: E731
    low, high = 0, len(ids)  # the most tokens whose decoding is no longer than the prefix (decodings grow with n)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if len(decode(mid)) <= len(text_prefix) else (low, mid - 1)
    for n in range(low, -1, -1):
        text = decode(n)
        if text_prefix.startswith(text):
            return ids[:n], text
    return [], ""


def row_note(score: float, source: str, dropped: bool, reward: float, student_reward: float) -> str:
    """Where a group row's tokens came from and what it was trained with, for ``opd inspect``: the judge's score of
    the student's sample, the row's reward and the student's own (the baseline's)."""
    rewards = f"reward {reward:g}" + (f", the student's {student_reward:g}" if reward != student_reward or source != "accepted" else "")
    return f"score {score:g}: {source}; {rewards}" + (" (dropped: the demonstration failed)" if dropped else "")


def turn_text(tokenizer, ids: list[int]) -> str:
    """An agent turn's text as its environment read it: special tokens kept (a template's tool-call tags may be
    special), the EOS that closed it not."""
    return tokenizer.decode(ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids, skip_special_tokens=False)


@register
class OVD(Method):
    name = "ovd"
    config_class = OVDConfig

    @classmethod
    def validate(cls, cfg) -> None:
        o = cls.section(cfg)
        require(0 <= o.threshold <= 9, "method.ovd.threshold", f"must be in [0, 9], got {o.threshold}")
        validate_client_settings(o.http, "method.ovd.http", cfg.train.dist_timeout)
        if o.judge not in JUDGE_KINDS:
            user_judge(o.judge)  # importable, and a judge: a one-line error now
        if o.judge == "programmatic" or o.replacement == "step":
            checkable = [name for name, spec in TASK_REGISTRY.items() if spec.config_class.has_step_judge]
            require(
                type(cfg.task).has_step_judge,
                "method.ovd.judge" if o.judge == "programmatic" else "method.ovd.replacement",
                f"needs a task whose steps can be checked ({', '.join(checkable)}); use judge=model, judge=http or a judge of your own "
                "with replacement=trajectory",
            )
        if o.replacement == "step":
            require(o.judge == "programmatic", "method.ovd.replacement", "'step' needs per-step scores (judge=programmatic)")
        if o.judge == "http":
            require(o.http.url is not None, "method.ovd.http.url", "is required for judge=http")
        if o.judge == "model":
            require(o.judge_path is not None or cfg.teacher.path is not None, "method.ovd.judge_path", "is required for judge=model")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(teacher=cls.section(cfg).replacement != "none", judge=True, group=True)

    def make_judge(self, task, teacher, device):
        """The task's step checker, a local model (by default the teacher itself), an HTTP endpoint, or the user's."""
        o = self.config
        if o.judge == "programmatic":
            return task.step_judge()
        if o.judge not in JUDGE_KINDS:
            return user_judge(o.judge)
        if o.judge == "http":
            h = o.http
            outage = OutagePolicy("method.ovd.http.url", "method.ovd.http.", h.outage, h.outage_seconds)
            return HTTPJudge(h.url, h.model, h.api_key_env, h.deadline, h.retries, h.backoff, max_reply_mb=h.max_reply_mb, outage=outage)
        path = o.judge_path or self.cfg.teacher.path
        judge_tok = load_tokenizer(path, "method.ovd.judge_path")
        if path == self.cfg.teacher.path and isinstance(teacher, ModelTeacher):
            return ModelJudge(teacher.model, judge_tok)  # the teacher judges: no second copy
        return ModelJudge(freeze(load_model(path, "method.ovd.judge_path", self.cfg.teacher.dtype, device=device)), judge_tok)

    def data(self, s: Session, examples, rng, generator) -> Batch:
        """Student group → verbal scores → accept (score ≥ θ) or replace by a teacher demonstration."""
        o = self.config
        if is_episodic(s.task):
            return self.episode_data(s, examples, generator)
        sampled = student_samples(s, examples, generator)
        r = sampled.rollouts
        with s.timer.phase("judge"):
            scores = s.judge.score(sampled.examples, r.texts)
            step_scores = step_starts = None
            if o.replacement == "step":
                step_scores = [s.judge.step_scores(e, t) for e, t in zip(sampled.examples, r.texts)]
                step_starts = [s.judge.step_starts(e, t) for e, t in zip(sampled.examples, r.texts)]
        plan = plan_group(r.texts, scores, o.threshold, o.replacement, step_scores, step_starts)
        completions = [ids[mask.bool()].tolist() for ids, mask in zip(r.completion_ids_BC, r.completion_mask_BC)]
        texts = list(r.texts)
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(r.prompt_ids_BP, r.prompt_mask_BP)]
        replaced = [i for i, member in enumerate(plan) if member.source != "student"]
        if replaced:  # kept prefixes are the student's own sampled tokens, never re-tokenised text
            kept = [sampled_prefix(s.tokenizer, completions[i], texts[i][: plan[i].keep_prefix_chars]) for i in replaced]
            demos = s.teacher_sampler.sample([prompts[i] + ids for i, (ids, _) in zip(replaced, kept)], s.cfg.sampling, generator)
            for j, i in enumerate(replaced):
                tail = demos.completion_ids_BC[j][demos.completion_mask_BC[j].bool()].tolist()
                completions[i] = kept[j][0] + tail
                texts[i] = kept[j][1] + demos.texts[j]
        outcomes = list(sampled.rewards)  # kept samples keep their reward; replaced ones are graded anew
        for i, reward in zip(replaced, s.task.rewards([texts[i] for i in replaced], [sampled.examples[i] for i in replaced])[0]):
            outcomes[i] = reward
        rollouts = build_rollouts(prompts, completions, s.tokenizer.pad_token_id, texts=texts, device=s.device)
        rollouts.group_B = list(r.group_B)
        source = {"student": "accepted", "teacher": "replaced by the teacher", "student_prefix+teacher": "student prefix kept, the rest the teacher's"}
        return self.group_batch(
            s, sampled.examples, rollouts, scores, sampled.rewards, outcomes, replaced,
            accepted_B=[m.source == "student" for m in plan], sources=[source[m.source] for m in plan],
            rescore=lambda rows: s.judge.score([sampled.examples[i] for i in rows], [texts[i] for i in rows]),
            info={"student_tokens": float(r.completion_mask_BC.sum())},
        )

    def episode_data(self, s: Session, examples, generator) -> Batch:
        """OVD over multi-turn episodes: each student episode is judged (the programmatic judge per turn, a model or
        HTTP judge on the whole trajectory's text); a rejected one is replaced by a teacher episode — from the start
        (``replacement=trajectory``), or after the student's turns before the first rejected one, which are replayed
        as they were sampled and kept (``replacement=step``). Every agent token of the group is trained (observations
        never are), with GRPO advantages on the episodes' outcomes."""
        o = self.config
        k = s.cfg.sampling.samples_per_prompt
        rows = [e for e in examples for _ in range(k)]
        kwargs = s.cfg.task.chat_template_kwargs
        episodes = run_task_episodes(s.task, rows, s.sampler, s.tokenizer, s.cfg.sampling, generator, kwargs, s.context)
        r = episodes.rollouts
        turns_B = [agent_turns(r, i) for i in range(len(rows))]
        texts_B = [[turn_text(s.tokenizer, t) for t in turns] for turns in turns_B]
        with s.timer.phase("judge"):
            if o.judge == "programmatic":
                turn_scores = [s.judge.turn_scores(e, texts) for e, texts in zip(rows, texts_B)]
                scores = [min(t) if t else 0.0 for t in turn_scores]
            else:
                scores = s.judge.score(rows, r.texts)
        replaced = [i for i, score in enumerate(scores) if score < o.threshold and o.replacement != "none"]
        kept_turns = [(first_rejected_step(turn_scores[i], o.threshold) or 0) if o.replacement == "step" else 0 for i in replaced]
        picks = [(r, i) for i in range(len(rows))]
        outcomes = list(episodes.rewards)
        info = episodes.metrics()
        if replaced:
            demos = scripted_episodes(
                s.task, [rows[i] for i in replaced], [turns_B[i][:n] for i, n in zip(replaced, kept_turns)], s.tokenizer, kwargs, s.context,
                then=s.teacher_sampler, params=s.cfg.sampling, generator=generator,
            )
            for j, i in enumerate(replaced):
                picks[i] = (demos.rollouts, j)
                outcomes[i] = demos.rewards[j]
            info["demonstration_kept_turns"] = sum(kept_turns) / len(replaced)
        rollouts = stack_rows(picks, s.tokenizer.pad_token_id).to(s.device)
        rollouts.sampler_logp_BC = None  # a mix of policies, as the single-turn group is
        rollouts.group_B = [i // k for i in range(len(rows))]
        kept_of = dict(zip(replaced, kept_turns))
        sources = [
            "accepted" if i not in kept_of else "replaced by a teacher episode" if not kept_of[i] else f"{kept_of[i]} student turn(s) kept, the rest the teacher's"
            for i in range(len(rows))
        ]
        accepted_B = [i not in kept_of for i in range(len(rows))] if o.replacement != "none" else [x >= o.threshold for x in scores]
        return self.group_batch(
            s, rows, rollouts, scores, episodes.rewards, outcomes, replaced, accepted_B, sources,
            rescore=lambda picked: [self.episode_score(s, rows[i], rollouts, i) for i in picked],
            info={**info, "student_tokens": float(r.loss_mask_BC.sum())},
        )

    def episode_score(self, s: Session, example: Example, rollouts: Rollouts, row: int) -> float:
        """The judge's score of episode ``row`` of ``rollouts`` (its agent turns, for the programmatic judge)."""
        if self.config.judge == "programmatic":
            return s.judge.episode_score(example, [turn_text(s.tokenizer, t) for t in agent_turns(rollouts, row)])
        return s.judge.score([example], [rollouts.texts[row]])[0]

    def group_batch(
        self, s: Session, rows: list[Example], rollouts: Rollouts, scores: list[float], student_rewards: list[float],
        outcomes: list[float], replaced: list[int], accepted_B: list[bool], sources: list[str], rescore, info: dict,
    ) -> Batch:
        """The group both paths end in: demonstrations that failed the task left out (``drop_failed_demonstrations``),
        the replaced rows re-scored when the score is part of the reward (``rescore``), the rewards
        ``r_i + w · s_i / 9``, the group's metrics and where each row came from (``row_note``)."""
        o, n = self.config, len(rows)
        dropped = [i for i in replaced if o.drop_failed_demonstrations and outcomes[i] <= 0]
        for i in dropped:  # no trained tokens; out of the group's mean and std too when the final group is the baseline
            rollouts.loss_mask_BC[i] = 0
            if o.baseline == "final_group":
                rollouts.group_B[i] = -1 - i
        final_scores = scores
        if o.score_weight:
            final_scores = [None if i in replaced else score for i, score in enumerate(scores)]
            with s.timer.phase("judge"):
                for i, value in zip(replaced, rescore(replaced) if replaced else []):
                    final_scores[i] = value
        info = {
            **info, "reward": sum(student_rewards) / n, "judge_score": sum(scores) / n, "accepted_fraction": sum(accepted_B) / n,
            "dropped_fraction": len(dropped) / n,
        }
        if replaced:
            info["demonstration_reward"] = sum(outcomes[i] for i in replaced) / len(replaced)
        rewards = ovd_rewards(outcomes, final_scores, o.score_weight)
        baseline_rewards = ovd_rewards(student_rewards, scores, o.score_weight)  # each student sample's own reward
        notes = [row_note(scores[i], sources[i], i in dropped, rewards[i], baseline_rewards[i]) for i in range(n)]
        return Batch(rollouts, rows, on_policy=False, rewards=rewards, baseline_rewards=baseline_rewards, info=info, row_notes=notes)

    def row_advantages(self, batch: Batch):
        o = self.config
        if o.baseline == "final_group":
            return reward_advantages(batch, o.scale_by_std, o.std)
        return student_baseline_advantages(
            torch.tensor(batch.rewards), torch.tensor(batch.baseline_rewards), torch.tensor(batch.rollouts.group_B), o.scale_by_std,
            o.std == "sample",
        )

    def loss(self, s: Session, batch: Batch, step: int):
        return group_policy_loss(s, batch)

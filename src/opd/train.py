"""The one training loop: sample → score → loss → optimizer step; evaluate; checkpoint; resume.

Every step draws its prompts and its sampling noise from generators seeded by
``(run.seed, step)``, so a run resumed from a checkpoint replays exactly the steps an
uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .assemble import build_session
from .checkpoint import (
    CHECKPOINT_PREFIX, MANIFEST, fsync_dir, fsync_tree, full_state, latest_checkpoint, load_checkpoint, load_extra_tensors, save_checkpoint,
    write_manifest,
)
from .config import Config, redact, save_config, to_dict
from .distributed import launched_world, start_ranks, stop_ranks, thread_oversubscription
from .evaluate import evaluate_rows, summarise
from .methods.data import batch_metrics
from .methods.losses import student_token_logprobs
from .metrics import MetricsLog, NoMetrics
from .objectives.common import step_normaliser
from .profiling import PeakMemory, phase_shares
from .prompts import PromptError
from .resume import describe, read_saved_config, record, trajectory_changes
from .run_lock import RunDirLock
from .rollout import Sampler
from .session import Session, TrainingError
from .sharding import full_tensor, gathered, is_sharded, local_part, whole_state_dict

log = logging.getLogger(__name__)


class RunDirError(ValueError):
    """The output directory holds a run that this one would overwrite."""


# ----------------------------------------------------------------------------- optimizer


def build_optimizer(cfg: Config, model: torch.nn.Module):
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the student has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)

    def lr_factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


# ----------------------------------------------------------------------------- one step


def step_generators(seed: int, step: int, device: torch.device, micro: int = 0) -> tuple[random.Random, torch.Generator]:
    """The data RNG and sampling generator of micro-batch ``micro`` of ``step``: a function of (seed, step, micro)
    only. Micro-batch 0's RNG also draws the step's prompts (the same on every rank)."""
    if micro == 0:
        return random.Random(f"opd-data-{seed}-{step}"), torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % (2**63))
    digest = hashlib.sha256(f"opd-micro-{seed}-{step}-{micro}".encode()).digest()
    return random.Random(digest), torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") % (2**63))


def train_step(s: Session, optimizer, step: int) -> tuple[dict[str, float], str]:
    """One training step: sample ``grad_accum`` micro-batches, then ``train.updates_per_batch`` optimizer updates
    on them (the policy-gradient ratio against the log-probs from before the first). Returns (metrics, status).

    status is ``applied``; ``nonfinite`` (a non-finite loss or gradient: no update); or
    ``no_signal`` (every gradient exactly zero, e.g. a GRPO/OVD batch whose groups all got
    the same reward: no update, since Adam would otherwise keep moving on stale momentum).
    """
    cfg, method, ranks = s.cfg, s.method, s.ranks
    step_rng, step_generator = step_generators(cfg.run.seed, step, s.device)
    examples = s.task.sample_train(cfg.train.prompts_per_step, step_rng)
    accum = cfg.train.grad_accum
    per_micro = len(examples) // (accum * ranks.world_size)
    optimizer.zero_grad(set_to_none=True)
    batches = []
    with gathered(s.student):  # a sharded student is whole while the ranks sample (each decodes on its own)
        for micro in range(ranks.rank * accum, (ranks.rank + 1) * accum):  # this rank's share of the step's micro-batches
            rng, generator = (step_rng, step_generator) if micro == 0 else step_generators(cfg.run.seed, step, s.device, micro)
            with s.timer.phase("sample"):
                batch = method.data(s, examples[micro * per_micro : (micro + 1) * per_micro], rng, generator)
            batch.seed = micro_seed(cfg.run.seed, step, micro)
            batches.append(batch)
    if cfg.train.updates_per_batch > 1:  # the ratio's denominator: the policy that made the batch, before any update
        with s.timer.phase("student"):
            for batch in batches:
                with batch.rng(0):
                    batch.old_logp_BC = old_logprobs(s, batch)
    totals, status = {}, "no_signal"
    for update in range(cfg.train.updates_per_batch):
        metrics, update_status = optimizer_update(s, optimizer, batches, step, update)
        if update == 0:
            totals = metrics
        elif "clip_fraction" in metrics:  # the clip only binds from the second update on
            totals["clip_fraction_last"] = metrics["clip_fraction"]
        if update_status == "nonfinite":
            status = "nonfinite"
            break
        if update_status == "applied":
            status = "applied"
    if status == "applied":
        s.sampler_behind = True
    if s.sampler_behind and (step + 1) % cfg.sampling.sync_every == 0:
        sync_sampler(s)
    return totals, status


def micro_seed(seed: int, step: int, micro: int) -> int:
    """Micro-batch ``micro`` of ``step``'s own seed for its forward passes (dropout; ``Batch.rng``)."""
    return int.from_bytes(hashlib.sha256(f"opd-forward-{seed}-{step}-{micro}".encode()).digest()[:8], "little") % (2**63)


def sync_sampler(s: Session) -> None:
    """Sample from the student's current weights from now on (an engine gets them pushed; opd's own sampler has them)."""
    with s.timer.phase("sync"):
        s.sampler.update_weights(s.student)
    s.sampler_behind = False


def optimizer_update(s: Session, optimizer, batches: list, step: int, update: int = 0) -> tuple[dict[str, float], str]:
    """Gradients of the step's loss on ``batches`` (summed over ranks), clipped, then one optimizer update (and the
    teacher's hook)."""
    cfg = s.cfg
    optimizer.zero_grad(set_to_none=True)
    sums, counts, finite = accumulate_gradients(s, batches, step, update)
    params = [p for p in s.student.parameters() if p.requires_grad]
    with s.timer.phase("reduce") if s.ranks.several else contextlib.nullcontext():
        finite = s.ranks.all(finite)  # one rank's non-finite loss skips the update on all
        totals = s.ranks.merge_metrics(sums, counts, SUMMED_METRICS)
        if finite and not is_sharded(s.student):  # FSDP reduce-scattered them in the backward
            s.ranks.sum_gradients(params)
    with s.timer.phase("optimizer"):
        if finite:
            clip = cfg.train.grad_clip if cfg.train.grad_clip is not None else float("inf")
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, clip))  # over all shards when sharded
            totals["grad_norm"] = float(grad_norm)
            finite = bool(torch.isfinite(grad_norm))
        status = "nonfinite" if not finite else "no_signal" if totals["grad_norm"] == 0 else "applied"
        if status == "applied":
            optimizer.step()
            if not s.ranks.all(weights_finite(params)):
                raise TrainingError(
                    f"the update at step {step + 1} made the student's weights non-finite (e.g. float16 full fine-tuning "
                    "overflowing, or too high a train.lr); use student.dtype=bfloat16/float32 or LoRA, or lower train.lr"
                )
            if s.teacher is not None:
                s.teacher.after_optimizer_step(s.student)
        optimizer.zero_grad(set_to_none=True)
    return totals, status


def weights_finite(params: list[torch.Tensor]) -> bool:
    """Whether this rank's weights (its shards, when sharded) are all finite."""
    norms = torch._foreach_norm([local_part(p.detach()) for p in params])
    return bool(torch.isfinite(torch.stack(norms)).all())


def old_logprobs(s: Session, batch) -> torch.Tensor:
    """The batch's sampled-token log-probs under the student as it is now (before this step's updates), no gradient."""
    with torch.no_grad():
        return student_token_logprobs(s, batch.rollouts)[0]


SUMMED_METRICS = ("loss", "student_tokens")  # parts of a step total; every other metric is averaged over micro-batches


def accumulate_gradients(s: Session, batches: list, step: int, update: int = 0) -> tuple[dict[str, float], dict[str, int], bool]:
    """Backpropagate the step's loss over its micro-batches into the student's ``.grad``; ``(sums, counts, finite)``:
    each metric summed over the micro-batches that report it, and how many did (``Ranks.merge_metrics`` makes the
    step's metrics of them: the ``SUMMED_METRICS`` totals, every other one the mean over its micro-batches).

    Every micro-batch is weighted by one normaliser taken over the whole step, on every rank (its
    token count, sequence count or rows × tokens per row), so the accumulated gradient — summed over
    ranks — is that of the one big batch, whatever ``grad_accum`` and the number of ranks are. A
    method may first choose its tokens over the whole step (``Method.prepare_step``). Stops at the
    first micro-batch with a non-finite loss.
    """
    method = s.method
    if not all(b.prepared for b in batches):  # once per step, not once per update
        with s.timer.phase("student"):
            method.prepare_step(s, batches, step)
        for batch in batches:
            batch.prepared = True
    normaliser = step_normaliser([b.trained_mask_BC for b in batches], method.reduction(), method.tokens_per_row(), total=s.ranks.sum)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    finite = True
    sharded = is_sharded(s.student)
    for batch in batches:
        batch.normaliser = normaliser
        with s.timer.phase("student"), batch.rng(1 + update):
            loss, metrics = method.loss(s, batch, step)
            finite = bool(torch.isfinite(loss))
            if sharded:  # a sharded backward is a collective: every rank runs it, or none
                finite = s.ranks.all(finite)
                if not finite:  # no backward will reshard the root group its forward gathered
                    s.student.reshard()
            if finite:
                loss.backward()
        metrics.update(batch_metrics(batch), loss=float(loss.detach()))
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
        if not finite:
            break
    return sums, counts, finite


# ----------------------------------------------------------------------------- the run


def prepare_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    run_dir = Path(cfg.run.output_dir)
    recover_final_model(run_dir / "final")
    resume_from = latest_checkpoint(run_dir) if cfg.run.resume else None
    holds_run = (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()
    if cfg.run.resume and resume_from is None:
        if holds_run and not cfg.run.overwrite:  # starting again would truncate its metrics
            raise RunDirError(
                f"run.resume=true but run.output_dir '{run_dir}' holds no intact checkpoint to resume from "
                "(with checkpoint.every=0 and checkpoint.at_end=false none is saved); pass run.overwrite=true to start it again from step 0"
            )
        log.warning("run.resume=true but %s holds no checkpoint; starting from step 0", run_dir)
    if resume_from is not None:
        check_resume(cfg, run_dir, resume_from)
    if holds_run and resume_from is None and not cfg.run.resume:
        if not cfg.run.overwrite:
            raise RunDirError(
                f"run.output_dir '{run_dir}' already holds a run; pass run.resume=true to continue it "
                "or run.overwrite=true to replace it"
            )
        for name in ("checkpoints", "tensorboard", "final"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, resume_from


def check_resume(cfg: Config, run_dir: Path, checkpoint: Path) -> None:
    """Refuse a resume whose settings would not continue the same run (unless allowed; then record them)."""
    step = int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))
    if step > cfg.train.steps:
        raise RunDirError(f"the newest checkpoint is at step {step}, past train.steps={cfg.train.steps}; resume with train.steps >= {step}")
    saved = read_saved_config(run_dir)
    if saved is None:
        log.warning("%s has no readable config.yaml; cannot check what this resume changes", run_dir)
        return
    changes = [c for c in trajectory_changes(saved, redact(to_dict(cfg))) if not same_micro_batches(c, cfg, checkpoint)]
    if changes and not cfg.run.allow_changes:
        raise RunDirError(
            f"resuming {run_dir} with settings that alter the run: {describe(changes)}; "
            "pass run.allow_changes=true to resume anyway (the changes are recorded in resume_changes.jsonl)"
        )
    if changes:
        log.warning("resuming with changed settings: %s", describe(changes))
        record(run_dir, step, changes)


def apply_optimizer_settings(cfg: Config, optimizer, scheduler) -> None:
    """After restoring a checkpoint: the config's lr, betas and weight decay (unchanged ones are a no-op), so an
    allowed change takes effect instead of the checkpoint's values silently winning."""
    t = cfg.train
    scheduler.base_lrs = [t.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]):
        group.update(lr=t.lr * factor, betas=t.betas, weight_decay=t.weight_decay)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def run_eval(s: Session, model_sampler: Sampler, examples, step_seed: int) -> dict[str, float]:
    e = s.cfg.eval
    sampling = s.cfg.sampling
    if e.max_new_tokens is not None:
        sampling = replace(sampling, max_new_tokens=e.max_new_tokens)
    ranks = s.ranks  # each rank evaluates a contiguous share of the examples; the rows are gathered
    share = examples[ranks.rank * len(examples) // ranks.world_size : (ranks.rank + 1) * len(examples) // ranks.world_size]
    generator = torch.Generator(device=s.device).manual_seed(step_seed + 7919 * ranks.rank)
    max_prompt = s.max_prompt_tokens + s.cfg.sampling.max_new_tokens - sampling.max_new_tokens if s.max_prompt_tokens else None

    def rows() -> list:
        try:
            return evaluate_rows(
                model_sampler, s.tokenizer, s.task, share, sampling, e.k, e.temperature, e.batch_size, generator, max_prompt,
                s.cfg.task.chat_template_kwargs,
            )
        except PromptError as err:
            raise PromptError(f"{err} (evaluation generates up to {sampling.max_new_tokens} tokens: eval.max_new_tokens / sampling.max_new_tokens)") from None

    with gathered(s.student):  # a sharded student is whole while each rank decodes its share
        return summarise(ranks.gather(rows), e.k)


def train(cfg: Config) -> dict:
    """Run ``cfg`` to completion; return (and write) the summary. Launched across several processes (torchrun,
    accelerate launch) every rank calls this and they run one job together (``distributed``)."""
    started = time.time()
    ranks = start_ranks(cfg.train.device, cfg.train.dist_timeout)
    if ranks.main and (warning := thread_oversubscription(ranks, cfg.train.threads)):
        log.warning(warning)
    lock = RunDirLock(Path(cfg.run.output_dir))  # rank 0 holds it until the run ends, however it ends

    def claim_run_dir() -> tuple[Path, Path | None]:
        lock.acquire()
        try:
            return prepare_run_dir(cfg)
        except BaseException:
            lock.release()
            raise

    finished = False
    try:
        run_dir, resume_from = ranks.from_main(claim_run_dir)  # every rank resumes from the checkpoint rank 0 chose
        torch.manual_seed(cfg.run.seed)
        s = build_session(cfg, ranks)
        try:
            summary = run_session(s, run_dir, resume_from, started)
            finished = True
            return summary
        finally:
            for sampler in (s.sampler, s.teacher_sampler):
                if sampler is not None:
                    sampler.close()
    finally:
        try:
            stop_ranks(ranks, finished)
        finally:
            lock.release()


def run_session(s: Session, run_dir: Path, resume_from: Path | None, started: float) -> dict:
    """Train the built session from ``resume_from`` (or the start) to the end; evaluate; save; summarise."""
    cfg, ranks = s.cfg, s.ranks
    if ranks.main:
        save_config(cfg, run_dir / "config.yaml")
    optimizer, scheduler = build_optimizer(cfg, s.student)
    micro_batches = cfg.train.grad_accum * ranks.world_size
    state = {"nonfinite_skips": 0, "consecutive_nonfinite": 0, "no_signal_steps": 0, "generated_tokens": 0.0, "wall_seconds": 0.0, "phase_seconds": {}}
    start_step = 0
    if resume_from is not None:
        saved = load_checkpoint(resume_from, s.student, optimizer, scheduler)
        check_micro_batches(cfg, saved.get("micro_batches_per_step", cfg.train.grad_accum), micro_batches, resume_from)
        state.update(saved)
        apply_optimizer_settings(cfg, optimizer, scheduler)
        if s.teacher is not None:
            s.teacher.load_state_tensors(load_extra_tensors(resume_from))
        start_step = state["step"]
        log.info("resumed from %s at step %d", resume_from, start_step)
    state["micro_batches_per_step"] = micro_batches
    sync_sampler(s)  # an engine starts from the checkpoint on disk; the student may be a resumed one
    metrics_log = (
        MetricsLog(run_dir, cfg.log.tensorboard, start_step if resume_from is not None else None, cfg.train.steps) if ranks.main else NoMetrics()
    )
    eval_examples = s.task.eval_examples()[: cfg.eval.num_prompts]

    if resume_from is None:
        if cfg.eval.teacher and s.teacher_sampler is not None:
            state["teacher_eval"] = run_eval(s, s.teacher_sampler, eval_examples, cfg.run.seed)
            metrics_log.write("teacher_eval", 0, state["teacher_eval"])
        state["before_eval"] = run_eval(s, s.sampler, eval_examples, cfg.run.seed)
        metrics_log.write("eval", 0, state["before_eval"])

    last_eval = state.get("before_eval", {})
    bar = tqdm(range(start_step, cfg.train.steps), initial=start_step, total=cfg.train.steps, disable=not (cfg.log.progress_bar and ranks.main), desc=cfg.run.name, dynamic_ncols=True)
    segment_start = time.time()
    memory = PeakMemory(s.device)
    try:
        for step in bar:
            step_start = time.time()
            memory.reset()
            metrics, status = train_step(s, optimizer, step)
            if (peak := memory.peak_mb()) is not None:
                metrics["peak_memory_mb"] = peak
            with warnings.catch_warnings():  # a skipped update still advances the schedule
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                scheduler.step()
            if status == "applied":
                state["consecutive_nonfinite"] = 0
            elif status == "no_signal":
                state["no_signal_steps"] += 1
            else:
                state["nonfinite_skips"] += 1
                state["consecutive_nonfinite"] += 1
                log.warning("step %d: non-finite loss or gradient%s; update skipped", step + 1, nonfinite_reason(metrics))
            state["generated_tokens"] += metrics.get("student_tokens", 0.0)
            for phase, seconds in s.timer.pop().items():
                metrics[f"time/{phase}"] = seconds
                state["phase_seconds"][phase] = state["phase_seconds"].get(phase, 0.0) + seconds
            metrics.update(lr=scheduler.get_last_lr()[0], step_seconds=time.time() - step_start, skipped=float(status != "applied"), generated_tokens=state["generated_tokens"])
            done = step + 1
            metrics_log.write("train", done, metrics)  # the step that stops the run gets its row too
            if state["consecutive_nonfinite"] >= cfg.train.max_consecutive_nonfinite:
                raise TrainingError(
                    f"{state['consecutive_nonfinite']} steps in a row had a non-finite loss or gradient "
                    f"(last at step {done}); lower train.lr or check the teacher's outputs"
                )
            if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.steps:
                last_eval = run_eval(s, s.sampler, eval_examples, cfg.run.seed)
                metrics_log.write("eval", done, last_eval)
            bar.set_postfix(_postfix(metrics, last_eval))
            periodic = cfg.checkpoint.every and done % cfg.checkpoint.every == 0
            if periodic or (cfg.checkpoint.at_end and done == cfg.train.steps):
                state["wall_seconds"] += time.time() - segment_start
                segment_start = time.time()
                whole = full_state(s.student, optimizer)  # every rank: a sharded student's tensors are gathered to rank 0
                ranks.from_main(lambda: save_checkpoint(
                    run_dir, done, s.student, s.tokenizer, optimizer, scheduler, state, cfg.checkpoint.keep_last, teacher_tensors(s), whole,
                ))
    finally:
        bar.close()
    state["wall_seconds"] += time.time() - segment_start
    if cfg.train.steps and state["no_signal_steps"] + state["nonfinite_skips"] >= cfg.train.steps - start_step > 0:
        log.warning(
            "no step of this run changed the student: every gradient was exactly zero or non-finite "
            "(e.g. GRPO/OVD groups whose samples all got the same reward); the final model is the initial one"
        )
    if s.sampler_behind:
        sync_sampler(s)
    after = run_eval(s, s.sampler, eval_examples, cfg.run.seed)
    metrics_log.write("eval", cfg.train.steps, after)
    metrics_log.close()
    whole = whole_state_dict(s.student)  # every rank (a collective when sharded); None when unsharded
    ranks.from_main(lambda: save_final_model(s, run_dir / "final", whole))
    summary = {
        "method": cfg.method.name,
        "task": cfg.task.name,
        "teacher_accuracy": state.get("teacher_eval", {}).get("accuracy"),
        "student_accuracy_before": state.get("before_eval", {}).get("accuracy"),
        "student_accuracy_after": after.get("accuracy"),  # None for prompt-only eval data (nothing to grade)
        "steps": cfg.train.steps,
        "train_seconds": round(state["wall_seconds"], 2),
        "wall_seconds": round(time.time() - started, 2),
        "generated_tokens": state["generated_tokens"],
        "nonfinite_skips": state["nonfinite_skips"],
        "no_signal_steps": state["no_signal_steps"],
        "trained": state["no_signal_steps"] + state["nonfinite_skips"] < cfg.train.steps,
        "phase_seconds": {k: round(v, 2) for k, v in state["phase_seconds"].items()},
        "phase_shares": {k: round(v, 4) for k, v in phase_shares(state["phase_seconds"]).items()},
        "eval_before": state.get("before_eval"),
        "eval_after": after,
        "eval_teacher": state.get("teacher_eval"),
        "eval_set": {**s.task.describe_eval(), "evaluated": len(eval_examples)},
        "data_checks": s.data_report,
    }
    if not ranks.main:
        return summary
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.log.plot:
        from .report import plot_run

        plot_run(run_dir)
    return summary


def same_micro_batches(change: tuple, cfg: Config, checkpoint: Path) -> bool:
    """A ``train.grad_accum`` change that keeps ranks × grad_accum (e.g. 2 ranks × 1 resumed as 1 process × 2):
    the same micro-batches with the same noise, so not a change of the run."""
    if change[0] != "train.grad_accum":
        return False
    try:
        saved = json.loads((checkpoint / "state.json").read_text()).get("micro_batches_per_step", change[1])
    except (OSError, ValueError):
        return False
    return saved == cfg.train.grad_accum * launched_world()[1]


def check_micro_batches(cfg: Config, saved: int, micro_batches: int, checkpoint: Path) -> None:
    """Each micro-batch draws its own sampling noise, so ranks × grad_accum is part of the trajectory: a resume
    on another number of ranks continues the same run only when the product is unchanged (a checkpoint without
    the count comes from one process: its grad_accum)."""
    if saved == micro_batches:
        return
    message = (
        f"{checkpoint} was written with {saved} micro-batches per step (ranks x train.grad_accum) and this resume has "
        f"{micro_batches}; launch it with ranks x train.grad_accum = {saved}"
    )
    if not cfg.run.allow_changes:
        raise RunDirError(message + ", or pass run.allow_changes=true")
    log.warning("%s; continuing (run.allow_changes=true)", message)


def teacher_tensors(s: Session) -> dict | None:
    """Teacher state that a checkpoint must carry for an exact resume (an EMA teacher's weights), or None."""
    return (s.teacher.state_tensors() or None) if s.teacher is not None else None


def nonfinite_reason(metrics: dict) -> str:
    """What the step's metrics say about why its loss was not finite ('' when they say nothing)."""
    if metrics.get("teacher_impossible_tokens"):
        return (
            f" (the teacher gave probability 0 to {int(metrics['teacher_impossible_tokens'])} sampled tokens, "
            "where a reverse KL is infinite; a log-ratio clip, e.g. opd_plus, or a bounded divergence keeps it finite)"
        )
    return ""


def _postfix(metrics: dict, last_eval: dict) -> dict:
    shown = {"loss": f"{metrics.get('loss', float('nan')):.4f}"}
    if "kl" in metrics:
        shown["kl"] = f"{metrics['kl']:.4f}"
    if "reward" in metrics:
        shown["reward"] = f"{metrics['reward']:.2f}"
    if "accuracy" in last_eval:
        shown["acc"] = f"{last_eval['accuracy']:.3f}"
    return shown


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def save_final_model(s: Session, path: Path, whole: dict | None = None) -> None:
    """A checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads: LoRA adapters merged into the weights; the
    weights of a sharded student from ``whole`` (``sharding.whole_state_dict``).

    Written beside ``path``, fsynced with a manifest, then swapped in atomically (``renameat2`` exchange on Linux;
    elsewhere two renames, after which a complete one is always ready for ``recover_final_model`` to put back)."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model = s.student
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(tmp / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": whole} if whole is not None else {}))
    s.tokenizer.save_pretrained(tmp)
    write_manifest(tmp)
    fsync_tree(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists() and exchange(tmp, path):  # atomic: final/ is the old model, then the new one, never absent
        os.replace(tmp, old)
    else:
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_final_model(path: Path) -> None:
    """After a run killed while swapping in ``final/``: put the complete new (or else the old) one back."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if not path.exists():
        if (tmp / MANIFEST).is_file():
            os.replace(tmp, path)
        elif old.exists():
            os.replace(old, path)
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)

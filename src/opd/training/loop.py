"""The one training loop: sample → score → loss → optimizer step; evaluate; checkpoint; resume.

``train`` claims the run directory, builds the session and runs it; ``run_session`` is the run from
its first (or resumed) step to the final model; ``train_step`` is one step. Every step draws its
prompts and its sampling noise from generators seeded by ``(run.seed, step, micro-batch)``
(``seeds``), so a run resumed from a checkpoint replays exactly the steps an uninterrupted run would
have taken. What a run directory may hold (``run_dir``), what a resume may change (``resume``), the
checkpoints (``checkpoints``) and the final model (``final_model``) are their own modules.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import time
import warnings
from typing import Iterable
from pathlib import Path

import torch

from ..config.saving import redact, save_config, to_dict
from ..config.sections import parse_duration
from ..tasks.reward_functions import reward_errors
from ..methods.base import Session
from ..methods.batch import Batch
from ..methods.data import batch_metrics
from ..methods.losses import student_token_logprobs
from ..objectives.common import step_normaliser
from ..parallel.failure import PeerFailed, Watchdog, connect_store, stopped_because
from ..parallel.ranks import start_ranks, stop_ranks, thread_oversubscription
from ..parallel.sharding import full_tensor, is_sharded, whole_state_dict
from ..services.http import ServiceError, ServiceOutage
from ..teachers.judges import JudgeError
from .assembly import build_session
from .checkpoints import CHECKPOINT_PREFIX, full_state, list_checkpoints, load_checkpoint, load_extra_tensors, save_checkpoint
from .errors import TrainingError, is_out_of_memory, out_of_memory, report_failure
from .evaluation import evaluate_session
from .final_model import save_final_model
from .metrics import MetricsLog, NoMetrics
from .trackers import open_trackers
from .optimizer import apply_optimizer_settings, build_optimizer, weights_finite
from .profiling import PeakMemory, phase_shares
from .progress import progress
from .resume import check_micro_batches
from .rollout_pipeline import RolloutPipeline
from .resume import record as record_resume_changes
from .run_dir import prepare_run_dir
from .run_lock import RunDirLock
from .micro_batches import regroup
from .seeds import micro_seed
from .stopping import PREEMPTED_EXIT, STOPPED_FILE, Preempted, StepAbandoned, StopRequests

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the run


def train(cfg) -> dict:
    """Run ``cfg`` to completion; return (and write) the summary. Launched across several processes (torchrun,
    accelerate launch) every rank calls this and they run one job together (``parallel.ranks``)."""
    started = time.time()
    ranks = start_ranks(cfg.train.device, cfg.train.dist_timeout)
    if ranks.main and (warning := thread_oversubscription(ranks, cfg.train.threads)):
        log.warning(warning)
    lock = RunDirLock(Path(cfg.run.output_dir))  # rank 0 holds it until the run ends, however it ends

    def claim_run_dir() -> tuple[Path, Path | None, list]:
        lock.acquire()
        try:
            return prepare_run_dir(cfg)
        except BaseException:
            lock.release()
            raise

    finished = False  # every rank got to the end together (the run finished, or stopped resumably)
    stops = StopRequests(parse_duration(cfg.run.time_limit) if cfg.run.time_limit is not None else None, started).install()
    watchdog = Watchdog(ranks.rank, store).start() if ranks.several and (store := connect_store()) is not None else None
    try:
        run_dir, resume_from, changes = ranks.from_main(claim_run_dir)  # every rank resumes from the checkpoint rank 0 chose
        torch.manual_seed(cfg.run.seed)
        s = build_session(cfg, ranks)
        if changes and ranks.main:  # the resumed run has started (data checked, models loaded): its changes are real
            record_resume_changes(run_dir, int(resume_from.name.removeprefix(CHECKPOINT_PREFIX)), changes)
        try:
            summary = run_session(s, run_dir, resume_from, started, stops)
            finished = True
            return summary
        except Preempted as stopped:
            finished = True
            if ranks.main:  # for a batch script: stopped resumably (torchrun's own exit status is 1 whatever the ranks')
                (run_dir / STOPPED_FILE).write_text(json.dumps({"reason": stopped.reason, "step": stopped.step,
                                                               "checkpoint": str(stopped.checkpoint) if stopped.checkpoint else None, "exit_status": PREEMPTED_EXIT}))
            raise
        except BaseException as err:
            finished = getattr(err, "raised_together", False)  # every rank raises it at the same point: none is left waiting
            raise
        finally:
            if finished and ranks.several:  # every rank past its last collective: closing an engine inside the
                ranks.barrier()  # process group may end the group (vLLM's external launcher does)
            if s.pipeline is not None:
                s.pipeline.close()
            for sampler in (s.sampler, s.teacher_sampler):
                if sampler is not None:
                    sampler.close()
    except BaseException as err:
        if watchdog is not None and not isinstance(err, Preempted) and not getattr(err, "raised_together", False):
            if (why := watchdog.peer_failure()) is not None:  # a collective broke because another rank failed first
                watchdog.failing = True
                raise PeerFailed(stopped_because(why)) from None
            if isinstance(err, Exception) and not getattr(err, "reported_by_rank0", False):
                report_failure(err, ranks.rank)  # before the others go (their launcher may then end this rank too)
            watchdog.announce(err)  # the other ranks stop now, not at the process group's timeout
        raise
    finally:
        stops.restore()
        if watchdog is not None:
            watchdog.stop()
        try:
            stop_ranks(ranks, finished)
        finally:
            lock.release()


def run_session(s: Session, run_dir: Path, resume_from: Path | None, started: float, stops: StopRequests) -> dict:
    """Train the built session from ``resume_from`` (or the start) to the end; evaluate; save; summarise. ``stops``
    may end it early between two steps, with a checkpoint (``Preempted``)."""
    cfg = s.cfg
    if s.ranks.main:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / STOPPED_FILE).unlink(missing_ok=True)  # this run goes on from where that one stopped
    optimizer, scheduler = build_optimizer(cfg, s.student)
    state = restore(s, optimizer, scheduler, resume_from)
    start_step = state.get("step", 0)
    sync_sampler(s)  # an engine starts from the checkpoint on disk; the student may be a resumed one
    s.pipeline = RolloutPipeline(s, cfg.sampling.max_staleness, cfg.train.steps)
    s.pipeline.engine_version = start_step
    if resume_from is not None:
        s.pipeline.restore(resume_from, start_step)
    trackers = functools.partial(open_trackers, cfg.log.trackers(), run_dir, cfg.run.name, redact(to_dict(cfg)))
    metrics_log = MetricsLog(run_dir, trackers, start_step if resume_from is not None else None, cfg.train.steps) if s.ranks.main else NoMetrics()
    eval_examples = s.task.eval_examples()[: cfg.eval.num_prompts]
    checkpointed = start_step if resume_from is not None else None  # the step the newest checkpoint holds
    with stop_if_service_fails(s, run_dir, start_step, optimizer, scheduler, state, checkpointed), memory_named(s, run_dir, start_step, "evaluation"):
        evaluate_before(s, state, eval_examples, metrics_log)  # (what a resumed run has not evaluated yet)
    checkpointed = run_steps(s, optimizer, scheduler, state, start_step, run_dir, eval_examples, metrics_log, checkpointed, stops)
    if cfg.train.steps and state["no_signal_steps"] + state["nonfinite_skips"] >= cfg.train.steps - start_step > 0:
        log.warning(
            "no step of this run changed the student: every gradient was exactly zero or non-finite "
            "(e.g. GRPO/OVD groups whose samples all got the same reward); the final model is the initial one"
        )
    with stop_if_service_fails(s, run_dir, cfg.train.steps, optimizer, scheduler, state, checkpointed), memory_named(s, run_dir, cfg.train.steps, "evaluation"):
        engine_current(s, cfg.train.steps)
        after = evaluate_session(s, s.sampler, eval_examples, cfg.run.seed)
    metrics_log.write("eval", cfg.train.steps, after)
    metrics_log.close()
    whole = whole_state_dict(s.student)  # every rank (a collective when sharded); None when unsharded
    s.ranks.from_main(lambda: save_final_model(s.student, s.tokenizer, run_dir / "final", whole))
    summary = run_summary(s, state, after, len(eval_examples), started)
    if s.ranks.main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.log.plot:
            from .curves import plot_run

            plot_run(run_dir)
    return summary


def restore(s: Session, optimizer, scheduler, resume_from: Path | None) -> dict:
    """The run's counters: fresh, or restored with the student, optimizer, scheduler, RNG and teacher state from the
    checkpoint ``resume_from`` (then ``step`` is the step it resumes at)."""
    cfg = s.cfg
    micro_batches = cfg.train.grad_accum * s.ranks.world_size
    state = {"nonfinite_skips": 0, "consecutive_nonfinite": 0, "no_signal_steps": 0, "generated_tokens": 0.0, "wall_seconds": 0.0, "phase_seconds": {}}
    if resume_from is not None:
        saved = load_checkpoint(resume_from, s.student, optimizer, scheduler)
        check_micro_batches(cfg, saved.get("micro_batches_per_step", cfg.train.grad_accum), micro_batches, resume_from)
        state.update(saved)
        apply_optimizer_settings(cfg, optimizer, scheduler)
        if s.teacher is not None:
            s.teacher.load_state_tensors(load_extra_tensors(resume_from))
        log.info("resumed from %s at step %d", resume_from, state["step"])
    state["micro_batches_per_step"] = micro_batches
    return state


def evaluate_before(s: Session, state: dict, eval_examples: list, metrics_log) -> None:
    """The teacher's held-out accuracy (once, when asked and there is a teacher to sample) and the student's before
    training — each unless ``state`` (a resumed run's) has it already — and an evaluation a service failure left
    undone (``pending_eval``: the step it belongs to, which the run resumes at)."""
    if s.cfg.eval.teacher and s.teacher_sampler is not None and "teacher_eval" not in state:
        state["teacher_eval"] = evaluate_session(s, s.teacher_sampler, eval_examples, s.cfg.run.seed)
        metrics_log.write("teacher_eval", 0, state["teacher_eval"])
    if "before_eval" not in state:
        state["before_eval"] = evaluate_session(s, s.sampler, eval_examples, s.cfg.run.seed)
        metrics_log.write("eval", 0, state["before_eval"])
    if "pending_eval" in state:
        metrics_log.write("eval", state["pending_eval"], evaluate_session(s, s.sampler, eval_examples, s.cfg.run.seed))
        del state["pending_eval"]


@contextlib.contextmanager
def stop_if_service_fails(s: Session, run_dir: Path, done: int, optimizer, scheduler, state: dict, checkpointed: int | None):
    """Around an evaluation with ``done`` steps behind it: a service that fails in it (raised on every rank together,
    ``Ranks.gather``) stops the run with a checkpoint of those steps, the evaluation left to the resumed run."""
    try:
        yield
    except ServiceError as failure:
        if "before_eval" in state and done < s.cfg.train.steps:
            state["pending_eval"] = done
        stop_for_service(s, run_dir, done, optimizer, scheduler, state, checkpointed, failure)


def stop_for_service(
    s: Session, run_dir: Path, done: int, optimizer, scheduler, state: dict, checkpointed: int | None, failure: Exception,
    weights_changed: bool = False,
) -> None:
    """A service failed with ``done`` steps behind the run, on every rank: a checkpoint of them (unless one exists, or
    the failed step had already changed the weights — then the newest checkpoint stands), then ``Preempted`` for
    an outage (exit status 75: resumable once the service is back; docs/cluster.md) or the service's own error."""
    if done == 0 and checkpointed is None and not isinstance(failure, ServiceOutage):
        raise failure  # a service that fails before anything was trained: nothing to keep
    held = boundary_checkpoint(s, run_dir, done, optimizer, scheduler, state, checkpointed, weights_changed)
    if isinstance(failure, ServiceOutage):
        raise together_as(failure, Preempted(str(failure), held or 0, checkpoint_dir(run_dir, held))) from None
    kept = f"checkpoint {checkpoint_dir(run_dir, held)} holds the {held} steps before it" if held is not None else "no checkpoint holds the steps so far"
    raise together_as(failure, ServiceError(f"{failure}; {kept}: --resume once the service answers")) from None


def boundary_checkpoint(
    s: Session, run_dir: Path, step: int, optimizer, scheduler, state: dict, checkpointed: int | None, weights_changed: bool = False,
) -> int | None:
    """A checkpoint of the step boundary ``step`` for a run that stops there, unless one exists or none can stand for
    it: the step in progress already changed the weights, or the engine samples from older weights until its next
    sync (``sampling.sync_every``), which a resume — starting the engine from the checkpoint — would not reproduce.
    Returns the step the newest checkpoint holds (None: there is none)."""
    if checkpointed != step and not weights_changed and not s.sampler_behind:
        checkpoint(s, run_dir, step, optimizer, scheduler, state)
        return step
    return checkpointed


def checkpoint_dir(run_dir: Path, step: int | None) -> Path | None:
    return run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}" if step is not None else None


def together_as(failure: Exception, error: Exception) -> Exception:
    """``error`` in place of ``failure``, raised on the same ranks in the same way (quiet on all but rank 0)."""
    for mark in ("raised_together", "reported_by_rank0"):
        if getattr(failure, mark, False):
            setattr(error, mark, True)
    return error


def run_steps(
    s: Session, optimizer, scheduler, state: dict, start_step: int, run_dir: Path, eval_examples: list, metrics_log,
    checkpointed: int | None, stops: StopRequests,
) -> int | None:
    """Steps ``start_step`` … ``train.steps`` − 1, each logged, evaluated and checkpointed as configured; before each,
    ``stops`` may end the run there (every rank at the same step), with a checkpoint of it (``Preempted``); a service
    that fails in a step or an evaluation ends it the same way at the step boundary. ``checkpointed``: the step the
    newest checkpoint holds (None: none yet); returns it at the end."""
    cfg = s.cfg
    last_eval = state.get("before_eval", {})
    bar = progress(range(start_step, cfg.train.steps), start_step, cfg.train.steps, cfg.run.name, cfg.log.progress_bar and s.ranks.main)
    segment_start = time.time()
    memory = PeakMemory(s.device)
    try:
        for step in bar:
            if (reason := stops.reason(s.ranks)) is not None:
                state["wall_seconds"] += time.time() - segment_start
                segment_start = time.time()
                held = boundary_checkpoint(s, run_dir, step, optimizer, scheduler, state, checkpointed)
                raise Preempted(reason, held or 0, checkpoint_dir(run_dir, held))
            step_start = time.time()
            memory.reset()
            try:
                with memory_named(s, run_dir, step + 1):
                    metrics, status = train_step(s, optimizer, step)
            except StepAbandoned as abandoned:
                s.timer.pop()
                state["wall_seconds"] += time.time() - segment_start
                segment_start = time.time()
                stop_for_service(s, run_dir, step, optimizer, scheduler, state, checkpointed, abandoned.failure, abandoned.weights_changed)
            if (peak := memory.peak_mb()) is not None:
                metrics["peak_memory_mb"] = peak
            with warnings.catch_warnings():  # a skipped update still advances the schedule
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                scheduler.step()
            count_step(s, state, metrics, status, step)
            metrics.update(lr=scheduler.get_last_lr()[0], step_seconds=time.time() - step_start, skipped=float(status != "applied"), generated_tokens=state["generated_tokens"])
            done = step + 1
            metrics_log.write("train", done, metrics)  # the step that stops the run gets its row too
            if s.sync_failure is not None:  # the engine did not take this step's weights: stop here, checkpointed
                failure, s.sync_failure = s.sync_failure, None
                state["wall_seconds"] += time.time() - segment_start
                segment_start = time.time()
                stop_for_service(s, run_dir, done, optimizer, scheduler, state, checkpointed, failure)
            if state["consecutive_nonfinite"] >= cfg.train.max_consecutive_nonfinite:
                raise TrainingError(
                    f"{state['consecutive_nonfinite']} steps in a row had a non-finite loss or gradient "
                    f"(last at step {done}); lower train.lr or check the teacher's outputs"
                )
            if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.steps:
                with stop_if_service_fails(s, run_dir, done, optimizer, scheduler, state, checkpointed), memory_named(s, run_dir, done, "evaluation"):
                    engine_current(s, done)
                    last_eval = evaluate_session(s, s.sampler, eval_examples, cfg.run.seed)
                metrics_log.write("eval", done, last_eval)
            bar.set_postfix(_postfix(metrics, last_eval))
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or (cfg.checkpoint.at_end and done == cfg.train.steps):
                state["wall_seconds"] += time.time() - segment_start
                segment_start = time.time()
                with memory_named(s, run_dir, done, "checkpoint"):
                    checkpoint(s, run_dir, done, optimizer, scheduler, state)
                checkpointed = done
                stops.longest_checkpoint_s = max(stops.longest_checkpoint_s, time.time() - segment_start)
            stops.longest_step_s = max(stops.longest_step_s, time.time() - step_start)
    finally:
        bar.close()
    state["wall_seconds"] += time.time() - segment_start
    return checkpointed


@contextlib.contextmanager
def memory_named(s: Session, run_dir: Path, step: int, phase: str | None = None):
    """An out-of-memory error inside (CUDA or host) as one line (``errors.out_of_memory``) naming ``phase`` (by default
    the step's phase it happened in, ``PhaseTimer.failed_in``), step ``step`` and the newest checkpoint, which it
    leaves intact."""
    try:
        yield
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        newest = list_checkpoints(run_dir)[-1:]
        raise together_as(err, out_of_memory(err, phase or s.timer.failed_in or "student", step, newest[0].name if newest else None)) from None


def count_step(s: Session, state: dict, metrics: dict, status: str, step: int) -> None:
    """The run's counters after a step with ``status``; the step's time per phase into its metrics and the totals."""
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


def checkpoint(s: Session, run_dir: Path, done: int, optimizer, scheduler, state: dict) -> None:
    """The checkpoint after ``done`` steps, written by rank 0 (a sharded student's tensors gathered from every rank)."""
    whole = full_state(s.student, optimizer)  # every rank: a sharded student's tensors are gathered to rank 0
    ahead = s.pipeline.gather() if s.pipeline is not None else None  # every rank: the rows of the steps ahead (a lag)
    s.ranks.from_main(lambda: save_checkpoint(
        run_dir, done, s.student, s.tokenizer, optimizer, scheduler, state, s.cfg.checkpoint.keep_last, teacher_tensors(s), whole,
        (lambda directory: RolloutPipeline.write(ahead, directory)) if ahead else None,
    ))


def run_summary(s: Session, state: dict, after: dict, evaluated: int, started: float) -> dict:
    """What ``summary.json`` (and ``opd train``) reports of the finished run."""
    cfg = s.cfg
    return {
        "method": cfg.method.name,
        "task": cfg.task.name,
        "teacher_accuracy": state.get("teacher_eval", {}).get("accuracy"),
        "student_accuracy_before": state.get("before_eval", {}).get("accuracy"),
        "student_accuracy_after": after.get("accuracy"),  # None for prompt-only eval data (nothing to grade)
        **user_reward_summary(s, state, after),
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
        "eval_set": {**s.task.describe_eval(), "evaluated": evaluated},
        "data_checks": s.data_report,
    }


def user_reward_summary(s: Session, state: dict, after: dict) -> dict:
    """With the user's reward functions (``task.reward_function``): the mean rewards before and after training (and
    the teacher's), and how many calls raised and scored 0; nothing otherwise."""
    errors = reward_errors(s.task)
    if errors is None:
        return {}
    return {
        "teacher_reward": state.get("teacher_eval", {}).get("reward"), "student_reward_before": state.get("before_eval", {}).get("reward"),
        "student_reward_after": after.get("reward"), "reward_errors": int(s.ranks.sum(errors)),
    }


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


# ----------------------------------------------------------------------------- one step


def train_step(s: Session, optimizer, step: int) -> tuple[dict[str, float], str]:
    """One training step: sample ``grad_accum`` micro-batches (regrouped by ``train.micro_batch_tokens`` where set:
    ``training.micro_batches``), then ``train.updates_per_batch`` optimizer updates on them (the policy-gradient
    ratio against the log-probs from before the first). Returns (metrics, status).

    status is ``applied``; ``nonfinite`` (a non-finite loss or gradient: no update); or
    ``no_signal`` (every gradient exactly zero, e.g. a GRPO/OVD batch whose groups all got
    the same reward: no update, since Adam would otherwise keep moving on stale momentum).
    """
    cfg, ranks = s.cfg, s.ranks
    optimizer.zero_grad(set_to_none=True)
    taken = s.pipeline.take(step)  # sampled now, or (sampling.max_staleness) generated ahead while earlier steps trained
    abandon_if_failed(s, taken.failure)
    batches = taken.rows.batches
    data_tally = tally(batch_metrics(b) for b in batches)  # what the sampled micro-batches hold, whatever trains them
    if cfg.train.micro_batch_tokens is not None:
        batches = training_micro_batches(s, batches, step, ranks.rank * cfg.train.grad_accum)
    if cfg.train.updates_per_batch > 1:  # the ratio's denominator: the policy that made the batch, before any update
        with s.timer.phase("student"):
            for batch in batches:
                with batch.rng(0):
                    batch.old_logp_BC = logprobs_before_updates(s, batch)
    totals, status = {}, "no_signal"
    for update in range(cfg.train.updates_per_batch):
        metrics, update_status = optimizer_update(s, optimizer, batches, step, update, data_tally if update == 0 else None)
        if update == 0:
            totals = metrics
        elif "clip_fraction" in metrics:  # the clip only binds from the second update on
            totals["clip_fraction_last"] = metrics["clip_fraction"]
        if update_status == "nonfinite":
            failure, s.service_failure = s.service_failure, None
            abandon_if_failed(s, failure, weights_changed=status == "applied")
            status = "nonfinite"
            break
        if update_status == "applied":
            status = "applied"
    totals.update(lag_metrics(step, taken) if s.pipeline.lag else {})
    if status == "applied" and not s.pipeline.lag:  # (with a lag the pipeline pushes, at the next step's start)
        s.sampler_behind = True
    if s.sampler_behind and (step + 1) % cfg.sampling.sync_every == 0:
        try:
            sync_sampler(s)
        except ServiceError as err:  # (on every rank) the step is done; the run stops at its boundary
            s.sync_failure = err
    return totals, status


def lag_metrics(step: int, taken) -> dict[str, float]:
    """With ``sampling.max_staleness``: the rows' lag in steps, the seconds the trainer waited for them, and the share
    of their generation hidden behind training (``overlap``; not for rows a resumed run took from its checkpoint)."""
    metrics = {"lag": float(step - taken.rows.version), "time/rollout_wait": taken.wait_s}
    if taken.generate_s:
        metrics.update({"time/generate": taken.generate_s, "overlap": max(0.0, 1.0 - taken.wait_s / taken.generate_s)})
    return metrics


def engine_current(s: Session, done: int) -> None:
    """Before an evaluation after ``done`` steps: the engine samples from the student's current weights (with a lag,
    once the generation in flight is done)."""
    if s.pipeline.lag:
        s.pipeline.settle(done)
    elif s.sampler_behind:
        sync_sampler(s)


def abandon_if_failed(s: Session, failure: Exception | None, weights_changed: bool = False) -> None:
    """Give the step up on every rank when a service failed on any (``StepAbandoned``, the lowest failing rank's
    error); nothing when none did. A collective: every rank calls it at the same point of the step."""
    try:
        s.ranks.raise_together(failure)
    except (ServiceError, JudgeError) as agreed:
        raise StepAbandoned(agreed, weights_changed) from None


def service_failed(s: Session) -> bool:
    """Whether a remote teacher or reference failed in this step (its rows scored NaN: ``Teacher.take_failure``); the
    first failure is kept in ``s.service_failure`` for the step's end."""
    for teacher in (s.teacher, s.reference):
        failure = teacher.take_failure() if teacher is not None else None
        if failure is not None and s.service_failure is None:
            s.service_failure = failure
    return s.service_failure is not None


def training_micro_batches(s: Session, sampled: list[Batch], step: int, first_micro: int) -> list[Batch]:
    """The step's rows regrouped into micro-batches under ``train.micro_batch_tokens`` (``training.micro_batches``),
    each with its own seed for its forward passes (a function of the run's seed, the step and its place in the
    step's plan)."""
    with s.timer.phase("sample"):
        planned = regroup(s, sampled, first_micro)
    for index, batch in planned:
        batch.seed = micro_seed(s.cfg.run.seed, step, REGROUPED_SEEDS + (index if index >= 0 else PADDING_SEED))
    return [batch for _, batch in planned]


REGROUPED_SEEDS, PADDING_SEED = 1 << 16, 1 << 15  # micro_seed salts of the regrouped micro-batches, apart from the sampled


def tally(metrics: Iterable[dict[str, float]]) -> tuple[dict[str, float], dict[str, int]]:
    """Each key's sum over the given metric dicts, and how many reported it."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for m in metrics:
        for key, value in m.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return sums, counts


def sync_sampler(s: Session) -> None:
    """Sample from the student's current weights from now on (an engine gets them pushed; opd's own sampler has them).
    A push that fails (an engine server that stopped answering) is raised; the sampler then counts as up to date,
    since a checkpoint of this moment is what a resumed run's engine starts from — what the push would have given."""
    try:
        with s.timer.phase("sync"):
            s.sampler.update_weights(s.student)
    finally:
        s.sampler_behind = False


def optimizer_update(
    s: Session, optimizer, batches: list[Batch], step: int, update: int = 0, data_tally: tuple[dict, dict] | None = None,
) -> tuple[dict[str, float], str]:
    """Gradients of the step's loss on ``batches`` (summed over ranks), clipped, then one optimizer update (and the
    teacher's hook). ``data_tally``: the sampled micro-batches' own metrics (``tally``), reported with these."""
    cfg = s.cfg
    optimizer.zero_grad(set_to_none=True)
    sums, counts, finite = accumulate_gradients(s, batches, step, update)
    for key, value in (data_tally[0].items() if data_tally else ()):
        sums[key] = sums.get(key, 0.0) + value
        counts[key] = counts.get(key, 0) + data_tally[1][key]
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


def logprobs_before_updates(s: Session, batch: Batch) -> torch.Tensor:
    """The batch's sampled-token log-probs under the student as it is now (before this step's updates), no gradient."""
    with torch.no_grad():
        return student_token_logprobs(s, batch.rollouts)[0]


# parts of a step total (each micro-batch's share under the step's normaliser, or a count); every other metric is
# averaged over the micro-batches that report it
SUMMED_METRICS = ("loss", "jsd", "kl_ref", "student_tokens", "micro_batches")


def accumulate_gradients(s: Session, batches: list[Batch], step: int, update: int = 0) -> tuple[dict[str, float], dict[str, int], bool]:
    """Backpropagate the step's loss over its micro-batches into the student's ``.grad``; ``(sums, counts, finite)``:
    each loss metric summed over the micro-batches that report it, and how many did (``Ranks.merge_metrics`` makes
    the step's metrics of them: the ``SUMMED_METRICS`` totals, every other one the mean over its micro-batches),
    with ``Method.prepare_step``'s metrics counted once. Padding passes run (their backward is a collective of
    a sharded student) but count nowhere.

    Every micro-batch is weighted by one normaliser taken over the whole step, on every rank (its
    token count, sequence count or rows × tokens per row), so the accumulated gradient — summed over
    ranks — is that of the one big batch, whatever ``grad_accum`` and the number of ranks are. A
    method may first choose its tokens over the whole step (``Method.prepare_step``). Stops at the
    first micro-batch with a non-finite loss.
    """
    method = s.method
    step_metrics: dict[str, float] = {}
    if update == 0 or not all(b.prepared for b in batches):  # once per step (on every rank: it may gather), not per update
        with s.timer.phase("student"):
            step_metrics = method.prepare_step(s, batches, step) or {}
        for batch in batches:
            batch.prepared = True
    real = [b.trained_mask_BC for b in batches if not b.padding_pass]
    normaliser = step_normaliser(real, method.reduction(), method.tokens_per_row(), total=s.ranks.sum)
    sums, counts = tally([step_metrics])
    if s.cfg.train.micro_batch_tokens is not None:  # how many passes the budget made of the step (summed over ranks)
        sums["micro_batches"], counts["micro_batches"] = float(len(real)), 1
    finite = True
    sharded = is_sharded(s.student)
    for batch in batches:
        batch.normaliser = normaliser
        with s.timer.phase("student"), batch.rng(1 + update):
            loss, metrics = method.loss(s, batch, step)
            failed = service_failed(s)  # (asked first: a failed service's NaN makes the loss non-finite too)
            finite = bool(torch.isfinite(loss)) and not failed
            if sharded:  # a sharded backward is a collective: every rank runs it, or none
                finite = s.ranks.all(finite)
                if not finite:  # no backward will reshard the root group its forward gathered
                    s.student.reshard()
            if finite:
                loss.backward()
        if not batch.padding_pass:
            metrics["loss"] = float(loss.detach())
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
        if not finite:
            break
    return sums, counts, finite

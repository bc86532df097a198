"""``opd inspect RUN --step N``: an HTML page showing, token by token, what the method's loss said about a few of
the student's completions at step N of a run.

The session is built from the run's saved config (its teacher, reference and self-teacher as the run had them),
then the student's weights after N steps are loaded into it (step 0: the initial ones; a kept checkpoint, with an
EMA teacher's state; the final model); the prompts are those the run drew for step N + 1 (the data RNG is a function of the seed and the step), sampled
afresh by that student. Each sampled token is coloured by the advantage the loss trained it with (green raises its
probability, red lowers it) — the teacher–student log-ratio ℓ^T − ℓ^S for a full-vocabulary loss, which has no
per-token advantage — with the numbers on hover. Tokens the loss skipped (REOPOLD's filtered ones) are struck
through, observation tokens of a tool episode are grey, and each row says where it came from (OVD: accepted or
replaced by the teacher).
"""

from __future__ import annotations

import html
from pathlib import Path

import torch

from ..config.loading import load_saved_config
from ..config.sections import ConfigError
from ..methods import token_views
from ..methods.base import Session
from ..methods.data import privileged_view
from ..models.scoring import rollout_logprobs
from ..training.assembly import build_session
from ..training.checkpoints import CHECKPOINT_PREFIX, load_extra_tensors, load_trainable
from ..training.seeds import step_generators


def available_steps(run_dir: Path, total: int) -> dict[int, Path | None]:
    """Step -> where the student's weights after that step are: a checkpoint directory (its trainable tensors and
    teacher state), the final model (``final/``, when no checkpoint was kept at the last step), or None for step 0
    (the config's own student)."""
    steps: dict[int, Path | None] = {0: None}
    for ckpt in sorted((run_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*")):
        if (ckpt / "trainable.safetensors").is_file():
            steps[int(ckpt.name.removeprefix(CHECKPOINT_PREFIX))] = ckpt
    if (run_dir / "final" / "config.json").is_file() and total not in steps:
        steps[total] = run_dir / "final"
    return steps


def load_student_at(s: Session, source: Path, run_dir: Path) -> None:
    """Put the run's student weights after the chosen step into the session built from the run's own config (so
    its teacher, reference and self-teacher are the run's, not rebuilt from the checkpoint); an EMA teacher gets its
    checkpointed state too."""
    if source.name == "final":
        if s.cfg.student.lora.enabled:
            raise ConfigError(f"{run_dir}: a LoRA run's last step needs its checkpoint (checkpoint.at_end); final/ holds the merged model")
        from transformers import AutoModelForCausalLM

        s.student.load_state_dict(AutoModelForCausalLM.from_pretrained(source).state_dict())
    else:
        load_trainable(source, s.student)
        if s.teacher is not None and (state := load_extra_tensors(source)):
            s.teacher.load_state_tensors(state)
    s.sampler.update_weights(s.student)


def _colour(value: float, scale: float) -> str:
    x = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    return f"rgba(0, 160, 0, {abs(x):.2f})" if x >= 0 else f"rgba(220, 0, 0, {abs(x):.2f})"


def token_rows(s: Session, step: int, rows: int):
    """``(rollouts, values_BC, trained_BC, teacher_BC, student_BC, notes, what)`` of the first ``rows`` completions of
    step ``step + 1``'s first micro-batch (the whole micro-batch goes through the method, so a selection made over
    the step — REOPOLD's — is the one training made) under the session's student."""
    cfg = s.cfg
    rng, generator = step_generators(cfg.run.seed, step, s.device)
    examples = s.task.sample_train(cfg.train.prompts_per_step, rng)
    examples = examples[: max(1, len(examples) // cfg.train.grad_accum)]
    batch = s.method.data(s, examples, rng, generator)
    with token_views.recording() as views, torch.no_grad():
        s.method.prepare_step(s, [batch], step)
        s.method.loss(s, batch, step)
    r = batch.rollouts
    if views:
        v = views[-1]
        values, trained, teacher, student, what = v.advantages_BC, v.train_mask_BC, v.teacher_logp_BC, v.logp_BC, "advantage"
    else:  # a full-vocabulary loss: no per-token advantage; the sampled tokens' log-ratio at the loss's temperature
        _, tau = s.method.loss_temperature(cfg)
        view = privileged_view(s, batch) if s.method.needs(cfg).privileged else r
        with torch.no_grad():
            student, _ = rollout_logprobs(s.student, r, tau)
            teacher = s.teacher.token_logprobs(view, tau) if s.teacher is not None else None
        student = student.float().cpu()
        teacher = teacher.float().cpu() if teacher is not None else None
        values = teacher - student if teacher is not None else torch.zeros_like(student)
        trained, what = r.loss_mask_BC.float().cpu(), f"teacher − student log-ratio at τ = {tau:g} (ℓ^T − ℓ^S)"
    for scorer in (s.teacher, s.reference):  # a served teacher that failed scored NaN instead of raising
        if scorer is not None and (failure := scorer.take_failure()) is not None:
            raise failure
    n = min(rows, r.batch_size)
    notes = batch.row_notes or [None if batch.on_policy else "not the student's sample: this step's batch is off-policy (reference solutions or teacher samples)"] * r.batch_size
    return r, values[:n], trained[:n], None if teacher is None else teacher[:n], None if student is None else student[:n], notes[:n], what


def render(s: Session, step: int, rows: int) -> str:
    r, values, trained, teacher, student, notes, what = token_rows(s, step, rows)
    mask = r.completion_mask_BC.cpu()
    agent = r.loss_mask_BC.cpu()
    shown = values[mask[: values.shape[0]].bool()].abs()
    scale = float(torch.quantile(shown, 0.95)) if shown.numel() else 1.0
    parts = [
        "<!doctype html><meta charset='utf-8'><title>opd inspect</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}pre{white-space:pre-wrap;font-family:monospace;"
        "line-height:1.7}.obs{color:#999}.skip{text-decoration:line-through;opacity:.5}.prompt{color:#555}</style>",
        f"<h1>{html.escape(s.cfg.run.name)} — step {step}</h1>",
        f"<p>method <b>{html.escape(s.cfg.method.name)}</b>; colour: {html.escape(what)} (green raises the token's probability, "
        f"red lowers it; full colour at |value| ≥ {scale:.3g}, the 95th percentile). Struck through: sampled but not trained. "
        "Grey: observations (tool results). Hover a token for its numbers.</p>",
    ]
    tok = s.tokenizer
    for b in range(values.shape[0]):
        prompt = tok.decode(r.prompt_ids_BP[b][r.prompt_mask_BP[b].bool()].tolist())
        line = [f"<h3>row {b}" + (f" — {html.escape(notes[b])}" if notes[b] else "") + "</h3><pre><span class='prompt'>" + html.escape(prompt) + "</span>"]
        for c in range(int(mask[b].sum())):
            text = html.escape(tok.decode([int(r.completion_ids_BC[b, c])]))
            if not agent[b, c]:
                line.append(f"<span class='obs'>{text}</span>")
                continue
            numbers = [f"{what.split(' (')[0]} {float(values[b, c]):+.3f}"]
            if teacher is not None:
                numbers.append(f"ℓT {float(teacher[b, c]):.3f}")
            if student is not None:
                numbers.append(f"ℓS {float(student[b, c]):.3f}")
            cls = "" if trained[b, c] else " class='skip'"
            line.append(f"<span{cls} style='background:{_colour(float(values[b, c]), scale)}' title='{html.escape(', '.join(numbers))}'>{text}</span>")
        parts.append("".join(line) + "</pre>")
    return "\n".join(parts) + "\n"


def inspect_run(run_dir: str | Path, step: int | None = None, rows: int = 4, out: str | Path | None = None, overrides: list[str] = ()) -> Path:
    """Write the page for ``step`` of the run in ``run_dir`` (default: its last step); return its path."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_saved_config(run_dir / "config.yaml", list(overrides))
    steps = available_steps(run_dir, cfg.train.steps)
    step = max(steps) if step is None else step
    if step not in steps:
        raise ConfigError(f"--step {step}: {run_dir} has the student at steps {', '.join(map(str, sorted(steps)))} only "
                          "(checkpoint.every decides which steps a run keeps)")
    s = build_session(cfg)
    if steps[step] is not None:
        load_student_at(s, steps[step], run_dir)
    page = Path(out) if out else run_dir / f"inspect-step{step}.html"
    page.write_text(render(s, step, rows))
    return page

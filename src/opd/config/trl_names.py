"""TRL's argument names and the opd keys that do their work: what ``unknown config key`` suggests when a user
writes a TRL name (``train.learning_rate``, ``save_steps``), and the migration table of docs/from_trl.md (a test
keeps the two equal and checks that every key named here exists).

Each entry: TRL's name -> (the opd key or keys, a note; empty when the key means the same).
"""

from __future__ import annotations

TRL_NAMES: dict[str, tuple[str, str]] = {
    "model_name_or_path": ("student.path", "a local directory, world:student, or a repo id in the Hugging Face cache"),
    "teacher_model_name_or_path": ("teacher.path", ""),
    "teacher_tokenizer_name_or_path": ("teacher.tokenizer", "teacher.tokenizer=own: the teacher's own tokenizer, read from teacher.path (GOLD's cross-tokenizer case)"),
    "uld_use_hybrid_loss": ("method.gkd.cross_vocab", "hybrid: GOLD's exact match + ULD (with teacher.tokenizer=own); the default, projection, maps the teacher's distribution onto the student's vocabulary"),
    "uld_hybrid_matched_weight": ("method.gkd.hybrid_matched_weight", ""),
    "uld_hybrid_unmatched_weight": ("method.gkd.hybrid_unmatched_weight", ""),
    "dataset_name": ("task.path", "a file, a save_to_disk directory, or a dataset in the local datasets cache"),
    "output_dir": ("run.output_dir", ""),
    "seed": ("run.seed", ""),
    "resume_from_checkpoint": ("run.resume", "true resumes from the newest checkpoint in run.output_dir"),
    "learning_rate": ("train.lr", ""),
    "weight_decay": ("train.weight_decay", ""),
    "max_grad_norm": ("train.grad_clip", ""),
    "warmup_steps": ("train.warmup_steps", ""),
    "lr_scheduler_type": ("train.schedule", "constant or cosine"),
    "max_steps": ("train.steps", "optimizer steps"),
    "num_train_epochs": ("train.steps", "opd counts optimizer steps, each of train.prompts_per_step prompts"),
    "per_device_train_batch_size": ("train.prompts_per_step", "prompts per optimizer step over all ranks and micro-batches"),
    "gradient_accumulation_steps": ("train.grad_accum", "micro-batches per rank per step"),
    "gradient_checkpointing": ("train.gradient_checkpointing", ""),
    "bf16": ("train.precision", "train.precision=bf16"),
    "fp16": ("train.precision", "bf16 or fp32; float16 weights only with LoRA (student.dtype)"),
    "save_steps": ("checkpoint.every", ""),
    "save_total_limit": ("checkpoint.keep_last", ""),
    "eval_steps": ("eval.every", ""),
    "logging_steps": ("log.progress_bar", "every step is logged to metrics.jsonl and TensorBoard"),
    "report_to": ("log.report_to", "a list of tensorboard, wandb, mlflow (TensorBoard alone by default)"),
    "max_completion_length": ("sampling.max_new_tokens", ""),
    "max_new_tokens": ("sampling.max_new_tokens", ""),
    "num_generations": ("sampling.samples_per_prompt", ""),
    "temperature": ("sampling.temperature", ""),
    "top_p": ("sampling.top_p", ""),
    "top_k": ("sampling.top_k", ""),
    "use_vllm": ("sampling.engine", "sampling.engine=vllm"),
    "vllm_gpu_memory_utilization": ("sampling.vllm.gpu_memory_utilization", ""),
    "vllm_tensor_parallel_size": ("sampling.vllm.tensor_parallel_size", ""),
    "vllm_enable_sleep_mode": ("sampling.vllm.sleep", ""),
    "lmbda": ("method.gkd.lambda_onpolicy", "the share of on-policy (student-sampled) micro-batches"),
    "beta": ("method.gkd.beta", "GKD's generalised JSD interpolation"),
    "seq_kd": ("method.gkd.seq_kd", ""),
    "use_peft": ("student.lora.enabled", ""),
    "lora_r": ("student.lora.r", ""),
    "lora_alpha": ("student.lora.alpha", ""),
    "lora_dropout": ("student.lora.dropout", ""),
    "lora_target_modules": ("student.lora.target_modules", ""),
    "torch_dtype": ("student.dtype", "and teacher.dtype"),
    "attn_implementation": ("student.attn_implementation", "and teacher.attn_implementation"),
    "chat_template_path": ("student.chat_template", "a .jinja file, or the template's text"),
}


def trl_hint(name: str) -> str | None:
    """The suggestion for a key whose last part is a TRL argument name: ``"'train.lr' (TRL's learning_rate)"``."""
    entry = TRL_NAMES.get(name.rsplit(".", 1)[-1])
    if entry is None:
        return None
    key, note = entry
    return f"'{key}' (TRL's {name.rsplit('.', 1)[-1]}{': ' + note if note else ''})"

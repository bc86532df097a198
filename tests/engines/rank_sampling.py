"""Run by ``test_vllm_ranks.py`` under ``torchrun`` (or alone, as the one-process reference): each rank builds the
vLLM sampler as a training run does, samples its share of three micro-batches (rank 0 asks twice, rank 1 once, as
GKD's per-micro-batch coin or an episode's turns can make them), takes a weight push of a perturbed student, and
samples its share again. Writes ``{micro: [completion ids, log-probs]}`` per rank as JSON.

    python rank_sampling.py OUT TENSOR_PARALLEL_SIZE
"""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

from opd.config.sections import SamplingConfig  # noqa: E402
from opd.engines.base import sampling_round  # noqa: E402
from opd.engines.vllm import VLLMConfig, VLLMSampler  # noqa: E402
from opd.models.loading import eos_token_ids, load_model, load_tokenizer, resolve_path  # noqa: E402
from opd.parallel.ranks import start_ranks, stop_ranks  # noqa: E402
from opd.tasks.arithmetic import make_example  # noqa: E402
from opd.training.seeds import step_generators  # noqa: E402

SHARES = {0: [0, 2], 1: [1]}  # micro-batches per rank of 2; one process takes all three


def prompts(tokenizer, micro: int) -> list[list[int]]:
    import random

    rng = random.Random(micro)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": make_example(rng.randint(100, 999), rng.randint(100, 999)).prompt}],
                                      add_generation_prompt=True, tokenize=False)
        for _ in range(3 + micro)  # micro-batches of different sizes
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def perturbed(student: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return student


def main(out: str, tensor_parallel_size: int) -> None:
    torch.set_num_threads(1)
    ranks = start_ranks("cpu", 300)
    tokenizer = load_tokenizer("world:student")
    student = load_model("world:student", "student.path")
    path = resolve_path("world:student", "student.path")
    sampler = VLLMSampler(path, tokenizer, eos_token_ids(student, tokenizer), VLLMConfig(tensor_parallel_size=tensor_parallel_size),
                          "float32", 0, torch.device("cpu"), 128)
    params = SamplingConfig(temperature=1.0, max_new_tokens=12)
    share = SHARES[ranks.rank] if ranks.several else [0, 1, 2]
    results = {}
    for phase in ("before", "after"):
        if phase == "after":
            sampler.update_weights(perturbed(student))
        with sampling_round(sampler):
            for micro in share:
                r = sampler.sample(prompts(tokenizer, micro), params, step_generators(0, 3, torch.device("cpu"), micro)[1])
                lengths = r.completion_lengths_B.tolist()
                results[f"{phase}-{micro}"] = [
                    [r.completion_ids_BC[i, :n].tolist(), r.sampler_logp_BC[i, :n].tolist()] for i, n in enumerate(lengths)
                ]
    with open(os.path.join(out, f"rank{ranks.rank}.json"), "w") as f:
        json.dump(results, f)
    ranks.barrier()
    sampler.close()
    stop_ranks(ranks, True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

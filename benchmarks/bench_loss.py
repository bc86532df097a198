"""Full-vocabulary distillation loss, forward + backward: opd's fused chunked divergence vs a materialised baseline.

    python benchmarks/bench_loss.py                       # V ∈ {32768, 151936}, T ∈ {1024, 4096}, hidden 1024
    python benchmarks/bench_loss.py --vocab 151936 --tokens 1024 --impls opd materialised

Each (implementation, V, T) runs in a fresh subprocess so its peak memory is its own: the
figure is the resident high-water mark during the call minus the resident memory before it
(inputs and weights excluded; the gradients it returns included). The loss is GKD's
generalised JSD (β = 0.5, τ = 0.9), token mean over T positions of one sequence, float32
(``--dtype bfloat16`` for GPUs). Implementations:

- ``materialised``: the plain formula (the one TRL's GKD trainer writes): full ``[T, V]``
  logits for both models, log-softmax, mixture by logsumexp, ``kl_div``; autograd backward.
- ``opd``: ``opd.objectives.fused.fused_divergence`` (default chunk: about 2^25 logits).
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (its PyTorch path, ``compiled=False``,
  default chunk 1024), if installed.
- ``trl_chunked``: TRL's ``ChunkedDivergenceFunction`` (vocabulary tiles, recomputed in
  backward), if installed.

Every row's loss and gradients are compared with the materialised baseline's (relative
error); the summary prints opd's peak-memory and time ratios against each other row measured
in the same run. The materialised baseline is skipped where it would not fit in memory.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import available_bytes, gib, machine, measure  # noqa: E402

BETA, TEMPERATURE = 0.5, 0.9
IMPLS = ("opd", "materialised", "liger", "trl_chunked")
# The materialised baseline keeps about this many [T, V] float32 buffers alive at its peak
# (logits, log-probs, mixture, stacked logsumexp input, kl terms, their gradients); measured ~19 here.
MATERIALISED_BUFFERS = 20


def make_inputs(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    student_hidden = randn(tokens, hidden).requires_grad_()
    student_weight = randn(vocab, hidden, scale=2 / math.sqrt(hidden)).requires_grad_()
    teacher_hidden = randn(tokens, hidden)
    teacher_weight = randn(vocab, hidden, scale=2 / math.sqrt(hidden))
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def loss_materialised(h, w, th, tw):
    student_logp = torch.log_softmax(h @ w.T / TEMPERATURE, dim=-1, dtype=torch.float32)
    with torch.no_grad():
        teacher_logp = torch.log_softmax(th @ tw.T / TEMPERATURE, dim=-1, dtype=torch.float32)
    mixture = torch.logsumexp(torch.stack([student_logp + math.log(1 - BETA), teacher_logp + math.log(BETA)]), dim=0)
    kl_teacher = torch.nn.functional.kl_div(mixture, teacher_logp, reduction="none", log_target=True)
    kl_student = torch.nn.functional.kl_div(mixture, student_logp, reduction="none", log_target=True)
    return (BETA * kl_teacher + (1 - BETA) * kl_student).sum() / h.shape[0]


def loss_opd(h, w, th, tw):
    from opd.objectives.fused import DenseTeacher, OutputHead, fused_divergence

    weight_N = torch.full((h.shape[0],), 1.0 / h.shape[0], device=h.device)
    teacher = DenseTeacher.from_hidden(th, lambda x: (x @ tw.T).float())
    return fused_divergence(h, OutputHead(w), teacher, weight_N, BETA, TEMPERATURE).loss


def loss_liger(h, w, th, tw):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, temperature=TEMPERATURE, compiled=False)
    labels = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
    return loss_fn(h, w, th, tw, labels)


def loss_trl_chunked(h, w, th, tw):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    per_token, _entropy = ChunkedDivergenceFunction.apply(h, w, None, th, tw, None, BETA, TEMPERATURE)
    return per_token.mean()


LOSSES = {"materialised": loss_materialised, "opd": loss_opd, "liger": loss_liger, "trl_chunked": loss_trl_chunked}


def worker(impl: str, tokens: int, vocab: int, hidden: int, dtype: str, out: Path) -> None:
    """Run one implementation once (after a small warm-up) and save its timing, memory and results."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_t = getattr(torch, dtype)
    loss_fn = LOSSES[impl]
    warm = make_inputs(64, 512, 64, dtype_t, device, seed=1)
    loss_fn(*warm).backward()
    del warm
    h, w, th, tw = make_inputs(tokens, vocab, hidden, dtype_t, device)
    with measure(device) as stats:
        loss = loss_fn(h, w, th, tw)
        loss.backward()
    torch.save({"loss": loss.detach().double().cpu(), "grad_h": h.grad.double().cpu(), "grad_w": w.grad.float().cpu()}, out)
    print(json.dumps(stats))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def run_case(impl: str, tokens: int, vocab: int, hidden: int, dtype: str, tmp: Path) -> dict:
    out = tmp / f"{impl}-{vocab}-{tokens}.pt"
    cmd = [sys.executable, __file__, "--worker", impl, "--tokens", str(tokens), "--vocab", str(vocab), "--hidden", str(hidden), "--dtype", dtype, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"impl": impl, "error": last}
    return {"impl": impl, **json.loads(proc.stdout.strip().splitlines()[-1]), "result": out}


def available(impl: str) -> bool:
    module = {"liger": "liger_kernel", "trl_chunked": "trl"}.get(impl)
    if module is None:
        return True
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 151936])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--json", type=Path, help="also write every row here")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.tokens[0], args.vocab[0], args.hidden, args.dtype, args.out)
        return

    print(f"# fused divergence benchmark — {machine()}")
    print(f"# JSD β={BETA} τ={TEMPERATURE}, hidden {args.hidden}, {args.dtype}, forward + backward, one sequence of T tokens\n")
    print("| V | T | impl | peak | time | loss rel. err | grad_h rel. err | grad_W rel. err | opd peak ratio | opd time ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    elem = 2 if args.dtype == "bfloat16" else 4
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for vocab in args.vocab:
            for tokens in args.tokens:
                results = {}
                for impl in args.impls:
                    if not available(impl):
                        results[impl] = {"impl": impl, "error": "not installed"}
                        continue
                    if impl == "materialised":
                        need = MATERIALISED_BUFFERS * tokens * vocab * 4 + 2 * vocab * args.hidden * elem
                        if need > 0.85 * available_bytes():
                            results[impl] = {"impl": impl, "error": f"skipped: needs ~{gib(need)}, {gib(available_bytes())} available"}
                            continue
                    results[impl] = run_case(impl, tokens, vocab, args.hidden, args.dtype, tmp)
                reference = results.get("materialised")
                reference_data = torch.load(reference["result"]) if reference and "result" in reference else None
                opd = results.get("opd", {})
                for impl, r in results.items():
                    row = {"vocab": vocab, "tokens": tokens, **{k: v for k, v in r.items() if k != "result"}}
                    if "result" in r and reference_data is not None:
                        data = torch.load(r["result"])
                        for key in ("loss", "grad_h", "grad_w"):
                            row[f"{key}_rel_err"] = relative_error(data[key], reference_data[key])
                    if "peak_bytes" in r and "peak_bytes" in opd and impl != "opd":
                        if r["peak_bytes"] > 0:  # toy sizes can fit in memory the process already holds
                            row["opd_peak_ratio"] = opd["peak_bytes"] / r["peak_bytes"]
                        row["opd_time_ratio"] = opd["seconds"] / r["seconds"]
                    rows.append(row)
                    print(_format(row), flush=True)
                for r in results.values():
                    if "result" in r:
                        Path(r["result"]).unlink(missing_ok=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _format(row: dict) -> str:
    def err(key):
        return f"{row[key]:.1e}" if key in row else "—"

    def ratio(key):
        return f"{row[key]:.2f}×" if key in row else "—"

    if "error" in row:
        return f"| {row['vocab']} | {row['tokens']} | {row['impl']} | {row['error']} | | | | | | |"
    return (
        f"| {row['vocab']} | {row['tokens']} | {row['impl']} | {gib(row['peak_bytes'])} | {row['seconds']:.2f} s | "
        f"{err('loss_rel_err')} | {err('grad_h_rel_err')} | {err('grad_w_rel_err')} | {ratio('opd_peak_ratio')} | {ratio('opd_time_ratio')} |"
    )


if __name__ == "__main__":
    main()

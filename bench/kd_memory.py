"""Peak memory and time of the chunked KD loss vs the naive one (forward + backward).

Qwen2.5-0.5B-like sizes by default: vocab 151,936, hidden 896, 1,024 response tokens; lm_head frozen,
gradient w.r.t. the student's hidden states. Each variant runs in its own process; on CPU the peak is
the process's peak RSS above its baseline (inputs and lm_head already allocated), on GPU it is
torch.cuda.max_memory_allocated above the same baseline. Prints the ratios (target: memory <= 0.1x
of naive with the loss equal to 1e-5).

    .venv/bin/python bench/kd_memory.py
    .venv/bin/python bench/kd_memory.py --chunk 128 --tokens 2048
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(variant: str, tokens: int, vocab: int, hidden: int, chunk: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from vaemo.losses import distill

    torch.manual_seed(0)
    torch.set_num_threads(2)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device).requires_grad_(False)
    with torch.no_grad():
        head.weight.normal_(0, 0.02)
    student = (torch.randn(tokens, hidden, device=device) * 2).requires_grad_(True)
    teacher = torch.randn(tokens, hidden, device=device) * 2
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_mb()
    start = time.perf_counter()
    if variant == "naive":
        s = F.log_softmax(head(student).float(), -1)
        t = F.log_softmax(head(teacher).float(), -1)
        loss = (t.exp() * (t - s)).sum()
    else:
        loss = distill(student, head, teacher, temperature=1.0, chunk_size=chunk).kl_sum
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = peak_rss_mb() - base
    return {
        "loss": float(loss) / tokens,
        "grad_norm": float(student.grad.norm()),
        "peak_mb": peak,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    args = parser.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.vocab, args.hidden, args.chunk, args.device)))
        return
    results = {}
    for variant in ("naive", "chunked"):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--tokens",
            str(args.tokens),
            "--vocab",
            str(args.vocab),
            "--hidden",
            str(args.hidden),
            "--chunk",
            str(args.chunk),
            "--device",
            args.device,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    naive, chunked = results["naive"], results["chunked"]
    print(
        f"setting   : {args.tokens} response tokens, vocab {args.vocab}, hidden {args.hidden}, chunk {args.chunk}, "
        f"{args.device}, forward + backward"
    )
    for name, r in results.items():
        print(f"{name:10s}: peak {r['peak_mb']:8.1f} MB  time {r['seconds']:6.2f} s  loss/token {r['loss']:.8f}")
    print(f"memory ratio (chunked / naive): {chunked['peak_mb'] / naive['peak_mb']:.3f}  (target <= 0.1)")
    print(f"time ratio   (chunked / naive): {chunked['seconds'] / naive['seconds']:.2f}")
    print(
        f"loss difference per token     : {abs(chunked['loss'] - naive['loss']):.2e}  (target <= 1e-5); "
        f"grad-norm relative difference {abs(chunked['grad_norm'] / naive['grad_norm'] - 1):.1e}"
    )


if __name__ == "__main__":
    main()

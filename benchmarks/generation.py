"""Rollout generation: tether's KV-cache engine vs Hugging Face `generate`, in one run.

    .venv/bin/python benchmarks/generation.py [--batches 16 64] [--new-tokens 64] [--compile]
        [--unpacked] [--unfused] [--repeats 1] [--dtypes fp32 bf16]

SmolLM2-135M-Instruct, sampling at temperature 1 with EOS ignored (every row generates
exactly --new-tokens), prompts from examples/data/ppo-prompts.jsonl. Also measures the
matmul rate of this machine (a 2048³ matmul) in its fastest dtype (bf16 where the CPU has
native bf16, else fp32) and reports each tokens/s as a fraction of that roofline:
rate / (2 · parameters) tokens per second. `--compile` adds the engine with its forward
(prefill and decode step) under `torch.compile(dynamic=True)`, bf16 only, and reports the
compile time (its warm-up) beside the rate. (In float32 inductor cannot lower the reordered
weights: its `_linear_pointwise` lowering asserts that the weight is a graph constant.)
`--unpacked` adds the engine with its weights left for F.linear
(`tether.fast.engine.can_pack` off), `--unfused` the engine on ATen ops instead of its fused C++
kernels (`tether.fast.fused`). `--repeats N` times every engine N times, the engines taking turns
(this machine's rate moves by a third from minute to minute, and a drift then reaches every
engine alike), and reports each one's median with every run listed.
bf16 runs by default only where it is native: emulated, a bf16 matmul runs at a few GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    from transformers import AutoModelForCausalLM

    from tether.data import load_prompts
    from tether.hardware import set_threads
    from tether.models.loading import load_tokenizer, resolve_model_source
    from tether.rollout.generation import generate

    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--unpacked", action="store_true")
    parser.add_argument("--unfused", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=None)
    args = parser.parse_args()
    from tether.fast import engine as tether_engine
    from tether.hardware import bf16_available

    eager_forward, can_pack = tether_engine.forward, tether_engine.can_pack
    kernels = tether_engine.tether_fused.kernels
    set_threads(0)
    source = resolve_model_source("smollm2-135m-instruct")
    tokenizer = load_tokenizer(source)
    prompts, _ = load_prompts(ROOT / "examples/data/ppo-prompts.jsonl")
    params = None
    fastest = "bf16" if bf16_available() else "fp32"
    dtypes = args.dtypes or (["fp32", "bf16"] if fastest == "bf16" else ["fp32"])
    results = {
        "fp32_gflops": matmul_gflops(torch.float32),
        "bf16_native": fastest == "bf16",
    }
    if fastest == "bf16":
        results["bf16_gflops"] = matmul_gflops(torch.bfloat16)

    def run(model, dtype: torch.dtype, engine: str, batch_prompts: list, compiled) -> float:
        """Tokens/s of one `generate` call with `engine` ("hf", "auto", "unpacked",
        "unfused" or "compiled")."""
        tether_engine.forward = compiled if engine == "compiled" else eager_forward
        tether_engine.can_pack = (lambda *_: False) if engine == "unpacked" else can_pack
        tether_engine.tether_fused.kernels = (lambda: None) if engine == "unfused" else kernels
        started = time.perf_counter()
        out = generate(
            model,
            tokenizer,
            batch_prompts,
            dtype=dtype,
            max_new_tokens=args.new_tokens,
            ignore_eos=True,
            seed=0,
            engine="hf" if engine == "hf" else "auto",
        )
        return sum(len(r) for r in out.response_ids) / (time.perf_counter() - started)

    rows = []
    for dtype_name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
        # Each token costs ~2 FLOPs per weight it multiplies: every parameter once (a tied
        # embedding is counted once, for its use as the LM head; the lookup itself is free).
        params = sum(p.numel() for p in model.parameters())
        for batch in args.batches:
            batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
            engines = ["hf", "auto"]
            if args.unpacked:
                engines.append("unpacked")
            if args.unfused:
                engines.append("unfused")
            if args.compile and dtype_name == "bf16":
                engines.append("compiled")
            compiled = None
            if "compiled" in engines:
                torch._dynamo.reset()
                compiled = torch.compile(eager_forward, dynamic=True)

            warm_up = {}
            for engine in engines:
                started = time.perf_counter()
                run(model, dtype, engine, batch_prompts[:2], compiled)
                warm_up[engine] = time.perf_counter() - started
            rates: dict[str, list[float]] = {engine: [] for engine in engines}
            for _ in range(args.repeats):  # in turn, so that a drift of the machine hits all
                for engine in engines:
                    rates[engine].append(run(model, dtype, engine, batch_prompts, compiled))
            for engine in engines:
                rows.append(
                    {
                        "engine": {
                            "hf": "hf generate",
                            "auto": "tether",
                            "unpacked": "tether, F.linear",
                            "unfused": "tether, ATen ops (no fused kernels)",
                            "compiled": "tether + torch.compile",
                        }[engine],
                        "dtype": dtype_name,
                        "batch": batch,
                        "tokens_per_s": statistics.median(rates[engine]),
                        "runs_tokens_per_s": [round(r, 1) for r in rates[engine]],
                        "warm_up_s": warm_up[engine],
                        # each turn's rate over HF's in the same turn: the ratio without the
                        # drift between turns
                        "vs_hf_generate_per_turn": [
                            round(r / h, 2) for r, h in zip(rates[engine], rates["hf"], strict=True)
                        ],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    roofline = results[f"{fastest}_gflops"] * 1e9 / (2 * params)
    for row in rows:
        row[f"fraction_of_{fastest}_roofline"] = row["tokens_per_s"] / roofline
    results |= {"params": params, f"{fastest}_roofline_tokens_per_s": roofline, "rows": rows}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Training throughput and model FLOPs utilisation of a torchrun job through tether's
DDP/FSDP2 wrapping (tether.runs.distributed.Parallel), on a random-init Llama.

    # the GPU benchmark: a 1.1B-parameter Llama (TinyLlama's shape), bf16, FSDP2
    torchrun --nproc-per-node 1 benchmarks/distributed_train.py --size 1b --parallel fsdp
    # a smoke run of the same code on 2 CPU processes (gloo)
    torchrun --nproc-per-node 2 benchmarks/distributed_train.py --size tiny --steps 3

Each step is a next-token loss over `--batch` sequences of `--seq` random tokens per rank,
bf16 autocast over float32 master weights, AdamW. Reports the job's training tokens/s over
the steps after `--warmup`, and MFU = model FLOPs/s / peak: model FLOPs per token are
6·N (forward + backward over N non-embedding-lookup parameters) + 12·layers·hidden·seq
(attention scores), the PaLM paper's count; peak is the GPU's dense bf16 rate (989 TFLOP/s
for H100/H200 SXM) or `--peak-tflops`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SIZES = {
    # TinyLlama-1.1B's shape: 1.10B parameters with a 32k vocabulary.
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
}
DENSE_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SIZES, default="1b")
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="fsdp")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float)
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from tether.hardware import autocast, resolve_device
    from tether.runs import distributed

    device = resolve_device("auto")
    world = distributed.init_from_env(device)
    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[args.size], max_position_embeddings=max(2048, args.seq))
    model = LlamaForCausalLM(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel()  # a lookup, not a matmul
    parallel = distributed.Parallel(model, args.parallel, bf16=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(world.rank)

    def loss_of(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(input_ids=ids, labels=ids).loss

    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(
            config.vocab_size, (args.batch, args.seq), device=device, generator=generator
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast(True):
            loss = parallel(loss_of, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)

    tokens_per_s = args.batch * args.seq * world.size * len(times) / sum(times)
    flops_per_token = 6 * (params - embedding) + 12 * config.num_hidden_layers * (
        config.hidden_size * args.seq
    )
    peak = peak_tflops(args.peak_tflops)
    result = {
        "size": args.size,
        "parameters": params,
        "parallel": args.parallel,
        "ranks": world.size,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "batch_per_rank": args.batch,
        "seq": args.seq,
        "step_s": sum(times) / len(times),
        "tokens_per_s": tokens_per_s,
        "model_tflops": flops_per_token * tokens_per_s / 1e12,
        "mfu": flops_per_token * tokens_per_s / (peak * 1e12 * world.size) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else None,
        "final_loss": float(loss.detach()),
    }
    if world.is_main:
        print(json.dumps(result, indent=2))
    distributed.barrier()


if __name__ == "__main__":
    main()

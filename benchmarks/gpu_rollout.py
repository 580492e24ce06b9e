"""Rollout and training-step speed on one device, with the peers a user would pick, in one run.

1. generation: bf16 on a GPU (float32 on a CPU), `ignore_eos`, 128 new tokens, batch 64
   and 256, at SmolLM2-135M's and Qwen2.5-0.5B's shapes (seeded random weights): tether's
   `generate` against Hugging Face `generate` (sdpa, its default cache) and against
   `generate` with a static cache under `torch.compile(mode="reduce-overhead")`. Tokens/s,
   the ratios, and tether's share of the decode step's roofline: max(bytes of weights + KV
   read / memory bandwidth, FLOPs / matmul rate in the generation's dtype), both rates
   measured in the same run;
2. a GRPO iteration (group 8, 64 prompts, 256 new tokens, a rule reward): samples/s and peak
   memory, against TRL's `GRPOTrainer` (no vLLM) where TRL is installed;
3. SFT and DPO steps at Qwen2.5-0.5B's shape: tokens/s and model FLOPs utilisation
   (6 · parameters · tokens/s over the matmul rate measured in the dtype the training
   computes in: bf16 where the device has it natively, float32 elsewhere).

At `--scale tiny` (the default on a CPU) the same code runs on a 2-layer model in seconds,
so it cannot rot while no GPU is at hand (tests/test_gpu_check.py runs it). Nothing is
fetched: `--tokenizer DIR` as for gpu_check.py.

  python benchmarks/gpu_rollout.py --tokenizer /tmp/smol-tokenizer --out /tmp/rollout
  python benchmarks/gpu_rollout.py --device cpu --scale tiny --out /tmp/rollout-cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tether.hardware import bf16_available

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import QWEN25_05B, SMOLLM2_135M, TINY, build_model, export_tokenizer

FULL = {"batches": [64, 256], "new_tokens": 128, "prompt": 32, "grpo": (64, 8, 256), "seq": 512}
SMALL = {"batches": [4, 8], "new_tokens": 8, "prompt": 8, "grpo": (4, 2, 8), "seq": 32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Seconds of the fastest of `repeats` calls after one warm-up call: a peak rate is what
    the machine reaches when nothing else runs, and on a shared CPU a mean also measures the
    neighbours."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - started)
    return best


# --------------------------------------------------------------------------- the machine


def machine_rates(
    device: torch.device, small: bool, dtype: torch.dtype, train_dtype: torch.dtype
) -> dict[str, float]:
    """Measured memory bandwidth (a copy: bytes read + written), the matmul rate in the
    generation's `dtype`, and the matmul rate in `train_dtype` (the dtype tether's training
    computes in here), each the fastest of several tries."""
    numel = (1 << 20) if small else (1 << 29)  # 2 MiB or 1 GiB of bf16
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeats=5)
    n = 256 if small else 8192

    def matmul_tflops(kind: torch.dtype) -> float:
        a = torch.randn(n, n, dtype=kind, device=device)
        b = torch.randn(n, n, dtype=kind, device=device)
        return 2 * n**3 / timed(lambda: a @ b, device, repeats=5) / 1e12

    rates = {"bandwidth_gbs": 2 * numel * 2 / seconds / 1e9, "matmul_tflops": matmul_tflops(dtype)}
    same = train_dtype == dtype
    rates["train_matmul_tflops"] = rates["matmul_tflops"] if same else matmul_tflops(train_dtype)
    return rates


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- 1. generation


def decode_roofline(model, batch: int, prompt: int, new: int, rates: dict) -> float:
    """Seconds one decode step needs at the measured rates: the weights read once, each row's
    KV cache read (at its mean length), 2 FLOPs per weight per row."""
    config = model.config
    itemsize = model.dtype.itemsize
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize
    mean_len = prompt + new / 2
    bytes_read = parameters(model) * itemsize + batch * mean_len * kv_bytes
    flops = 2 * parameters(model) * batch
    return max(bytes_read / (rates["bandwidth_gbs"] * 1e9), flops / (rates["matmul_tflops"] * 1e12))


def bench_generation(model_dir: Path, device, dtype, shape_name: str, s: dict, rates) -> list:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    out = []
    for batch in s["batches"]:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(100, 5000, (batch, s["prompt"]), generator=g).tolist()
        row = {"model": shape_name, "batch": batch, "new_tokens": s["new_tokens"]}
        row |= generation_rates(model, tokenizer, prompts, s["new_tokens"], dtype, device)
        step = batch / row["tether_tok_s"]  # seconds per decode step, prefill included
        row["roofline_share"] = (
            decode_roofline(model, batch, s["prompt"], s["new_tokens"], rates) / step
        )
        for peer in ("hf", "hf_compiled"):
            if isinstance(row.get(f"{peer}_tok_s"), float):
                row[f"x_{peer}"] = row["tether_tok_s"] / row[f"{peer}_tok_s"]
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def generation_rates(model, tokenizer, prompts: list[list[int]], new: int, dtype, device) -> dict:
    """Tokens/s of tether's `generate`, HF `generate`, and (on a GPU) HF `generate` with a
    static cache under torch.compile, all sampling `new` tokens per row, EOS ignored."""
    from transformers import GenerationConfig

    from tether.rollout.generation import generate

    batch = len(prompts)
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    hf_config = GenerationConfig(
        max_new_tokens=new, min_new_tokens=new, do_sample=True, top_k=0, top_p=1.0,
        pad_token_id=tokenizer.pad_token_id or 0,
    )  # fmt: skip
    seeds = list(range(batch))
    rates = {
        "tether_tok_s": batch * new / timed(
            lambda: generate(
                model, tokenizer, prompts, max_new_tokens=new, ignore_eos=True, dtype=dtype,
                row_seeds=seeds,
            ),
            device,
        ),
        "hf_tok_s": batch * new / timed(
            lambda: model.generate(input_ids=ids, attention_mask=mask, generation_config=hf_config),
            device,
        ),
    }  # fmt: skip
    if device.type != "cuda":
        return rates
    static = GenerationConfig(**hf_config.to_dict(), cache_implementation="static")
    model.forward = torch.compile(model.forward, mode="reduce-overhead")
    try:
        rates["hf_compiled_tok_s"] = (
            batch
            * new
            / timed(
                lambda: model.generate(
                    input_ids=ids, attention_mask=mask, generation_config=static
                ),
                device,
            )
        )
    except Exception as e:  # a peer that fails is a cell of the table, not the end of it
        rates["hf_compiled_tok_s"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    finally:
        del model.forward  # back to the class's forward
    return rates


# --------------------------------------------------------------------------- 2. GRPO iteration


def count_vowels(completions, **kwargs) -> list[float]:
    return [float(sum(c in "aeiou" for c in text)) for text in completions]


def bench_grpo(model_dir: Path, device: str, s: dict, out: Path) -> dict:
    import tether

    prompts, group, new = s["grpo"]
    steps = 2
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = tether.grpo(
        model=str(model_dir),
        data=[{"prompt": f"Write about the number {i}."} for i in range(prompts * steps)],
        reward=count_vowels,
        rollout={"max_new_tokens": new, "samples_per_prompt": group, "missing_eos": "none"},
        train={"batch_size": prompts, "max_steps": steps, "save_every": 0, "device": device},
        ppo={"ppo_epochs": 1},
        out=out / "grpo",
    )
    seconds = time.perf_counter() - started
    row = {
        "tether_samples_s": prompts * group * steps / seconds,
        "tether_step_s": result.metrics.get("time/step_s"),
        "tether_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    try:
        import trl  # noqa: F401
    except ImportError:
        row["trl"] = "not installed here"
    print(json.dumps(row), flush=True)
    return row


# --------------------------------------------------------------------------- 3. training steps


def bench_training(model_dir: Path, device: str, s: dict, out: Path, rates: dict) -> list:
    import tether

    text = " ".join(["the sea and the sky are wide and blue"] * (s["seq"] // 9 + 1))
    n_params = None
    rows = []
    sft_records = [{"text": text} for _ in range(64)]
    pairs = [
        {"prompt": "Say something.", "chosen": text, "rejected": text[::-1]} for _ in range(64)
    ]
    common = {"save_every": 0, "device": device, "max_steps": 3, "batch_size": 8}
    for stage, fn, data in (("sft", tether.sft, sft_records), ("dpo", tether.dpo, pairs)):
        source = _write(out / f"{stage}.jsonl", data)
        result = fn(
            model=str(model_dir),
            data={"train": source, "max_length": s["seq"], "eval_fraction": 0.0},
            train=common,
            out=out / stage,
        )
        if n_params is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            with torch.device("meta"):
                n_params = parameters(
                    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
                )
        tokens_s = result.metrics["throughput/tokens_per_s"]
        mfu = 6 * n_params * tokens_s / (rates["train_matmul_tflops"] * 1e12)
        row = {"stage": stage, "tokens_s": tokens_s, "mfu": mfu}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _write(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", choices=["full", "tiny"])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=["generation", "grpo", "training"])
    args = parser.parse_args()
    device = torch.device(args.device)
    small = (args.scale or ("full" if device.type == "cuda" else "tiny")) == "tiny"
    s = SMALL if small else FULL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer or export_tokenizer(args.out / "tokenizer")
    shapes = {"tiny": ("llama", TINY)} if small else {
        "smollm2-135m": ("llama", SMOLLM2_135M), "qwen2.5-0.5b": ("qwen2", QWEN25_05B),
    }  # fmt: skip
    models = {
        name: build_model(args.out / name, tokenizer, family, shape, 0)
        for name, (family, shape) in shapes.items()
    }
    train_dtype = torch.bfloat16 if bf16_available(device) else torch.float32
    rates = machine_rates(device, small, dtype, train_dtype)
    print(json.dumps(rates), flush=True)
    results: dict = {"device": str(device), "scale": "tiny" if small else "full", **rates}
    if "generation" in args.only:
        results["generation"] = [
            row
            for name, path in models.items()
            for row in bench_generation(path, device, dtype, name, s, rates)
        ]
    first, last = next(iter(models.values())), list(models.values())[-1]
    if "grpo" in args.only:
        results["grpo"] = bench_grpo(first, args.device, s, args.out)
    if "training" in args.only:
        results["training"] = bench_training(last, args.device, s, args.out, rates)
    (args.out / "gpu_rollout.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

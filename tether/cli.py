"""`tether STAGE --config FILE.yaml [--set key=value ...] [--out RUN_DIR] [--resume]`.

Stages are looked up in a table and imported only when run, so `tether --help` does not
load torch or transformers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tether.api import STAGES, Stage, load_target
from tether.errors import TetherError

DEVICE_HELP = "where the models run: auto (this process's GPU where there is one), cpu, cuda:N"


def build_parser() -> argparse.ArgumentParser:
    """The `tether` parser: one subcommand per training stage, then the tools."""
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Align language models with human feedback: SFT, reward models, PPO.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # --version's lines as they are
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="STAGE", required=True)
    for name, stage in STAGES.items():
        _add_stage_parser(sub, name, stage)
    _add_rm_eval_parser(sub)
    _add_score_parser(sub)
    _add_doctor_parser(sub)
    _add_inspect_parser(sub)
    _add_demo_parser(sub)
    _add_report_parser(sub)
    _add_config_parser(sub)
    _add_push_parser(sub)
    return parser


def _add_stage_parser(sub, name: str, stage: Stage) -> None:
    """`tether STAGE`: a config file, overrides and shortcuts, then the stage's runner."""
    p = sub.add_parser(
        name,
        help=stage.help,
        description=stage.help,
        epilog=f"Every config key, its default and its meaning: tether config {name}",
    )
    p.add_argument("--config", type=Path, help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    p.add_argument("--out", type=Path, help="run dir (default: runs/STAGE-TIMESTAMP)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest complete checkpoint",
    )
    p.add_argument("--model", help=f"shortcut for --set {stage.model_key}=...")
    p.add_argument("--data", help=f"shortcut for --set {stage.data_key}=...")
    p.add_argument("--max-steps", type=int, help=f"shortcut for --set {stage.steps_key}=...")
    p.add_argument("--device", help="shortcut for --set train.device=... (auto, cpu, cuda:N)")
    p.set_defaults(func=_run_stage, stage=name)


def _add_config_parser(sub) -> None:
    cfg = sub.add_parser(
        "config",
        help="print every config key of a stage, with its default and what it does",
        description="Print a stage's config as commented YAML: every key, its default and its "
        "meaning. `tether config ppo > ppo.yaml` is a starting point for --config.",
    )
    cfg.add_argument("stage", choices=list(STAGES))
    cfg.set_defaults(func=_run_config)


def _add_push_parser(sub) -> None:
    push = sub.add_parser(
        "push", help="upload a run's final/ (model, card, adapter) to the Hugging Face Hub"
    )
    push.add_argument("run_dir", type=Path, help="a run dir (or a model dir)")
    push.add_argument("repo_id", help="the Hub repo, e.g. your-name/smollm2-ppo")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.set_defaults(func=_run_push)


def _add_rm_eval_parser(sub) -> None:
    ev = sub.add_parser("rm-eval", help="evaluate a reward model on preference data")
    ev.add_argument("--model", required=True, help="reward model dir (a `tether rm` final/)")
    ev.add_argument("--data", required=True, help="preference file (any supported format)")
    ev.add_argument("--max-length", type=int, default=256)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--device", default="auto", help=DEVICE_HELP)
    ev.set_defaults(func=_run_rm_eval)


def _add_score_parser(sub) -> None:
    sc = sub.add_parser("score", help="score {prompt, response} records with a reward model")
    sc.add_argument("--model", required=True, help="reward model dir")
    sc.add_argument("--data", required=True, help="JSONL/Parquet of {prompt, response}")
    sc.add_argument("--out", required=True, type=Path, help="JSONL written with a `score` key")
    sc.add_argument("--max-length", type=int, default=256)
    sc.add_argument("--batch-size", type=int, default=16)
    sc.add_argument("--device", default="auto", help=DEVICE_HELP)
    sc.set_defaults(func=_run_score)


def _add_doctor_parser(sub) -> None:
    doc = sub.add_parser(
        "doctor", help="diagnose a run: reward hacking, KL blow-up, instability, collapse"
    )
    doc.add_argument("run_dir", type=Path, help="a tether run dir (holds metrics.jsonl)")
    doc.add_argument("--json", action="store_true", help='print {"findings": [...]}')
    doc.set_defaults(func=_run_doctor)


def _add_inspect_parser(sub) -> None:
    ins = sub.add_parser(
        "inspect", help="per-token log-probs under policy and reference: where the KL comes from"
    )
    ins.add_argument("--policy", required=True, help="policy model (dir, .gguf or name)")
    ins.add_argument("--reference", required=True, help="reference model (dir, .gguf or name)")
    ins.add_argument("--prompt", help="the prompt (a user message)")
    ins.add_argument(
        "--response", action="append", default=[], help="a response to inspect (repeatable)"
    )
    ins.add_argument("--data", type=Path, help="JSONL/Parquet of {prompt, response} records")
    ins.add_argument("--reward-model", help="also score each response with this reward model")
    ins.add_argument(
        "--critic",
        help="a PPO run's final/ (or its value_head.safetensors / critic/): values, advantages",
    )
    ins.add_argument("--beta", type=float, default=0.05, help="KL coefficient for the penalty")
    ins.add_argument("--temperature", type=float, default=1.0)
    ins.add_argument("--html", type=Path, help="also write a self-contained HTML page")
    ins.add_argument("--no-color", action="store_true")
    ins.add_argument("--device", default="auto", help=DEVICE_HELP)
    ins.set_defaults(func=_run_inspect)


def _add_demo_parser(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="the whole RLHF pipeline on the embedded SmolLM2, judged by a gold standard",
        description="Preferences from a simulated annotator -> reward model -> PPO -> "
        "held-out evaluation against a gold judge and best-of-n -> report.html.",
    )
    demo.add_argument("--task", default="sentiment", help="sentiment, arithmetic or mod.py:task")
    demo.add_argument("--out", type=Path, help="run dir (default: runs/demo-TIMESTAMP)")
    demo.add_argument("--resume", action="store_true", help="continue the run in --out")
    demo.add_argument("--quick", action="store_true", help="a ~2-minute version at small scale")
    demo.add_argument("--steps", type=int, help="PPO steps")
    demo.add_argument("--prompts", type=int, help="training prompts (K answers ranked each)")
    demo.add_argument("--model", help="the reference policy (default: the embedded SmolLM2)")
    demo.add_argument("--length-bias", type=float, help="annotator utility per word (hacking)")
    demo.add_argument("--tau", type=float, help="annotator noise in gold units")
    demo.add_argument("--kl-coef", type=float, help="β of the PPO KL penalty")
    demo.add_argument(
        "--kl-budget", type=float, help="stop PPO where its KL reaches this budget (nats), land it"
    )
    demo.add_argument("--device", help=DEVICE_HELP)
    demo.set_defaults(func=_run_demo)


def _add_report_parser(sub) -> None:
    rep = sub.add_parser("report", help="(re)build RUN_DIR/report.html for any run or demo")
    rep.add_argument("run_dir", type=Path)
    rep.set_defaults(func=_run_report)


def _run_config(args: argparse.Namespace) -> int:
    from tether.api import config_reference

    print(f"# tether {args.stage}: {STAGES[args.stage].help}")
    print("# Every key with its default; set them in a --config file or with --set KEY=VALUE.\n")
    print(config_reference(args.stage), end="")
    return 0


def _run_push(args: argparse.Namespace) -> int:
    from tether.tools.hub import push

    print(f"pushed: {push(args.run_dir, args.repo_id, args.private)}")
    return 0


def _run_rm_eval(args: argparse.Namespace) -> int:
    import json

    from tether.tools.evaluate import evaluate_reward_model

    metrics = evaluate_reward_model(
        args.model, args.data, args.max_length, args.batch_size, args.device
    )
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key:>24}  {value:.4f}" if isinstance(value, float) else f"{key:>24}  {value}")
    return 0


def _run_score(args: argparse.Namespace) -> int:
    from tether.tools.evaluate import score_file

    n = score_file(args.model, args.data, args.out, args.max_length, args.batch_size, args.device)
    print(f"scored {n} responses -> {args.out}")
    return 0


def _run_doctor(args: argparse.Namespace) -> int:
    """Exit status 0 healthy, 1 warnings, 2 critical, so scripts and CI can gate on it."""
    import json

    from tether.tools.doctor import diagnose, exit_status, format_findings, read_run

    findings = diagnose(read_run(args.run_dir))
    if args.json:
        print(json.dumps({"findings": [f.to_json() for f in findings]}))
    else:
        print(format_findings(findings, str(args.run_dir)))
    return exit_status(findings)


def _run_inspect(args: argparse.Namespace) -> int:
    from tether.data import load_scored_responses
    from tether.tools.inspector import Inspector, format_terminal, write_html

    groups: dict[str, tuple[object, list[str]]] = {}
    if args.data:  # checked in full before any model loads
        records, _ = load_scored_responses(args.data)
        for _, messages, response in records:
            key = repr(messages)
            groups.setdefault(key, (messages, []))[1].append(response)
    if args.prompt is not None:
        if not args.response:
            raise TetherError("--prompt needs at least one --response")
        groups[repr(args.prompt)] = (args.prompt, list(args.response))
    if not groups:
        raise TetherError("give --prompt with --response, or --data FILE")
    inspector = Inspector(
        args.policy,
        args.reference,
        args.temperature,
        args.reward_model,
        args.critic,
        args.beta,
        args.device,
    )
    results = []
    for prompt, responses in groups.values():
        found = inspector.inspect(prompt, responses)
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        print(f"prompt: {text!r}\n")
        print(format_terminal(found, args.beta, color=not args.no_color and sys.stdout.isatty()))
        results.append((text, found))
    if args.html:
        write_html(results, args.beta, args.html)
        print(f"wrote {args.html}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tether.tools.demo import QUICK, DemoSettings, budget_settings, run_demo

    if args.resume and args.out is None:
        raise TetherError("--resume needs --out RUN_DIR (the demo to continue)")
    out = args.out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = replace(DemoSettings(task=args.task), **(QUICK if args.quick else {}))
    if args.kl_budget:
        settings = budget_settings(settings)
    for field_name, value in (
        ("ppo_steps", args.steps),
        ("train_prompts", args.prompts),
        ("model", args.model),
        ("length_bias", args.length_bias),
        ("tau", args.tau),
        ("kl_coef", args.kl_coef),
        ("device", args.device),
        ("kl_budget", args.kl_budget),
    ):
        if value is not None:
            settings = replace(settings, **{field_name: value})
    try:
        summary = run_demo(out, settings, resume=args.resume)
    except KeyboardInterrupt:
        print(f"\ntether: interrupted; continue with: tether demo --out {out} --resume")
        return 130
    print(
        f"\nRM held-out accuracy {summary['rm_accuracy']:.3f} · gold π_ref "
        f"{summary['gold_ref']:.3f} -> policy {summary['gold_policy']:.3f} · KL "
        f"{summary['kl']:.2f} nats · win-rate {summary['win_rate']:.0%} · "
        f"{summary['wall_s'] / 60:.1f} min\nreport: {out / 'report.html'}"
    )
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from tether.tools.report import build_report

    print(f"wrote {build_report(args.run_dir)}")
    return 0


def _version() -> str:
    """The version, and what tether will use on this machine and why: a user whose runs are
    slow sees whether bf16, the weight packing and the fused kernels apply."""
    import os

    import torch

    from tether import __version__, hardware
    from tether.fast import allocator, fused

    device = hardware.resolve_device("auto")
    bf16 = hardware.use_bf16("auto", device)
    flags = hardware.cpu_flags().partition(":")[2].split()
    shown = [f for f in flags if f.startswith(("avx", "amx", "fma"))]
    kernels = (
        "off"
        if os.environ.get(fused.SWITCH) == "0"
        else ("built" if fused.library_path().is_file() else "not built (built on first rollout)")
    )
    return "\n".join(
        [
            f"tether {__version__}, torch {torch.__version__}",
            f"device (auto): {hardware.describe(device, bf16)}",
            f"cpu: {' '.join(shown) or 'no AVX flags read'}",
            f"bf16 weight packing: {'yes' if hardware.bf16_weight_packing() else 'no'}; "
            f"fused decode kernels: {kernels}; malloc: {allocator.active()}",
        ]
    )


def _run_stage(args: argparse.Namespace) -> int:
    from tether.api import run, run_dir_of
    from tether.config import load_config

    stage = STAGES[args.stage]
    overrides = list(args.overrides)
    for value, key in (
        (args.model, stage.model_key),
        (args.data, stage.data_key),
        (args.max_steps, stage.steps_key),
        (args.device, "train.device"),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    out = run_dir_of(args.stage, args.out, args.resume)
    config_path = args.config
    saved_run = config_path is None and args.resume and (out / "config.yaml").is_file()
    if saved_run:
        config_path = out / "config.yaml"  # resume the run exactly as it was configured
    config = load_config(load_target(stage.config), config_path, overrides, saved_run=saved_run)
    started = time.perf_counter()
    result = run(args.stage, config, out, resume=args.resume)
    print(
        f"{args.stage}: done in {time.perf_counter() - started:.0f}s; model saved to {result.final}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from tether.runs import faults

    args = build_parser().parse_args(argv)
    faults.arm_kill_timer()
    try:
        return args.func(args)
    except TetherError as e:
        print(f"tether: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ntether: interrupted; continue with the same command plus --resume", file=sys.stderr
        )
        return 130


def entry() -> int:
    """The `tether` command: `main` on tcmalloc or jemalloc where one is installed
    (`tether.fast.allocator`), re-executing this process once to preload it."""
    from tether.fast import allocator

    allocator.relaunch(sys.argv[1:])
    return main()


if __name__ == "__main__":
    raise SystemExit(entry())

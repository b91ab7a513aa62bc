"""The ``accelkit`` command line."""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

from accelkit.errors import AccelkitError

DESCRIPTION = """\
accelkit makes diffusion models fast: it captures a pipeline's denoiser as a graph, applies
acceleration passes (fewer/better-placed sampler steps, block caching with a DP schedule), searches
their settings to meet a speed budget at the best fidelity, and writes plans plus a fidelity report.

MODEL is a local diffusers pipeline folder, a hub id (where the network allows) or a zoo name such
as zoo:shapes; with no MODEL the embedded default zoo:shapes runs (CPU, minutes).
"""

EPILOG = """\
examples:
  accelkit inspect zoo:shapes                      # blocks, FLOPs, attention sites
  accelkit optimize --budget 2x --out out/          # embedded default model, CPU
  accelkit optimize ./my-pipeline --budget 2x --budget 3x --passes steps,cache --trials 20
  accelkit report out/                              # re-render out/report/ from report.json
  accelkit search --worker --storage postgresql://u:pw@host/db --study s1 --trials 8   # distributed search
  accelkit report out/ --storage postgresql://u:pw@host/db --study s1                  # report a shared study
  accelkit run out/ --budget 2x --prompt "a red circle" --output image.png
  accelkit export out/ --budget 2x                  # ONNX per graph variant, checked by onnxruntime
  accelkit run out/ --budget 2x --backend onnxruntime --prompt "a red circle"
  accelkit distill out/ --budget 2x --iterations 200   # recover a pruned plan by distillation
  accelkit export out/ --budget 2x --target tensorrt   # + one TensorRT engine per variant (GPU, TensorRT >= 10.9)
  accelkit run out/ --budget 2x --backend tensorrt --device cuda --prompt "a red circle"

exit codes: 0 success; 1 internal error (please report); 2 bad input (the message names the fix);
  3 a budget or --min-psnr floor could not be met; 4 some search trials raised; 130 Ctrl-C; 143 SIGTERM.
"""


#: What ``ArgumentParser.add_subparsers`` returns: each command's builder adds its parser to it.
Subcommands = argparse._SubParsersAction


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="pipeline folder, hub id or zoo:NAME (default: the embedded zoo:shapes)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accelkit", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    # One builder per command, in the order `accelkit --help` lists them.
    for add_command in (_add_inspect, _add_optimize, _add_search, _add_report, _add_run, _add_export, _add_distill):
        add_command(commands)
    return parser


def _add_inspect(commands: Subcommands) -> None:
    inspect = commands.add_parser(
        "inspect", help="show the denoiser's blocks, FLOPs and attention sites",
        description="Capture MODEL's denoiser and print its family, parameter count, block table "
                    "(name, kind, FLOPs share, weight bytes) and attention sites.",
        epilog="example:\n  accelkit inspect zoo:shapes --json", formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(inspect)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.add_argument("--height", type=int, help="image height to capture at (default: the model's)")
    inspect.add_argument("--width", type=int, help="image width to capture at (default: the model's)")
    inspect.add_argument("--num-frames", type=int,
                         help="frames to capture at, for video pipelines (default: the pipeline's)")
    _add_call_arg(inspect)


def _add_optimize(commands: Subcommands) -> None:
    optimize = commands.add_parser(
        "optimize", help="search pass settings to meet speed budgets; write plans and a fidelity report",
        description="Search the passes' settings with Optuna so that each --budget (a speedup over the "
                    "baseline sampler at --steps steps) is met at the best fidelity. Writes "
                    "OUT/plans/<budget>/plan.json, OUT/report/index.html + report.json and OUT/study.db "
                    "(re-running with the same --out resumes the study).",
        epilog="examples:\n"
               "  accelkit optimize --budget 2x --out out/\n"
               "  accelkit optimize zoo:shapes --budget 2x --budget 3x --trials 24 --min-psnr 25\n"
               "  accelkit optimize ./pipe --passes cache --steps 50 --prompts prompts.txt\n\n"
               "exit codes: 0 all budgets met; 2 bad input; 3 a budget or the --min-psnr floor not met "
               "(the report is still written).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_search_options(optimize)
    optimize.add_argument("--min-psnr", type=float, default=None,
                          help="fidelity floor in dB; a plan below it fails the run with exit code 3")
    optimize.add_argument("--out", default="accelkit-out", help="output directory (default: accelkit-out)")
    optimize.add_argument("--overwrite", action="store_true",
                          help="reuse an --out made for another model or other budgets: its plans and report are "
                               "removed (never files accelkit did not write)")
    optimize.add_argument("--export", choices=["onnx", "tensorrt"], default=None,
                          help="also export every met plan (ONNX checked with onnxruntime)")
    optimize.add_argument("--quiet", action="store_true", help="no progress output")
    optimize.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def _add_search(commands: Subcommands) -> None:
    search = commands.add_parser(
        "search", help="run search trials as a worker against a shared study (distributed search)",
        description="Run --trials trials of the budget search against a shared Optuna study and exit "
                    "(no report). Start as many workers as wanted, on any machines that reach --storage; "
                    "then write plans and the report with `accelkit report OUT --storage URL --study NAME`. "
                    "The study stores the settings it was created with; a worker whose settings differ "
                    "refuses to join. A killed worker's running trial is marked failed after the grace "
                    "period and retried by another worker. --trials 0 only creates (or checks) the study.",
        epilog="examples:\n"
               "  accelkit search --worker --storage postgresql://u:pw@db/ak --study s1 zoo:shapes --budget 2x "
               "--trials 0\n"
               "  accelkit search --worker --storage postgresql://u:pw@db/ak --study s1 zoo:shapes --budget 2x "
               "--trials 8\n"
               "  accelkit report out/ --storage postgresql://u:pw@db/ak --study s1\n\n"
               "exit codes: 0 trials ran; 2 bad input (e.g. settings differ from the study's); 130 interrupted "
               "(the running trial is marked failed).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    search.add_argument("--worker", action="store_true", required=True,
                        help="run as a worker: N trials against --storage/--study, no report (required)")
    _add_search_options(search, worker=True)
    search.add_argument("--min-psnr", type=float, default=None,
                        help="fidelity floor stored with a new study, used by its report (default: none)")
    search.add_argument("--out", default=None,
                        help="directory for the calibration cache (default: none, kept in memory)")
    search.add_argument("--quiet", action="store_true", help="no progress output")
    search.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def _add_report(commands: Subcommands) -> None:
    report = commands.add_parser(
        "report", help="re-render OUT/report/ from OUT/report/report.json, or report a shared study",
        description="Re-render the fidelity report of an optimize run. With --storage: choose the plans "
                    "from a shared study (workers of `accelkit search --worker`), evaluate them and write "
                    "OUT/plans/ and OUT/report/; the model, prompts and settings come from the study.",
        epilog="examples:\n  accelkit report out/\n"
               "  accelkit report out/ --storage postgresql://u:pw@db/ak --study s1\n\n"
               "exit codes (with --storage): 0 all budgets met; 2 bad input; 3 a budget or the --min-psnr "
               "floor not met (the report is still written).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("out", help="the directory optimize wrote (with --storage: where to write)")
    report.add_argument("--storage", default=None, help="Optuna storage URL of a shared study")
    report.add_argument("--study", default=None, help="study name (default: the only study in --storage)")
    report.add_argument("--model", default=None,
                        help="with --storage: model to load (default: the study's; weights must match)")
    report.add_argument("--budget", action="append", metavar="Nx",
                        help="with --storage: budgets to report (default: the study's)")
    report.add_argument("--min-psnr", type=float, default=None,
                        help="with --storage: fidelity floor in dB (default: the study's)")
    report.add_argument("--device", default=None, help="with --storage: cpu or cuda (default: the study's)")
    report.add_argument("--quiet", action="store_true", help="no progress output")


def _add_run(commands: Subcommands) -> None:
    run = commands.add_parser(
        "run", help="generate images with a plan",
        description="Load MODEL (default: the plan's model), apply OUT's plan and generate.",
        epilog='example:\n  accelkit run out/ --budget 2x --prompt "a red circle" --output red.png',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("out", help="the directory optimize wrote")
    run.add_argument("--budget", default=None, help="which plan (default: the only one)")
    run.add_argument("--model", default=None, help="model to load (default: the one the plan names)")
    run.add_argument("--prompt", action="append", required=True, help="prompt; repeat for several")
    run.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    run.add_argument("--output", default="accelkit-run.png",
                     help="image file (PNG); several prompts get -N suffixes. Videos: .png writes the frames "
                          "side by side, .gif an animation")
    run.add_argument("--num-frames", type=int, default=None,
                     help="frames per video, for video plans (default and only valid value: the plan's)")
    run.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    run.add_argument("--backend", default="pytorch", choices=["pytorch", "onnxruntime", "tensorrt"],
                     help="run the denoiser in PyTorch (default), from the plan's ONNX export, or from its "
                          "TensorRT engines (needs `accelkit export OUT --target tensorrt` first)")
    run.add_argument("--steps", type=int, default=None,
                     help="denoising steps (default: the plan's; others re-derive its schedule)")
    run.add_argument("--strict-steps", action="store_true", help="refuse a --steps other than the plan's")
    run.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    run.add_argument("--check", action="store_true",
                     help="also run the original pipeline once and print the PSNR of the first prompt's images")
    _add_call_arg(run, "on top of the plan's")


def _add_export(commands: Subcommands) -> None:
    export = commands.add_parser(
        "export", help="export a plan's graph variants (ONNX, checked with onnxruntime; or TensorRT engines)",
        description="Export every graph variant of OUT's plan to OUT/plans/<budget>/onnx/ (one model per "
                    "variant, verified against PyTorch in onnxruntime) and list the files in plan.json. "
                    "--target tensorrt also builds one strongly typed engine per variant into "
                    "OUT/plans/<budget>/engines/ (needs TensorRT >= 10.9 and an NVIDIA GPU; the tactic "
                    "timing cache OUT/tensorrt-timing.cache is reused by later builds).",
        epilog="examples:\n  accelkit export out/ --budget 2x --target onnx\n"
               "  accelkit export out/ --budget 2x --target tensorrt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("out", help="the directory optimize wrote")
    export.add_argument("--budget", default=None, help="which plan (default: the only one)")
    export.add_argument("--target", default="onnx", choices=["onnx", "tensorrt"], help="export target")
    export.add_argument("--model", default=None, help="model to load (default: the one the plan names)")


def _add_distill(commands: Subcommands) -> None:
    distill = commands.add_parser(
        "distill", help="recover a pruned plan's fidelity by distilling it from the original model",
        description="Train the pruned denoiser of OUT's plan (the student, starting from its remaining weights) "
                    "to reproduce the original denoiser (the teacher) on the teacher's own trajectories for "
                    "the training prompts: output MSE plus LAPTOP-Diff's normalized feature loss at every "
                    "kept block's output. The trained weights go into the plan's weights.safetensors (`accelkit "
                    "run` and accelkit.load use them) and a 'recovery' section with PSNR before/after on "
                    "held-out prompts into plan.json and the report. Rerunning starts again from the original "
                    "weights. Plans that removed no blocks are refused.",
        epilog="examples:\n"
               "  accelkit optimize zoo:shapes --passes prune --budget 1.3x --out out/\n"
               "  accelkit distill out/ --budget 1.3x --iterations 200\n"
               "  accelkit distill out/ --budget 2x --device cuda --iterations 2000 --batch-size 4 "
               "--prompts prompts.txt\n\n"
               "exit codes: 0 recovered; 2 bad input (e.g. a plan without pruning); 130 interrupted (the "
               "plan is left unchanged).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    distill.add_argument("out", help="the directory optimize wrote")
    distill.add_argument("--budget", default=None, help="which plan (default: the only one)")
    distill.add_argument("--model", default=None, help="model to load (default: the one the plan names)")
    distill.add_argument("--iterations", type=int, default=200, help="optimizer steps (default: 200)")
    distill.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate, cosine-decayed (default: 2e-5)")
    distill.add_argument("--batch-size", type=int, default=2,
                         help="recorded denoiser calls per step, gradients accumulated (default: 2)")
    distill.add_argument("--feature-weight", type=float, default=1.0,
                         help="weight of the normalized feature loss against the output MSE (default: 1)")
    distill.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    distill.add_argument("--prompts", metavar="FILE", help="training prompts, one per line (default: the model's "
                         "calibration prompts)")
    distill.add_argument("--num-prompts", type=int, default=8, help="training prompts used (default: 8)")
    distill.add_argument("--eval-prompts", metavar="FILE",
                         help="held-out prompts for PSNR before/after (default: the report's, else built-in)")
    distill.add_argument("--num-eval-prompts", type=int, default=8, help="evaluation prompts (default: 8)")
    distill.add_argument("--seed", type=int, default=0, help="seed of the training order (default: 0)")
    distill.add_argument("--quiet", action="store_true", help="no progress output")
    distill.add_argument("--json", action="store_true", help="print the recovery section as JSON on stdout")


def _add_search_options(parser: argparse.ArgumentParser, *, worker: bool = False) -> None:
    """The model, generation and search options ``optimize`` and ``search --worker`` share."""
    _add_model(parser)
    parser.add_argument("--budget", action="append", metavar="Nx",
                        help="target speedup, e.g. 2x; repeat for several (default: 2x)")
    parser.add_argument("--passes", default=None,
                        help="comma-separated passes to use, applied in the order steps,prune,quant,sparse,cache "
                             "(default: steps,cache)")
    if worker:
        parser.add_argument("--trials", type=int, required=True,
                            help="trials for this worker to run (0: only create or check the study)")
    else:
        parser.add_argument("--trials", type=int, default=12, help="search trials in total (default: 12)")
    parser.add_argument("--steps", type=int, default=28, help="sampler steps of the baseline (default: 28)")
    parser.add_argument("--prompts", metavar="FILE", help="calibration prompts, one per line")
    parser.add_argument("--num-prompts", type=int, default=8,
                        help="calibration prompts the search scores trials on (default: 8; fewer makes choices noisy)")
    parser.add_argument("--eval-prompts", metavar="FILE",
                        help="held-out evaluation prompts (default: a held-out split of the built-in set)")
    parser.add_argument("--num-eval-prompts", type=int, default=8, help="evaluation prompts (default: 8)")
    parser.add_argument("--num-val-prompts", type=int, default=8,
                        help="validation prompts the best trials per budget are re-scored on before one is chosen "
                             "(default: 8; a plan replaces fewer steps only on a significant gain over at least 4)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--cost", default="roofline", choices=["roofline", "latency"],
                        help="cost measure: roofline cost model (default) or measured latency")
    parser.add_argument("--cost-target", choices=["cpu", "h100"], default=None,
                        help="device table for the roofline cost (default: cpu on CPU, h100 on CUDA)")
    if worker:
        parser.add_argument("--storage", required=True,
                            help="Optuna storage URL of the shared study: postgresql://user:pw@host/db "
                                 "(or sqlite:///file.db on one machine)")
    else:
        parser.add_argument("--storage", default=None,
                            help="Optuna storage URL (default: sqlite in OUT); postgresql://... to share a study")
    parser.add_argument("--study", default=None, help="study name (default: derived from model and settings)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="frames per video, for video pipelines (default: the pipeline's)")
    _add_call_arg(parser)
    parser.add_argument("--heartbeat", type=int, default=10,
                        help="seconds between heartbeats of a running trial (default: 10)")
    parser.add_argument("--grace-period", type=int, default=None,
                        help="seconds without heartbeat after which a running trial counts as dead, is "
                             "marked failed and retried (default: 3x --heartbeat); workers of one study must agree")


def _add_call_arg(parser: argparse.ArgumentParser, note: str = "stored in the plan") -> None:
    parser.add_argument("--call-arg", action="append", metavar="KEY=VALUE", default=[],
                        help=f"extra pipeline call argument, {note}; VALUE is JSON, else a string; repeat for "
                             "several (e.g. --call-arg max_sequence_length=128 --call-arg negative_prompt=blurry)")


def _settings_from_args(args: argparse.Namespace) -> Any:
    from accelkit.workflows.optimize import OptimizeSettings, parse_budget, parse_call_arguments, parse_passes

    budgets = tuple(args.budget or ["2x"])
    for budget in budgets:
        parse_budget(budget)
    return OptimizeSettings(
        model=args.model, budgets=budgets, passes=parse_passes(args.passes), trials=args.trials, steps=args.steps,
        num_prompts=args.num_prompts, num_eval_prompts=args.num_eval_prompts,
        num_val_prompts=args.num_val_prompts, prompts_file=args.prompts,
        eval_prompts_file=args.eval_prompts, seed=args.seed, device=args.device, cost=args.cost,
        cost_target=args.cost_target, min_psnr=args.min_psnr, storage=args.storage, study=args.study,
        out=args.out, height=args.height, width=args.width, guidance_scale=args.guidance_scale,
        call_args=parse_call_arguments(args.call_arg), num_frames=args.num_frames, heartbeat=args.heartbeat,
        grace_period=args.grace_period, overwrite=getattr(args, "overwrite", False))


def _version() -> str:
    from accelkit.workflows import __version__

    return f"accelkit {__version__}"


def _console(quiet: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from accelkit.workflows.inspect import inspect_model

    found = inspect_model(args.model, height=args.height, width=args.width, num_frames=args.num_frames,
                          call_args=args.call_arg)
    if args.json:
        print(json.dumps(found.to_dict(), indent=2))
        return 0
    console = _console()
    generation = found.generation
    console.print(f"[bold]{found.model}[/]: {found.family}, {found.params / 1e6:.2f} M parameters, "
                  f"{found.flops_per_step / 1e9:.3f} GFLOP per denoiser call at "
                  f"{generation['height']}x{generation['width']}")
    table = Table(title="blocks")
    for column in ("#", "block", "kind", "FLOPs share", "weights"):
        table.add_column(column, justify="right" if column in ("#", "FLOPs share", "weights") else "left")
    for index, block in enumerate(found.blocks):
        table.add_row(str(index), block.name, block.kind, f"{100 * block.flops_share:.1f}%",
                      f"{block.weight_bytes / 1e6:.2f} MB")
    console.print(table)
    sites = Table(title=f"attention sites ({len(found.attention_sites)}); {found.linear_sites} linear layers")
    sites.add_column("node")
    sites.add_column("tokens", justify="right")
    for name, count in found.attention_sites.items():
        sites.add_row(name, str(count))
    console.print(sites)
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from accelkit.workflows.optimize import optimize

    settings = _settings_from_args(args)
    console = _console(quiet=args.quiet or args.json)
    run = optimize(settings, export=args.export, console=console, progress=not (args.quiet or args.json))
    result = run.result
    summary = {
        "out": str(result.out), "study": result.study_name, "exit_code": result.exit_code,
        "report": str(result.report_path) if result.report_path else None,
        "budgets": [{"budget": o.budget, "met": o.met, "speedup": o.speedup, "psnr": o.psnr,
                     "plan": str(o.plan_dir) if o.plan_dir else None, "message": o.message}
                    for o in result.outcomes],
    }
    if run.exports:
        summary["exports"] = {budget: str(directory) for budget, directory in run.exports.items()}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(f"report: {result.report_path}")
        failed = [o for o in result.outcomes if not o.met]
        if failed:
            console.print("[red]not met:[/] " + "; ".join(o.message for o in failed))
    return result.exit_code


def cmd_search(args: argparse.Namespace) -> int:
    from accelkit.errors import InputError
    from accelkit.workflows.optimize import run_worker

    settings = _settings_from_args(args)
    if settings.trials < 0:
        raise InputError(f"--trials must be at least 0, got {settings.trials}")
    console = _console(quiet=args.quiet or args.json)
    result = run_worker(settings, console=console, progress=not (args.quiet or args.json))
    summary = {"study": result.study_name, "ran": result.ran, "states": result.states,
               "exit_code": result.exit_code}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        states = ", ".join(f"{count} {state.lower()}" for state, count in sorted(result.states.items()))
        console.print(f"study '{result.study_name}': this worker finished {result.ran} trial(s)"
                      + (f" ({states})" if states else ""))
    return result.exit_code


def cmd_report(args: argparse.Namespace) -> int:
    from accelkit.workflows.optimize import render_report, report_study

    if args.storage is None:
        from accelkit.errors import InputError

        stray = [f"--{n.replace('_', '-')}" for n in ("study", "model", "budget", "min_psnr", "device")
                 if getattr(args, n) is not None]
        if stray:
            raise InputError(f"{', '.join(stray)} need --storage (they choose what to report from a shared study)")
        print(render_report(args.out))
        return 0
    console = _console(quiet=args.quiet)
    result = report_study(args.out, args.storage, args.study, model=args.model, budgets=args.budget,
                          min_psnr=args.min_psnr, device=args.device, console=console)
    failed = [o for o in result.outcomes if not o.met]
    if failed:
        console.print("[red]not met:[/] " + "; ".join(o.message for o in failed))
    print(result.report_path)
    return result.exit_code


def cmd_run(args: argparse.Namespace) -> int:
    from accelkit.workflows.run import run_plan

    result = run_plan(args.out, args.budget, prompts=args.prompt, output=args.output, model=args.model,
                      device=args.device, backend=args.backend, steps=args.steps, strict_steps=args.strict_steps,
                      num_images=args.num_images, num_frames=args.num_frames, seed=args.seed, check=args.check,
                      call_args=args.call_arg)
    if result.check_psnr is not None:
        print(f"check: PSNR {result.check_psnr:.2f} dB against the original pipeline")
    print("\n".join(str(path) for path in result.written))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from accelkit.workflows.export import export

    print(export(args.out, args.budget, target=args.target, model=args.model))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from accelkit.errors import InputError
    from accelkit.workflows.recover import DistillConfig, check_recoverable, distill_plan

    for flag in ("num_prompts", "num_eval_prompts"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    config = DistillConfig(iterations=args.iterations, lr=args.lr, batch_size=args.batch_size,
                           feature_weight=args.feature_weight, seed=args.seed)
    quiet = args.quiet or args.json
    console = _console(quiet=quiet)
    bar = Progress(TextColumn("distill"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[losses]}"), TimeElapsedColumn(), console=console, disable=quiet)
    task = bar.add_task("steps", total=config.iterations, losses="")
    # A plan that cannot be distilled fails here, before the model loads and any bar is drawn.
    check_recoverable(args.out, args.budget)

    def progress(step: int, total: int, losses: dict[str, float]) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=step,
                   losses=f"output {losses['output']:.3g}  feature {losses['feature']:.3g}")
        if step == total:
            bar.stop()

    try:
        result = distill_plan(args.out, args.budget, config, model=args.model, device=args.device,
                              prompts_file=args.prompts, eval_prompts_file=args.eval_prompts,
                              num_prompts=args.num_prompts, num_eval_prompts=args.num_eval_prompts,
                              progress=progress, say=console.print)
    except KeyboardInterrupt:
        print("accelkit: interrupted; the plan is unchanged", file=sys.stderr)
        return 130
    finally:
        bar.stop()
    recovery = result.recovery
    if args.json:
        print(json.dumps(recovery, indent=2))
    else:
        console.print(f"plan {result.plan_dir.name}: PSNR {recovery['psnr_before']:.2f} -> {recovery['psnr_after']:.2f} dB "
                      f"on {recovery['eval_prompts']} held-out prompts after {config.iterations} steps "
                      f"({recovery['seconds']:.0f} s); weights in {result.plan_dir / 'weights.safetensors'}"
                      + ("; report updated" if result.report_updated else ""))
    return 0


COMMANDS = {"inspect": cmd_inspect, "optimize": cmd_optimize, "search": cmd_search, "report": cmd_report,
            "run": cmd_run, "export": cmd_export, "distill": cmd_distill}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from accelkit._signals import last_signal, terminate_as_interrupt
    from accelkit.cli.validate import validate_args
    from accelkit.errors import Interrupted

    try:
        with terminate_as_interrupt():
            # Every value is checked before anything loads or is written.
            validate_args(args)
            code = COMMANDS[args.command](args)
            # A command that caught the signal itself reports 130; SIGTERM's code is 143.
            return 128 + last_signal() if code == 130 and last_signal() else code
    except AccelkitError as error:
        if args.debug:
            raise
        return _fail(str(error), error.exit_code)
    except KeyboardInterrupt as error:
        signum = error.signum if isinstance(error, Interrupted) else signal.SIGINT
        print("accelkit: interrupted" if signum == signal.SIGINT else "accelkit: terminated", file=sys.stderr)
        return 128 + int(signum)
    except OSError as error:
        if args.debug:
            raise
        if error.errno in _ENVIRONMENT_ERRNOS:
            where = f" '{error.filename}'" if error.filename else ""
            return _fail(f"cannot write or read{where}: {error.strerror}; {_ENVIRONMENT_ERRNOS[error.errno]}", 2)
        return _internal_error(error)
    except MemoryError:
        if args.debug:
            raise
        return _fail("out of memory: lower --height/--width, --num-prompts or the model size", 2)
    except Exception as error:  # noqa: BLE001 - one line for users, the traceback behind --debug
        if args.debug:
            raise
        if type(error).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
            return _fail("out of GPU memory: lower --height/--width or use a larger GPU", 2)
        return _internal_error(error)


#: Failures of the machine around accelkit, not of accelkit: each names what to change.
_ENVIRONMENT_ERRNOS = {
    errno.EROFS: "the file system is read-only: pass a writable --out / output path",
    errno.EACCES: "permission denied: pass a path you may write",
    errno.EPERM: "permission denied: pass a path you may write",
    errno.ENOSPC: "the disk is full: free space or pass another --out (nothing was half-written)",
    errno.EDQUOT: "the disk quota is exceeded: free space or pass another --out (nothing was half-written)",
    errno.ENOTDIR: "a part of the path is a file: pass a directory",
    errno.EISDIR: "the path is a directory: pass a file path",
    errno.EEXIST: "something else already exists there: pass another path",
}


def _fail(message: str, code: int) -> int:
    print(f"accelkit: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _internal_error(error: BaseException) -> int:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return _fail(f"internal error {type(error).__name__}: {first} (this is a bug: please report it "
                 "with the traceback that --debug prints)", 1)


if __name__ == "__main__":
    sys.exit(main())

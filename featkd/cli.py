"""The `featkd` command line.

    featkd quickstart                         compare KD, FitNets, AT, RKD on digits (3 seeds)
    featkd quickstart --text                  compare KD, TinyBERT, MiniLM, MiniLMv2 on generated text
    featkd train CONFIG [key=value ...]       one run from a YAML config (--resume RUN_DIR continues one)
    featkd eval CHECKPOINT                    top-1 of a trained model on its test set
    featkd sweep CONFIG --grid k=v1,v2 ...    a grid of overrides x seeds -> results table
    featkd compare FILE [key=value ...]       variants x seeds -> results table
    featkd report FOLDER                      an HTML page with plots of a run, comparison or sweep
    featkd inspect MODEL                      hookable module names with their shapes
    featkd list [losses|models|...]           what the registries hold
    featkd config CONFIG [key=value ...]      print the resolved, validated config
    featkd bench [SUITE]                      benchmarks that print numbers (overhead, scaling, cache, rkd-angle)
    featkd bench deploy RUN_DIR               teacher, student and its exports: top-1, size, CPU latency
    featkd export RUN_DIR --format onnx       the student as ONNX or TorchScript (--quantize int8), with a model card
    featkd predict EXPORT_DIR INPUTS          run an exported student on a .npy of samples or a .txt of texts

Bad input (an unknown key, loss, model, feature name, a missing file) prints one message
saying what was wrong and what to do, and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

KINDS = ("losses", "adapters", "models", "datasets", "optimizers", "schedulers")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featkd", description="Feature- and relation-based knowledge distillation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="run one experiment from a YAML config (or resume one)")
    p.add_argument("config", nargs="?", help="path to a YAML config, or the name of a shipped one (quickstart)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.kd.temperature=2 logger=none")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--smoke", action="store_true",
                   help="check the config end to end in seconds: tiny synthetic data, one epoch per stage")

    p = sub.add_parser("eval", help="top-1 of a trained model's checkpoint on its test set")
    p.add_argument("checkpoint", help="a checkpoint of a featkd run (e.g. runs/<run>/checkpoints/best.pt)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("sweep", help="run a grid of overrides over a config (seeds as replicates)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="overrides applied to every point of the grid")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="an axis of the grid; `seed` is the replicate axis (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, in separate processes (default 1)")
    p.add_argument("--name", help="the sweep's name (folder and W&B group)")
    p.add_argument("--wandb-sweep", metavar="FILE", help="write a W&B sweep YAML for the grid instead of running it")

    p = sub.add_parser("compare", help="run the variants of a comparison file over seeds; print a table")
    p.add_argument("file", help="comparison YAML (base config, seeds, variants)")
    p.add_argument("overrides", nargs="*", help="overrides applied to the base config of every variant")
    p.add_argument("--seeds", help="comma-separated seeds, replacing the file's list")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, in separate processes (default 1)")
    p.add_argument("--smoke", action="store_true", help="every variant on tiny synthetic data, one epoch, one seed")

    p = sub.add_parser("report", help="an HTML page with plots of a run, comparison or sweep folder")
    p.add_argument("folder", help="a run folder (featkd train), comparison folder (featkd compare) or sweep folder "
                                  "(featkd sweep)")
    p.add_argument("--out", metavar="FOLDER", help="write report.html and its plots here (default: into FOLDER)")

    p = sub.add_parser("quickstart", help="distil a CNN on digits with KD, FitNets, AT and RKD vs the student alone "
                                          "(--text: a transformer on generated sentences with KD, TinyBERT, MiniLM, MiniLMv2)")
    p.add_argument("--text", action="store_true", help="the text quickstart (configs/nlp/compare.yaml)")
    p.add_argument("overrides", nargs="*", help="overrides for every run, e.g. train.epochs=5")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, in separate processes (default 1)")

    p = sub.add_parser("inspect", help="list a model's hookable module names with their shapes")
    p.add_argument("model", help="built-in name, timm:<name>, torchvision:<name> or hf:<folder>")
    p.add_argument("--input-shape", help="per-sample input shape, e.g. 3,32,32 (default: the model's own); "
                                         "for text models, the sequence length (default 16)")
    p.add_argument("--vocab-size", type=int, default=1000, help="built-in text models: vocabulary size (default 1000)")
    p.add_argument("--num-classes", type=int, help="classifier size (default 10; 1000 for timm/torchvision)")
    p.add_argument("--depth", type=int, default=None, help="only show names with at most this many dots + 1")

    p = sub.add_parser("list", help="list registered losses, adapters, models, datasets, ...")
    p.add_argument("kind", nargs="?", choices=KINDS, help="one kind (default: all)")

    p = sub.add_parser("bench", help="benchmarks that print numbers (and write them as JSON)")
    p.add_argument("suite", nargs="?", default="overhead",
                   choices=["overhead", "scaling", "cache", "rkd-angle", "deploy"],
                   help="overhead (default): step time and memory per method vs student step + teacher forward; "
                        "scaling: relational losses vs batch size; cache: epoch times with the teacher cache; "
                        "rkd-angle: direct vs Gram-matrix RKD angle; deploy RUN_DIR: a run's teacher, student "
                        "and its exports side by side")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="deploy: the run folder")
    p.add_argument("--threads", type=int, default=None, help="deploy: CPU threads for timing (default torch's)")
    p.add_argument("--teacher", default="torchvision:resnet34",
                   help="image model, or a text model (hf:<folder or type>, transformer): then the text methods")
    p.add_argument("--student", default="torchvision:resnet18")
    p.add_argument("--teacher-args", help="text models: JSON arguments (an hf: model type's config)")
    p.add_argument("--student-args", help="text models: JSON arguments")
    p.add_argument("--vocab", type=int, default=30522, help="text models: vocabulary size (default BERT's 30522)")
    p.add_argument("--input-shape", default="3,32,32", help="per-sample shape; text models: sequence length")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=None, help="overhead/cache: 64; rkd-angle: 256")
    p.add_argument("--dim", type=int, default=2048, help="rkd-angle: embedding size")
    p.add_argument("--batches", default="32,64,128,256,512,1024", help="scaling: batch sizes")
    p.add_argument("--methods", default=None,
                   help="overhead: comma-separated methods or groups, '+' to combine, '+dot' to train with the DOT "
                        "optimizer (default: kd,fitnet,at,sp,rkd,crd,kd+at+rkd; zoo2: the zoo's later methods; "
                        "all: both; text: kd,distilbert,minilm,minilmv2,tinybert)")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats (median); overhead: 20, others: 3")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="overhead: skip the peak-memory subprocesses")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the results to this JSON file")

    p = sub.add_parser("export", help="export a run's student to ONNX or TorchScript, with a model card and a "
                                      "parity report")
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="a finished run folder, or a checkpoint file")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--quantize", choices=["int8"], help="int8 with ONNX Runtime's quantizer (ONNX only)")
    p.add_argument("--out", help="the export folder (default: RUN_DIR/export-<format>[-int8])")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the latency measured in the card")

    p = sub.add_parser("predict", help="classify inputs with an exported student")
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="a folder written by `featkd export`")
    p.add_argument("inputs", metavar="INPUTS", help="a .npy array of samples, or a .txt file of one text per line")
    p.add_argument("--top", type=int, default=1, help="show the K most likely classes (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")

    p = sub.add_parser("config", help="print a config after merging bases and overrides, validated")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    return parser


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        from featkd.errors import ConfigError

        raise ConfigError(f"--seeds {text!r}: give integers separated by commas, e.g. --seeds 0,1,2") from None


def cmd_train(args: argparse.Namespace) -> int:
    from featkd.config import load_config
    from featkd.errors import ConfigError
    from featkd.run_folder import resume_config
    from featkd.summary import summary_lines
    from featkd.trainer import train

    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], None
    if args.resume:
        given = load_config(args.config, args.overrides) if args.config else None
        if args.overrides and not args.config:
            raise ConfigError("--resume continues a run with its own config; overrides need CONFIG as well.")
        result = train(resume_config(args.resume, given), args.resume, resume=True)
    else:
        if not args.config:
            raise ConfigError("featkd train needs a CONFIG (or --resume RUN_DIR).")
        config = load_config(args.config, args.overrides)
        if args.smoke:
            from featkd.config import smoke_config

            config = smoke_config(config)
        result = train(config)
    from featkd import distributed

    if distributed.rank() == 0:
        print("\n".join(summary_lines(result)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from featkd.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.device)
    print(f"{result['checkpoint']}: {result['model']} ({result['params']:,} parameters), stage {result['stage']}, "
          f"epoch {result['epoch']}")
    print(f"test top-1 {result['acc']:.2f}%  cross-entropy {result['loss']:.4f}  on {result['samples']} samples")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from featkd.sweep import parse_grid, run_sweep, wandb_sweep_yaml

    grid = parse_grid(args.grid)
    if args.wandb_sweep:
        from pathlib import Path

        Path(args.wandb_sweep).write_text(wandb_sweep_yaml(args.config, grid, args.overrides, args.name))
        print(f"wrote {args.wandb_sweep}; start it with `wandb sweep {args.wandb_sweep}` and `wandb agent <id>`")
        return 0
    result = run_sweep(args.config, grid, args.overrides, args.jobs, args.name)
    print()
    print(result.markdown())
    print(f"\n{len(result.runs)} runs in {result.seconds:.0f}s; results in {result.folder}/results.md (.csv)")
    if result.report:
        print(f"report in {result.report}")
    return 0


def cmd_compare(args: argparse.Namespace, file: str | None = None) -> int:
    from featkd.compare import run_comparison

    result = run_comparison(file or args.file, args.overrides, _seeds(args.seeds), jobs=args.jobs,
                            smoke=getattr(args, "smoke", False))
    print()
    print(result.markdown())
    print(f"\n{len(result.rows)} runs in {result.seconds:.0f}s; results in {result.folder}/results.md (.csv, .json)")
    if result.report:
        print(f"report in {result.report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from featkd.report import write_report

    print(write_report(args.folder, args.out))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import inspect

    import torch

    import featkd

    from featkd.capture import list_modules
    from featkd.models import build_model, default_input_shape

    from featkd.text_models import example_text_input

    external = ":" in args.model
    text = args.model.startswith("hf:") or (":" not in args.model and "text" in inspect.signature(
        featkd.MODELS.get(args.model)).parameters)
    shape = _shape(args.input_shape) if args.input_shape else ((16,) if text else default_input_shape(args.model))
    classes = args.num_classes or (1000 if external and not text else 10)
    extra = {"vocab_size": args.vocab_size} if text and not external else {}
    model = build_model(args.model, classes, shape, extra)
    example = example_text_input(model, length=shape[0]) if text else torch.zeros((2, *shape))
    rows = list_modules(model, example)
    if args.depth is not None:
        rows = [r for r in rows if r.name.count(".") < args.depth]
    fmt = lambda s: "x".join(map(str, s[1:])) if s else "-"  # noqa: E731 (per-sample shape)
    width = max([len(r.name) for r in rows] + [4])
    type_width = max([len(r.type) for r in rows] + [4])
    what = f"{example['input_ids'].shape[1]} tokens" if text else f"input {fmt((0, *shape))}, {classes} classes"
    ports = ", NAME#i (element i of a tuple output), ATTN:attention / ATTN:scores (self-attention maps)" if text else ""
    print(f"{args.model}: {what}. Feature names: NAME (output), NAME:in (input){ports}.")
    print(f"{'name':<{width}}  {'type':<{type_width}}  {'input':>14}  {'output':>14}  {'params':>10}")
    for r in rows:
        calls = f"  (runs {r.calls}x: use {r.name}@0..@{r.calls - 1})" if r.calls > 1 else ""
        calls = "  (not run)" if r.calls == 0 else calls
        print(f"{r.name:<{width}}  {r.type:<{type_width}}  {fmt(r.input_shape):>14}  {fmt(r.output_shape):>14}  {r.params:>10,}{calls}")
    return 0


def _json_arg(text: str | None, option: str) -> dict | None:
    import json

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        value = exc
    if not isinstance(value, dict):
        from featkd.errors import ConfigError

        raise ConfigError(f"{option} {text!r}: give a JSON object, e.g. '{{\"num_hidden_layers\": 4}}'.")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in re.split(r"[,x]", text.strip()))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        from featkd.errors import ConfigError

        raise ConfigError(f"--input-shape {text!r}: give positive integers, e.g. 3,32,32")
    return shape


def cmd_list(args: argparse.Namespace) -> int:
    import featkd

    registries = {
        "losses": featkd.LOSSES, "adapters": featkd.ADAPTERS, "models": featkd.MODELS,
        "datasets": featkd.DATASETS, "optimizers": featkd.OPTIMIZERS, "schedulers": featkd.SCHEDULERS,
    }
    for kind in [args.kind] if args.kind else KINDS:
        registry = registries[kind]
        names = registry.names()
        print(f"{kind}:")
        width = max(len(n) for n in names)
        for name in names:
            print(f"  {name:<{width}}  {registry.describe(name)}")
        if kind == "models":
            print(f"  {'timm:<name>':<{width}}  any timm model, built without downloading")
            print(f"  {'torchvision:<name>':<{width}}  any torchvision classification model, built without downloading")
            print(f"  {'hf:<folder or type>':<{width}}  a Hugging Face transformers model from a save_pretrained folder, or "
                  "a model type (bert, ...) with its config under args (the nlp extra)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from featkd.bench import common

    if args.suite == "deploy":
        return _bench_deploy(args)
    elif args.run_dir is not None:
        from featkd.errors import ConfigError

        raise ConfigError(f"featkd bench {args.suite} takes no run folder; did you mean `featkd bench deploy "
                          f"{args.run_dir}`?")
    shape = _shape(args.input_shape)
    if args.suite == "overhead":
        from featkd.bench import overhead

        text = overhead.is_text_model(args.teacher)
        methods = args.methods.split(",") if args.methods else overhead.TEXT_METHODS if text else overhead.METHODS
        settings = {"teacher": args.teacher, "student": args.student, "input_shape": shape, "classes": args.classes,
                    "batch": args.batch or 64, "repeats": args.repeats or 20, "device": args.device,
                    "precision": args.precision, "channels_last": args.channels_last}
        if text:
            settings.update(vocab=args.vocab, teacher_args=_json_arg(args.teacher_args, "--teacher-args"),
                            student_args=_json_arg(args.student_args, "--student-args"))
        results = overhead.run(**settings, methods=methods, memory=not args.no_memory)
        overhead.report(results, settings)
    elif args.suite == "scaling":
        from featkd.bench import scaling

        settings = {"batches": [int(b) for b in args.batches.split(",")], "repeats": args.repeats or 3,
                    "device": args.device}
        results = scaling.run(**settings)
        scaling.report(results)
    elif args.suite == "cache":
        from featkd.bench import cache

        settings = {"teacher": args.teacher, "student": args.student, "input_shape": shape, "classes": args.classes,
                    "batch": args.batch or 64, "device": args.device}
        results = cache.run(**settings)
        cache.report(results, {**settings, "samples": 1024})
    else:
        from featkd.bench import rkd_angle

        settings = {"batch": args.batch or 256, "dim": args.dim, "repeats": args.repeats or 3, "device": args.device}
        results = rkd_angle.run(**settings)
        rkd_angle.report(results)
    print(f"machine: {common.machine()}")
    if args.json:
        common.write_json(args.json, args.suite, [asdict(r) for r in results], settings=settings)
    return 0


def _bench_deploy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from featkd.bench import common, deploy
    from featkd.errors import ExportError

    if args.run_dir is None:
        raise ExportError("featkd bench deploy needs a run folder: featkd bench deploy runs/<name>-<time>")
    settings = {"run_dir": args.run_dir, "batch_sizes": [1, 32], "repeats": args.repeats or 30,
                "threads": args.threads}
    rows = deploy.run(args.run_dir, tuple(settings["batch_sizes"]), settings["repeats"], args.threads)
    deploy.report(rows, settings)
    print(f"machine: {common.machine()}")
    path = args.json or str(Path(args.run_dir) / "deploy.json")
    common.write_json(path, "deploy", deploy.to_json(rows), settings=settings)
    print(f"written to {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from featkd.deploy.export import Quantization, export

    result = export(args.source, args.format, args.quantize, args.out, args.overwrite, threads=args.threads)
    p, card = result.parity, result.card
    print(f"exported     {result.folder}  ({card['format']}, {card['exporter']})")
    if card["quantization"]:
        q = card["quantization"]
        print(f"int8         {Quantization(q['method'], q['int8'], q['fp32']).describe()}")
    print(f"parity       {p['samples']} test samples: top-1 {p['exported_top1']:.2f}% exported, "
          f"{p['pytorch_top1']:.2f}% PyTorch; same top-1 on {p['top1_agreement']:.2f}%; "
          f"max |logit| difference {p['max_abs_logit_difference']:.2e}"
          + (f" ({'ok' if p['passed'] else 'ABOVE'} the fp32 tolerance {p['tolerance']:.0e})" if "passed" in p else ""))
    measured = card.get("measured")
    if measured:
        e, t = measured["export"], measured["pytorch_fp32"]
        print(f"size         {e['file_mb']:.3f} MB exported, {t['file_mb']:.3f} MB of fp32 weights")
        for b in (1, 32):
            print(f"batch {b:<6} {e[f'latency_b{b}_median_ms']:.3f} ms exported, "
                  f"{t[f'latency_b{b}_median_ms']:.3f} ms PyTorch (median, CPU, {e['threads']} threads)")
        for note in measured["notes"]:
            print(f"note         {note}")
    if not result.passed:
        print("featkd: error: the fp32 export does not match the PyTorch student within the tolerance; see "
              f"{result.folder / 'parity.json'}", file=sys.stderr)
        return 1
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from featkd.deploy.predict import Predictor

    predictions = Predictor(args.export_dir).predict_file(args.inputs, top=args.top)
    for p in predictions:
        if args.json:
            print(json.dumps({"index": p.index, "label": p.label, "probability": p.probability,
                              "top": [[label, prob] for label, prob in p.top]}))
        else:
            ranked = "  ".join(f"{label} {prob:.3f}" for label, prob in p.top)
            print(f"{p.index}\t{ranked}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from featkd.config import dump_yaml, load_config

    from featkd.trainer import check

    config = load_config(args.config, args.overrides)
    check(config)  # what `featkd train` checks before it starts
    print(dump_yaml(config), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("WANDB_SILENT", "true")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (`featkd train CONFIG --smoke key=value`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from featkd.engine import Interrupted, NonFiniteLoss
    from featkd.errors import FeatkdError

    handlers = {
        "train": cmd_train,
        "eval": cmd_eval,
        "sweep": cmd_sweep,
        "compare": cmd_compare,
        "report": cmd_report,
        "quickstart": lambda a: cmd_compare(a, "nlp/compare" if a.text else "quickstart_compare"),
        "inspect": cmd_inspect,
        "list": cmd_list,
        "config": cmd_config,
        "bench": cmd_bench,
        "export": cmd_export,
        "predict": cmd_predict,
    }
    try:
        return handlers[args.command](args)
    except NonFiniteLoss as exc:
        print(f"featkd: error: {exc}", file=sys.stderr)
        return 3
    except FeatkdError as exc:
        print(f"featkd: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        run_dir = exc.checkpoint.parent.parent if exc.checkpoint else None
        print(f"featkd: stopped by {signal_name(exc.signum)} in stage {exc.stage!r} (epoch {exc.epoch}, batch "
              f"{exc.batch}); checkpoint written. Resume with: featkd train --resume {run_dir}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("featkd: interrupted", file=sys.stderr)
        return 130


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


if __name__ == "__main__":
    sys.exit(main())

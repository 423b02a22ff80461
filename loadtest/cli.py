"""`kvsplice-loadtest`: load-test kvsplice servers over HTTP and write a report.

    kvsplice-loadtest concurrency -c 8 --url http://127.0.0.1:8000
    kvsplice-loadtest rate --rate 4 --burstiness 0.5
    kvsplice-loadtest sweep --concurrency 1,4,16,64
    kvsplice-loadtest capacity --input-len 2000 --output-len 32 --slo-ttft-ms 2000
    kvsplice-loadtest compare --url-a http://127.0.0.1:8000 --url-b http://127.0.0.1:8001
    kvsplice-loadtest report results/results.json

Exit status: 0 done; 1 the server failed or vanished (partial results saved); 2 bad usage;
130 interrupted (partial results saved).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from loadtest.capacity import SearchConfig
from loadtest.client import ServerUnavailable
from loadtest.lengths import LengthSpec
from loadtest.modes import CAPACITY_TOKENS, Session, run_capacity, run_compare, run_loads
from loadtest.output import write_outputs, write_report
from loadtest.results import ResultStore
from loadtest.runner import Limits, Load, ServerFailed
from loadtest.safety import UnsafeTarget, check_target
from loadtest.stats import SLOs
from loadtest.table import terminal_summary
from loadtest.target import ClientOptions
from loadtest.workload import KINDS, WorkloadConfig

PROG = "kvsplice-loadtest"
DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_OK, EXIT_SERVER, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "mode"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.mode == "report":
        return rerender(Path(args.results))
    try:
        for url in _urls(args):
            check_target(url, args.allow_remote)
        session = build_session(args, f"{PROG} {shlex.join(argv)}")
    except (UnsafeTarget, ValueError) as exc:
        parser.exit(EXIT_USAGE, f"{PROG}: error: {exc}\n")
    return execute(session, args)


def execute(session: Session, args: argparse.Namespace) -> int:
    store = session.store
    status, error, code = "complete", None, EXIT_OK
    try:
        asyncio.run(_dispatch(session, args))
    except (ServerFailed, ServerUnavailable) as exc:
        status, error, code = "partial", str(exc), EXIT_SERVER
    except KeyboardInterrupt:
        status, error, code = "interrupted", "interrupted by the user", EXIT_INTERRUPTED
    except ValueError as exc:  # a workload the server cannot take (e.g. no max_model_len for 'long')
        status, error, code = "partial", str(exc), EXIT_USAGE
    except BaseException as exc:  # a bug: keep what was measured, then let the traceback show
        store.finish("partial", f"internal error: {type(exc).__name__}: {exc}")
        write_outputs(store, plots=False)
        raise
    store.finish(status, error)
    doc = write_outputs(store, plots=not args.no_plots)
    print(terminal_summary(doc))
    print(f"\nresults: {store.out_dir}/ (results.json, summary.csv, requests.csv, report.md, plots)")
    if error:
        print(f"{PROG}: {status}: {error}", file=sys.stderr)
    return code


async def _dispatch(session: Session, args: argparse.Namespace) -> None:
    try:
        if args.mode in ("concurrency", "rate", "sweep"):
            await run_loads(session, args.url, _loads(args))
        elif args.mode == "capacity":
            await run_capacity(session, args.url)
        elif args.mode == "compare":
            await run_compare(session, args.url_a, args.url_b, _compare_loads(args), not args.no_capacity)
    finally:
        await session.close()


def rerender(results: Path) -> int:
    """`report`: the Markdown and plots again from a results.json (e.g. after the report code changed)."""
    try:
        doc = json.loads(results.read_text())
    except (OSError, ValueError) as exc:
        print(f"{PROG}: error: cannot read {results}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    write_report(doc, results.parent, plots=True)
    print(f"wrote {results.parent}/report.md and plots")
    return EXIT_OK


# ---------------------------------------------------------------- building the session


def build_session(args: argparse.Namespace, command: str) -> Session:
    slos = SLOs(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_itl_ms, args.slo_e2e_ms, args.slo_quantile)
    workload = WorkloadConfig(args.dataset, args.input_len, args.output_len, args.dataset_path, args.seed,
                              args.shared_prefix_len)
    workload.validate()
    limits = Limits(args.max_requests, args.duration_s, args.grace_s, args.max_consecutive_failures)
    search = SearchConfig(
        **{k: getattr(args, k) for k in ("start", "limit", "trial_waves", "confirm_waves", "trial_duration_s",
                                         "max_trials") if hasattr(args, k)},
        poll_interval_s=getattr(args, "capacity_poll_s", 0.1), slos=slos)
    options = ClientOptions(args.allow_remote, args.model, args.api_key, args.request_timeout_s,
                            args.metrics_prefix, args.temperature, not args.no_ignore_eos,
                            args.seed if args.temperature > 0 else None, args.token_timing)
    setup = {
        "workload": {"kind": args.dataset, "input_len": str(args.input_len) if args.input_len else None,
                     "output_len": str(args.output_len), "path": args.dataset_path, "seed": args.seed,
                     "shared_prefix_len": args.shared_prefix_len,
                     "temperature": args.temperature, "ignore_eos": not args.no_ignore_eos,
                     "token_timing": args.token_timing},
        "limits": {"max_requests": limits.max_requests, "duration_s": limits.duration_s, "grace_s": limits.grace_s,
                   "max_consecutive_failures": limits.max_consecutive_failures,
                   "poll_interval_s": args.metrics_interval_s},
        "search": {k: v for k, v in vars(search).items() if k != "slos"} if args.mode in ("capacity", "compare")
        else None,
    }
    out_dir = Path(args.out or f"loadtest-results/{args.mode}-{datetime.now():%Y%m%d-%H%M%S}")
    store = ResultStore(out_dir, args.mode, command, slos, setup, getattr(args, "keep_trial_requests", False))
    return Session(store, options, workload, limits, search, args.metrics_interval_s, not args.no_progress)


def _urls(args: argparse.Namespace) -> list[str]:
    return [args.url_a, args.url_b] if args.mode == "compare" else [args.url]


def _loads(args: argparse.Namespace) -> list[Load]:
    common = dict(burstiness=getattr(args, "burstiness", 1.0), max_concurrency=getattr(args, "max_concurrency", None),
                  seed=args.seed)
    if args.mode == "concurrency":
        return [Load(concurrency=args.concurrency, seed=args.seed)]
    if args.mode == "rate":
        return [Load(rate=args.rate, **common)]
    if args.concurrency:
        return [Load(concurrency=n, seed=args.seed) for n in args.concurrency]
    return [Load(rate=r, **common) for r in args.rate]


def _compare_loads(args: argparse.Namespace) -> list[Load | str]:
    return [item if isinstance(item, str) else Load(concurrency=item, seed=args.seed) for item in args.concurrency]


# ---------------------------------------------------------------- parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    sub = parser.add_subparsers(title="modes", metavar="MODE")
    common = _common_options()

    p = sub.add_parser("concurrency", parents=[common], help="closed loop: N requests always in flight")
    _url(p)
    p.add_argument("-c", "--concurrency", type=_positive_int, default=8, help="requests in flight (default 8)")

    p = sub.add_parser("rate", parents=[common], help="open loop: Poisson (or gamma) arrivals at a rate")
    _url(p)
    p.add_argument("-r", "--rate", type=_rate, required=True, help="requests per second ('inf': all at once)")
    _arrivals(p)

    p = sub.add_parser("sweep", parents=[common], help="one run per concurrency or per rate")
    _url(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--concurrency", type=_list(_positive_int), help="e.g. 1,4,16,64")
    which.add_argument("--rate", type=_list(_rate), help="e.g. 1,2,4,inf")
    _arrivals(p)

    p = sub.add_parser("capacity", parents=[common], help="largest sustained concurrency (doubling + bisection)")
    _url(p)
    _search(p)

    p = sub.add_parser("compare", parents=[common], help="the same workload against servers A and B, with capacities")
    p.add_argument("--url-a", required=True, help="server A, e.g. compression ratio 1.0")
    p.add_argument("--url-b", required=True, help="server B, e.g. compression ratio 0.5")
    p.add_argument("--concurrency", type=_list(_concurrency_or_capacity), default=[1, "cap-a", "cap-b"],
                   help="closed-loop loads run on both; 'cap-a' / 'cap-b' = the capacity measured on A / B "
                        "(default 1,cap-a,cap-b)")
    p.add_argument("--no-capacity", action="store_true", help="skip the capacity searches")
    _search(p)

    p = sub.add_parser("report", help="re-render report.md and plots from a results.json")
    p.add_argument("results", help="path of results.json")
    p.set_defaults(mode="report")
    for name, subparser in sub.choices.items():
        subparser.set_defaults(mode=name)
    return parser


def _common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("target")
    g.add_argument("--allow-remote", action="store_true", help="allow a non-loopback server (default: loopback only)")
    g.add_argument("--model", help="model name to request (default: the first one /v1/models lists)")
    g.add_argument("--api-key", default=os.environ.get("KVSPLICE_API_KEY"),
                   help="bearer token (default: $KVSPLICE_API_KEY)")
    g.add_argument("--metrics-prefix", default="kvsplice:", help="prefix of the server's metric names")

    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=KINDS, default="random",
                   help="random words; text windows of --dataset-path; jsonl prompts; long: prompts that fill "
                        "~90%% of the context (default random)")
    g.add_argument("--dataset-path", help="text file (text, long) or JSONL file with 'prompt' per line")
    g.add_argument("--input-len", type=_length, default=None,
                   help="prompt length in words (about one token each): N or LOW:HIGH (default 128)")
    g.add_argument("--output-len", type=_length, default=LengthSpec.fixed(64),
                   help="output tokens per request: N or LOW:HIGH (default 64)")
    g.add_argument("--shared-prefix-len", type=int, default=0, metavar="WORDS",
                   help="every prompt starts with the same WORDS words (one text per seed), as a long system "
                        "prompt would: measures prefix caching (default 0)")
    g.add_argument("--seed", type=int, default=0, help="makes prompts, lengths and arrivals reproducible")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    g.add_argument("--no-ignore-eos", action="store_true", help="let the model stop early (lengths then vary)")
    g.add_argument("--token-timing", choices=("chunks", "logprobs"), default="chunks",
                   help="chunks: ITL per streamed chunk (a chunk may hide several tokens); logprobs: request "
                        "logprobs=0 so each chunk lists its tokens and ITL is exact per token (default chunks)")

    g = p.add_argument_group("limits (every run stops at whichever comes first)")
    g.add_argument("--max-requests", type=_positive_int, default=500, help="requests per run (default 500)")
    g.add_argument("--duration-s", type=_positive_float, default=300.0, help="seconds per run (default 300)")
    g.add_argument("--grace-s", type=_non_negative_float, default=30.0,
                   help="after --duration-s, time for in-flight requests to finish (default 30)")
    g.add_argument("--request-timeout-s", type=_positive_float, default=300.0,
                   help="longest silence within one request (default 300)")
    g.add_argument("--max-consecutive-failures", type=_positive_int, default=20,
                   help="end the run after this many failures in a row, 429s aside (default 20)")

    g = p.add_argument_group("SLOs (milliseconds; used for goodput and capacity)")
    for name, what in (("ttft", "time to first token"), ("tpot", "time per output token"),
                       ("itl", "inter-token latency (capacity only)"), ("e2e", "end-to-end latency (goodput only)")):
        g.add_argument(f"--slo-{name}-ms", type=_positive_float, help=what)
    g.add_argument("--slo-quantile", type=_unit_float, default=0.9,
                   help="capacity checks this quantile of TTFT/TPOT/ITL against the SLOs (default 0.9)")

    g = p.add_argument_group("output")
    g.add_argument("--out", help="results directory (default loadtest-results/MODE-TIMESTAMP)")
    g.add_argument("--metrics-interval-s", type=_positive_float, default=0.5, help="/metrics poll period (default 0.5)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _url(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"server base URL (default {DEFAULT_URL})")


def _arrivals(p: argparse.ArgumentParser) -> None:
    p.add_argument("--burstiness", type=_positive_float, default=1.0,
                   help="gamma shape of inter-arrival times: 1 = Poisson, < 1 burstier, > 1 more regular")
    p.add_argument("--max-concurrency", type=_positive_int, help="cap on requests in flight (default none)")


def _search(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("capacity search")
    g.add_argument("--start", type=_positive_int, default=1, help="first concurrency tried (default 1)")
    g.add_argument("--limit", type=_positive_int, default=1024, help="highest concurrency tried (default 1024)")
    g.add_argument("--trial-waves", type=_positive_int, default=2,
                   help="requests per search trial, in multiples of its concurrency (default 2)")
    g.add_argument("--confirm-waves", type=_positive_int, default=4,
                   help="requests of the confirming steady run, in multiples of the capacity (default 4)")
    g.add_argument("--trial-duration-s", type=_positive_float, default=120.0, help="time limit per trial (default 120)")
    g.add_argument("--max-trials", type=_positive_int, default=30, help="trials at most (default 30)")
    g.add_argument("--capacity-poll-s", type=_positive_float, default=0.1,
                   help="/metrics period during trials: how soon a preempting trial is stopped, and the "
                        "sampling of running requests on a server without num_requests_running_peak "
                        "(default 0.1)")
    g.add_argument("--keep-trial-requests", action="store_true",
                   help="keep every trial request in results.json / requests.csv (default: trial summaries only)")


def _length(text: str) -> LengthSpec:
    try:
        return LengthSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _number(text: str, kind=float):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def _unit_float(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1): {text}")
    return value


def _rate(text: str) -> float:
    return math.inf if text.strip().lower() == "inf" else _positive_float(text)


def _concurrency_or_capacity(text: str) -> int | str:
    text = text.strip().lower()
    return text if text in CAPACITY_TOKENS else _positive_int(text)


def _list(parse):
    def parse_list(text: str) -> list:
        items = [parse(item) for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items

    return parse_list


if __name__ == "__main__":
    sys.exit(main())

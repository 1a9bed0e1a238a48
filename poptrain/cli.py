"""The ``poptrain`` command: argument parsing and the terminal display; no training logic.

Exit codes: 0 success, 1 a training failure, 2 invalid input (nothing was started).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit code is 2 as well; keep it, without a traceback
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"poptrain: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="poptrain", description="Train a population of coupled PyTorch models on Ray, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in (
        ("check", "validate a config and print it resolved; starts nothing"),
        ("run", "train the population described by a config"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("config", help="YAML config file")
        cmd.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted-key overrides, e.g. members.0.optimizer.lr=0.01")
    cmd = sub.add_parser("resume", help="continue an interrupted run from its latest complete checkpoint, into the same MLflow runs")
    cmd.add_argument("run_dir", help="the run's output folder, e.g. runs/prelu_separation")
    sub.add_parser("compare", help="print a population's members side by side: the params that differ, final metrics (RUN_ID [--all])", add_help=False)
    sub.add_parser("schema", help="print the config reference (every key, its type, default and meaning)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import paths in configs (`mypkg.models:Net`) resolve from the working directory, as with
    # `python -m poptrain`; a console script would not look there otherwise.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if argv and argv[0] == "compare":  # its own parser: poptrain compare RUN_ID [--all] [--tracking-uri URI]
        return compare_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "schema":
        from poptrain.config_docs import config_reference

        print(config_reference())
        return EXIT_OK
    from poptrain.config.errors import ConfigError

    try:
        if args.command == "check":
            return _check(args)
        return _run(args)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_USAGE


def _check(args) -> int:
    from poptrain.config.records import dump_config
    from poptrain.driver.population import prepare

    cfg, population, uri = prepare(args.config, args.overrides)
    print(dump_config(cfg), end="")
    for member, values in cfg.varied_values().items():
        print(f"# {member}: {', '.join(f'{key}={value!r}' for key, value in values.items())}")
    _print_stacking(cfg, population)
    by_size: dict[int, list[str]] = {}  # members of one size in one entry: a thousand alike members are one
    for m, shapes in population.param_shapes.items():
        by_size.setdefault(sum(_numel(s) for s in shapes.values()), []).append(m)
    sizes = [f"{_names(members)}: {n:,} parameters{' each' if len(members) > 1 else ''}" for n, members in by_size.items()]
    print(f"# valid: {len(cfg.members)} members ({'; '.join(sizes)}); tracking: {uri}")
    return EXIT_OK


def _names(members: list[str], shown: int = 8) -> str:
    return ", ".join(members[:shown]) + (f" and {len(members) - shown} more" if len(members) > shown else "")


def _print_stacking(cfg, population) -> None:
    """Which members can train as one stacked computation with alike members of their host, and why the others train alone."""
    from poptrain.driver.checks import stacking_problems

    problems = stacking_problems(cfg, population)
    alone: dict[str, list[str]] = {}
    for member, reason in problems.items():
        if reason is not None:
            alone.setdefault(reason, []).append(member)
    stacking = len(problems) - sum(len(v) for v in alone.values())
    print(f"# stacking: {stacking} of {len(problems)} members train stacked where their host carries alike members")
    for reason, members in alone.items():
        print(f"# trains alone: {_names(members)}: {reason}")


def _numel(shape) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out


def _run(args) -> int:
    from poptrain.driver.population import prepare, resume, run

    if args.command == "resume":
        name = args.run_dir
        start = lambda progress: resume(args.run_dir, progress=progress)  # noqa: E731
    else:
        cfg, _, _ = prepare(args.config, args.overrides)  # fail fast, before the display starts
        name = cfg.name
        start = lambda progress: run(cfg, progress=progress)  # noqa: E731
    return _train_with_display(name, start)


def _train_with_display(name: str, start) -> int:
    from poptrain.driver.population import PopulationError

    display = LiveDisplay(name) if sys.stdout.isatty() else PlainDisplay(name)
    try:
        with display:
            result = start(display.update)
    except PopulationError as exc:
        print(f"poptrain: run {name!r} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print_summary(result)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# Display


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


LISTED_MEMBERS = 8  # a larger population is summarised in the terminal, not listed member by member


def display_rows(snapshot: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, state) rows for the displays: every member of a small population; for a larger one,
    its median (step, loss, steps/s, the longest ETA), its best and worst member by loss and its
    slowest, so that a thousand members fit on one screen."""
    members = snapshot["members"]
    if len(members) <= LISTED_MEMBERS:
        return list(members.items())

    def median(values):
        values = sorted(v for v in values if v is not None)
        return values[len(values) // 2] if values else None

    states = list(members.values())
    etas = [s["eta_s"] for s in states if s["eta_s"] is not None]
    middle = {
        "step": median(s["step"] for s in states),
        "loss": median(s["loss"] for s in states),
        "steps_per_s": median(s["steps_per_s"] for s in states),
        "eta_s": max(etas) if etas else None,
    }
    rows = [(f"median of {len(members)}", middle)]
    with_loss = [n for n, s in members.items() if s["loss"] is not None]
    if with_loss:
        best, worst = min(with_loss, key=lambda n: members[n]["loss"]), max(with_loss, key=lambda n: members[n]["loss"])
        rows += [(f"best {best}", members[best]), (f"worst {worst}", members[worst])]
    slowest = min(members, key=lambda n: (members[n]["step"], -(members[n]["eta_s"] or 0)))
    rows.append((f"slowest {slowest}", members[slowest]))
    return rows


class PlainDisplay:
    """Periodic plain lines, for logs (CI, ``ray job submit``)."""

    def __init__(self, name: str, every_s: float = 5.0):
        self.name, self.every_s, self.last = name, every_s, 0.0
        self.latest: dict[str, Any] | None = None
        self.printed: dict[str, Any] | None = None

    def __enter__(self):
        print(f"poptrain: run {self.name!r} starting", flush=True)
        return self

    def __exit__(self, *exc):
        if self.latest is not None and self.printed is not self.latest:
            self._print(self.latest)  # the last state, however short the run
        return False

    def update(self, snapshot: dict[str, Any]) -> None:
        self.latest = snapshot
        now = time.monotonic()
        if now - self.last < self.every_s or not snapshot["members"]:
            return
        self.last = now
        self._print(snapshot)

    def _print(self, snapshot: dict[str, Any]) -> None:
        self.printed = snapshot
        parts = [
            f"{name} step {s['step']}/{snapshot['steps']} loss {_fmt(s['loss'])} ({_fmt(s['steps_per_s'], '.1f')} steps/s)"
            for name, s in display_rows(snapshot)
        ]
        parts += [f"coupling/{k} {_fmt(v)}" for k, v in snapshot["couplings"].items()]
        print(f"[{snapshot['elapsed_s']:7.1f}s] " + " | ".join(parts), flush=True)


class LiveDisplay:
    """A live table per member (step, loss, steps/s, ETA) and the coupling values, on a terminal."""

    def __init__(self, name: str):
        from rich.console import Console
        from rich.live import Live

        self.name = name
        self.live = Live(console=Console(), refresh_per_second=4, transient=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        return self.live.__exit__(*exc)

    def update(self, snapshot: dict[str, Any]) -> None:
        from rich.table import Table

        table = Table(title=f"poptrain · {self.name} · {snapshot['elapsed_s']:.0f}s")
        for column in ("member", "step", "loss", "steps/s", "ETA"):
            table.add_column(column, justify="right" if column != "member" else "left")
        for name, s in display_rows(snapshot):
            eta = s["eta_s"]
            table.add_row(name, f"{s['step']}/{snapshot['steps']}", _fmt(s["loss"]), _fmt(s["steps_per_s"], ".1f"), "-" if eta is None else f"{eta:.0f}s")
        for key, value in snapshot["couplings"].items():
            table.add_row(f"[dim]coupling/{key}", "", _fmt(value), "", "")
        self.live.update(table)


def _recorded(result):
    """``(parent run, {member: run})`` as MLflow holds them at the end, for the held-out and
    population values; None when the store cannot be read (the summary then shows less). The
    members' runs are read only when the result lacks a member's held-out values (a thousand
    runs take seconds to read back): ``{}`` then stands for them."""
    from mlflow.tracking import MlflowClient

    from poptrain.tracking.compare import population_runs
    from poptrain.tracking.runs import check_tracking_reachable

    try:
        check_tracking_reachable(result.tracking_uri)  # MLflow's HTTP client would retry for minutes
        client = MlflowClient(result.tracking_uri)
        evaluated = [name for name, values in result.metrics.items() if any(k.startswith("eval/") for k in values)]
        if evaluated and len(evaluated) == len(result.metrics):  # the end's held-out values are in the result
            return client.get_run(result.run_id), {}
        return population_runs(client, result.run_id)
    except Exception:  # a summary never fails a finished run
        return None


def print_summary(result) -> None:
    """The final table: per member its held-out ``eval/*`` values (the best one marked), loss,
    objective, terms and couplings, and device; then the population's ensemble and best values."""
    from rich.console import Console

    from poptrain.tracking.compare import BEST_MEMBER_TAG, is_key_metric, metric_order, render_population, ui_link

    recorded = _recorded(result)
    metrics = {name: dict(values) for name, values in result.metrics.items()}
    if recorded is not None:
        for name, run in recorded[1].items():  # eval/* as logged; the result holds the last training step's
            metrics.setdefault(name, {}).update({k: v for k, v in run.data.metrics.items() if k.startswith("eval/")})
    keys = sorted({k for m in metrics.values() for k in m if is_key_metric(k)}, key=metric_order)
    best = getattr(result, "best_member", None) if recorded is None else recorded[0].data.tags.get(BEST_MEMBER_TAG)
    console = Console(width=max(100, Console().width))
    console.print(_summary_table(result, metrics, keys, best))
    if recorded is not None:
        render_population(recorded[0], console=console)
    console.print(f"MLflow run {result.run_id} at {result.tracking_uri}")
    if recorded is not None:
        console.print(f"in the MLflow UI: {ui_link(result.tracking_uri, recorded[0].info.experiment_id, result.run_id)}", soft_wrap=True)
    console.print(f"outputs in {result.output_dir}")


SUMMARY_ROWS = 8  # members in the final table; a larger population shows its best and worst (`poptrain compare` lists all)


def _ranking(result) -> tuple[str, bool]:
    """What the final table ranks a large population by: the run's `evaluation.rank_by` (from its
    resolved config) and whether higher is better; the training loss, lower first, without one."""
    from poptrain.config.load import load_config

    try:
        ranking = load_config(result.output_dir / "config.yaml", record=True).evaluation.ranking
        if ranking is None:  # no held-out metrics
            return "loss", False
        return f"eval/{ranking.key}", bool(ranking.higher)
    except Exception:  # a summary never fails a finished run
        return "loss", False


def _summary_table(result, metrics: dict[str, dict[str, float]], keys: list[str], best: str | None):
    from rich.table import Table

    table = Table(title=f"poptrain · finished in {result.seconds:.1f}s")
    table.add_column("member")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_column("device")
    names = list(metrics)
    shown: list[str | None] = [*names]  # None: the row standing for those left out
    if len(names) > SUMMARY_ROWS:  # the best and the worst, not a thousand rows
        key, higher = _ranking(result)
        if not any(metrics[n].get(key) is not None for n in names):
            key, higher = "loss", False
        known = [n for n in names if metrics[n].get(key) is not None]
        ranked = sorted(known, key=lambda n: metrics[n][key], reverse=higher) + [n for n in names if n not in known]
        shown = [*ranked[: SUMMARY_ROWS // 2], None, *ranked[-(SUMMARY_ROWS // 2 - 1) :]]
    for name in shown:
        if name is None:
            table.add_row(f"… {len(metrics) - SUMMARY_ROWS + 1} more", *["" for _ in keys], "")
            continue
        values = metrics[name]
        label = f"{name} (best)" if name == best else name
        table.add_row(label, *[_fmt(values.get(k)) for k in keys], str(result.placement.get(name, {}).get("device", "")))
    return table


def _default_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def compare_main(argv: list[str] | None = None) -> int:
    """``poptrain compare RUN_ID [--all] [--tracking-uri URI]``: 0, or 2 with a message on stderr."""
    parser = argparse.ArgumentParser(prog="poptrain compare", description="Compare the member runs of a population.")
    parser.add_argument("run_id", help="the population's (parent) MLflow run id")
    parser.add_argument("--all", action="store_true", help="show every param, not only those that differ")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from poptrain.tracking.compare import BEST_MEMBER_TAG, NotAPopulation, members_table, population_runs, render, render_population, ui_link
    from poptrain.tracking.runs import TrackingUnavailable, check_tracking_reachable

    uri = args.tracking_uri or _default_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        print(f"poptrain compare: no MLflow store at {uri}; pass --tracking-uri or set $MLFLOW_TRACKING_URI", file=sys.stderr)
        return EXIT_USAGE  # MlflowClient would create an empty store there
    try:
        check_tracking_reachable(uri)
        client = MlflowClient(uri)
        parent, members = population_runs(client, args.run_id)
    except (NotAPopulation, TrackingUnavailable) as exc:
        print(f"poptrain compare: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from rich.console import Console

    columns, rows = members_table(members, args.all)
    console = Console(width=max(100, Console().width))
    title = f"{parent.info.run_name} · {len(members)} members · {parent.info.status}"
    render(columns, rows, title=title, console=console, best=parent.data.tags.get(BEST_MEMBER_TAG))
    render_population(parent, console=console)
    console.print(f"in the MLflow UI: {ui_link(uri, parent.info.experiment_id, parent.info.run_id)}", soft_wrap=True)
    console.print(f"population run {args.run_id} at {uri}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``unetlab`` command line. Heavy modules (torch, mlflow) are imported inside the commands."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from unetlab.errors import UnetlabError

EPILOG = """examples:
  unetlab plugins                                   what the installed plugins offer
  unetlab validate experiments/concat_vs_add.yaml   check a file, list its resolved runs
  unetlab summary experiments/seed_unet.yaml        parameters, GFLOPs and output shape per run
  unetlab run experiments/concat_vs_add.yaml        train every run, log each to MLflow
  unetlab compare experiments/concat_vs_add.yaml    variants side by side (mean +- std over seeds)
  unetlab run FILE --set train.epochs=3 --set model.fusion=add
"""


FILES_ARE_CODE = ("An experiment file is code: the plugins it names under 'plugins:' (any module or .py path) "
                  "run as soon as it is loaded, by validate and summary too, like a conftest.py. Load only files "
                  "you would run as a script. Tracking stores and checkpoints are data: no code runs from them.")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every run (value read as YAML), e.g. train.epochs=3")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``unetlab`` command."""
    parser = argparse.ArgumentParser(
        prog="unetlab", description="Compare U-Net variants honestly: plugin-based experiments logged to MLflow.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    add_plugins_command(sub)
    add_validate_command(sub)
    add_summary_command(sub)
    add_data_command(sub)
    add_run_command(sub)
    add_compare_command(sub)
    add_predict_command(sub)
    add_export_command(sub)
    add_new_plugin_command(sub)
    add_ui_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unetlab`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from unetlab import __version__

        print(f"unetlab {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 0
    # MLflow writes "View run ... at: URL" to stdout whenever a run on a tracking server ends: that would break
    # --jsonl (stdout is JSON lines only) and repeat what unetlab prints itself at the end of `run`.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    handler = args.handler
    # MLflow's INFO chatter ("Creating initial MLflow database tables...") is noise on our stderr;
    # setdefault: a user who sets MLFLOW_LOGGING_LEVEL gets what they asked for.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        return handler(args)
    except UnetlabError as exc:
        # one line, always: a plugin's multi-line exception text is folded rather than spilled
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"unetlab: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unetlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `unetlab plugins | head`
        return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def add_plugins_command(sub: argparse._SubParsersAction) -> None:
    """The ``unetlab plugins`` command's flags (its handler, ``cmd_plugins``, follows)."""
    p = sub.add_parser("plugins", help="list plugins and the components they register")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--kind", help="only components of this kind")
    p.add_argument("--file", metavar="EXP.yaml", help="also load the local plugins this experiment file names")
    p.set_defaults(handler=cmd_plugins)


def cmd_plugins(args: argparse.Namespace) -> int:
    """``unetlab plugins``: every plugin (broken ones marked) and its components by kind."""
    from unetlab.plugin_api.host import default_host
    from unetlab.plugin_api.registry import KINDS

    host = default_host()
    if args.file:
        from pathlib import Path

        from unetlab.config.yaml_loader import load_yaml_file

        data, _ = load_yaml_file(Path(args.file))
        specs = data.get("plugins") if isinstance(data, dict) else None
        for spec in [specs] if isinstance(specs, str) else specs or []:
            host.load_local(str(spec), base_dir=Path(args.file).parent)  # a broken one is listed as BROKEN
    registry = host.registry
    if args.kind and args.kind not in KINDS:
        registry.list(args.kind)  # raises the did-you-mean error
    report: list[dict[str, Any]] = []
    for info in host.plugins.values():
        components = [c for c in registry if c.plugin == info.name and (not args.kind or c.kind == args.kind)]
        report.append({
            "name": info.name, "distribution": info.distribution, "version": info.version,
            "source": info.source, "first_party": info.first_party, "hooks": info.hooks,
            "broken": info.broken, "error": info.error, "refused": info.refused, "warnings": info.warnings,
            "components": [{
                "kind": c.kind, "name": c.name, "description": c.description, "direction": c.direction,
                "binary_only": c.binary_only,
                "params": [{"name": p.name, "type": p.type_name(), "required": p.required,
                            "default": None if p.required else _jsonable(p.default)} for p in c.params],
            } for c in components],
        })
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for plugin in report:
        origin = f"{plugin['distribution']} {plugin['version']}" if plugin["distribution"] else "local"
        tag = " [first-party]" if plugin["first_party"] else ""
        status = "  BROKEN" if plugin["broken"] else ""
        print(f"{plugin['name']}  ({origin}; {plugin['source']}){tag}{status}")
        if plugin["broken"]:
            print(f"    error: {plugin['error']}")
        for text in plugin["refused"]:
            print(f"    refused: {text}")
        for text in plugin["warnings"]:
            print(f"    deprecated: {text}")
        for c in plugin["components"]:
            notes = "".join([f" [{c['direction']} is better]" if c["direction"] else "",
                             " [binary only]" if c["binary_only"] else ""])
            print(f"    {c['kind']:<11} {c['name']:<16} {c['description']}{notes}")
            if c["params"]:
                params = ", ".join(
                    f"{p['name']}: {p['type']}" + ("" if p["required"] else f" = {json.dumps(p['default'])}")
                    for p in c["params"])
                print(f"    {'':<11} {'':<16} ({params})")
    return 0


def add_validate_command(sub: argparse._SubParsersAction) -> None:
    """The ``unetlab validate`` command's flags (its handler, ``cmd_validate``, follows)."""
    p = sub.add_parser("validate", help="validate an experiment file and print its resolved runs",
                       description=f"Validate an experiment file and print its resolved runs. {FILES_ARE_CODE}")
    p.add_argument("file")
    _add_set(p)
    p.add_argument("--json", action="store_true", help="print every run's resolved config as JSON")
    p.set_defaults(handler=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    """``unetlab validate FILE``: load, expand and check every run, build its components on the meta device."""
    from unetlab.analysis.contract import format_contract
    from unetlab.analysis.contract_records import contract_before_training
    from unetlab.config.experiment import load_experiment
    from unetlab.model.meta_build import build_runs_on_meta
    from unetlab.plugin_api.host import default_host

    host = default_host()
    experiment = load_experiment(args.file, args.overrides, host=host)
    build_runs_on_meta(experiment.runs, host.registry, where=args.file)  # factory errors, no memory, no weights
    tune_lines = _tune_plan(experiment, host, args.file)
    host.warn_problems()
    contract = contract_before_training(experiment, host.registry)  # builds each dataset: after the quick checks
    if args.json:
        import dataclasses

        tune = {"tune": dataclasses.asdict(experiment.tune)} if experiment.tune is not None else {}
        print(json.dumps({"name": experiment.name, "runs": [
            {"name": r.name, "variant": r.variant, "seed": r.seed, "config": _jsonable(r.config)}
            for r in experiment.runs], **tune, "contract": contract.as_dict()}, indent=2))
        return 0
    print(f"{args.file}: OK, experiment '{experiment.name}', {len(experiment.runs)} run(s)")
    for run in experiment.runs:
        m = run.config["model"]
        losses = "+".join(l["name"] if l["weight"] == 1.0 else f"{l['weight']:g}*{l['name']}"
                          for l in run.settings.train.loss)
        print(f"  {run.name:<32} encoder={m['encoder']['name']} upsampler={m['upsampler']['name']} "
              f"fusion={m['fusion']['name']} loss={losses} epochs={run.config['train']['epochs']}")
    for line in tune_lines:
        print(line)
    print("\n".join(format_contract(contract)))
    return 0


def _tune_plan(experiment, host, path: str) -> list[str]:
    """A tuned experiment's plan (trials x variants, budget, space), after checking its data has a test split
    and logs the tune metric; nothing for an untuned one."""
    if experiment.tune is None:
        return []
    from unetlab.runs.tuning import check_tuned_file, plan_lines

    direction = check_tuned_file(experiment.runs, host.registry, path, experiment.tune.metric)
    variants = list(dict.fromkeys(r.variant for r in experiment.runs))
    return plan_lines(experiment.tune, variants, len(experiment.runs), direction)


def add_summary_command(sub: argparse._SubParsersAction) -> None:
    """The ``unetlab summary`` command's flags (its handler, ``cmd_summary``, follows)."""
    p = sub.add_parser("summary", help="parameters, forward GFLOPs and output shape of every run's model",
                       description="Parameters, forward GFLOPs and output shape of every run's model. "
                                   f"{FILES_ARE_CODE}")
    p.add_argument("file")
    _add_set(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                   help="input size (default: the dataset's image size)")
    p.set_defaults(handler=cmd_summary)


def cmd_summary(args: argparse.Namespace) -> int:
    """``unetlab summary FILE``: parameter count, GFLOPs per image and output shape per run."""
    from unetlab.cli.model_summary import summarise_experiment

    rows = summarise_experiment(args.file, args.overrides, args.input_size)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'run':<32} {'params':>14} {'GFLOPs/img':>11}  input -> output")
    for r in rows:
        print(f"{r['run']:<32} {r['params']:>14,} {r['gflops']:>11.3f}  "
              f"{'x'.join(map(str, r['input_shape']))} -> {'x'.join(map(str, r['output_shape']))}")
    return 0


def add_run_command(sub: argparse._SubParsersAction) -> None:
    """The ``unetlab run`` command's flags (its handler, ``cmd_run``, follows)."""
    p = sub.add_parser("run", help="train every run of an experiment file and log each to MLflow",
                       description=f"Train every run of an experiment file and log each to MLflow. {FILES_ARE_CODE} "
                                   "A tracking server that stops answering is retried for UNETLAB_TRACKING_TIMEOUT "
                                   "seconds (default 300), then the run stops in one line; --resume continues "
                                   "from the last checkpoint.")
    p.add_argument("file")
    _add_set(p)
    p.add_argument("--resume", action="store_true",
                   help="continue unfinished runs from their last checkpoint, skip finished ones")
    p.add_argument("--only", nargs="+", default=[], metavar="RUN",
                   help="only runs whose name starts with one of these (e.g. concat/)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train up to N runs at once in separate processes (one GPU each when there are several)")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="train each run with N processes (DistributedDataParallel: one GPU each, or CPU processes "
                        "with gloo); data.batch_size is per process. Multi-node: torchrun ... -m unetlab run FILE")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run each run as a Ray task (extra unetlab[ray]): no ADDRESS starts a local Ray instance; "
                        "'auto' or ray://HOST:PORT joins a cluster (needs an http:// tracking server and an absolute, "
                        "shared tracking.checkpoint_dir)")
    p.add_argument("--ray-cpus", type=float, default=None, metavar="N",
                   help="CPUs each Ray task asks for (default: its run's train.threads; a task gets 1 GPU when the "
                        "cluster has GPUs)")
    p.add_argument("--ray-retries", type=int, default=3, metavar="N",
                   help="times a task whose worker died is retried, resuming from its last checkpoint (default 3)")
    p.add_argument("--parent-run-id", default=None, help=argparse.SUPPRESS)  # set by --jobs for its workers
    p.add_argument("--run-name", action="append", default=[], help=argparse.SUPPRESS)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quiet", action="store_true", help="no progress bars, only one line per run")
    mode.add_argument("--jsonl", action="store_true", help="JSON lines on stdout (events: start, epoch, run_end...)")
    p.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    """``unetlab run FILE``: train every run, log each to MLflow; exit 1 when a run failed."""
    import os

    if os.environ.get("UNETLAB_RAY_WORKER_PID"):  # a run placed by --ray: stop with the Ray worker
        from unetlab.runs.ray_runs import die_with_ray_worker

        die_with_ray_worker()
    from unetlab.runs.runner import run_experiment

    output = "quiet" if args.quiet else "jsonl" if args.jsonl else "bar"
    if args.jobs < 1 or args.nproc_per_node < 1:
        raise UnetlabError("--jobs and --nproc-per-node must be at least 1")
    if args.ray is not None and (args.jobs > 1 or args.nproc_per_node > 1):
        raise UnetlabError("--ray does not combine with --jobs or --nproc-per-node: Ray places the runs")
    if args.nproc_per_node > 1 and "RANK" not in os.environ:
        if args.jobs > 1:
            raise UnetlabError("--jobs and --nproc-per-node do not combine: choose one")
        from unetlab.config.experiment import load_experiment
        from unetlab.runs.execution import run_torchrun
        from unetlab.runs.worker_command import worker_run_args
        from unetlab.training.preflight import check_processes_per_node

        # a bad file, or more processes than GPUs, is one line here, not N tracebacks
        check_processes_per_node(load_experiment(args.file, args.overrides).runs, args.nproc_per_node)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={args.nproc_per_node}",
                   *worker_run_args(args.file, args.overrides, resume=args.resume, only=args.only,
                                    output="quiet" if args.quiet else "jsonl" if args.jsonl else None)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        return run_torchrun(command, env, args.file)
    ray_plan = None
    if args.ray is not None:
        from unetlab.runs.ray_runs import RayPlan, parse_address

        if args.ray_retries < 0:
            raise UnetlabError(f"--ray-retries must be >= 0, got {args.ray_retries}")
        ray_plan = RayPlan(parse_address(args.ray), args.ray_cpus, args.ray_retries)
    return run_experiment(args.file, args.overrides, resume=args.resume, output=output, only=args.only,
                          jobs=args.jobs, parent_run_id=args.parent_run_id, exact=args.run_name, ray=ray_plan)


def add_data_command(sub: argparse._SubParsersAction) -> None:
    """The ``unetlab data`` command's flags (its handler, ``cmd_data``, follows)."""
    p = sub.add_parser("data", help="check the dataset of an experiment file: counts, sizes, classes, problems")
    p.add_argument("file")
    _add_set(p)
    p.set_defaults(handler=cmd_data)


def cmd_data(args: argparse.Namespace) -> int:
    """``unetlab data FILE``: per split counts, sizes, channels, dtype, classes; exit 2 listing every problem."""
    from unetlab.cli.data_check import data_command

    return data_command(args.file, args.overrides)


def add_compare_command(sub: argparse._SubParsersAction) -> None:
    """The ``unetlab compare`` command's flags (its handler, ``cmd_compare``, follows)."""
    p = sub.add_parser("compare", help="compare the variants of an experiment: mean +- std over seeds")
    p.add_argument("experiment", help="an experiment file or an MLflow experiment name")
    p.add_argument("--metric", default=None, help="metric to compare (default: the runs' train.monitor)")
    p.add_argument("--format", choices=["table", "md", "csv", "json"], default="table")
    p.add_argument("--out", default=None, help="where to write the comparison figure (default: compare-NAME.png)")
    p.add_argument("--parent", default=None, help="compare the runs of this parent run id (default: the latest)")
    p.add_argument("--margin", type=float, default=None,
                   help="smallest difference that matters: pairs are then 'equivalent within +-margin' or 'not "
                        "resolved' (default: compare.margin of the experiment file)")
    p.add_argument("--direction", choices=["max", "min"], default=None,
                   help="which way is better for --metric (default: the runs' unetlab.metric_directions tag)")
    p.add_argument("--compute-ratio", type=float, default=None, metavar="R",
                   help="the comparison contract warns when the variants' training compute or time differ by more "
                        "than R times (default: compare.compute_ratio of the experiment file, else 1.5)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: as for unetlab run)")
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    """``unetlab compare``: one row per variant, mean +- std over seeds, and which differences are real."""
    from unetlab.cli.compare_command import compare_command

    return compare_command(args.experiment, args.metric, args.format, args.out, args.parent, args.tracking_uri,
                           args.margin, args.direction, args.compute_ratio)


def add_ui_command(sub: argparse._SubParsersAction) -> None:
    """The ``unetlab ui`` command's flags (its handler, ``cmd_ui``, follows)."""
    p = sub.add_parser("ui", help="start the MLflow UI on the store unetlab logs to",
                       description="Start the MLflow UI on the store unetlab logs to and print the URL of the "
                                   "latest comparison's training runs, grouped by variant (with FILE: that "
                                   "experiment's). It listens on 127.0.0.1 only unless --expose is given.")
    p.add_argument("file", nargs="?", help="an experiment file whose tracking.uri and experiment to use")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default: 127.0.0.1; any other than loopback needs --expose)")
    p.add_argument("--expose", action="store_true",
                   help="allow a non-loopback --host: the store is then readable AND writable by anyone who can "
                        "reach the port, without authentication (MLflow's own login: mlflow server --app-name "
                        "basic-auth)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1,
                   help="server worker processes (default: 1, enough for one person; mlflow's own default is 4)")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(handler=cmd_ui)


def cmd_ui(args: argparse.Namespace) -> int:
    """``unetlab ui``: the MLflow UI on the same store ``unetlab run`` uses (127.0.0.1 by default).

    ``mlflow ui`` starts a server process of its own, so it runs as a child in its own process group
    and every SIGTERM, SIGINT or SIGHUP is forwarded to that whole group: nothing outlives the command.
    MLflow's background job runner (about ten processes, for GenAI jobs) is off unless
    ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` says otherwise: viewing training runs does not need it.
    """
    import os
    import signal
    import subprocess

    from unetlab.tracking.run_tracker import resolve_tracking_uri

    exposed = _check_ui_host(args.host, args.expose)  # before anything is read or started
    uri, experiment_name = args.tracking_uri, None
    if args.file:
        from unetlab.config.experiment import load_experiment

        experiment = load_experiment(args.file)
        experiment_name = experiment.name
        uri = uri or experiment.runs[0].settings.tracking.uri
    uri = resolve_tracking_uri(uri) if args.tracking_uri is None else uri
    if exposed:
        print(f"unetlab: warning: --expose: the MLflow UI on {args.host}:{args.port} serves the tracking store "
              f"{uri or 'MLflow default (./mlflow.db)'} to every host that can reach it, readable and writable (runs, "
              "artifacts, models can be created, changed and deleted) with no authentication; for logins use "
              "MLflow's own: mlflow server --app-name basic-auth", file=sys.stderr)
    # mlflow ui passes these to its web server, whose own bind options would open other addresses
    # than --host: without --expose they are refused, so the loopback-only promise has no back door.
    server_opts = sorted(k for k in os.environ if k.startswith("MLFLOW_") and k.endswith("_OPTS") and os.environ[k])
    if server_opts and not exposed:
        raise UnetlabError(f"unetlab ui: {', '.join(server_opts)} is set; its web server options can listen on "
                           "other addresses than --host. Unset it, or pass --expose to serve the store beyond "
                           "this machine knowingly")
    from unetlab.analysis.dashboard import ui_urls

    for line in ui_urls(uri, experiment_name, args.host, args.port):
        print(line, flush=True)
    if uri and uri.startswith(("http://", "https://")):
        return 0  # a tracking server serves its own UI (the line above says where); mlflow ui cannot open one
    # The MLflow of unetlab's own interpreter: the venv need not be activated for this to work.
    command = [sys.executable, "-m", "mlflow", "ui", "--host", args.host, "--port", str(args.port),
               "--workers", str(args.workers)]
    if uri:
        command += ["--backend-store-uri", uri]
    print(f"unetlab: {' '.join(command[1:])}", file=sys.stderr)
    received: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signum)

    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in forwarded}  # before the child exists: no signal is lost
    try:
        try:
            env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
            child = subprocess.Popen(command, env=env, start_new_session=True)
        except OSError as exc:
            raise UnetlabError(f"cannot start the MLflow UI: {exc}") from None
        if received:  # a signal came before the child existed
            os.killpg(child.pid, received[0])
        code = child.wait()  # the handler forwards and returns; wait() then goes on (PEP 475)
        _stop_process_group(child.pid)  # server processes that outlived mlflow ui itself
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        return 128 + received[0]
    return code if code >= 0 else 128 - code


def _check_ui_host(host: str, expose: bool) -> bool:
    """True when ``host`` is not a loopback address (and ``--expose`` allows it); a ``UnetlabError`` when it
    is not loopback and ``--expose`` was not given: ``mlflow ui`` has no authentication."""
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if loopback:
        return False
    if not expose:
        raise UnetlabError(f"--host {host}: not a loopback address; the MLflow UI would serve the tracking store to "
                           "the network, writable and without authentication. Add --expose to do it anyway "
                           "(or keep the default 127.0.0.1)")
    return True


def _stop_process_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM what is left of process group ``pgid``, then SIGKILL it after ``grace_s`` seconds."""
    import os
    import signal
    import time

    deadline = time.monotonic() + grace_s
    try:
        os.killpg(pgid, signal.SIGTERM)
        while time.monotonic() < deadline:
            time.sleep(0.1)
            os.killpg(pgid, 0)  # raises ProcessLookupError once the group is empty
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def add_new_plugin_command(sub: argparse._SubParsersAction) -> None:
    """The ``unetlab new-plugin`` command's flags (its handler, ``cmd_new_plugin``, follows)."""
    p = sub.add_parser("new-plugin", help="scaffold a plugin project that passes its own tests")
    p.add_argument("name", help="plugin name: lowercase letters, digits and _ (project unetlab-NAME)")
    p.add_argument("--dir", default=".", help="where to create the project (default: here)")
    p.set_defaults(handler=cmd_new_plugin)


def cmd_new_plugin(args: argparse.Namespace) -> int:
    """``unetlab new-plugin NAME``: write a plugin project (pyproject, one hook per kind, conformance tests)."""
    from unetlab.cli.new_plugin import scaffold_plugin

    root = scaffold_plugin(args.name, args.dir)
    print(f"created {root}\nnext: cd {root} && pip install -e '.[test]' && pytest && unetlab plugins")
    return 0


def add_predict_command(sub: argparse._SubParsersAction) -> None:
    """The ``unetlab predict`` command's flags (its handler, ``cmd_predict``, follows)."""
    p = sub.add_parser("predict", help="predict masks for images with a trained model (tiled for large images)")
    p.add_argument("model", help="checkpoint file (best.pt/last.pt), MLflow run id, runs:/ or models:/ URI")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="folder for the masks (NAME_mask.png: 0/255, or class indices)")
    p.add_argument("--tile", type=int, default=None,
                   help="tile size (default, same padding: whole image up to 1024x1024 pixels, else 512; valid: 572)")
    p.add_argument("--overlap", type=int, default=32, help="overlap between tiles, same padding (default: 32)")
    p.add_argument("--tta", action="store_true", help="average over flips (test-time augmentation)")
    p.add_argument("--overlay", action="store_true", help="also write NAME_overlay.png")
    p.add_argument("--tracking-uri", default=None, help="MLflow store of the run (default: as for unetlab run)")
    p.set_defaults(handler=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    """``unetlab predict MODEL INPUTS... --out DIR``."""
    from unetlab.deploy.predict import predict_files

    written = predict_files(args.model, args.inputs, args.out, args.tile, args.overlap, args.tta, args.overlay,
                            args.tracking_uri)
    print(f"wrote {len(written)} mask(s) to {args.out}")
    return 0


def add_export_command(sub: argparse._SubParsersAction) -> None:
    """The ``unetlab export`` command's flags (its handler, ``cmd_export``, follows)."""
    p = sub.add_parser("export", help="export a trained model to torch.export (.pt2) or ONNX, checked against PyTorch")
    p.add_argument("model", help="checkpoint file, MLflow run id, runs:/ or models:/ URI")
    p.add_argument("--format", choices=["pt2", "onnx"], default="pt2")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--size", type=int, default=None, help="example input size (valid padding: the fixed size)")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """``unetlab export MODEL --format pt2|onnx --out FILE``: export, then compare with PyTorch."""
    from unetlab.deploy.export import check_export, export_model
    from unetlab.training.model_store import load_model

    if args.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)
    model = load_model(args.model)
    info = export_model(model, args.format, args.out, args.size)
    c, s = info["example_shape"][1], info["example_shape"][2]
    m = info["spatial_multiple"]
    shapes = [(1, c, s, s), (3, c, s, s)] + ([(2, c, 2 * m, 3 * m)] if m else [])
    worst = check_export(model, args.format, args.out, shapes)
    print(f"exported {args.format} to {args.out} (dynamic: {info['dynamic']}); max |exported - PyTorch| = "
          f"{worst:.2e} over inputs {shapes}")
    if worst > 1e-3:
        raise UnetlabError(f"the exported model differs from PyTorch by {worst:.2e} (> 1e-3)")
    return 0



if __name__ == "__main__":
    sys.exit(main())

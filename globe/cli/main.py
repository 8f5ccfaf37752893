"""The `globe` command: argparse for the verbs, Hydra for the `key=value` configuration.

Why here: the library never imports Hydra. This module composes `globe/conf/default.yaml` with the
user's overrides, turns the result into a typed `GlobeConfig` and calls the library.

    globe inspect PATH [--json]
    globe fit      model.path=PATH output_dir=DIR [overrides]      [-m: sweep comma lists]
    torchrun --nproc_per_node=N -m globe fit ...                    (sharded fit, globe/fit/dist.py)
    globe export   model.path=PATH artifacts=DIR output_dir=OUT export.format=globe|dense
    globe eval     model.path=PATH_OR_OUT [eval.text=FILE | eval.dataset=wikitext2] [output=FILE]
    globe generate model.path=PATH prompt="..." [max_new_tokens=N]
    globe report   RUN_DIR
    globe demo     [--out DIR] [--fast]

Bad input prints one line `error: ...` and exits 2 (`--debug` shows the traceback).

Values that are data, not configuration (`DATA_KEYS`: the prompt, paths, names) never go through
Hydra's override grammar, where `prompt=def f(x):` is a syntax error and `$`, `,`, brackets and
quotes mean something: they are taken verbatim after the first `=` and set on the composed config.
One pair of matching outer quotes is removed (the Hydra quoting of older commands, e.g.
'artifacts="DIR_UP,DIR_GATE"'), so a value that must keep outer quotes doubles them; `null` unsets
every key but `prompt`. `-m` sweeps never split them on commas.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from ..config import GlobeConfig
from ..errors import GlobeError
from ..progress import env_every_s
from .process import bound_malloc, bound_onednn_cache, quiet_openmp

VERBS_WITH_OVERRIDES = ("fit", "export", "eval", "generate")
SHORT = {"prompt": "generate.", "max_new_tokens": "generate."}  # `prompt=...` is generate.prompt=...
DATA_KEYS = ("generate.prompt", "model.path", "model.revision", "output_dir", "artifacts", "output", "eval.text",
             "train.calib_text", "wandb.project", "wandb.entity", "wandb.run_name")


def split_data(overrides: list[str]) -> tuple[dict[str, str | None], list[str]]:
    """({data key: verbatim value}, the Hydra overrides left) from `key=value` arguments."""
    data: dict[str, str | None] = {}
    rest = []
    for o in overrides:
        key, eq, val = o.partition("=")
        if not eq or key not in DATA_KEYS:
            rest.append(o)
            continue
        if len(val) >= 2 and val[0] == val[-1] and val[0] in "'\"":
            val = val[1:-1]
        data[key] = None if val == "null" and key != "generate.prompt" else val
    return data, rest


def compose(overrides: list[str]) -> GlobeConfig:
    """Hydra compose of the packaged config with `key=value` overrides -> validated GlobeConfig."""
    from hydra import compose as h_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for o in overrides:
        if "=" not in o:
            raise GlobeError(f"bad argument {o!r}: expected key=value (Hydra override syntax)")
    overrides = [SHORT.get(o.partition("=")[0], "") + o for o in overrides]
    verbatim, overrides = split_data(overrides)
    try:
        with initialize_config_module(config_module="globe.conf", version_base=None):
            cfg = h_compose(config_name="default", overrides=list(overrides))
        data: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except (HydraException, OmegaConfBaseException, ValueError) as e:  # ValueError: `bank=5` (a group given a number)
        msg = str(e).splitlines()[0]
        raise GlobeError(f"bad override: {msg}{_key_hint(msg)}") from None
    for key, val in verbatim.items():  # after Hydra: an explicit value beats a group's default
        if key == "artifacts" and val and "," in val and not Path(val).is_dir():
            if val.startswith("[") and val.endswith("]"):  # Hydra's list syntax: artifacts=[DIR_UP,DIR_GATE]
                val = val[1:-1]
            val = [v.strip() for v in val.split(",") if v.strip()]  # several fit directories: DIR_UP,DIR_GATE
        *sec, leaf = key.split(".")
        node = data
        for part in sec:
            node = node.setdefault(part, {})
        node[leaf] = val
    keys = {o.lstrip("+~").partition("=")[0]: o.partition("=")[2] for o in overrides}
    if not any(o.lstrip("+~").startswith("cache") for o in overrides):
        data.pop("cache", None)  # no cache setting on the command line: a globe export's saved ones apply
    try:
        conf = GlobeConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise GlobeError(f"config {e}") from None
    if "cache.S_per_layer" in keys and keys.get("cache", keys.get("cache.mode")) != "lru":  # valid, but inert
        from ..progress import log
        log("cache.S_per_layer=%s without cache=lru: the model runs with cache.mode=%s (S_per_layer only sets "
            "the simulated hit rate of eval.hit_rate); add cache=lru to run an lru cache",
            keys["cache.S_per_layer"], keys.get("cache", keys.get("cache.mode", "full")))
    return _fill_defaults(conf)


def _key_hint(msg: str) -> str:
    """For Hydra's "Could not override 'bank.foo'": the section's keys, the closest first."""
    import dataclasses
    import difflib

    m = re.search(r"override '([\w.]+)'", msg)
    if not m or "." not in m.group(1):
        return ""
    sec, _, leaf = m.group(1).partition(".")
    obj = getattr(GlobeConfig(), sec, None)
    if not dataclasses.is_dataclass(obj):
        return ""
    names = [f.name for f in dataclasses.fields(obj)]
    close = difflib.get_close_matches(leaf, names, n=1)
    return (f" (did you mean {sec}.{close[0]}?" if close else f" ({sec} keys:") + \
        f"{' ' + sec + ' keys: ' if close else ' '}{', '.join(names)})"


def require_model(conf: GlobeConfig) -> GlobeConfig:
    """Every verb but demo works on a model the user names: never a silent default."""
    from ..fixtures import FIXTURE_DIR

    if not conf.model.path:
        raise GlobeError("model.path is required: a Hugging Face model id or a local checkpoint directory, e.g. "
                         f"model.path=Qwen/Qwen1.5-MoE-A2.7B (the bundled fixture: model.path={FIXTURE_DIR})")
    return conf


def _fill_defaults(conf: GlobeConfig) -> GlobeConfig:
    if not conf.model.path:
        return conf
    if conf.eval.text is None and conf.eval.dataset is None and not conf.eval.tasks:  # tasks only: no perplexity
        cand = Path(conf.model.path) / "eval.txt"
        if cand.is_file():
            conf.eval.text = str(cand)
    return conf


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """`-m` multirun: `bank.m_up=16,32 sparsity.target_support=8,12` -> the cartesian product."""
    choices = []
    for o in overrides:
        k, _, v = o.partition("=")
        if "," in v and not v.startswith("[") and k not in DATA_KEYS:
            choices.append([f"{k}={x}" for x in v.split(",")])
        else:
            choices.append([o])
    return [list(c) for c in itertools.product(*choices)]


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_inspect(a: argparse.Namespace) -> int:
    from ..io.inspect import format_table, inspect

    info = inspect(a.path)
    if a.json:
        _print_json(info)
    else:
        print(format_table(info))
    return 0


def cmd_fit(overrides: list[str], multirun: bool) -> int:
    from ..fit.dist import check_launch_env, is_rank0

    check_launch_env()  # a bad RANK/WORLD_SIZE fails here, not after the fit
    runs = expand_sweep(overrides) if multirun else [overrides]
    confs = []
    for i, ov in enumerate(runs):  # validate every run's config before any work
        conf = require_model(compose(ov))
        if not conf.output_dir:
            raise GlobeError("output_dir is required: globe fit model.path=PATH output_dir=DIR")
        if multirun:
            tag = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(o for o in ov if o not in overrides))
            conf.output_dir = str(Path(conf.output_dir) / f"{i:03d}_{tag}")
        confs.append(conf)
    from ..fit.run import run_fit

    results = [{"output_dir": c.output_dir, "summary": run_fit(c)} for c in confs]
    if is_rank0():  # under torchrun every rank returns the summary: print it once
        _print_json(results if multirun else results[0]["summary"])
    return 0


def cmd_export(overrides: list[str]) -> int:
    conf = require_model(compose(overrides))
    if not conf.artifacts:
        raise GlobeError("artifacts is required: globe export model.path=PATH artifacts=DIR output_dir=OUT")
    if not conf.output_dir:
        raise GlobeError("output_dir is required for export")
    from ..runtime.export import run_export as export

    out = export(conf)
    print(str(out))
    return 0


def cmd_eval(overrides: list[str]) -> int:
    conf = require_model(compose(overrides))
    from ..eval.run import run_eval

    _print_json(run_eval(conf))
    return 0


def cmd_generate(overrides: list[str]) -> int:
    conf = require_model(compose(overrides))
    if not conf.generate.prompt:
        raise GlobeError('prompt is required: globe generate model.path=PATH prompt="..."')
    from ..runtime.generate import generate

    print(generate(conf))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from ..eval.report import render_report

    print(str(render_report(a.run_dir)))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(out_dir=a.out, fast=a.fast)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (`error: ...`, exit 2) instead of a usage block first."""

    def error(self, message: str):  # noqa: D102 (argparse API)
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="globe", description="GloBE: global-basis compression of MoE experts")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("inspect", help="summarise an MoE checkpoint (no weights loaded)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the JSON object only")
    for verb, text in (("fit", "fit global Up/Gate banks"), ("export", "write a compressed or dense model"),
                       ("eval", "perplexity, speed, memory, hit rate"), ("generate", "greedy generation")):
        q = sub.add_parser(verb, help=text)
        q.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
        if verb == "fit":
            q.add_argument("-m", "--multirun", action="store_true", help="sweep comma-separated values")
    p = sub.add_parser("report", help="Markdown + PNG report of a fit run")
    p.add_argument("run_dir")
    p = sub.add_parser("demo", help="inspect, fit, export and evaluate the bundled fixture")
    p.add_argument("--out", default=None, type=_nonempty("--out"), help="output directory (default: a fresh temp dir)")
    p.add_argument("--fast", action="store_true", help="shorter schedule")
    return ap


def _nonempty(flag: str):
    """argparse type: a non-empty path (an empty --out ran the demo into a temp dir as if none was given)."""
    def check(v: str) -> str:
        if not v.strip():
            raise argparse.ArgumentTypeError(f"{flag} needs a directory, got an empty string")
        return v
    return check


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or "debug=true" in argv
    argv = [x for x in argv if x != "--debug"]
    ap = build_parser()
    a = ap.parse_args(argv)
    bound_onednn_cache()
    bound_malloc()
    quiet_openmp()
    previous = _terminate_cleanly()
    try:
        env_every_s()  # GLOBE_PROGRESS_EVERY_S, checked before any work
        if a.verb == "inspect":
            return cmd_inspect(a)
        if a.verb == "fit":
            return cmd_fit(a.overrides, a.multirun)
        if a.verb == "export":
            return cmd_export(a.overrides)
        if a.verb == "eval":
            return cmd_eval(a.overrides)
        if a.verb == "generate":
            return cmd_generate(a.overrides)
        if a.verb == "report":
            return cmd_report(a)
        if a.verb == "demo":
            return cmd_demo(a)
    except (GlobeError, FileNotFoundError) as e:
        if debug:
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # `globe inspect ... | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not raise again
        return 0
    finally:
        if previous is not None:
            import signal
            signal.signal(signal.SIGTERM, previous)
    return 1


class Terminated(BaseException):
    """SIGTERM (kill, a scheduler's time limit) raised in the main thread, so staging directories and
    temp files are removed on the way out exactly as for Ctrl-C. SIGKILL cannot be caught: a hidden
    `.NAME.tmp-*` directory next to the output can then remain and is safe to delete."""


def _terminate_cleanly():
    """Install the SIGTERM -> Terminated handler; returns the previous handler (None off the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def _raise(signum, frame):
        raise Terminated()
    return signal.signal(signal.SIGTERM, _raise)


if __name__ == "__main__":
    sys.exit(main())

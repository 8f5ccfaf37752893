"""Zero-shot accuracy through lm-eval-harness on an already-loaded model (optional extra `lm-eval[hf]`).

Why wrap an in-memory model: the GloBE runtime patches modules after loading, so lm-eval must not
reload from disk; its HFLM wrapper accepts a model instance (it then runs on `model.device`). Tasks
are checked against lm-eval's TaskManager before anything runs so a typo fails in one line instead
of after minutes of work. Built-in task data come from the Hugging Face hub through `datasets`
(network or a warm cache); `task_paths` adds directories of task YAMLs, e.g. local offline tasks
(see tests/data/lm_eval_tasks/). Results: {task: {metric: value}} with lm-eval's metric names
("acc,none", "acc_stderr,none", ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import GlobeError


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # needs accelerate: the `hf` extra of lm-eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise GlobeError(f"eval.tasks needs lm-eval-harness with its hf extra ({e.name or e} missing): "
                         "pip install 'lm-eval[hf]'") from None
    return lm_eval, HFLM, TaskManager


def check_tasks(tasks: Sequence[str], manager) -> None:
    """GlobeError naming every task that `manager` does not know."""
    known = set(manager.all_tasks)
    bad = [t for t in tasks if t not in known]
    if bad:
        raise GlobeError(f"unknown lm-eval task(s): {', '.join(bad)} (not built in nor in eval.task_paths; "
                         "see `lm-eval ls tasks`)")


def task_dirs(task_paths: Sequence[str] | None) -> list[str]:
    """The resolved directories of eval.task_paths; GlobeError naming one that is not a directory."""
    out = []
    for p in task_paths or ():
        d = Path(p).expanduser()
        if not d.is_dir():
            raise GlobeError(f"eval.task_paths: no such directory: {p}")
        out.append(str(d.resolve()))
    return out


def validate_tasks(tasks: Sequence[str], task_paths: Sequence[str] | None = None):
    """Fail early (before loading a model) on a missing lm-eval, a bad task dir or an unknown task.

    Returns the TaskManager (built-in tasks plus the YAMLs under `task_paths`) to hand to `zero_shot`.
    """
    paths = task_dirs(task_paths)
    _, _, TaskManager = _lm_eval()
    manager = TaskManager(include_path=paths or None)
    check_tasks([str(t) for t in tasks], manager)
    return manager


def zero_shot(model, tokenizer, tasks: Sequence[str], batch_size: int = 1, limit: int | None = None,
              manager=None, task_paths: Sequence[str] | None = None) -> dict:
    """Run lm-eval tasks zero-shot on `model`; {task: {metric: value}} (numeric values only).

    `limit` caps the examples per task; `manager` is the TaskManager from `validate_tasks` (built
    here from `task_paths` when None). Failures inside lm-eval (e.g. a dataset that cannot be
    downloaded) become a one-line GlobeError.
    """
    tasks = [str(t) for t in tasks]
    if not tasks:
        return {}
    lm_eval, HFLM, _ = _lm_eval()
    manager = manager or validate_tasks(tasks, task_paths)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size))
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=limit, task_manager=manager,
                                      log_samples=False)
    except Exception as e:  # dataset download failures and the like
        msg = str(e).splitlines()[0] if str(e) else ""
        raise GlobeError(f"lm-eval failed: {type(e).__name__}: {msg}") from None
    out: dict = {}
    for task, metrics in (res or {}).get("results", {}).items():
        out[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out

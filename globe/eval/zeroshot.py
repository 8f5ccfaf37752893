"""Zero-shot accuracy through lm-eval-harness on an already-loaded model (optional extra `lm-eval`).

Why wrap an in-memory model: the GloBE runtime patches modules after loading, so lm-eval must not
reload from disk; its HFLM wrapper accepts a model instance. Tasks are checked against lm-eval's
TaskManager before anything runs so a typo fails in one line instead of after minutes of work.
Task data come from the Hugging Face hub through `datasets` (needs a network or a warm cache).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import GlobeError


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise GlobeError("eval.tasks needs lm-eval-harness: pip install 'globe-moe[eval]'") from None
    return lm_eval, HFLM, TaskManager


def check_tasks(tasks: Sequence[str], manager) -> None:
    known = set(manager.all_tasks)
    bad = [t for t in tasks if t not in known]
    if bad:
        raise GlobeError(f"unknown lm-eval task(s): {', '.join(bad)} (see `lm-eval ls tasks`)")


def validate_tasks(tasks: Sequence[str]):
    """Fail early (before loading a model) on a missing lm-eval or unknown task; returns a TaskManager."""
    _, _, TaskManager = _lm_eval()
    manager = TaskManager()
    check_tasks(tasks, manager)
    return manager


def zero_shot(model, tokenizer, tasks: Sequence[str], batch_size: int = 1, limit: int | None = None,
              manager=None) -> dict:
    """Run lm-eval tasks zero-shot; {task: {metric: value}} (metric names as lm-eval reports them)."""
    tasks = [str(t) for t in tasks]
    if not tasks:
        return {}
    lm_eval, HFLM, _ = _lm_eval()
    manager = manager or validate_tasks(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=limit, task_manager=manager)
    except Exception as e:  # dataset download failures and the like
        msg = str(e).splitlines()[0] if str(e) else ""
        raise GlobeError(f"lm-eval failed: {type(e).__name__}: {msg}") from None
    out: dict = {}
    for task, metrics in (res or {}).get("results", {}).items():
        out[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out

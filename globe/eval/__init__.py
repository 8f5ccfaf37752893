"""Evaluation and reporting: perplexity, speed/memory, LRU hit rate, zero-shot, diagnostics, reports.

    run_eval(cfg) -> dict                          `globe eval` (run.py)
    perplexity(model, ids, context, stride) -> dict
    measure_speed(model, prefill_tokens, decode_tokens) -> dict
    record_routing(model, ids) / hit_rate_curve(traces, S_values) / lru_replay(trace, S)
    zero_shot(model, tokenizer, tasks) -> dict     (optional extra lm-eval)
    diagnose(run_dir, checkpoint=None) -> dict
    render_report(run_dir, out_dir=None) -> Path   `globe report`
Submodules import torch/matplotlib lazily through this package's consumers; import what you need.
"""

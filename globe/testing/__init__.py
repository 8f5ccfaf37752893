"""Helpers for tests and benchmarks, not part of the compression API: tiny models of every registry
architecture and one with Qwen1.5-MoE-A2.7B's layer sizes (`models`), random artifacts of the right
shapes and dense references (`artifacts`). Nothing in `globe` outside this package imports it."""

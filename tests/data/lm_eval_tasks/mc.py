"""Data for the local lm-eval task `globe_fixture_mc` (offline zero-shot tests).

Each item: the first half of a prose sentence from the bundled fixture's held-out eval.txt as
context, and four continuations: the true second half and three word-order shuffles of it (same
words, same length), so chance is 0.25 and a trained LM should clearly prefer the true order.

`load(**kw)` is the task's `custom_dataset` (lm-eval calls it with the task metadata as keywords);
it reads fixture_mc.jsonl next to this file, so the task works from any working directory.
`python mc.py` regenerates the jsonl (seeded, deterministic).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "fixture_mc.jsonl"
N = 20


def load(**kw):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(DATA))})


def make(eval_txt: Path, n: int = N, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    paras = [p.strip("\n") for p in re.split(r"\n\s*\n", eval_txt.read_text())]
    prose = [p for p in paras if p.endswith(".") and all(ln[:1].isalpha() for ln in p.splitlines())]  # no titles
    text = " ".join(" ".join(p.split()) for p in prose)
    sents = re.split(r"(?<=\.) (?=[A-Z])", text)
    ok = [s for s in sents if re.fullmatch(r"[A-Z][A-Za-z ,'()-]+\.", s) and 12 <= len(s.split()) <= 24]
    out = []
    for ln in rng.sample(ok, n):
        w = ln.split()
        h = len(w) // 2
        ctx, tail = " ".join(w[:h]), w[h:]
        choices = [" " + " ".join(tail)]
        while len(choices) < 4:
            s = tail[:]
            rng.shuffle(s)
            c = " " + " ".join(s)
            if c not in choices:
                choices.append(c)
        label = rng.randrange(4)
        choices[0], choices[label] = choices[label], choices[0]
        out.append({"context": ctx, "choices": choices, "label": label})
    return out


if __name__ == "__main__":
    from globe.testing.models import fixture_path

    rows = make(Path(fixture_path()) / "eval.txt")
    DATA.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} items to {DATA}")

"""Why does the activation-aware objective not lower perplexity on the fixture?

Fits the fixture's Up family four ways at the 50% budget of bench_fit.py (m=16, r=46, support 8,
3000 steps, batch 64): weight-only, activation-aware with the layer's input covariance, with each
expert's routed-token covariance, and with the layer covariance plus row weights
(`train.calib_row_weights`: each hidden unit weighted by how much its error reaches the expert's
output). Calibration: first half of eval.txt. On the held-out second
half it reports (a) the relative output error of the Up projection itself,
sqrt(sum_i E_{x routed to i} ||(W_i - W_hat_i) x||^2 / sum_i E ||W_i x||^2), and (b) the perplexity of
the fixture with only Up replaced.

Run: python benchmarks/bench_activation_diag.py -> benchmarks/results/activation_diag.json
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from globe.artifacts import Artifacts
from globe.config import GlobeConfig
from globe.eval.perplexity import perplexity, tokenize
from globe.fit.calib import input_covariances
from globe.fit.run import run_fit
from globe.io.checkpoint import Checkpoint
from globe.testing.models import fixture_path

OUT = Path(__file__).parent / "results" / "activation_diag.json"


def fit(out: Path, calib: Path | None, per_expert: bool, rows: bool = False) -> Artifacts:
    train = {"steps": 3000, "batch_size": 64, "lr": 0.03, "families": ["up"], "baselines": False,
             "eval_every": 100, "checkpoint_every": 10**6, "device": "cpu"}
    if calib is not None:
        train.update(objective="activation", calib_text=str(calib), calib_tokens=100_000,
                     calib_per_expert=per_expert, calib_row_weights=rows)
    cfg = GlobeConfig.from_dict({"model": {"path": str(fixture_path())}, "output_dir": str(out),
                                 "bank": {"m_up": 16, "m_gate": 16, "r": 46}, "sparsity": {"target_support": 8},
                                 "train": train})
    run_fit(cfg, progress=False)
    return Artifacts.load(out)


def main() -> None:
    torch.manual_seed(0)
    fx = fixture_path()
    ck = Checkpoint(fx)
    text = (fx / "eval.txt").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib, held = tmp / "calib.txt", tmp / "held.txt"
        calib.write_text(text[: len(text) // 2])
        held.write_text(text[len(text) // 2 :])
        arts = {"weight": fit(tmp / "w", None, False), "activation_layer": fit(tmp / "a", calib, False),
                "activation_per_expert": fit(tmp / "e", calib, True),
                "activation_layer_row_weights": fit(tmp / "r", calib, False, rows=True)}
        _, per = input_covariances(ck, held, n_tokens=100_000, per_expert=True)
        W = ck.load_family("up", torch.float32)
        E, p = ck.num_experts, ck.p
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(fx)
        ids = tokenize(tok, held.read_text())
        model = AutoModelForCausalLM.from_pretrained(fx, dtype=torch.float32).eval()
        orig = {L: model.model.layers[L].mlp.experts.gate_up_proj.detach().clone() for L in ck.moe_layers}
        res = {"original_ppl": perplexity(model, ids, 256)["perplexity"], "fits": {}}
        for name, a in arts.items():
            Wh = a.families["up"].reconstruct()
            num = den = 0.0
            for (L, e), (C, n) in per.items():
                i = ck.moe_layers.index(L) * E + e
                D, Wi, C = W[i] - Wh[i], W[i], C.float() * n
                num += torch.einsum("pd,de,pe->", D, C, D).item()
                den += torch.einsum("pd,de,pe->", Wi, C, Wi).item()
            with torch.no_grad():
                for li, L in enumerate(ck.moe_layers):
                    model.model.layers[L].mlp.experts.gate_up_proj[:, p:] = Wh[li * E:(li + 1) * E]
            ppl = perplexity(model, ids, 256)["perplexity"]
            with torch.no_grad():
                for L in ck.moe_layers:
                    model.model.layers[L].mlp.experts.gate_up_proj.copy_(orig[L])
            werr = ((W - Wh).pow(2).sum() / W.pow(2).sum()).sqrt().item()
            res["fits"][name] = {"weight_rel_error": werr, "heldout_routed_output_rel_error": (num / den) ** 0.5,
                                 "ppl_up_only": ppl}
            print(name, res["fits"][name], flush=True)
    res["heldout_tokens"] = int(ids.numel())
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

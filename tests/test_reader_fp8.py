"""FP8 block-quantized checkpoints (DeepSeek-V3 / Kimi-K2 layout) are read as values; other
quantizations are refused in one line before any work.

The checkpoints are written by hand: a tiny deepseek_v3 (hidden 136, expert width 200, so 128 x 128
blocks are partial at the edges) whose linear weights are stored as float8_e4m3fn codes with
`<name>_scale_inv` (ceil(R/128), ceil(C/128)) fp32 and a `quantization_config` in config.json, as
DeepSeek-V3 ships them. Expected values come from an independent block-by-block dequantization.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from globe.cli.main import main
from globe.errors import GlobeError
from globe.io.checkpoint import Checkpoint
from globe.io.inspect import inspect
from globe.testing.models import tiny_model

QCFG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
F8 = torch.float8_e4m3fn
SKIP = ("embed_tokens", "norm", "lm_head", "mlp.gate.weight")  # kept in bf16 by DeepSeek-V3


def quantize(w: torch.Tensor, b: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) -> fp8 codes (R, C), scale_inv (ceil(R/br), ceil(C/bc)): each block scaled to |max| = 448."""
    R, C = w.shape
    nr, nc = -(-R // b[0]), -(-C // b[1])
    q, s = torch.empty(R, C, dtype=F8), torch.empty(nr, nc)
    for i in range(nr):
        for j in range(nc):
            blk = w[i * b[0]:(i + 1) * b[0], j * b[1]:(j + 1) * b[1]].float()
            s[i, j] = blk.abs().max().clamp_min(1e-12) / 448
            q[i * b[0]:(i + 1) * b[0], j * b[1]:(j + 1) * b[1]] = (blk / s[i, j]).to(F8)
    return q, s


def dequant_ref(q: torch.Tensor, s: torch.Tensor, b: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Independent reference: element (r, c) = float(code) * s[r // br, c // bc], in fp32."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            sl = (slice(i * b[0], (i + 1) * b[0]), slice(j * b[1], (j + 1) * b[1]))
            out[sl] = q[sl].float() * s[i, j].item()
    return out


def write_fp8(model, d, qcfg=QCFG, block=(128, 128), fused=False):
    """Save `model` as an FP8 checkpoint; returns {name: (codes, scale_inv)} of the quantized tensors."""
    model.save_pretrained(d)
    sd = load_file(str(d / "model.safetensors"))
    if fused:  # the transformers-5 in-memory layout: experts.gate_up_proj (E, 2p, d)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    out, q = {}, {}
    for k, w in sd.items():
        if w.ndim == 2 and k.endswith(".weight") and not any(x in k for x in SKIP):
            c, s = quantize(w, block)
            out[k], out[k + "_scale_inv"], q[k] = c, s, (c, s)
        elif w.ndim == 3:  # fused experts: one scale grid per expert
            pairs = [quantize(w[e], block) for e in range(w.shape[0])]
            c, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            out[k], out[k + "_scale_inv"], q[k] = c, s, (c, s)
        else:
            out[k] = w.to(torch.bfloat16)
    (d / "model.safetensors").unlink()
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (d / "config.json").write_text(json.dumps(cfg))
    return q


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    torch.manual_seed(0)
    m = tiny_model("deepseek_v3", hidden_size=136, moe_intermediate_size=200, intermediate_size=264,
                   n_routed_experts=4, num_hidden_layers=2)
    d = tmp_path_factory.mktemp("fp8") / "ds3"
    return m, d, write_fp8(m, d)


def test_fp8_experts_dequantized(fp8):
    m, d, q = fp8
    ck = Checkpoint(d)
    assert ck.moe_layers == [1] and ck.quantization.startswith("fp8 e4m3, 128x128 blocks")
    assert not any(k.endswith("_scale_inv") for k in ck.keys())
    assert set(ck.keys()) == set(m.state_dict()) - {k for k in m.state_dict() if ".experts.gate_up" in k
                                                    or ".experts.down" in k} | set(ck.expert_tensor_names())
    for e in range(4):
        for fam, nm in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            name = f"model.layers.1.mlp.experts.{e}.{nm}.weight"
            ref = dequant_ref(*q[name])
            assert ck.stored_dtype_str(name) == "F8_E4M3" and ck.dtype_str(name) == "BF16"
            w = ck.expert(1, e, fam)
            assert w.dtype == torch.bfloat16 and torch.equal(w, ref.to(torch.bfloat16))
            assert torch.equal(ck.expert(1, e, fam, torch.float32), ref)
    up32 = ck.load_family("up", dtype=torch.float32)
    assert up32.dtype == torch.float32 and up32.shape == (4, 200, 136)
    assert torch.equal(up32[2], dequant_ref(*q["model.layers.1.mlp.experts.2.up_proj.weight"]))
    assert ck.load_family("up").dtype == torch.bfloat16
    # Values, not codes: within fp8's relative step (2^-3) of the weights that were quantized.
    orig = m.model.layers[1].mlp.experts.gate_up_proj[:, 200:]
    assert ((up32 - orig).abs() <= orig.abs().amax() / 8).all() and up32.abs().max() < 1


def test_fp8_other_tensors(fp8):
    m, d, q = fp8
    ck = Checkpoint(d)
    name = "model.layers.0.self_attn.q_a_proj.weight"
    assert torch.equal(ck.tensor(name), dequant_ref(*q[name]).to(torch.bfloat16))
    assert torch.equal(ck.tensor(name, torch.float32), dequant_ref(*q[name]))
    norm = "model.layers.0.input_layernorm.weight"
    assert ck.dtype_str(norm) == "BF16" and torch.equal(ck.tensor(norm), m.state_dict()[norm].to(torch.bfloat16))
    from globe.compat import layer_state

    st = layer_state(ck, 1, dtype=torch.float32)
    gu = st["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(gu[3, :200], dequant_ref(*q["model.layers.1.mlp.experts.3.gate_proj.weight"]))
    assert torch.equal(st["model.layers.1.mlp.shared_experts.up_proj.weight"],
                       dequant_ref(*q["model.layers.1.mlp.shared_experts.up_proj.weight"]))
    cfg = ck.export_config()
    assert "quantization_config" not in cfg and "quantization_config" in ck.raw_config
    assert cfg["model_type"] == "deepseek_v3"


def test_fp8_inspect(fp8, capsys):
    m, d, _ = fp8
    info = inspect(str(d))
    assert info["quantization"].startswith("fp8 e4m3")
    assert info["params"]["total"] == sum(v.numel() for v in m.state_dict().values())
    assert info["dtypes"]["F8_E4M3"] > 0 and "F32" not in info["dtypes"]
    assert main(["inspect", str(d)]) == 0
    assert "fp8 e4m3, 128x128 blocks" in capsys.readouterr().out


def test_fp8_matches_transformers_on_whole_blocks(tmp_path):
    """Where every dimension is a multiple of 128 (DeepSeek-V3's experts: 2048 x 7168), the values equal
    transformers' own FP8 dequantization (its CPU load path), tensor for tensor. (For partial edge
    blocks transformers 5.24 derives the block from rows // scale_rows instead of 128, which departs
    from DeepSeek's weight_dequant; globe follows DeepSeek, checked by the tests above.)"""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    m = tiny_model("deepseek_v3", hidden_size=256, moe_intermediate_size=128, intermediate_size=256,
                   n_routed_experts=3, num_hidden_layers=2)
    write_fp8(m, tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    ck = Checkpoint(tmp_path)
    ex = ref.model.layers[1].mlp.experts
    for e in range(3):
        assert torch.equal(ck.expert(1, e, "gate"), ex.gate_up_proj[e, :128])
        assert torch.equal(ck.expert(1, e, "up"), ex.gate_up_proj[e, 128:])
        assert torch.equal(ck.expert(1, e, "down"), ex.down_proj[e])
    sd = ref.state_dict()
    common = [k for k in ck.keys() if k in sd]
    assert len(common) >= 20 and all(torch.equal(ck.tensor(k), sd[k]) for k in common)


def test_fp8_fused_layout(tmp_path):
    torch.manual_seed(1)
    m = tiny_model("deepseek_v3", hidden_size=136, moe_intermediate_size=100, n_routed_experts=3,
                   num_hidden_layers=2)
    q = write_fp8(m, tmp_path, fused=True)
    ck = Checkpoint(tmp_path)
    assert ck.layout == "fused"
    gu_c, gu_s = q["model.layers.1.mlp.experts.gate_up_proj"]
    dn_c, dn_s = q["model.layers.1.mlp.experts.down_proj"]
    for e in range(3):
        full = dequant_ref(gu_c[e], gu_s[e])
        assert torch.equal(ck.expert(1, e, "gate", torch.float32), full[:100])
        assert torch.equal(ck.expert(1, e, "up", torch.float32), full[100:])
        assert torch.equal(ck.expert(1, e, "down"), dequant_ref(dn_c[e], dn_s[e]).to(torch.bfloat16))


def test_fp8_other_block_size(tmp_path):
    torch.manual_seed(2)
    m = tiny_model("deepseek_v3", n_routed_experts=3, num_hidden_layers=2)
    q = write_fp8(m, tmp_path, qcfg={**QCFG, "weight_block_size": [16, 8]}, block=(16, 8))
    ck = Checkpoint(tmp_path)
    name = "model.layers.1.mlp.experts.1.down_proj.weight"
    assert q[name][1].shape == (2, 3)  # (32, 24) in 16 x 8 blocks
    assert torch.equal(ck.expert(1, 1, "down", torch.float32), dequant_ref(*q[name], (16, 8)))


def test_fp8_fit_sees_values(fp8, tmp_path, capsys):
    """`globe fit` on the FP8 checkpoint equals the same fit on its fp32 dequantization."""
    _, d, q = fp8
    plain = tmp_path / "plain"
    shutil.copytree(d, plain)
    sd = load_file(str(plain / "model.safetensors"))
    for k, (c, s) in q.items():
        sd[k] = dequant_ref(c, s)
        del sd[k + "_scale_inv"]
    save_file(sd, str(plain / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["quantization_config"]
    (plain / "config.json").write_text(json.dumps(cfg))
    res = []
    for src in (d, plain):
        out = tmp_path / f"fit-{src.name}"
        args = ["fit", f"model.path={src}", f"output_dir={out}", "train.steps=10", "bank.m_up=4", "bank.m_gate=4",
                "sparsity.target_support=2", "train.baselines=false", "train.families=[up]", "train.eval_every=5"]
        assert main(args) == 0, capsys.readouterr().err
        capsys.readouterr()
        res.append(json.loads((out / "summary.json").read_text())["families"]["up"]["rel_fro_error"])
    assert res[0] == res[1] and res[0] < 1


@pytest.mark.parametrize("qcfg,needle", [
    ({"quant_method": "gptq", "bits": 4}, "'gptq'"), ({"quant_method": "awq"}, "'awq'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"quant_method": "compressed-tensors"}, "'compressed-tensors'"), ({"quant_method": "mxfp4"}, "'mxfp4'"),
    ({"load_in_8bit": True}, "quant_method None"), ({"quant_method": "mystery"}, "'mystery'"),
    ({**QCFG, "weight_block_size": None}, "per-tensor scales"), ({**QCFG, "fmt": "e5m2"}, "'e5m2'"),
    ({**QCFG, "activation_scheme": "static"}, "'static'"), ({**QCFG, "weight_block_size": [128]}, "two positive"),
    ("fp8", "not an object"),
])
def test_unsupported_quantization_refused_first(tiny_dirs, tmp_path, capsys, qcfg, needle):
    d = shutil.copytree(tiny_dirs["deepseek_v3"][1], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"garbage")  # refused before any weight file is opened
    assert main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "safetensors" not in err.split(":", 2)[-1].split(";")[0], err
    out = tmp_path / "fit"
    assert main(["fit", f"model.path={d}", f"output_dir={out}"]) == 2 and not out.exists()
    assert needle in capsys.readouterr().err


def _edit(d, edit_sd=None, edit_cfg=None):
    if edit_sd:
        sd = load_file(str(d / "model.safetensors"))
        edit_sd(sd)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    if edit_cfg:
        cfg = json.loads((d / "config.json").read_text())
        edit_cfg(cfg)
        (d / "config.json").write_text(json.dumps(cfg))


NAME = "model.layers.1.mlp.experts.0.up_proj.weight"


@pytest.mark.parametrize("label,edit_sd,edit_cfg,needle", [
    ("missing scale", lambda sd: sd.pop(NAME + "_scale_inv"), None, f"FP8 tensor {NAME} has no scale tensor"),
    ("scale shape", lambda sd: sd.__setitem__(NAME + "_scale_inv", torch.ones(1, 1)), None, "needs floating [2, 2]"),
    ("scale int", lambda sd: sd.__setitem__(NAME + "_scale_inv", torch.ones(2, 2, dtype=torch.int32)), None, "I32"),
    ("orphan scale", lambda sd: sd.__setitem__("model.norm.weight_scale_inv", torch.ones(2, 2)), None,
     "has no FP8 tensor model.norm.weight"),
    ("no config", None, lambda c: c.pop("quantization_config"), "FP8 scale but config.json has no quantization_config"),
    ("codes alone", lambda sd: [sd.pop(k) for k in list(sd) if k.endswith("_scale_inv")],
     lambda c: c.pop("quantization_config"), "declares no quantization"),
    ("e5m2 codes", lambda sd: sd.__setitem__(NAME, sd[NAME].to(torch.float8_e5m2)), None, "F8_E5M2"),
    ("gptq names", lambda sd: sd.__setitem__("model.layers.0.mlp.gate_proj.qweight", torch.zeros(2, dtype=torch.int32)),
     None, "packed quantized weight"),
])
def test_fp8_layout_problems_refused(fp8, tmp_path, capsys, label, edit_sd, edit_cfg, needle):
    d = shutil.copytree(fp8[1], tmp_path / "m")
    _edit(d, edit_sd, edit_cfg)
    with pytest.raises(GlobeError, match=".") as ei:
        Checkpoint(d)
    assert needle in str(ei.value) and "\n" not in str(ei.value), (label, str(ei.value))
    assert main(["inspect", str(d)]) == 2
    capsys.readouterr()


def test_fp8_logged_once(fp8):
    import logging

    from globe.io import checkpoint as cmod

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.msgs: list[str] = []

        def emit(self, record):
            self.msgs.append(record.getMessage())

    cmod._LOGGED.discard(str(fp8[1]))
    h, lg = Keep(), logging.getLogger("globe")
    lg.addHandler(h)
    old = lg.level
    lg.setLevel(logging.INFO)
    try:
        Checkpoint(fp8[1])
        Checkpoint(fp8[1])
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)
    msgs = [m for m in h.msgs if "dequantized on read" in m]
    assert len(msgs) == 1 and "exports will be bf16" in msgs[0]


def test_fp8_exports_are_bf16_values(fp8, tmp_path):
    """Both export formats of an FP8 checkpoint hold dequantized bf16 values and no quantization_config;
    the dense one loads in plain transformers with the logits of a bf16 model of the dequantized weights
    patched with the same artifacts; the globe one reloads to exactly that patched model."""
    from transformers import AutoModelForCausalLM

    from globe import compat
    from globe.config import GlobeConfig
    from globe.runtime import patch_model
    from globe.runtime.export import run_export as export
    from globe.runtime.load import load_model
    from globe.testing.artifacts import random_artifacts

    m, d, q = fp8
    deq = tiny_model("deepseek_v3", hidden_size=136, moe_intermediate_size=200, intermediate_size=264,
                     n_routed_experts=4, num_hidden_layers=2).to(torch.bfloat16)
    ck = Checkpoint(d)
    with torch.no_grad():  # the reference: every tensor as the reader dequantizes it
        sd = {}
        for L in range(2):
            sd.update(compat.layer_state(ck, L, dtype=torch.bfloat16))
        for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            sd[k] = ck.tensor(k)
        deq.load_state_dict(sd, strict=False)
    arts = random_artifacts(deq, m=4, r=8, support=2, seed=5)
    arts.save(tmp_path / "arts")
    ids = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(0))
    outs = {}
    for fmt in ("dense", "globe"):
        out = export(GlobeConfig.from_dict(dict(model=dict(path=str(d)), artifacts=str(tmp_path / "arts"),
                                                output_dir=str(tmp_path / fmt), export=dict(format=fmt))))
        conf = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in conf
        assert not any(k.endswith("_scale_inv") for k in json.loads(
            (out / "config.json").read_text()).get("globe", {}).get("families", {}))
        with torch.no_grad():
            model = AutoModelForCausalLM.from_pretrained(str(out)).eval() if fmt == "dense" else load_model(out)
            outs[fmt] = model(input_ids=ids).logits
    patched = patch_model(deq, tmp_path / "arts")
    with torch.no_grad():
        want = patched(input_ids=ids).logits
    assert torch.equal(outs["globe"], want)
    torch.testing.assert_close(outs["dense"].float(), want.float(), rtol=5e-2, atol=5e-2)

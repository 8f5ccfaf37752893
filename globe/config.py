"""Typed configuration for every GloBE verb.

Why: the library never imports Hydra. The CLI composes YAML with Hydra, turns the result into these
dataclasses (`GlobeConfig.from_dict`) and calls the library. Every dataclass validates itself in
`__post_init__` and raises `ValueError("<key>: <problem>")`; checks that need the model's shapes
(r <= min(p, d), target support <= m) live in `GlobeConfig.check_shapes`, which runs before any
weight is read.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("up", "gate")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16", "fp16")
DATASETS = ("wikitext2", "wikitext2raw", "wikitext")  # eval.dataset names (globe.eval.perplexity)


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{key}: {msg}")


def _cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _numbers(cfg: Any, prefix: str) -> None:
    """Every int/float/bool/str/list field of a config dataclass as its annotated type, in place; ValueError
    naming the key for a bool or text where a number belongs, a fraction where an integer belongs, a
    non-finite float, a word other than true/false for a flag, or a list where text belongs (Python callers
    get the same one-line errors as the command line)."""
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, _number(f"{prefix}.{f.name}", f.type, getattr(cfg, f.name)))


def parse_share(share: str) -> int | None:
    """Layers per bank K of `bank.share`: None for global (all layers), 1 for layer, K for group:K.

    Raises ValueError("bank.share: ...") for anything else (K must be an integer >= 1).
    """
    s = str(share).strip()
    if s == "global":
        return None
    if s == "layer":
        return 1
    if s.startswith("group:"):
        k = s[len("group:"):]
        _need(k.isdigit() and int(k) >= 1, "bank.share",
              f"group size must be an integer >= 1, got {share!r} (e.g. group:2)")
        return int(k)
    raise ValueError(f"bank.share: unknown scope {share!r}; choose global, layer or group:K (K adjacent layers)")


@dataclass
class ModelCfg:
    path: str = ""  # local directory or hub id
    revision: str | None = None

    def __post_init__(self) -> None:
        _need(isinstance(self.path, str), "model.path", "must be a string")


@dataclass
class BankCfg:
    m_up: int = 32  # atoms per Up bank
    m_gate: int = 32  # atoms per Gate bank
    r: int | None = None  # atom rank; None -> round(r_frac * p), or derived from budget when r_frac is None too
    r_frac: float | None = None
    budget: float | None = 0.4  # fraction of the routed Up+Gate parameters kept (r derived; fit/budget.py)
    r_multiple: int = 8  # a budget-derived r is rounded down to a multiple of this (bf16 grouped_mm alignment)
    share: str = "global"  # global | layer | group:K (K adjacent MoE layers per bank; fit/share.py)
    allow_r_above: bool = False  # permit r > min(p, d)
    activation: str = "silu"  # phi applied after mixing: a key of globe.maps.ACTIVATIONS
    init: str = "svd"  # svd (rotations of the common SVD row space + noise) | random | kmeans
    seed: int = 0
    gain0: float = 1.0  # initial gain g inside phi (atoms have unit RMS)
    mobe_m: int | None = None  # MoBE-style baseline: atoms per layer (None -> max(2, m // layers))
    keep_fraction: float = 0.0  # routed experts kept uncompressed, the busiest by calibration gate mass
    # (fraction of all N; their Up/Gate stay the source's; counted in the budget; fit/calib.py keep_busiest)

    def __post_init__(self) -> None:
        _numbers(self, "bank")
        _need(int(self.m_up) >= 1, "bank.m_up", f"must be >= 1, got {self.m_up}")
        _need(int(self.m_gate) >= 1, "bank.m_gate", f"must be >= 1, got {self.m_gate}")
        _need(self.r is None or int(self.r) >= 1, "bank.r", f"must be >= 1, got {self.r}")
        _need(self.r_frac is None or 0 < float(self.r_frac) <= 4, "bank.r_frac",
              f"must be in (0, 4], got {self.r_frac}")
        _need(self.budget is None or 0 < float(self.budget) <= 1, "bank.budget",
              f"must be in (0, 1], got {self.budget}")
        _need(self.r is not None or self.r_frac is not None or self.budget is not None, "bank.budget",
              "set bank.budget, bank.r or bank.r_frac")
        _need(int(self.r_multiple) >= 1, "bank.r_multiple", f"must be >= 1, got {self.r_multiple}")
        parse_share(self.share)  # ValueError("bank.share: ...")
        from .maps import ACTIVATIONS  # torch, loaded when a config is built: `import globe` stays light

        _need(self.activation in ACTIVATIONS, "bank.activation",
              f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        _need(self.init in ("svd", "random", "kmeans"), "bank.init", f"unknown init {self.init!r}; svd|random|kmeans")
        _need(float(self.gain0) > 0, "bank.gain0", f"must be > 0, got {self.gain0}")
        _need(0 <= int(self.seed) < 2 ** 63, "bank.seed", f"must be in [0, 2^63), got {self.seed}")
        _need(self.mobe_m is None or int(self.mobe_m) >= 1, "bank.mobe_m", f"must be >= 1, got {self.mobe_m}")
        _need(0 <= float(self.keep_fraction) < 0.5, "bank.keep_fraction",
              f"must be in [0, 0.5), got {self.keep_fraction}")
        if self.budget is not None and self.r is None and self.r_frac is None:
            _need(float(self.keep_fraction) < float(self.budget), "bank.keep_fraction",
                  f"{self.keep_fraction:g} keeps at least bank.budget={self.budget:g} of the parameters exact: "
                  "nothing is left for the fitted experts; lower it")

    def m(self, family: str) -> int:
        return int(self.m_up if family == "up" else self.m_gate)

    def rank(self, p: int) -> int | None:
        """The explicit rank (bank.r, or round(r_frac * p)); None when r comes from bank.budget
        (globe.fit.budget.fit_rank, which needs N, d and the number of banks)."""
        if self.r is not None:
            return int(self.r)
        return max(1, round(self.r_frac * p)) if self.r_frac is not None else None


@dataclass
class SparsityCfg:
    map: str = "entmax"  # a key of globe.maps.SPARSE_MAPS: entmax (alpha below) | sparsemax | softmax (ablation)
    alpha: float = 1.5
    T0: float = 1.0  # initial temperature
    T_min: float = 1e-3
    T_max: float = 1e3
    target_support: int = 8  # median number of nonzero codes per expert
    eta: float = 0.05  # temperature controller gain
    l1: float = 0.0
    eps_prune: float = 1e-4  # codes below eps * max are zeroed at export
    T_auto: bool = True  # calibrate the initial T so the initial median support equals the target
    support0: int | None = None  # support target at step 0 (None -> min(m, 3 * target_support))
    anneal_frac: float = 0.5  # fraction of steps over which the support target decays to target_support
    z_max: float = 1.0  # cap on the per-expert std of the logits (they cannot outrun T); 0 = no cap
    recalibrate: float = 0.0  # > 1: re-set T by bisection when the median support leaves [tgt/x, tgt*x]; 0 = off

    def __post_init__(self) -> None:
        _numbers(self, "sparsity")
        from .maps import SPARSE_MAPS

        _need(self.map in SPARSE_MAPS, "sparsity.map",
              f"unknown sparse map {self.map!r}; choose one of {', '.join(SPARSE_MAPS)}")
        _need(1.0 < float(self.alpha) <= 2.0, "sparsity.alpha", f"must be in (1, 2], got {self.alpha}")
        _need(float(self.T0) > 0, "sparsity.T0", f"must be > 0, got {self.T0}")
        _need(1e-6 <= float(self.T_min) <= float(self.T_max) <= 1e6, "sparsity.T_min",
              f"need 1e-6 <= T_min <= T_max <= 1e6 (logits / T must stay finite), got {self.T_min}, {self.T_max}")
        _need(int(self.target_support) >= 1, "sparsity.target_support",
              f"must be >= 1, got {self.target_support}")
        _need(0 <= float(self.eta) <= 10, "sparsity.eta", f"must be in [0, 10] (a controller gain), got {self.eta}")
        _need(float(self.l1) >= 0, "sparsity.l1", f"must be >= 0, got {self.l1}")
        _need(0 <= float(self.eps_prune) < 1, "sparsity.eps_prune", f"must be in [0, 1), got {self.eps_prune}")
        _need(self.support0 is None or int(self.support0) >= 1, "sparsity.support0", "must be >= 1")
        _need(float(self.recalibrate) == 0 or float(self.recalibrate) > 1, "sparsity.recalibrate",
              f"must be 0 (off) or > 1 (a factor), got {self.recalibrate}")
        _need(0 <= float(self.anneal_frac) <= 1, "sparsity.anneal_frac", f"must be in [0, 1], got {self.anneal_frac}")
        _need(float(self.z_max) >= 0, "sparsity.z_max", f"must be >= 0, got {self.z_max}")


@dataclass
class TrainCfg:
    steps: int = 2000
    batch_size: int = 64  # experts per minibatch, drawn across all MoE layers
    lr: float = 3e-2
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    refit_every: int = 1  # closed-form ridge refit of A every K steps
    ridge: float = 1e-4
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    objective: str = "weight"  # weight | activation
    calib_text: str | None = None  # text file for the activation-aware objective
    calib_tokens: int = 4096
    calib_per_expert: bool = False  # covariance of tokens routed to each expert (else per layer)
    calib_row_weights: bool = False  # also weigh hidden units by how much their error reaches the output
    expert_weights: str = "uniform"  # uniform | routing (each expert's error by its routed-token count ^ power)
    expert_weight_power: float = 0.5  # exponent of the routing counts (0: uniform, 1: proportional)
    device: str = "auto"
    autocast_bf16: bool = False  # bf16 autocast of the large products (CUDA or CPU; fp32 masters)
    seed: int = 0
    patience: int = 0  # early stop after this many evals without improvement (0 = off)
    eval_every: int = 50
    checkpoint_every: int = 100
    log_every: int = 10
    max_memory_gb: float = 16.0  # experts kept in their stored dtype if fp32 would exceed this
    baselines: bool = True  # per-expert SVD baseline at matched budget (free: from the warm start's spectra)
    baseline_mobe: bool = False  # also fit the MoBE-style bank baseline (costly: ~L*E/batch x the fit's steps)
    lr_schedule: str = "cosine"  # constant | cosine (after the support anneal, down to 5% of lr)
    lr_codes: float | None = None  # Adam lr of the logits (None -> 5 * lr)
    eval_chunk: int = 32  # experts per chunk in full evaluations and A refits
    baseline_steps: int | None = None  # Adam steps of the MoBE-style baseline (None -> steps)
    codes_optimizer: str = "adam"  # adam (one Adam with the bank) | row_adam (only the batch's rows move)
    code_pass_every: int = 0  # every K steps, every expert's logits take code_pass_steps steps, bank fixed (0: off)
    code_pass_steps: int = 1
    distributed: Any = "auto"  # sharded over torch.distributed: auto (when launched by torchrun) | true | false

    def __post_init__(self) -> None:
        _numbers(self, "train")
        _need(int(self.steps) >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        _need(int(self.batch_size) >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _need(math.isfinite(float(self.lr)) and float(self.lr) > 0, "train.lr",
              f"must be finite and > 0, got {self.lr}")
        _need(int(self.refit_every) >= 1, "train.refit_every", "must be >= 1")
        _need(0 < float(self.eps) < 1, "train.eps", f"must be in (0, 1) (Adam's denominator term), got {self.eps}")
        _need(float(self.weight_decay) >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _need(0 <= int(self.seed) < 2 ** 63, "train.seed", f"must be in [0, 2^63), got {self.seed}")
        _need(float(self.ridge) >= 0, "train.ridge", "must be >= 0")
        fams = list(self.families)
        _need(len(fams) > 0 and all(f in FAMILIES for f in fams), "train.families",
              f"must be a non-empty subset of {list(FAMILIES)}, got {fams}")
        self.families = [f for f in FAMILIES if f in fams]
        _need(isinstance(self.betas, (list, tuple)), "train.betas", f"must be two numbers, e.g. [0.9,0.99], got "
              f"{self.betas!r}")
        self.betas = tuple(_number(f"train.betas[{i}]", "float", b) for i, b in enumerate(self.betas))  # type: ignore
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
              f"must be two numbers in [0, 1), got {list(self.betas)}")
        _need(self.objective in ("weight", "activation"), "train.objective",
              f"unknown objective {self.objective!r}; weight|activation")
        _need(self.objective == "weight" or bool(self.calib_text), "train.calib_text",
              "the activation objective needs a calibration text file")
        _need(self.expert_weights in ("uniform", "routing"), "train.expert_weights",
              f"unknown expert weighting {self.expert_weights!r}; uniform|routing")
        _need(self.expert_weights == "uniform" or bool(self.calib_text), "train.calib_text",
              "train.expert_weights=routing needs a calibration text file (the routed-token counts come from it)")
        _need(math.isfinite(float(self.expert_weight_power)) and 0 <= float(self.expert_weight_power) <= 2,
              "train.expert_weight_power", f"must be in [0, 2], got {self.expert_weight_power}")
        _need(self.device in DEVICES, "train.device", f"unknown device {self.device!r}")
        _need(int(self.calib_tokens) >= 2, "train.calib_tokens", f"must be >= 2 (tokens), got {self.calib_tokens}")
        _need(float(self.max_memory_gb) > 0, "train.max_memory_gb", "must be > 0")
        _need(self.lr_schedule in ("constant", "cosine"), "train.lr_schedule",
              f"unknown schedule {self.lr_schedule!r}; constant|cosine")
        _need(self.lr_codes is None or (math.isfinite(float(self.lr_codes)) and float(self.lr_codes) > 0),
              "train.lr_codes", "must be finite and > 0")
        _need(int(self.eval_chunk) >= 1, "train.eval_chunk", "must be >= 1")
        _need(int(self.eval_every) >= 1, "train.eval_every", "must be >= 1")
        _need(int(self.checkpoint_every) >= 1, "train.checkpoint_every", "must be >= 1")
        _need(int(self.log_every) >= 1, "train.log_every", "must be >= 1")
        _need(int(self.patience) >= 0, "train.patience", "must be >= 0")
        _need(self.baseline_steps is None or int(self.baseline_steps) >= 1, "train.baseline_steps", "must be >= 1")
        _need(self.codes_optimizer in ("adam", "row_adam"), "train.codes_optimizer",
              f"unknown optimizer {self.codes_optimizer!r}; adam|row_adam")
        _need(int(self.code_pass_every) >= 0, "train.code_pass_every", "must be >= 0")
        _need(int(self.code_pass_steps) >= 1, "train.code_pass_steps", "must be >= 1")
        _need(self.distributed in ("auto", True, False), "train.distributed",
              f"must be auto, true or false, got {self.distributed!r}")


@dataclass
class CacheCfg:
    enabled: bool = True
    mode: str = "full"  # full | lru | none (enabled=false means none)
    S_per_layer: int = 16
    dtype: str = "auto"  # compute dtype of cached tilde_B: auto follows the model
    warmup_tokens: int = 2048
    compose_full: bool = False  # cache A_i @ tilde_B_i (p x d) instead of tilde_B_i
    compile: bool = False  # compose tilde_B with a torch.compile'd fused kernel (CPU; eager fallback, logged)

    def __post_init__(self) -> None:
        _numbers(self, "cache")
        _need(self.mode in ("full", "lru", "none"), "cache.mode", f"unknown mode {self.mode!r}")
        _need(int(self.S_per_layer) >= 1, "cache.S_per_layer", "must be >= 1")
        _need(self.dtype in DTYPES, "cache.dtype", f"unknown dtype {self.dtype!r}")
        _need(int(self.warmup_tokens) >= 0, "cache.warmup_tokens", "must be >= 0")
        if not self.enabled:
            self.mode = "none"


@dataclass
class ExportCfg:
    format: str = "globe"  # globe | dense
    dtype: str = "bf16"
    save_mixed: bool = False  # store each expert's tilde_B_i (True) or bank + sparse codes (False)
    max_shard_gb: float = 5.0  # output shards of at most this many GB (+ model.safetensors.index.json)
    overwrite: bool = False  # replace an existing output_dir that holds an earlier globe or dense export

    def __post_init__(self) -> None:
        _numbers(self, "export")  # overwrite: a bool or the text true/false, nothing else (it deletes files)
        _need(self.format in ("globe", "dense"), "export.format", f"unknown format {self.format!r}")
        _need(self.dtype in ("fp32", "bf16", "fp16"), "export.dtype", f"unknown dtype {self.dtype!r}")
        _need(float(self.max_shard_gb) > 0, "export.max_shard_gb", f"must be > 0, got {self.max_shard_gb}")


@dataclass
class WandbCfg:
    enabled: bool = False
    mode: str = "offline"
    project: str = "globe"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _numbers(self, "wandb")
        _need(self.mode in ("online", "offline", "disabled"), "wandb.mode", f"unknown mode {self.mode!r}")


@dataclass
class EvalCfg:
    text: str | None = None
    dataset: str | None = None  # wikitext2
    context: int = 256
    stride: int | None = None  # None -> context
    max_tokens: int | None = None
    speed: bool = False
    prefill_tokens: int = 512
    decode_tokens: int = 64
    hit_rate: bool = False
    S_values: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 60])
    tasks: list[str] = field(default_factory=list)  # lm-eval task names
    task_paths: list[str] = field(default_factory=list)  # extra dirs of lm-eval task YAMLs (local tasks)
    task_limit: int | None = None  # lm-eval: at most this many examples per task (None: all)
    task_batch_size: int = 1  # lm-eval HFLM batch size
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None  # torch CPU threads during eval (None: leave as is); 1 steadies timings on busy CPUs

    def __post_init__(self) -> None:
        _numbers(self, "eval")
        _need(int(self.context) >= 2, "eval.context", "must be >= 2")
        cpus = _cpus()
        _need(self.threads is None or 1 <= int(self.threads) <= cpus, "eval.threads",
              f"must be between 1 and {cpus} (the CPUs this process may use), got {self.threads}")
        _need(self.stride is None or int(self.stride) >= 1, "eval.stride", "must be >= 1")
        _need(self.device in DEVICES, "eval.device", f"unknown device {self.device!r}")
        _need(self.dtype in DTYPES, "eval.dtype", f"unknown dtype {self.dtype!r}")
        _need(all(isinstance(t, str) and t for t in self.tasks), "eval.tasks", "must be a list of task names")
        _need(all(isinstance(t, str) and t for t in self.task_paths), "eval.task_paths",
              "must be a list of directories")
        _need(self.task_limit is None or int(self.task_limit) >= 1, "eval.task_limit", "must be >= 1")
        _need(int(self.task_batch_size) >= 1, "eval.task_batch_size", "must be >= 1")
        _need(int(self.prefill_tokens) >= 1, "eval.prefill_tokens", f"must be >= 1, got {self.prefill_tokens}")
        _need(int(self.decode_tokens) >= 1, "eval.decode_tokens", f"must be >= 1, got {self.decode_tokens}")
        _need(all(S >= 1 for S in self.S_values), "eval.S_values",
              f"must be cache sizes >= 1 (slots per layer), got {self.S_values}")
        _need(self.max_tokens is None or int(self.max_tokens) >= 2, "eval.max_tokens",
              f"must be >= 2 (tokens to score), got {self.max_tokens}")
        _need(self.dataset is None or str(self.dataset).lower().replace("-", "").replace("_", "") in DATASETS,
              "eval.dataset", f"unknown dataset {self.dataset!r}; supported: wikitext2 (or eval.text=FILE)")


@dataclass
class GenerateCfg:
    """`globe generate`: greedy decoding of max_new_tokens tokens after prompt, on its own device/dtype."""
    prompt: str | None = None
    max_new_tokens: int = 32
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        _numbers(self, "generate")
        _need(self.prompt is None or isinstance(self.prompt, str), "generate.prompt", "must be a string")
        _need(int(self.max_new_tokens) >= 1, "generate.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _need(self.device in DEVICES, "generate.device", f"unknown device {self.device!r}")
        _need(self.dtype in DTYPES, "generate.dtype", f"unknown dtype {self.dtype!r}")


@dataclass
class GlobeConfig:
    model: ModelCfg = field(default_factory=ModelCfg)
    bank: BankCfg = field(default_factory=BankCfg)
    sparsity: SparsityCfg = field(default_factory=SparsityCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    cache: CacheCfg | None = None  # None: a globe export's saved settings (patch_model: CacheCfg())
    export: ExportCfg = field(default_factory=ExportCfg)
    wandb: WandbCfg = field(default_factory=WandbCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    output_dir: str | None = None
    artifacts: str | list[str] | None = None  # a fit directory, or several holding different families
    output: str | None = None
    generate: GenerateCfg = field(default_factory=GenerateCfg)
    debug: bool = False

    def check_shapes(self, p: int, d: int, n_experts: int, layers: int = 1) -> None:
        """Reject values that cannot work for these expert shapes (before reading weights): r above
        min(p, d), a target support above m, a bank.budget that cannot be met (n_experts over `layers`)."""
        from .fit.budget import fit_rank
        r = max(fit_rank(self, f, n_experts, p, d, layers) for f in self.train.families)
        if not self.bank.allow_r_above:
            _need(r <= min(p, d), "bank.r", f"r={r} exceeds min(p, d)={min(p, d)} (set bank.allow_r_above=true)")
        for f in self.train.families:
            m = self.bank.m(f)
            _need(self.sparsity.target_support <= m, "sparsity.target_support",
                  f"target support {self.sparsity.target_support} exceeds m_{f}={m}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> GlobeConfig:
        d = dict(d or {})
        subs = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, val in d.items():
            if key not in subs:
                raise ValueError(f"{key}: unknown config key")
            sub_cls = _SUB.get(key)
            if sub_cls is not None:
                kwargs[key] = None if val is None and key == "cache" else _build(sub_cls, key, val or {})
            else:
                kwargs[key] = _number(key, subs[key], val)
        return cls(**kwargs)


_SUB = {"model": ModelCfg, "bank": BankCfg, "sparsity": SparsityCfg, "train": TrainCfg,
        "cache": CacheCfg, "export": ExportCfg, "wandb": WandbCfg, "eval": EvalCfg,
        "generate": GenerateCfg}


def _number(key: str, typ: str, v: Any) -> Any:
    """A config number as its annotated type, or ValueError naming the key (a bool, "abc" or 1.5 for an int)."""
    if not isinstance(typ, str):
        return v
    if typ == "bool":
        return _bool(key, v)
    if typ in ("str", "str | None"):
        return _text(key, v, optional=typ != "str")
    if typ == "list[str]":
        if isinstance(v, (str, os.PathLike)):  # one name: EvalCfg(tasks="hellaswag") is ["hellaswag"]
            v = [v]
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{key}: expected a list of names, e.g. [a,b], got {v!r}")
        return [_text(f"{key}[{i}]", x) for i, x in enumerate(v)]
    if typ == "list[int]":
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{key}: expected a list of integers, e.g. [4,8,16], got {v!r}")
        return [_number(f"{key}[{i}]", "int", x) for i, x in enumerate(v)]
    want = "int" if typ.startswith("int") else "float" if typ.startswith("float") else None
    if want is None:
        return v
    if v is None:
        if "None" in typ:
            return v
        raise ValueError(f"{key}: expected a number, got None")
    if isinstance(v, bool):
        raise ValueError(f"{key}: expected a number, got {v!r}")
    if isinstance(v, int) and want == "int":
        return v  # exact, however large (a seed)
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a number, got {v!r}") from None
    if want == "int":
        if not x.is_integer():
            raise ValueError(f"{key}: expected an integer, got {v!r}")
        return int(x)
    if not math.isfinite(x):
        raise ValueError(f"{key}: must be finite, got {v!r}")
    return x


def _text(key: str, v: Any, optional: bool = False) -> str | None:
    """A text field: a str, a path (as its string) or an integer as typed on the command line (Hydra reads
    `output_dir=2024` as 2024); ValueError naming the key for anything else (a list, a float, a bool)."""
    if v is None and optional:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise ValueError(f"{key}: expected text, got {v!r}")


def _bool(key: str, v: Any) -> bool:
    """A bool, or the text true/false (any case); ValueError naming the key for anything else, so a typo
    like `eval.speed=nope` or `export.overwrite=yes` is refused instead of read as true."""
    if isinstance(v, bool):
        return v
    t = v.strip().lower() if isinstance(v, str) else None
    if t in ("true", "false"):
        return t == "true"
    raise ValueError(f"{key}: expected true or false, got {v!r}")


def _build(sub_cls: type, prefix: str, val: dict[str, Any]) -> Any:
    fields = {f.name: f.type for f in dataclasses.fields(sub_cls)}
    for k in val:
        if k not in fields:
            raise ValueError(f"{prefix}.{k}: unknown config key")
    return sub_cls(**{k: (list(v) if isinstance(v, (list, tuple)) and k != "betas" else v)
                      for k, v in val.items()})

"""Typed configuration: what a run is made of. Plain dataclasses, validated once, at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from flm.config.checks import require as _require
from flm.config.growth import NEW_LAYER_MODES, OPERATORS, growth_problem
from flm.config.mup import MupConfig
from flm.config.plan import PlanConfig
from flm.config.shape import SHAPE_KEYS
from flm.errors import FlmError


# The model architectures a config may name; flm.model.build_model maps each to its class (a test checks both
# name the same ones). Declared here because the config is validated without importing torch.
# "flm": the GPT-3-style FLM block (REFERENCE.md §1); "llama": the Llama family (RMSNorm, SwiGLU, plain RoPE,
# grouped-query attention; Mistral and Qwen2 checkpoints too: REFERENCE.md §10, docs/llama.md).
ARCHS = ("flm", "llama")
# The stock transformers classes a llama-arch model is exported as (`model.hf_class`; flm.export.llama).
HF_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class ModelConfig:
    """Shape and parametrisation of one FLM decoder (REFERENCE.md §1).

    `n_heads * head_dim` need not equal `d_model`: attention has its own inner width, which lets
    head growth keep the head dim fixed while the residual width changes independently.
    """

    arch: str = "flm"  # the model class (ARCHS); checkpoints written before it existed are "flm"
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    head_dim: int = 32
    # Key/value heads of grouped-query attention ("llama"): each serves n_heads / n_kv_heads query heads.
    # None: n_heads (plain multi-head attention, the only kind "flm" has).
    n_kv_heads: int | None = None
    d_ff: int | None = None  # None: 4 * d_model
    vocab_size: int | None = None  # None: taken from the prepared data's tokenizer
    max_seq_len: int = 256
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    ln_eps: float = 1e-5
    rope_theta: float = 10000.0
    xpos_scale_base: float = 512.0
    # Readout: logits = lm_head(h) * output_mult * (base_width / d_model if mup else 1).
    output_mult: float = 1.0
    base_width: int = 256  # μP: the width whose init and LRs are the configured ones (width_mult = d_model / base_width)
    # μP (flm.model.mup_rules): hidden matrices get init variance init_std² / width_mult and Adam LR lr / width_mult,
    # and the readout above; false: standard parametrization (every multiplier 1).
    mup: bool = False
    zero_query: bool = False  # initialise the query rows of QKV to zero (attention starts uniform)
    # "llama" only (FLM has biases on every linear layer): biases on the q, k and v projections, as Qwen2 has.
    qkv_bias: bool = False
    # "llama" only: the transformers class `flm export hf` writes (HF_CLASSES), recorded by `flm import hf`;
    # None: Qwen2ForCausalLM with qkv_bias, else LlamaForCausalLM.
    hf_class: str | None = None
    # The separate teacher-signal head (train.teacher_objective = "separate", docs/data.md): a second readout beside
    # the LM head, d_model -> 2 (false, true), on the final-normed hidden state. Set by the trainer from
    # train.teacher_objective, never by hand; None: no head (the unified objective).
    teacher_head: bool | None = None

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def attn_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when unset."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def validate(self) -> None:
        _require(self.arch in ARCHS, f"model.arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("n_layers", "d_model", "n_heads", "head_dim", "max_seq_len", "base_width"):
            _require(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
        _require(self.head_dim % 2 == 0, f"model.head_dim must be even for rotary pairs, got {self.head_dim}")
        _require(self.ffn_dim > 0, f"model.d_ff must be positive, got {self.d_ff}")
        _require(self.vocab_size is None or self.vocab_size > 0, f"model.vocab_size must be positive, got {self.vocab_size}")
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _require(self.init_std > 0, f"model.init_std must be positive, got {self.init_std}")
        _require(self.ln_eps > 0, f"model.ln_eps must be positive, got {self.ln_eps}")
        _require(self.rope_theta > 1, f"model.rope_theta must be > 1, got {self.rope_theta}")
        _require(self.xpos_scale_base > 0, f"model.xpos_scale_base must be positive, got {self.xpos_scale_base}")
        _require(self.output_mult > 0, f"model.output_mult must be positive, got {self.output_mult}")
        _require(self.n_kv_heads is None or self.n_kv_heads > 0, f"model.n_kv_heads must be positive, got {self.n_kv_heads}")
        _require(self.n_heads % self.kv_heads == 0,
                 f"model.n_kv_heads ({self.kv_heads}) must divide model.n_heads ({self.n_heads})")
        if self.arch == "flm":
            _require(self.kv_heads == self.n_heads, f"model.n_kv_heads ({self.n_kv_heads}) must be unset or equal "
                                                    f"model.n_heads ({self.n_heads}) for arch 'flm' (no grouped-query attention)")
            _require(not self.qkv_bias, "model.qkv_bias is for arch 'llama' (every linear layer of 'flm' has a bias)")
            _require(self.hf_class is None, "model.hf_class is for arch 'llama' ('flm' exports as FLMForCausalLM)")
        _require(self.hf_class is None or self.hf_class in HF_CLASSES,
                 f"model.hf_class must be one of {HF_CLASSES}, got {self.hf_class!r}")
        _require(not (self.qkv_bias and self.hf_class in ("LlamaForCausalLM", "MistralForCausalLM")),
                 f"model.qkv_bias: {self.hf_class} has no q/k/v-only biases (Qwen2ForCausalLM has)")
        _require(self.teacher_head in (None, True), f"model.teacher_head is true or unset, got {self.teacher_head!r}")
        _require(not self.teacher_head or self.arch == "flm", "model.teacher_head (the separate teacher-signal head) "
                                                              "is for arch 'flm'")


_SOURCE_KINDS = ("text", "instruct", "teacher")
_LOSS_ON = ("response", "all")


@dataclass
class SourceConfig:
    """One data source of a mixture ([[data.sources]]); see docs/data.md for the file formats.

    `weight` is the source's share of the sequences in every batch (weights are normalised to sum to 1).
    """

    kind: str = "text"  # "text" (loss on every token), "instruct" (JSONL prompt/response), "teacher" (propositions)
    # text: a corpus as in data.corpus ("" = data.corpus); instruct: a .jsonl file or folder of them;
    # teacher: a .jsonl file or folder, or "bundled" (the generated comparison/arithmetic set, docs/data.md)
    path: str = ""
    weight: float = 1.0
    loss_on: str = "response"  # instruct only: "response" (loss on the response and its end) or "all"
    val_fraction: float | None = None  # held-out share of this source's records (None: data.val_fraction)

    def validate(self, where: str) -> None:
        _require(self.kind in _SOURCE_KINDS, f"{where}.kind must be one of {_SOURCE_KINDS}, got {self.kind!r}")
        _require(self.kind == "text" or bool(self.path), f"{where}.path must name the {self.kind} data")
        _require(self.weight > 0 and self.weight != float("inf"), f"{where}.weight must be positive, got {self.weight}")
        _require(self.val_fraction is None or 0.0 < self.val_fraction < 0.5,
                 f"{where}.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        _require(self.loss_on in _LOSS_ON, f"{where}.loss_on must be one of {_LOSS_ON}, got {self.loss_on!r}")
        _require(self.kind == "instruct" or self.loss_on == "response",
                 f"{where}.loss_on applies to instruct sources only (a {self.kind} source has a fixed loss mask)")


@dataclass
class DataConfig:
    """Where text comes from, how it is tokenised, and where the shards go."""

    # "bundled" (kjv + zh-idioms), "kjv", "zh-idioms", or a file, folder or glob of .txt, .jsonl, .jsonl.gz,
    # .jsonl.zst or .parquet files (docs/data.md)
    corpus: str = "bundled"
    dir: str = "data/bundled"  # output folder of `flm prepare`, input of `flm train`
    tokenizer: str = "bpe"  # "bpe" (train byte-level BPE here), a tokenizer.json path, or "tiktoken:PATH"
    vocab_size: int = 8192  # for tokenizer = "bpe"
    bpe_sample_chars: int = 100_000_000  # BPE trains on all training text up to this many characters, a sample beyond
    workers: int = 0  # tokenising processes of `flm prepare` (0: one per CPU core); the output does not depend on it
    val_fraction: float = 0.01
    shard_tokens: int = 50_000_000
    max_chars: int | None = None  # cap on corpus characters (None: everything), for quick runs
    # A mixture of sources, each with a weight; empty: `corpus` alone, as plain text.
    sources: list[SourceConfig] = field(default_factory=list)

    def validate(self) -> None:
        _require(bool(self.corpus), "data.corpus must not be empty")
        _require(bool(self.dir), "data.dir must not be empty")
        _require(bool(self.tokenizer), "data.tokenizer must not be empty")
        _require(self.vocab_size >= 260, f"data.vocab_size must be at least 260 (256 bytes + specials), got {self.vocab_size}")
        _require(0.0 < self.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        _require(self.shard_tokens > 0, f"data.shard_tokens must be positive, got {self.shard_tokens}")
        _require(self.max_chars is None or self.max_chars > 0, f"data.max_chars must be positive, got {self.max_chars}")
        _require(self.bpe_sample_chars > 0, f"data.bpe_sample_chars must be positive, got {self.bpe_sample_chars}")
        _require(self.workers >= 0, f"data.workers must be >= 0 (0: one per CPU core), got {self.workers}")
        for i, source in enumerate(self.sources):
            source.validate(f"data.sources[{i}]")
        _require(not self.sources or any(s.kind != "teacher" for s in self.sources),
                 "data.sources needs a text or instruct source: the validation loss is measured on them")


@dataclass
class TrainConfig:
    """The optimisation loop: batch, schedule, precision, logging and checkpoints."""

    run_dir: str = "runs/demo"
    seed: int = 1337
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    compile: bool = False
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1
    seq_len: int = 128
    max_steps: int = 1000  # a run without [[stages]]; with stages, their token budgets set the steps
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100  # also the first stage's, unless it sets its own
    # The LR's shape after warmup (docs/growth.md): "cosine" from lr to min_lr over the whole run, or "wsd"
    # (warmup-stable-decay): lr held until the last decay_fraction of the run's steps, then down to min_lr in
    # decay_shape "linear", "cosine" or "1-sqrt". Either way the LR is a pure function of the step.
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    decay_shape: str = "linear"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 200
    keep_last: int = 3
    sample_prompt: str = "In the beginning"
    sample_tokens: int = 48
    tensorboard: bool = True
    progress: bool = True  # a progress bar on a terminal; elsewhere (CI, nohup, Slurm) a line every log_every steps
    # The step guard (flm.train.guard): a step whose loss or gradient norm is not finite, or whose loss exceeds
    # spike_factor x the median of the last spike_window accepted losses (0: no spike test), changes nothing;
    # then "skip" goes on (stopping after max_bad_steps such steps in a row), "rollback" returns to the newest
    # checkpoint and continues with the data after the bad batches (skipping rollback_skip more steps' worth of
    # batches; at most max_rollbacks times), "stop" ends the run with exit status 3.
    on_bad_step: str = "rollback"
    spike_factor: float = 3.0
    spike_window: int = 100
    max_bad_steps: int = 20
    rollback_skip: int = 0
    max_rollbacks: int = 5
    # How teacher-signal propositions are trained (docs/data.md): "unified" (FLM/eFLM, REFERENCE.md §4) predicts the
    # label token with the LM head; "separate" (FreeLM's form) classifies at the same position with a head of its
    # own (model.teacher_head), the label target taken out of the LM loss. The loss is then
    # (sum of LM cross-entropies + teacher_loss_weight x sum of the head's) / (LM targets + labels): at weight 1 a
    # label weighs what it weighs in the unified objective.
    teacher_objective: str = "unified"
    teacher_loss_weight: float = 1.0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "seq_len", "max_steps", "log_every", "eval_every",
                     "eval_batches", "ckpt_every", "keep_last"):
            _require(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        _require(self.dtype in ("auto", "fp32", "bf16"), f"train.dtype must be 'auto', 'fp32' or 'bf16', got {self.dtype!r}")
        _require(0 < self.lr <= 1, f"train.lr must be in (0, 1] (an Adam step of more than 1 per entry is no "
                                   f"learning rate), got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, f"train.min_lr must be in [0, lr], got {self.min_lr}")
        _require(0 <= self.warmup_steps <= self.max_steps, f"train.warmup_steps must be in [0, max_steps], got {self.warmup_steps}")
        _require(self.schedule in SCHEDULES, f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _require(0 < self.decay_fraction <= 1, f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        _require(self.decay_shape in DECAY_SHAPES,
                 f"train.decay_shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        _require(self.adam_eps > 0, f"train.adam_eps must be positive, got {self.adam_eps}")
        _require(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        _require(self.sample_tokens >= 0, f"train.sample_tokens must be >= 0, got {self.sample_tokens}")
        _require(self.on_bad_step in _ON_BAD_STEP,
                 f"train.on_bad_step must be one of {_ON_BAD_STEP}, got {self.on_bad_step!r}")
        _require(self.spike_factor == 0 or self.spike_factor > 1,
                 f"train.spike_factor must be 0 (off) or > 1, got {self.spike_factor}")
        for name in ("spike_window", "max_bad_steps", "max_rollbacks"):
            _require(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        _require(self.rollback_skip >= 0, f"train.rollback_skip must be >= 0, got {self.rollback_skip}")
        _require(self.teacher_objective in TEACHER_OBJECTIVES,
                 f"train.teacher_objective must be one of {TEACHER_OBJECTIVES}, got {self.teacher_objective!r}")
        _require(self.teacher_loss_weight > 0, f"train.teacher_loss_weight must be positive, got {self.teacher_loss_weight}")
        _require(self.teacher_objective == "separate" or self.teacher_loss_weight == 1.0,
                 "train.teacher_loss_weight weighs the separate head's loss (teacher_objective = 'separate'); the "
                 "unified objective weighs a label token like any other target")


_ON_BAD_STEP = ("skip", "rollback", "stop")
TEACHER_OBJECTIVES = ("unified", "separate")
SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
# How a grown stage's LR starts: on the run's schedule, re-warmed to it over the stage's warmup_steps, or back at
# the peak (train.lr, or the stage's own lr). None: "rewarm" when warmup_steps > 0, else "continue"; a stage
# with its own lr starts there.
LR_AT_GROWTH = ("continue", "rewarm", "peak")


@dataclass
class StageConfig:
    """One stage of a growth schedule: the shape trained in it, its token budget and how it starts.

    Shape fields left out keep the previous stage's value; the first stage starts from [model].
    """

    name: str = ""
    n_layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    d_ff: int | None = None
    n_kv_heads: int | None = None
    tokens: int = 0  # training tokens in this stage
    lr: float | None = None  # peak LR at the stage start (None: train.lr in stage 1, inherited after)
    warmup_steps: int = 0  # (re-)warmup at the stage start
    lr_at_growth: str | None = None  # "continue", "rewarm" or "peak" (LR_AT_GROWTH); not for the first stage
    # How the growth into this stage is done (docs/growth.md): "msg" (masks ramped in), "zero" (new residual
    # writers start at zero), "clone" (HyperCloning: widths by whole factors, copied layers), "stack" (copied
    # layers, depth only).
    operator: str = "msg"
    ramp_steps: int = 100  # K: masks ramp 0 -> 1 over this many steps ("msg"; "zero" when d_model grows)
    new_layers: str = "stack"  # depth growth: "stack" copies top layers, "insert" interleaves copies, "random"
    clone_noise: float = 0.3  # "clone": std of the zero-sum noise on cloned input weights, relative to their RMS
    # Copied layers (new_layers "stack" or "insert"): Gaussian noise on their weight matrices, std relative to each
    # matrix's RMS, to break the symmetry with their source (G_stack: ~0.2 slightly better). Exact families stay
    # exact: their new layers are gated (msg) or write zero (zero).
    copy_noise: float = 0.0
    batch_size: int | None = None  # sequences per optimizer step (None: train.batch_size * grad_accum)
    # Parallel layout while training this stage (None: [parallel]'s); dp counts all data-parallel ranks.
    tp: int | None = None
    pp: int | None = None
    dp: int | None = None

    def validate(self, where: str) -> None:
        for name in (*SHAPE_KEYS, "batch_size"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"{where}.{name} must be positive, got {value}")
        _require(self.tokens > 0, f"{where}.tokens must be positive, got {self.tokens}")
        _require(self.lr is None or 0 < self.lr <= 1, f"{where}.lr must be in (0, 1], got {self.lr}")
        _require(self.warmup_steps >= 0 and self.ramp_steps >= 0, f"{where}.warmup_steps and ramp_steps must be >= 0")
        mode = self.lr_at_growth
        _require(mode is None or mode in LR_AT_GROWTH, f"{where}.lr_at_growth must be one of {LR_AT_GROWTH}, got {mode!r}")
        _require(mode != "continue" or self.warmup_steps == 0,
                 f"{where}.lr_at_growth = 'continue' takes no warmup_steps (that is 'rewarm')")
        _require(mode != "rewarm" or self.warmup_steps > 0, f"{where}.lr_at_growth = 'rewarm' needs warmup_steps > 0")
        _require(mode not in ("continue", "rewarm") or self.lr is None,
                 f"{where}.lr sets the stage's own start LR: use lr_at_growth = 'peak' with it, or drop it")
        _require(self.new_layers in NEW_LAYER_MODES,
                 f"{where}.new_layers must be one of {NEW_LAYER_MODES}, got {self.new_layers!r}")
        _require(self.operator in OPERATORS, f"{where}.operator must be one of {OPERATORS}, got {self.operator!r}")
        _require(self.clone_noise >= 0, f"{where}.clone_noise must be >= 0, got {self.clone_noise}")
        _require(self.copy_noise >= 0, f"{where}.copy_noise must be >= 0, got {self.copy_noise}")
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"{where}.{name} must be positive, got {value}")


_PP_SCHEDULES = ("gpipe", "1f1b")


@dataclass
class ParallelConfig:
    """How a run launched with `torchrun` spreads over its processes (docs/parallel.md).

    dp x tp x pp must equal the number of processes. A stage may set its own tp/pp/dp: the layout
    then changes at that growth boundary. Without torchrun, `flm train` runs in one process and this
    section must describe one (the defaults).
    """

    dp: int = 1  # data-parallel ranks: FSDP2 shards weights, gradients and Adam state over them
    dp_replicate: int = 1  # HSDP: the dp ranks form this many replica groups, sharding within each
    tp: int = 1  # tensor parallel (DTensor): heads, FFN units and vocabulary split over these ranks
    pp: int = 1  # pipeline parallel: each of the pp ranks runs a consecutive range of blocks
    pp_schedule: str = "1f1b"  # "gpipe" (all forwards, then all backwards) or "1f1b" (interleaved)
    pp_microbatches: int | None = None  # pipeline micro-batches per micro-batch of train.batch_size (None: pp)
    sequence_parallel: bool = False  # with tp > 1: LayerNorm and dropout activations split along the sequence
    activation_checkpointing: bool = False  # recompute each block's activations during backward (less memory)
    # A collective (all-reduce, gather, barrier) that has not finished after this many seconds ends the run with
    # one line instead of hanging: a rank is stuck (stopped, swapping, a hung GPU) or gone. Growth and
    # checkpoints of very large models may need more.
    timeout_s: float = 300.0

    def validate(self) -> None:
        _require(self.timeout_s > 0, f"parallel.timeout_s must be positive, got {self.timeout_s}")
        for name in ("dp", "dp_replicate", "tp", "pp"):
            _require(getattr(self, name) > 0, f"parallel.{name} must be positive, got {getattr(self, name)}")
        _require(self.dp % self.dp_replicate == 0,
                 f"parallel.dp_replicate ({self.dp_replicate}) must divide parallel.dp ({self.dp})")
        _require(self.pp_schedule in _PP_SCHEDULES,
                 f"parallel.pp_schedule must be one of {_PP_SCHEDULES}, got {self.pp_schedule!r}")
        _require(self.pp_microbatches is None or self.pp_microbatches > 0,
                 f"parallel.pp_microbatches must be positive, got {self.pp_microbatches}")


@dataclass
class Config:
    """A whole run: model, data, training loop, growth stages, planning assumptions and μP tool settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[StageConfig] = field(default_factory=list)
    plan: PlanConfig = field(default_factory=PlanConfig)
    mup: MupConfig = field(default_factory=MupConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def stage_layout(self, stage: StageConfig | None) -> tuple[int, int, int]:
        """(tp, pp, dp) for a stage: its own values where set, else [parallel]'s."""
        p = self.parallel
        if stage is None:
            return p.tp, p.pp, p.dp
        return tuple(getattr(p, k) if getattr(stage, k) is None else getattr(stage, k) for k in ("tp", "pp", "dp"))

    def stage_models(self) -> list[ModelConfig]:
        """The model shape of every stage, each stage's overrides applied to the previous shape."""
        shapes, current = [], self.model
        for stage in self.stages:
            changes = {k: getattr(stage, k) for k in SHAPE_KEYS if getattr(stage, k) is not None}
            current = replace(current, **changes)
            shapes.append(current)
        return shapes

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.plan.validate()
        self.mup.validate()
        self.parallel.validate()
        for i, stage in enumerate(self.stages):
            stage.validate(f"stages[{i}]")
        _require(not self.stages or self.stages[0].lr_at_growth is None,
                 "stages[0].lr_at_growth: the first stage is not a growth (its LR starts with train.warmup_steps)")
        shapes = self.stage_models()
        for i, shape in enumerate(shapes):
            try:
                shape.validate()
            except FlmError as e:
                raise FlmError(f"{e} (in stages[{i}])") from None
            stage = self.stages[i]
            problem = growth_problem(stage.operator, shapes[i - 1], shape, stage.new_layers) if i else None
            _require(problem is None, f"stages[{i}]: {problem}")
        _require(self.model.teacher_head is None, "model.teacher_head is not set by hand: "
                                                  "train.teacher_objective = 'separate' adds the head")
        if self.train.teacher_objective == "separate":
            _require(any(s.kind == "teacher" for s in self.data.sources),
                     "train.teacher_objective = 'separate' needs a teacher source in data.sources")
            _require(self.model.arch == "flm", "train.teacher_objective = 'separate' is for model.arch 'flm'")
            layouts = [self.stage_layout(s) for s in self.stages or [None]]
            _require(all(tp * pp * dp == 1 for tp, pp, dp in layouts),
                     "train.teacher_objective = 'separate' trains in one process (not yet under torchrun)")
        _require(self.train.seq_len <= self.model.max_seq_len,
                 f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")

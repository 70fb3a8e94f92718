"""Typed recipe schemas, one dataclass per section. A recipe's `recipe:` key picks the schema.

    recipe: sft    SFTRecipe   model, data, template, lora, moe, training, plan
    recipe: grpo   GRPORecipe  model, data, rewards, template, lora, rollout, algorithm, moe,
                               training, eval, plan
    recipe: eval   EvalRecipe  model, data, rewards, template, eval

Training keys use transformers' TrainingArguments names where they overlap. This module is
plain data (no torch), so the loader checks a recipe before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from moetune.config.build import RecipeError


@dataclass
class ModelSection:
    """Where the weights come from: a checkpoint folder (`path`), or fresh weights from a
    config (`config`: a config.json path or a shipped name such as `tiny_arith`). Given both,
    `path` supplies the weights and `config` lets `--dry-run` plan before they are on disk.
    tokenizer: a folder or tokenizer.json; `char` is the shipped character tokenizer;
    default: the checkpoint folder's."""

    path: str | None = None
    config: str | None = None
    tokenizer: str | None = None
    adapter: str | None = None  # a LoRA adapter folder to apply (frozen) before training/eval
    dtype: Literal["float32", "bfloat16"] = "float32"
    fp8: Literal["frozen", "train"] | None = None  # FP8 frozen base (LoRA) or FP8 training
    mtp_loss_weight: float | None = None  # None: the config's value
    aux_loss_alpha: float | None = None  # sequence-wise balance loss weight; None: the config's
    seed: int = 0  # initialisation seed when built from a config
    # Shard each MoE layer's routed experts over groups of N ranks (moetune.model.expert_parallel);
    # N must divide the world size and n_routed_experts; data parallelism spans the groups.
    expert_parallel: int = 1


@dataclass
class ExpertSelection:
    """ESFT-style subset: per layer, the fewest experts covering `top_p` of the profile's
    token ratio (`select: token`) or mean gate score (`select: gate`)."""

    profile: str  # JSON written by `moetune experts profile`
    select: Literal["token", "gate"] = "gate"
    top_p: float = 0.2


@dataclass
class LoraSection:
    """Expert-aware LoRA (moetune.model.lora): rank r and scale alpha / r on the named
    components, in decoder layers `layers`, on all routed experts or an ESFT selection."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    components: list[Literal["attention", "dense_mlp", "shared_experts", "routed_experts"]] = field(
        default_factory=lambda: ["attention", "dense_mlp", "shared_experts", "routed_experts"]
    )
    ranks: dict[str, int] = field(default_factory=dict)  # per component, e.g. routed_experts: 8
    layers: list[int] | None = None  # [first, last) decoder layers; None = all
    experts: Literal["all"] | ExpertSelection = "all"


@dataclass
class ArithmeticSection:
    """Knobs of `builtin:arithmetic` (moetune.data.arithmetic.ArithmeticSpec)."""

    digits: int = 2
    terms: int = 2
    operations: str = "+-"
    test_fraction: float = 0.1
    style: Literal["plain", "think"] = "plain"  # think: worked steps in <think>, then <answer>
    sign_slip: float = 0.0  # share of negative train answers written without their sign
    count: int = 2000  # training problems drawn (SFT)


@dataclass
class DatasetSpec:
    """One data set (moetune.data.sources). `source`: a hub data set id (`openai/gsm8k`), a
    local file (.jsonl, .json, .parquet, .csv, .arrow), a folder (`save_to_disk`, or parquet
    files laid out as on the hub), or `builtin:arithmetic` / `builtin:humaneval`."""

    source: str
    subset: str | None = None  # the hub's config name (gsm8k: main | socratic)
    split: str | None = None  # None: train for training data, test for held-out data
    revision: str | None = None  # hub: a branch, tag or commit
    # The set's column names -> ours (prompt, completion, messages, text, answer, tests),
    # e.g. {question: prompt}; other columns pass through to the rewards.
    columns: dict[str, str] = field(default_factory=dict)
    # A format string over the row's columns that builds `prompt`, e.g. "{question} Answer
    # after ####." (after `columns`); None: the `prompt` column as it is.
    prompt_format: str | None = None
    # How the gold `answer` is written: none (as is), gsm8k (after ####), boxed (the last
    # \boxed{}), or a function `package.module:function` / `file.py:function` (text -> str).
    answer_format: str = "none"
    # Processes for the column, prompt and answer maps of a non-streamed set (None: this one).
    num_proc: int | None = None

    def __post_init__(self):
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"num_proc must be at least 1, got {self.num_proc}")


@dataclass
class MixtureEntry(DatasetSpec):
    """A data set in a mixture (`source:` given as a list), as open-r1's dataset_mixture.
    weight: the share of its rows used, in (0, 1]; streamed, its sampling probability."""

    weight: float = 1.0


@dataclass
class SFTDataSection(DatasetSpec):
    """SFT rows: one data set, or a mixture (`source` a list of data sets). Rows hold TRL's
    formats: `prompt` + `completion`, `messages` (chat), or `text`."""

    source: str | list[MixtureEntry]
    eval_source: str | None = None  # held-out rows from another data set (its test split)
    eval_split: str | None = None  # held-out rows: this split of `source` (e.g. test)
    eval_fraction: float = 0.0  # else this share of the training rows
    limit: int | None = None  # first N training rows
    streaming: bool = False  # read rows as training goes (needs training.max_steps)
    max_length: int = 256
    packing: bool = False
    completion_only_loss: bool = True  # loss on completions / assistant turns only
    arithmetic: ArithmeticSection = field(default_factory=ArithmeticSection)


@dataclass
class TemplateSection:
    """How prompts are shown to the model, identical in SFT, GRPO and eval
    (moetune.data.prompt_template)."""

    chat: bool = False  # the tokenizer's chat template around the prompt (a user turn)
    system_prompt: str | None = None
    few_shot: int = 0  # solved examples before the prompt
    few_shot_source: str | None = None  # rows with prompt + completion (default: train split)


@dataclass
class MoESection:
    """Auxiliary-loss-free balancing: after each optimizer step every router's bias moves by
    bias_update_gamma * sign(mean load - load). 0 disables; LoRA keeps the bias frozen."""

    bias_update_gamma: float = 0.001


@dataclass
class TrainingSection:
    """transformers.TrainingArguments fields (same names and meaning)."""

    output_dir: str = "runs/sft"
    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    eval_steps: int | None = None  # evaluate every N steps when there is an eval split
    gradient_checkpointing: bool = False
    bf16: bool = False
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    resume_from_checkpoint: bool | str = False  # true: the latest checkpoint in output_dir
    dataloader_num_workers: int = 0
    disable_tqdm: bool = False


@dataclass
class PlanSection:
    """What `moetune plan` (and `--dry-run`) assumes when it estimates memory per device.
    (A launch takes its device count and ZeRO stage from the accelerate config.)"""

    devices: int = 1
    zero_stage: Literal[0, 1, 2, 3] = 0
    device_memory_gb: float = 80.0
    # GRPO: the rollout engines run on devices of their own (`moetune rollout serve`, which
    # gives vLLM 0.9 of each), not beside the trainer (0.5)
    rollout_own_devices: bool = False


@dataclass
class SFTRecipe:
    """`recipe: sft`: supervised fine-tuning on TRL's SFTTrainer (moetune.finetune.sft)."""

    recipe: Literal["sft"]
    model: ModelSection
    data: SFTDataSection
    template: TemplateSection = field(default_factory=TemplateSection)
    lora: LoraSection | None = None
    moe: MoESection = field(default_factory=MoESection)
    training: TrainingSection = field(default_factory=TrainingSection)
    plan: PlanSection = field(default_factory=PlanSection)


@dataclass
class PromptSection(DatasetSpec):
    """GRPO prompts: one data set or a mixture whose rows hold `prompt` (after `columns` and
    `prompt_format`) and the columns the rewards read (e.g. `answer`)."""

    source: str | list[MixtureEntry]
    limit: int | None = None  # first N prompts
    streaming: bool = False  # read prompts as training goes, shuffled in a buffer
    arithmetic: ArithmeticSection = field(default_factory=ArithmeticSection)


@dataclass
class RolloutSection:
    """Sampling engines: vLLM workers (each its own process) or moetune's native generate,
    started here; or engines served elsewhere by `moetune rollout serve` (`remote`)."""

    backend: Literal["vllm", "native"] = "vllm"
    workers: int = 1
    tensor_parallel_size: int = 1
    dtype: Literal["float32", "bfloat16"] = "float32"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    max_model_len: int = 256
    timeout_s: float = 300.0  # a worker silent this long is restarted
    sync_bucket_mb: float = 512  # the most a weight sync sends to an engine at once
    # host:port of `moetune rollout serve` engines used instead of local workers (backend,
    # workers, tensor_parallel_size, dtype are then the servers'); key: $MOETUNE_ROLLOUT_KEY.
    # Data-parallel process r of R uses remote[r::R]: at least one engine each, none shared.
    remote: list[str] = field(default_factory=list)
    # Speculative decoding: tokens drafted per round by the checkpoint's MTP module(s) and
    # verified in one forward (native engine; vLLM where it supports deepseek_mtp). The
    # samples are distributed as without it. 0 = off.
    speculative_tokens: int = 0
    # Asynchronous GRPO (moetune.rl.async_collector): the engines sample the batches of up to
    # k later steps while the trainer updates. A sample generated by weights of version v
    # (the last step whose update they held) is used at step s if its staleness s - 1 - v is
    # at most k, else dropped and regenerated. 0: the synchronous loop (collect, update, sync).
    max_staleness: int = 0
    # With max_staleness > 0: a weight sync reaches the engines between two decoding steps of
    # the generations in flight, which go on with the new weights (each token records the
    # version that sampled it). Native engines only (local or remote); false: a sync waits
    # for the generations in flight to finish.
    partial_rollouts: bool = False
    # N consecutive trainer processes share one pool of engines (its `workers`, or its share
    # of `remote`): the first samples and scores all their prompts and sends each its share of
    # the groups; the others train only (moetune.rl.pool_share). 1: a pool per process. For
    # expert parallelism over many GPUs with engines on machines of their own.
    processes_per_pool: int = 1
    # With `lora:`, how the adapter reaches the engines after each step. adapter: the adapter
    # tensors alone, applied by the engine (native; vLLM with enable_lora, on GPUs, without an
    # `attention` adapter: vLLM's MLA ignores kv_b_proj's LoRA); merged: every weight the
    # adapter changes, merged into the base; auto: adapter where the engines can, else merged.
    lora_sync: Literal["auto", "merged", "adapter"] = "auto"

    def __post_init__(self):
        if self.processes_per_pool < 1:
            raise RecipeError(
                f"rollout.processes_per_pool: {self.processes_per_pool}: must be >= 1"
            )
        if self.max_staleness < 0:
            raise RecipeError(
                f"rollout.max_staleness: {self.max_staleness}: must be >= 0 (0 = synchronous)"
            )
        if self.partial_rollouts:
            if not self.max_staleness:
                raise RecipeError(
                    "rollout.partial_rollouts: needs rollout.max_staleness > 0 (a synchronous "
                    "loop syncs weights with no generation in flight)"
                )
            if self.backend == "vllm" and not self.remote:
                raise RecipeError(
                    "rollout.partial_rollouts: vLLM engines cannot swap weights in the middle "
                    "of a generation here; set rollout.backend: native"
                )
            if self.speculative_tokens:
                raise RecipeError(
                    "rollout.partial_rollouts: speculative decoding (rollout.speculative_tokens)"
                    " has no pause point between tokens; set one of them off"
                )
        if self.speculative_tokens < 0:
            raise RecipeError(
                f"rollout.speculative_tokens={self.speculative_tokens}: must be >= 0 (0 = off)"
            )
        if self.sync_bucket_mb <= 0:
            raise RecipeError(f"rollout.sync_bucket_mb={self.sync_bucket_mb}: must be > 0")


# The epsilons a loss uses when the recipe leaves epsilon_low / epsilon_high unset: DAPO's
# clip-higher, and gmpo's log-space range of verl's GMPO recipe.
LOSS_EPSILONS = {"gmpo": (0.4, 0.4)}
DEFAULT_EPSILONS = (0.2, 0.28)
CLIPPED_LOSSES = ("grpo", "dapo", "dr_grpo", "gspo")  # the losses dual-clip composes with
AdvantageKind = Literal["grpo", "dr_grpo", "leave_one_out", "rloo", "reinforce_pp", "pass_at_k"]
LossKind = Literal["grpo", "dapo", "dr_grpo", "gspo", "cispo", "sapo", "gmpo"]


@dataclass
class AlgorithmSection:
    """moetune.rl.algorithms: advantages, policy loss, KL, truncated importance sampling.
    __post_init__ fills the loss's epsilons and checks the keys that depend on each other."""

    group_size: int = 8  # samples per prompt
    # rloo = leave_one_out; reinforce_pp normalises over the whole batch (all ranks);
    # pass_at_k needs `pass_at_k: k`
    advantage: AdvantageKind = "grpo"
    loss: LossKind = "dapo"
    # The clip range (cispo: of its IS weight; gmpo: of the log-ratio). None: the loss's
    # default, 0.2 / 0.28 (clip-higher), gmpo 0.4 / 0.4 (verl's GMPO recipe).
    epsilon_low: float | None = None
    epsilon_high: float | None = None
    clip_ratio_c: float | None = None  # dual-clip PPO: > 1 caps a negative A's loss at c |A|
    tau_pos: float = 1.0  # sapo's gate temperature where A > 0 (the paper's)
    tau_neg: float = 1.05  # ... and where A <= 0
    pass_at_k: int | None = None  # k of advantage: pass_at_k (1 <= k <= group_size)
    beta: float = 0.0  # k3 KL weight against the reference (0 skips it)
    # Importance correction of the policy loss by w = pi_old / pi_engine (the engine's own
    # logprobs of the sampled tokens): train/inference mismatch, and the lag of asynchronous
    # samples (rollout.max_staleness > 0, which needs it on). tis_cap: the cap C; None: off.
    tis_cap: float | None = 2.0
    is_level: Literal["token", "sequence"] = "token"  # a weight per token, or per sequence
    # truncate: min(w, C) (TIS); mask: w where w <= C, else 0 (the token or sequence dropped)
    is_mode: Literal["truncate", "mask"] = "truncate"
    mu: int = 1  # optimisation passes over each batch
    dynamic_sampling: bool = True  # drop groups whose rewards all agree, refill
    max_refills: int = 2  # extra generation rounds per step to refill dropped groups
    overlong: Literal["none", "mask", "soft"] = "none"  # truncated completions
    overlong_buffer: int = 16  # soft: penalty ramps over the last N tokens
    update_router: bool = False  # train router weights and move the aux-free bias
    # Replay the experts the rollout engine routed each token to in the trainer's forwards
    # (rollout.backend native; vLLM reports them on GPU only).
    routing_replay: bool = False
    # Weight of the MTP loss on the sampled completions, added to the policy loss so that
    # the drafter keeps up with the policy. None: 0.1 with rollout.speculative_tokens > 0,
    # else 0 (the MTP modules stay frozen).
    mtp_weight: float | None = None

    def __post_init__(self):
        low, high = LOSS_EPSILONS.get(self.loss, DEFAULT_EPSILONS)
        self.epsilon_low = low if self.epsilon_low is None else self.epsilon_low
        self.epsilon_high = high if self.epsilon_high is None else self.epsilon_high
        if self.group_size < 2:
            raise RecipeError(
                f"algorithm.group_size: {self.group_size}: advantages compare the samples of "
                "a prompt; need at least 2"
            )
        if self.clip_ratio_c is not None:
            if not self.clip_ratio_c > 1:
                raise RecipeError(
                    f"algorithm.clip_ratio_c: {self.clip_ratio_c}: dual-clip needs a bound "
                    "> 1 (verl uses 3); null turns it off"
                )
            if self.loss not in CLIPPED_LOSSES:
                raise RecipeError(
                    f"algorithm.clip_ratio_c: dual-clip applies to the clipped losses "
                    f"{', '.join(CLIPPED_LOSSES)}, not algorithm.loss: {self.loss}"
                )
        if self.is_level not in ("token", "sequence"):
            raise RecipeError(
                f"algorithm.is_level: {self.is_level!r}: must be 'token' or 'sequence'"
            )
        if self.is_mode not in ("truncate", "mask"):
            raise RecipeError(f"algorithm.is_mode: {self.is_mode!r}: must be 'truncate' or 'mask'")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise RecipeError(f"algorithm.tis_cap: {self.tis_cap}: must be > 0 (null: off)")
        for name in ("tau_pos", "tau_neg"):
            if not getattr(self, name) > 0:
                raise RecipeError(
                    f"algorithm.{name}: {getattr(self, name)}: sapo's gate temperature must be > 0"
                )
        if self.advantage == "pass_at_k":
            k = self.pass_at_k
            if k is None or not 1 <= k <= self.group_size:
                raise RecipeError(
                    f"algorithm.pass_at_k: {k}: advantage pass_at_k needs k with "
                    f"1 <= k <= algorithm.group_size ({self.group_size})"
                )
        elif self.pass_at_k is not None:
            raise RecipeError(
                f"algorithm.pass_at_k: {self.pass_at_k} is read only with algorithm.advantage: "
                f"pass_at_k (it is {self.advantage})"
            )


@dataclass
class GRPOTrainingSection:
    """The GRPO loop's schedule, optimizer (AdamW), logging and checkpoints. A step samples
    `prompts_per_step` x group_size completions; `micro_batch_size` sequences per backward."""

    output_dir: str = "runs/grpo"
    max_steps: int = 100
    prompts_per_step: int = 16
    micro_batch_size: int = 64  # sequences per forward/backward
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    logging_steps: int = 1
    save_steps: int = 50
    max_nonfinite_in_row: int = 3  # stop after this many skipped (NaN/inf) updates in a row
    # metrics.jsonl is always written; tensorboard: <output_dir>/runs; wandb: a W&B run
    # (files in <output_dir>/wandb; WANDB_MODE=offline for no network)
    report_to: list[Literal["tensorboard", "wandb", "jsonl", "none"]] = field(
        default_factory=lambda: ["tensorboard"]
    )
    # Each step's samples appended to <output_dir>/rollouts.jsonl (`moetune rollouts show`):
    # true all, false none, an int N at most N a step (spread evenly over the step's samples)
    log_rollouts: bool | int = True
    resume_from_checkpoint: bool | str = False
    disable_tqdm: bool = False


@dataclass
class PeriodicEvalSection(DatasetSpec):
    """Greedy accuracy on held-out problems (a data set, its test split by default) every
    `every` steps (0: never)."""

    source: str = "builtin:arithmetic"
    every: int = 0
    limit: int = 100
    pass_threshold: float = 1.0


@dataclass(frozen=True)
class RewardSpec:
    """One entry of a recipe's `rewards` list."""

    name: str  # registered name, entry point, package.module:function or file.py:function
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    on_error: Literal["raise", "zero"] = "raise"

    def __post_init__(self):
        if self.on_error not in ("raise", "zero"):
            raise ValueError(
                f"reward {self.name!r}: on_error must be 'raise' or 'zero', got {self.on_error!r}"
            )


@dataclass
class GRPORecipe:
    """`recipe: grpo`: GRPO with rollout engines and rule-based rewards (moetune.rl.grpo)."""

    recipe: Literal["grpo"]
    model: ModelSection
    data: PromptSection
    rewards: list[RewardSpec]
    template: TemplateSection = field(default_factory=TemplateSection)
    lora: LoraSection | None = None
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    moe: MoESection = field(default_factory=MoESection)
    training: GRPOTrainingSection = field(default_factory=GRPOTrainingSection)
    eval: PeriodicEvalSection = field(default_factory=PeriodicEvalSection)
    plan: PlanSection = field(default_factory=PlanSection)

    def __post_init__(self):
        if self.algorithm.mtp_weight is None:
            self.algorithm.mtp_weight = 0.1 if self.rollout.speculative_tokens else 0.0
        if self.algorithm.mtp_weight < 0:
            raise ValueError(f"algorithm.mtp_weight={self.algorithm.mtp_weight}: must be >= 0")
        if self.rollout.max_staleness and self.algorithm.tis_cap is None:
            raise RecipeError(
                f"algorithm.tis_cap: null turns the importance correction off, which samples "
                f"up to rollout.max_staleness={self.rollout.max_staleness} steps old need; "
                "set a cap (e.g. 2.0)"
            )


@dataclass
class DataSection(DatasetSpec):
    """Evaluation problems: one data set or a mixture (its test split by default)."""

    source: str | list[MixtureEntry]
    limit: int | None = None  # first N problems
    seed: int = 0
    arithmetic: ArithmeticSection = field(default_factory=ArithmeticSection)


@dataclass
class EvalSection:
    """How `moetune eval` samples and what it writes (moetune.rl.evaluation)."""

    backend: Literal["native", "vllm"] = "native"  # vllm: a RolloutPool engine (adapter merged)
    n: int = 4  # samples per problem = k of pass@k
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    pass_threshold: float = 1.0  # weighted reward at which a sample passes
    output_dir: str = "eval_out"
    speculative_tokens: int = 0  # MTP drafts per round (as rollout.speculative_tokens); 0 = off

    def __post_init__(self):
        if self.speculative_tokens < 0:
            raise ValueError(
                f"eval.speculative_tokens={self.speculative_tokens}: must be >= 0 (0 = off)"
            )


@dataclass
class EvalRecipe:
    """`recipe: eval`: pass@k and mean reward of a checkpoint on a problem set."""

    recipe: Literal["eval"]
    model: ModelSection
    data: DataSection
    rewards: list[RewardSpec]
    template: TemplateSection = field(default_factory=TemplateSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self):
        if self.model.expert_parallel != 1 and self.eval.backend == "vllm":
            raise ValueError(
                f"model.expert_parallel: {self.model.expert_parallel} with eval.backend: vllm: "
                "the vLLM engine holds its experts itself; shard them with the native backend"
            )


SCHEMAS = {"sft": SFTRecipe, "grpo": GRPORecipe, "eval": EvalRecipe}

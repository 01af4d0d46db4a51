"""The experiment configuration: TOML in, validated by pydantic, frozen.

Every mistake is caught here, before any model is loaded or any example is
trained on, with a message that names the key and what it accepts.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

INVALID = "invalid configuration:\n  "
# The choices of optim.step_control and optim.lr_schedule (stepsize.py acts on them).
StepControl = Literal["none", "secant", "secant_decay"]
LrSchedule = Literal["constant", "cosine"]
ALrRule = Literal["fixed", "balanced"]


def _registry() -> dict[str, Any]:
    """The methods by name (aslora.methods.REGISTRY), imported on first use: the methods import
    this module, and each declares its own config checks and properties there."""
    from aslora.methods import REGISTRY

    return REGISTRY


def _tasks() -> dict[str, Any]:
    """The tasks by name (aslora.tasks.REGISTRY), imported on first use, as `_registry`."""
    from aslora.tasks import REGISTRY

    return REGISTRY


def _known(name: str, registry: dict[str, Any], what: str) -> str:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose among {', '.join(registry)}")
    return name


def _pair_tasks() -> list[str]:
    from aslora.tasks.glue import GLUE

    return [name for name, spec in GLUE.items() if len(spec.texts) == 2]


def _sentence_tasks() -> list[str]:
    return [name for name, cls in _tasks().items() if cls.sentence_classifier]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


# Nothing is coerced (no bool for an int, no string for a bool) and every number is finite.
# TOML's arrays arrive as lists: a tuple setting accepts one, but strictly typed items.
Strings = Annotated[tuple[Annotated[str, Strict()], ...], Field(strict=False)]
Integers = Annotated[tuple[Annotated[int, Strict()], ...], Field(strict=False)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelConfig(_Section):
    name: str = Field(
        "minilm",
        description="'minilm' (embedded all-MiniLM-L6-v2), a local folder or a hub model id",
    )
    max_length: int = Field(64, ge=8, le=4096)
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32",
        description="the frozen encoder's weights; LoRA factors, head and DP-SGD stay float32 (GLUE with a "
        "pooling); 'auto' = bfloat16 where the CPU computes it natively (AVX-512 BF16, AMX), else float32",
    )
    pooling: Literal["auto", "cls", "mean", "pooler"] = Field(
        "auto",
        description="the embedding a classifier reads: 'auto' = the model's declared sentence-transformers "
        "pooling, else the architecture's own head (GLUE tasks only)",
    )
    pair_encoding: Literal["auto", "joint", "separate"] = Field(
        "auto",
        description="sentence pairs: 'joint' = one sequence; 'separate' = each sentence embedded on its own and "
        "the head reads [u, v, |u - v|, u * v] (how sentence-transformers trains a bi-encoder); 'auto' = "
        "'separate' where the model declares its pooling, else 'joint'",
    )
    normalize: bool = Field(
        False,
        description="scale each sentence embedding to unit length before the head, as sentence-transformers' "
        "Normalize module does (all-MiniLM-L6-v2 declares one); needs a pooled classifier (model.pooling)",
    )
    dropout: float | None = Field(
        None, ge=0, lt=1,
        description="every dropout rate inside the pretrained model and its head (lora.dropout aside); "
        "null = the model's own (MiniLM: 0.1). DP fine-tuning usually trains with 0: under DP-SGD "
        "dropout's noise only adds to the privacy noise",
    )


class LoraSettings(_Section):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Strings = ("query", "value")
    layers: Integers = Field(
        (), description="indices of the transformer blocks that get adapters, e.g. [3, 4, 5]; empty = every "
        "block. Backpropagation stops at the lowest one, so upper blocks alone train faster per example",
    )
    train_head: bool = Field(True, description="false: the head stays at its seeded initialisation (the authors')")
    head_init: Literal["random", "zero"] = Field(
        "random", description="the classifier's output layer at start: the model's random init, or zeros"
    )
    client_ranks: Integers = Field(
        (), description="per-client LoRA ranks (<= r), one per client; only FLoRA's stacking supports them"
    )
    head_modules: Strings = Field(
        ("classifier",),
        description="modules trained fully and averaged (FedAvg) beside LoRA, e.g. classifier, pooler",
    )

    @model_validator(mode="after")
    def _targets(self) -> LoraSettings:
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module, e.g. ['query', 'value']")
        if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"lora.layers={list(self.layers)}: block indices must be distinct and >= 0, e.g. [3, 4, 5]")
        if self.head_init == "zero" and not self.train_head:
            raise ValueError(
                "lora.head_init='zero' with train_head=false gives zero logits and zero gradients forever: "
                "train the head, or keep head_init='random' (the authors' frozen random head)"
            )
        return self


class DataConfig(_Section):
    task: str = "sst2"  # a name of aslora.tasks.REGISTRY
    dir: str | None = Field(None, description="local data root; else ASLORA_DATA_DIR, else the hub")
    num_clients: int = Field(10, ge=1)
    partition: Literal["iid", "dirichlet"] = "dirichlet"
    dirichlet_alpha: float = Field(0.5, gt=0)
    train_subset: int = Field(0, ge=0, description="0 = all training examples")
    eval_subset: int = Field(0, ge=0, description="0 = the whole dev split")
    validation_size: int = Field(
        0, ge=0, description="N > 0: evaluate on N examples carved from the TRAINING set, not dev (for tuning)"
    )
    holdout_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of each client's shard held out for personalised evaluation"
    )
    probe_size: int = Field(
        0, ge=0, description="N > 0: N training examples set apart on the server, never trained on, to measure "
        "each round's realised loss decrease per layer (selection diagnostics; non-private, decides nothing)",
    )
    doc_stride: int = Field(32, ge=1, description="QA: tokens shared by consecutive windows of a long context")


    @field_validator("task")
    @classmethod
    def _known_task(cls, name: str) -> str:
        return _known(name, _tasks(), "task")

class FederationConfig(_Section):
    rounds: int = Field(10, ge=1)
    clients_per_round: int = Field(10, ge=1)
    local_steps: int = Field(5, ge=1)
    eval_every: int = Field(1, ge=1)
    dropout: float = Field(
        0.0, ge=0, lt=1, description="share of each round's sampled clients that fail (simulated faults)"
    )
    stragglers: float = Field(
        0.0, ge=0, lt=1, description="share of sampled clients whose updates arrive too late (simulated)"
    )
    min_clients: int = Field(1, ge=1, description="a round with fewer valid updates is skipped, not averaged")
    secure_aggregation: bool = Field(
        False, description="sum the updates under Flower's SecAgg+ (engine 'flower'; linear methods only)"
    )
    secure_range: float = Field(
        16.0, gt=0, description="SecAgg+ fixed-point range: every value a client sends must lie in [-range, range]"
    )
    server_optimizer: Literal["none", "momentum", "adam"] = Field(
        "none",
        description="how the server steps from the round's aggregate (server_optimizer.py): 'none' takes it as "
        "the next global state (FedAvg); 'momentum' (FedAvgM) and 'adam' (FedAdam, Reddi et al. 2021) read "
        "start - aggregate as a gradient and step by torch.optim, moments kept across rounds (post-processing, "
        "no privacy cost; methods whose server rule is a weighted mean only)",
    )
    server_lr: float = Field(1.0, gt=0, description="the server optimiser's lr ('momentum': 1 with momentum 0 is FedAvg)")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="'momentum': its coefficient; 'adam': beta1")
    server_beta2: float = Field(0.99, gt=0, lt=1, description="'adam': the second moment's decay")
    server_eps: float = Field(
        1e-3, gt=0, description="'adam': added to the root of the second moment (Reddi et al.'s tau: 1e-3)"
    )
    ema_decay: float = Field(
        0.0, ge=0, lt=1,
        description="the dev split scores, and the run exports, an exponential moving average of the global "
        "models over rounds with this decay (model_average.py; Polyak averaging, De et al. 2022: each layer's "
        "s B A averaged, never A and B apart; post-processing, no privacy cost); 0: the last round's model",
    )
    round_timeout_s: float = Field(
        900.0, gt=0,
        description="Flower: how long the server waits for a round's replies; a client that has not answered "
        "by then is rejected for the round (and charged: it may have trained)",
    )


class OptimConfig(_Section):
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="applied to the privatised gradient (post-processing, no privacy cost)"
    )
    lr: float = Field(0.5, gt=0)
    a_lr_scale: float = Field(
        1.0,
        gt=0,
        description="the A factors' lr is lr * a_lr_scale (B, the head: lr). LoRA+ (Hayou et al. 2024) "
        "trains A slower than B; under DP a step on A moves the weight by B dA, so once B has grown its "
        "effective size grows with |B|^2, where a step on B moves it by dB A at A's initial scale",
    )
    a_lr_rule: ALrRule = Field(
        "fixed",
        description="'fixed': A steps at lr * a_lr_scale. 'balanced': each layer's A at lr * min(a_lr_scale, "
        "|A| / |B|), from the round's global factors: a step on A lands in W as B dA, a step on B as dB A, so "
        "once B has grown (under DP mostly by accumulated noise) the same lr moves W, and puts noise into it, "
        "|B| / |A| times further on A; the cap keeps an A step's move in W within a B step's (post-processing "
        "of the public global state, no privacy cost)",
    )
    head_lr_scale: float = Field(
        1.0,
        gt=0,
        description="the trained head's lr is lr * head_lr_scale (the factors: lr, A times a_lr_scale). The "
        "head reads the pooled embedding (norm 4-6 for MiniLM's mean) and the adapters act inside the encoder, "
        "so one lr for both may suit neither",
    )
    step_control: StepControl = Field(
        "none",
        description="'secant': each local step after the first is shortened to where the loss along the step "
        "before it is lowest, as the two privatised gradients measure it (stepsize.py; post-processing, never "
        "longer than lr). 'secant_decay': also each round starts at the mean lr the clients' last steps ended "
        "at (a decay set by measurement). For SGD, with 2 or more local steps: once A has aligned, a B step "
        "tuned at the start overshoots a client's loss on label-skewed shards",
    )
    lr_schedule: LrSchedule = Field(
        "constant",
        description="the round's lr, set by the server: 'cosine' falls from lr at round 0 to lr * lr_final_scale "
        "past the last round (stepsize.py; post-processing, no privacy cost)",
    )
    lr_final_scale: float = Field(0.0, ge=0, le=1, description="'cosine': the lr it falls towards, as a multiple of lr")
    batch_size: int = Field(32, ge=1, description="expected (Poisson) batch size (per client, or on average)")
    batch_scaling: Literal["fixed", "by_size"] = Field(
        "fixed",
        description="'fixed': every client's expected batch is batch_size; 'by_size': one sampling rate "
        "q = batch_size / mean client size, so each client's batch grows with its data and one sigma fits all",
    )
    micro_batch_size: int = Field(
        0, ge=0, description="physical batch: a logical batch runs in chunks of at most this many (0 = whole)"
    )
    eval_batch_size: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _control_fits(self) -> OptimConfig:
        if self.step_control != "none" and self.optimizer != "sgd":
            raise ValueError(
                f"optim.step_control={self.step_control!r} sizes a plain SGD step (-lr g); optim.optimizer="
                f"{self.optimizer!r} steps otherwise: set optim.optimizer='sgd' or optim.step_control='none'"
            )
        if self.step_control == "secant_decay" and self.lr_schedule != "constant":
            raise ValueError(
                f"optim.step_control='secant_decay' and optim.lr_schedule={self.lr_schedule!r} both set each round's "
                "lr: keep one (step_control='secant' with the schedule, or lr_schedule='constant')"
            )
        return self


class SyntheticConfig(_Section):
    """The low-rank recovery task (data.task = 'synthetic')."""

    layers: int = Field(6, ge=1)
    dim_in: int = Field(16, ge=2)
    dim_out: int = Field(16, ge=1)
    target_rank: int = Field(2, ge=1, description="rank of every layer's target update dW*")
    outside_layers: int = Field(3, ge=0, description="layers whose dW* lies outside the initial A's row space")
    train_examples: int = Field(4000, ge=1)
    input_types: int = Field(4, ge=1, description="input covariance types; Dirichlet over them is the skew")
    input_anisotropy: float = Field(3.0, gt=0, description="std of a type's own input directions (others 1)")

    @model_validator(mode="after")
    def _fits(self) -> SyntheticConfig:
        if self.outside_layers > self.layers:
            raise ValueError(f"synthetic.outside_layers={self.outside_layers} exceeds synthetic.layers={self.layers}")
        return self


# AS-LoRA's scores that read the clients' gradient statistics; 'secant' is this project's (README)
SCORED = ("curvature", "first_order", "secant")


class SelectionConfig(_Section):
    """AS-LoRA's factor choice (ALGORITHM.md section 4); used by method 'aslora'."""

    rule: Literal["spec", "official"] = Field(
        "spec", description="'spec': sections 4.1-4.3; 'official': the authors' code (section 7)"
    )
    score: Literal["curvature", "first_order", "secant", "random", "always_b", "alternate"] = "curvature"
    granularity: Literal["layer", "tied", "group"] = "layer"
    groups: Strings = Field(
        ("block",),
        description="for granularity 'group': ['block'], ['module'] or regular expressions over layer names",
    )
    beta: float = Field(0.9, ge=0, lt=1, description="EMA factor of the scores")
    hysteresis: float = Field(0.0, ge=0, description="switch only if S_other > S_current + h |S_current|")
    min_dwell: int = Field(1, ge=1, description="rounds a factor stays active before it may switch")
    warmup_rounds: int = Field(0, ge=0, description="rounds that train B everywhere before selection")
    a_budget: float | None = Field(
        None, gt=0, le=1,
        description="a joint decision: this share of the layers (units) trains A each round, those "
        "where A's EMA score leads B's by the most; null = each unit decides alone (ALGORITHM.md 4.3)",
    )
    confidence: float | None = Field(
        None, gt=0,
        description="the score decides a unit only where its EMA lead exceeds this many standard errors; "
        "elsewhere the unit alternates (RoLoRA); null = the score always decides (ALGORITHM.md 4.3)",
    )
    confident_factors: Literal["AB", "B"] = Field(
        "AB",
        description="with selection.confidence, the factors a sure lead may choose: 'AB' either; 'B' only B, "
        "so that A trains only by alternation (a myopic score's lead for A grows A to make up for a small B, "
        "and every later step on B then puts that much more noise into the weight)",
    )
    unsure: Literal["alternate", "B"] = Field(
        "alternate",
        description="with selection.confidence, what a unit does where the score is not sure: 'alternate' "
        "(RoLoRA's exact schedule) or 'B' (FFA-LoRA's: A then trains only where its lead is sure, and with "
        "confident_factors 'B' only every other round there)",
    )
    ema_from: Literal["all", "frozen"] = Field(
        "all",
        description="'all': every factor's score updates its EMA (ALGORITHM.md 4.3); 'frozen': only the "
        "factor that stayed frozen in the round, whose gradients were measured at a fixed point",
    )
    floor_g: bool = Field(
        True,
        description="each client uploads max(G, 0) (ALGORITHM.md 4.1); false: the unbiased G, whose "
        "noise averages out over clients and rounds",
    )
    pinned_b: Strings = Field(
        (),
        description="with score 'alternate': regular expressions over layer names; the layers they match "
        "train B in every round (FFA-LoRA's schedule) and the rest alternate (RoLoRA's): a fixed per-layer "
        "policy, e.g. the best one in hindsight",
    )
    official_weights: Literal["uniform", "examples"] = Field(
        "uniform",
        description="with rule 'official': how the server averages the clients' factors: 'uniform' as the "
        "authors' code does, or 'examples' (n_i / N, as every other method here): with one sampling rate "
        "for all clients (optim.batch_scaling 'by_size'), a uniform mean gives the smallest client's noisier "
        "update the same weight as the rest",
    )
    score_clip_share: float | None = Field(
        None, ge=0, lt=1,
        description="the share of the clip budget C^2 given to the inactive factors, whose privatised "
        "gradients only feed the score; the active factors and the head get the rest (group-wise "
        "clipping, same sigma and accountant). null = one joint clip over all of them (ALGORITHM.md 4.1)",
    )

    @model_validator(mode="after")
    def _spec_only_settings(self) -> SelectionConfig:
        changed = {
            "a_budget": self.a_budget is not None, "confidence": self.confidence is not None,
            "ema_from": self.ema_from != "all", "floor_g": not self.floor_g,
        }
        inert = [k for k, on in changed.items() if on] if self.rule != "spec" or self.score not in SCORED else []
        if inert:
            raise ValueError(
                f"selection.{inert[0]} acts on the scores of the spec rule; with rule {self.rule!r} and score "
                f"{self.score!r} it would do nothing: set rule 'spec' and score {' or '.join(map(repr, SCORED))}, "
                f"or leave {inert[0]} at its default"
            )
        if self.official_weights != "uniform" and self.rule != "official":
            raise ValueError(
                f"selection.official_weights sets the official rule's averaging; with rule {self.rule!r} the "
                "clients are weighted by their examples already: set rule 'official', or leave official_weights "
                "at 'uniform'"
            )
        if self.confident_factors != "AB" and self.confidence is None:
            raise ValueError(
                "selection.confident_factors chooses what a confident lead may pick: set selection.confidence "
                "(e.g. 0.5) with it, or leave confident_factors at 'AB'"
            )
        if self.unsure != "alternate" and self.confidence is None:
            raise ValueError(
                "selection.unsure says what a unit does where the confident decision is not sure: set "
                "selection.confidence (e.g. 0.5) with it, or leave unsure at 'alternate'"
            )
        joint = "a_budget" if self.a_budget is not None else "confidence" if self.confidence is not None else None
        if joint and (self.hysteresis > 0 or self.min_dwell > 1):
            raise ValueError(
                f"selection.hysteresis and min_dwell act on the greedy per-unit rule, not under selection.{joint}: "
                f"leave them at 0 and 1, or set {joint} null"
            )
        if self.pinned_b and (self.rule != "spec" or self.score != "alternate"):
            raise ValueError(
                f"selection.pinned_b fixes a per-layer policy over the 'alternate' schedule; with rule {self.rule!r} "
                f"and score {self.score!r} it would do nothing: set rule 'spec' and score 'alternate', or leave "
                "pinned_b empty"
            )
        for pattern in self.pinned_b:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"selection.pinned_b pattern {pattern!r} is not a regular expression: {exc}") from None
        if self.a_budget is not None and self.confidence is not None:
            raise ValueError(
                "selection.a_budget and selection.confidence are two decision rules: set one of them, not both"
            )
        return self

    @model_validator(mode="after")
    def _share(self) -> SelectionConfig:
        if self.score_clip_share == 0 and self.rule == "spec" and self.score in SCORED:
            raise ValueError(
                f"selection.score_clip_share=0 leaves the inactive factors no gradient, which score "
                f"{self.score!r} reads: give them a share in (0, 1), or null for one joint clip"
            )
        return self


class PrivacyConfig(_Section):
    enabled: bool = True
    epsilon: float | None = Field(3.0, gt=0, description="target and budget per client")
    delta: float = Field(1e-5, gt=0, lt=1)
    noise_multiplier: float | None = Field(None, ge=0, description="given directly, else calibrated")
    clip: float = Field(1.0, gt=0)
    head_clip_share: float | None = Field(
        None, gt=0, lt=1,
        description="the share of the clip budget C^2 given to the trained head; the adapters clip to the rest "
        "(each example's gradient still has norm <= C: same sigma and accountant). null = one joint clip",
    )
    accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _target(self) -> PrivacyConfig:
        if self.enabled and self.epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                "privacy needs privacy.epsilon (a budget, to calibrate sigma) or privacy.noise_multiplier; "
                "set one of them, or privacy.enabled = false"
            )
        if self.head_clip_share is not None and not self.enabled:
            raise ValueError(
                "privacy.head_clip_share splits DP-SGD's per-example clip; privacy.enabled = false clips nothing: "
                "remove privacy.head_clip_share"
            )
        return self


class ExperimentConfig(_Section):
    name: str = "experiment"
    seed: int = Field(0, ge=0)
    method: str = "fedavg"  # a name of aslora.methods.REGISTRY
    output_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    lora: LoraSettings = LoraSettings()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    optim: OptimConfig = OptimConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    selection: SelectionConfig = SelectionConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    # Settings that differ by method (each baseline at its own tuned lr, as papers compare them):
    # [per_method.<method>] tables over the sections above, applied by `for_method`.
    per_method: dict[str, dict[str, Any]] = {}

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        return _known(name, _registry(), "method")

    @model_validator(mode="after")
    def _per_method(self) -> ExperimentConfig:
        sections = [name for name, f in type(self).model_fields.items() if isinstance(f.annotation, type)
                    and issubclass(f.annotation, _Section)]
        for method, table in self.per_method.items():
            if method not in _registry():
                raise ValueError(f"per_method.{method}: no such method; choose among {', '.join(_registry())}")
            misplaced = sorted(set(table) - set(sections))
            if misplaced:
                raise ValueError(
                    f"per_method.{method}: {', '.join(misplaced)} cannot differ by method; a per_method "
                    f"table holds only the sections {', '.join(sections)}"
                )
            try:
                self.for_method(method)
            except ConfigError as exc:
                raise ValueError(f"per_method.{method}: {str(exc).removeprefix(INVALID)}") from None
        return self

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        fed, data, method = self.federation, self.data, _registry()[self.method]
        if data.task == "synthetic" and self.synthetic.target_rank + self.lora.r > self.synthetic.dim_in:
            raise ValueError(
                "synthetic: lora.r + synthetic.target_rank must not exceed synthetic.dim_in "
                "(targets outside the row space of A need room there)"
            )
        sentence_classifier = _tasks()[data.task].sentence_classifier
        if data.validation_size and not sentence_classifier:
            raise ValueError(
                f"data.validation_size carves a validation split from a GLUE training set; task "
                f"'{data.task}' has none: set it to 0"
            )
        if self.model.dtype == "bfloat16" and not sentence_classifier:
            raise ValueError(
                f"model.dtype={self.model.dtype!r} is offered for GLUE sentence classifiers; task "
                f"'{data.task}' runs in float32: remove model.dtype"
            )
        if self.model.pair_encoding == "separate" and (not sentence_classifier or data.task not in _pair_tasks()):
            raise ValueError(
                f"model.pair_encoding='separate' embeds the two sentences of a pair apart; task '{data.task}' "
                f"has no sentence pairs: keep 'auto' (pair tasks: {_pair_tasks()})"
            )
        if self.model.normalize and not sentence_classifier:
            raise ValueError(
                f"model.normalize scales a sentence classifier's embedding; task '{data.task}' has its own head: "
                f"remove model.normalize (or use one of {_sentence_tasks()})"
            )
        if self.model.pooling != "auto" and not sentence_classifier:
            raise ValueError(
                f"model.pooling={self.model.pooling!r} chooses a sentence classifier's embedding; task "
                f"'{data.task}' has its own head: keep model.pooling='auto' (or use one of {_sentence_tasks()})"
            )
        if self.privacy.head_clip_share is not None and not self.lora.train_head:
            raise ValueError(
                "privacy.head_clip_share gives the trained head a share of the clip; with lora.train_head = false "
                "no head trains: remove privacy.head_clip_share, or train the head"
            )
        if self.optim.step_control != "none" and fed.local_steps < 2:
            raise ValueError(
                f"optim.step_control={self.optim.step_control!r} shortens a local step from the step before it; with "
                f"federation.local_steps={fed.local_steps} there is none: use 2 or more, or step_control='none'"
            )
        ranks = self.lora.client_ranks
        if ranks:
            if not method.heterogeneous_ranks:
                stacking = ", ".join(n for n, m in _registry().items() if m.heterogeneous_ranks)
                raise ValueError(
                    f"lora.client_ranks (heterogeneous ranks) need stacking: use {stacking}, not '{self.method}'"
                )
            if len(ranks) != data.num_clients or not all(1 <= r <= self.lora.r for r in ranks):
                raise ValueError(
                    f"lora.client_ranks needs one rank per client (data.num_clients={data.num_clients}), "
                    f"each between 1 and lora.r={self.lora.r}; got {list(ranks)}"
                )
        method.check_config(self)
        if fed.dropout + fed.stragglers >= 1:
            raise ValueError("federation.dropout + federation.stragglers must stay below 1: someone must report")
        if fed.min_clients > fed.clients_per_round:
            raise ValueError(
                f"federation.min_clients={fed.min_clients} exceeds federation.clients_per_round="
                f"{fed.clients_per_round}: no round could ever be aggregated"
            )
        if fed.secure_aggregation:
            _check_secure(self)
        _check_server_optimizer(self)
        if fed.ema_decay > 0 and method.personalised:
            raise ValueError(
                f"federation.ema_decay averages the server's global model, but method '{self.method}' is judged by "
                "the clients' own models: set ema_decay = 0"
            )
        if fed.clients_per_round > data.num_clients:
            raise ValueError(
                f"federation.clients_per_round={fed.clients_per_round} exceeds "
                f"data.num_clients={data.num_clients}; sample at most num_clients per round"
            )
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> ExperimentConfig:
        """A copy with dotted keys replaced ({'privacy.epsilon': 1.0}), validated again."""
        raw = self.model_dump(mode="json")
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = raw
            *parents, leaf = dotted.split(".")
            for depth, part in enumerate(parents):
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"unknown section '{'.'.join(parents[: depth + 1])}' in override '{dotted}'")
                node = node[part]
            node[leaf] = value
        return parse_config(raw)

    def for_method(self, method: str, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
        """The config a run of `method` uses: its per_method table over the shared settings, then
        `overrides` (the command line's, which win). The result has no per_method left, so it is
        resolved once: switching method again starts from the file's config."""
        if method not in _registry():
            raise ConfigError(f"method '{method}' is unknown; choose among {', '.join(_registry())}")
        table = dotted(self.per_method.get(method, {}))
        return self.with_overrides({**table, "method": method, "per_method": {}, **(overrides or {})})


def dotted(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 4.0}} -> {'optim.lr': 4.0}: TOML's nested tables as override keys."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat |= dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_server_optimizer(config: ExperimentConfig) -> None:
    """A server optimiser needs a weighted-mean server rule; its settings need a server optimiser."""
    fed = config.federation
    # Set means away from its default: a config's dump and reload marks every key as given.
    given = {k for k in ("server_lr", "server_momentum", "server_beta2", "server_eps")
             if getattr(fed, k) != FederationConfig.model_fields[k].default}
    if fed.server_optimizer == "none":
        stray = sorted(given)
        if stray:
            raise ValueError(
                f"federation.{stray[0]} is set but federation.server_optimizer = 'none' uses none of it: set "
                f"server_optimizer = 'momentum' or 'adam', or remove {', '.join('federation.' + k for k in stray)}"
            )
        return
    adams = sorted({"server_beta2", "server_eps"} & given)
    if fed.server_optimizer == "momentum" and adams:
        raise ValueError(f"federation.{adams[0]} is Adam's: remove it, or set server_optimizer = 'adam'")
    _require_linear_server(
        config,
        f"federation.server_optimizer={fed.server_optimizer!r} steps along start - aggregate, which is a "
        f"gradient only where the server averages the uploads; method '{config.method}' does not:",
        "server_optimizer = 'none'",
    )


def _require_linear_server(config: ExperimentConfig, problem: str, off: str) -> None:
    """A setting that needs the server rule to be a weighted mean of the uploads (Method.linear_server)."""
    if not _registry()[config.method].linear_server:
        linear = ", ".join(n for n, m in _registry().items() if m.linear_server)
        raise ValueError(f"{problem} use {linear}, or set {off}")


def _check_secure(config: ExperimentConfig) -> None:
    """What SecAgg+ cannot do: non-linear aggregation, singling out late updates, one client."""
    fed = config.federation
    _require_linear_server(
        config,
        f"federation.secure_aggregation: the server only sees the sum of the updates, but method "
        f"'{config.method}' needs each client's own (its aggregation is not a weighted sum);",
        "secure_aggregation = false",
    )
    if fed.stragglers > 0:
        raise ValueError(
            "federation.stragglers: a late update cannot be taken out of a secure sum once it is in; "
            "set stragglers = 0 with secure_aggregation (federation.dropout still works)"
        )
    if fed.clients_per_round < 2:
        raise ValueError("federation.secure_aggregation needs clients_per_round >= 2: a sum of one is that client")


def _describe(error: dict[str, Any], root: type[BaseModel]) -> str:
    """One line per pydantic error: the dotted key, the problem, the allowed values."""
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc) or "<config>"
    if error["type"] == "extra_forbidden":
        model: type[BaseModel] = root
        for part in loc[:-1]:
            annotation = model.model_fields[part].annotation
            model = annotation if isinstance(annotation, type) else model
        allowed = ", ".join(sorted(model.model_fields))
        return f"unknown key '{key}'; allowed keys here: {allowed}"
    return f"'{key}': {error['msg']}"


def parse_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping; every problem is reported, each with its key."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, ExperimentConfig) for e in exc.errors()]
        raise ConfigError(INVALID + "\n  ".join(lines)) from None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a TOML experiment file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a TOML file such as configs/demo.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not a text file (byte {exc.start} is not UTF-8); pass a TOML file such as configs/demo.toml"
        ) from None
    return parse_config(raw)

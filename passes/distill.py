"""`type: distill` — train the model (the student) to match a teacher's next-token distributions."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from llmopt.errors import InputError, RecipeError
from llmopt.model import ArchInfo
from llmopt.passes.base import Pass, PassConfig
from llmopt.state import ModelState, PassContext

if TYPE_CHECKING:
    import torch


class TrainingConfig(PassConfig):
    """The settings of every pass that trains against a teacher: `distill`, and `qad` on the quantized model."""

    teacher: str | None = Field(
        None, description="None: the model as it was before the pipeline's first pass. Or a local folder, hub id or "
                          "'demo' (loaded with safetensors only) with the same vocabulary.")
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Token windows per micro-batch, per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (gradient accumulation).")
    lr: float = Field(5e-5, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up steps, then cosine decay to 0 "
                                                               "(default: 10% of steps).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay on matrices (not on norms or "
                                                       "biases).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this (None: no "
                                                               "clipping).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both models in the KL term; the KL is "
                                                      "multiplied by T² (Hinton et al.).")
    loss: Literal["forward_kl", "reverse_kl", "topk_kl"] = Field(
        "forward_kl", description="forward_kl: KL(teacher‖student), mean-seeking; reverse_kl: KL(student‖teacher), "
                                  "mode-seeking; topk_kl: forward KL over the teacher's top_k tokens plus one bucket "
                                  "for the rest (needed by cache_teacher).")
    top_k: int = Field(64, ge=1, description="topk_kl: teacher tokens kept per position.")
    kl_weight: float = Field(1.0, ge=0, description="Weight of the KL term.")
    lm_weight: float = Field(0.0, ge=0, description="Weight of the next-token cross-entropy on the training text.")
    hidden_weight: float = Field(0.0, ge=0, description="Weight of the hidden-state MSE on mapped layers (needs the "
                                                        "same hidden_size as the teacher).")
    layer_map: dict[int, int] | None = Field(
        None, description="hidden_weight: student layer -> teacher layer, 1-based decoder-layer outputs (the last is "
                          "the final normalized state). Default: every layer when depths match, else evenly spaced.")
    eval_every: int = Field(50, ge=1, description="Steps between held-out evaluations (also after the last step).")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of the training windows held out for "
                                                              "evaluation, early stopping and the best checkpoint "
                                                              "(0: none; the last step's weights are kept).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a lower held-out loss (None: never).")
    checkpoint_dir: str | None = Field(None, description="Folder for checkpoints (and the teacher cache); a run "
                                                         "resumes from the latest checkpoint found there. On several "
                                                         "nodes: a filesystem they all see.")
    checkpoint_every: int | None = Field(None, ge=1, description="Steps between checkpoints (default: eval_every).")
    cache_teacher: bool = Field(False, description="Run the teacher once per window and keep its top_k "
                                                   "log-probabilities on disk, instead of running it every step.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast dtype; weights stay float32. auto: bf16 on GPUs that have it, fp16 on other "
                            "GPUs, fp32 on CPU (the recipe decides, not `accelerate launch --mixed_precision`, so a "
                            "run can be replayed).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, "
                                                            "about a third more compute.")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainingConfig":
        if self.kl_weight == self.lm_weight == self.hidden_weight == 0:
            raise ValueError("kl_weight, lm_weight and hidden_weight are all 0: nothing to train on")
        if self.cache_teacher and self.loss != "topk_kl":
            raise ValueError(f"cache_teacher keeps only the teacher's top_k log-probabilities, which loss "
                             f"'{self.loss}' cannot use: set loss: topk_kl")
        if self.cache_teacher and self.hidden_weight > 0:
            raise ValueError("cache_teacher stores no hidden states: set hidden_weight: 0 or cache_teacher: false")
        if "top_k" in self.model_fields_set and self.loss != "topk_kl":
            raise ValueError(f"top_k applies to loss: topk_kl only (loss is '{self.loss}')")
        if self.layer_map is not None and self.hidden_weight == 0:
            raise ValueError("layer_map is read by the hidden-state loss only: set hidden_weight > 0 or remove it")
        if self.warmup_steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if self.early_stopping_patience is not None and self.eval_fraction == 0:
            raise ValueError("early_stopping_patience needs a held-out split: set eval_fraction > 0")
        return self

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 10


class DistillConfig(TrainingConfig):
    type: Literal["distill"] = "distill"
    freeze: list[str] = Field(default_factory=list, description="Parameter-name glob patterns to keep fixed, e.g. "
                                                                "['model.embed_tokens.*', '*.mlp.*'].")
    train_only: list[str] = Field(default_factory=list, description="If given, train only parameters matching these "
                                                                    "globs, e.g. ['*.self_attn.*'] after a GQA rewrite.")


class DistillPass(Pass):
    """Knowledge distillation: the student learns the teacher's next-token distributions on the pipeline's text;
    on several GPUs or nodes with accelerate (`docs/distributed.md`).

    Loss per token position, averaged over positions, then weighted and summed:
      - kl_weight · T² · KL(p_t ‖ p_s), p = softmax(logits / T): forward KL (Hinton et al. 2015,
        "Distilling the Knowledge in a Neural Network"; the T² keeps gradient sizes independent of T);
        or reverse KL(p_s ‖ p_t), mode-seeking, the token-level form of the objective of MiniLLM (Gu et
        al. 2024); or top-k KL: forward KL between the two distributions coarsened to the teacher's
        top_k tokens plus one bucket holding the rest of the mass — a lower bound of the full KL, zero
        only when they agree, exact when top_k + 1 = vocabulary — which is what `cache_teacher` stores.
      - lm_weight · cross-entropy of the next token (plain language-model fine-tuning).
      - hidden_weight · mean over mapped layers of ‖h_s − h_t‖² / mean(h_t²): hidden-state MSE
        (TinyBERT, Jiao et al. 2020), scaled per layer by the teacher's mean square so that layers with
        large activations do not drown the others.

    Training is AdamW with linear warm-up and cosine decay, gradient accumulation, clipping, autocast,
    data parallelism (DDP) or sharding (FSDP2) through accelerate's Accelerator (the same code under
    `accelerate launch`), a held-out split evaluated every `eval_every` steps with early stopping, and the
    best weights kept.
    Quantized weights (recorded by a quantize pass) are never trained: their integer codes would no
    longer match. See `distill_trainer` for checkpoints, exact resume and the teacher cache.
    """

    type = "distill"
    Config = DistillConfig
    config: DistillConfig
    needs_calibration = True
    needs_teacher = True

    def check(self, arch: ArchInfo, where: str) -> ArchInfo:
        c = self.config
        if c.loss == "topk_kl" and c.top_k >= arch.vocab_size:
            raise RecipeError(f"{where}.top_k: {c.top_k} is not below the vocabulary size {arch.vocab_size}.",
                              "Use forward_kl for the full distribution, or a smaller top_k (e.g. 64).")
        bad = sorted(k for k in (c.layer_map or {}) if not 1 <= k <= arch.num_layers)
        if bad:
            raise RecipeError(f"{where}.layer_map: student layers {bad} do not exist; the student has layers "
                              f"1..{arch.num_layers} at this point of the recipe.", "Map existing layers only.")
        if c.teacher is not None:
            from llmopt.model import load_config, resolve_model

            teacher = ArchInfo.from_config(load_config(resolve_model(c.teacher)))
            if teacher.vocab_size != arch.vocab_size:
                raise RecipeError(f"{where}.teacher: '{c.teacher}' has a vocabulary of {teacher.vocab_size} tokens, "
                                  f"the student {arch.vocab_size}.", "Choose a teacher with the student's tokenizer.")
            if c.hidden_weight > 0 and teacher.hidden_size != arch.hidden_size:
                raise RecipeError(f"{where}.hidden_weight: the teacher's hidden size {teacher.hidden_size} differs "
                                  f"from the student's {arch.hidden_size}.", "Set hidden_weight: 0 for this teacher.")
        return arch

    def run(self, state: ModelState, ctx: PassContext) -> ModelState:
        from llmopt.passes.distill_trainer import Objective, train

        c, model = self.config, state.model
        windows = self._windows(ctx)
        teacher = self._teacher(ctx, model) if c.kl_weight > 0 or c.hidden_weight > 0 else None
        layer_map = self._layer_map(model, teacher) if c.hidden_weight > 0 else {}
        trainable, frozen_quantized = select_trainable(model, c.freeze, c.train_only, set(state.quantized))
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        try:
            model, info = train(model, Objective(c, windows, teacher, layer_map), c, trainable, seed=ctx.seed,
                                progress=ctx.progress)
        finally:
            for name, p in model.named_parameters():
                p.requires_grad_(flags[name])
        state.model = model  # the same module, except under FSDP (a rebuilt, unsharded one)
        info.update(teacher=c.teacher or "input model", loss=c.loss, frozen_quantized_tensors=frozen_quantized,
                    windows=len(windows), seq_len=int(len(windows[0])))
        state.pass_info["distill"] = info
        return state

    def _windows(self, ctx: PassContext) -> list[Any]:
        windows = ctx.calibration_windows("The distill pass (its training text)")
        lengths = {len(w) for w in windows}
        if not windows or len(lengths) != 1 or min(lengths) < 2:
            raise InputError(f"distill needs token windows of one length of at least 2 tokens; got {len(windows)} "
                             f"windows of lengths {sorted(lengths)[:5]}.", "Set `calibration: {samples, seq_len}`.")
        return windows

    def _teacher(self, ctx: PassContext, student: Any) -> Any:
        if self.config.teacher is not None:
            from llmopt.model import load_model, resolve_model

            teacher, _ = load_model(resolve_model(self.config.teacher))
        elif ctx.teacher is None:
            raise InputError("The distill pass was given no teacher.",
                             "Run it through the pipeline, or pass PassContext(teacher=...) or `teacher:`.")
        else:
            teacher = ctx.teacher()
        if teacher is student:
            raise InputError("The teacher is the student itself: training would move both.",
                             "Give the pass a frozen copy (the pipeline does: copy.deepcopy(model)).")
        t_vocab, s_vocab = teacher.config.vocab_size, student.config.vocab_size
        if t_vocab != s_vocab:
            raise InputError(f"The teacher's vocabulary has {t_vocab} tokens, the student's {s_vocab}.",
                             "Distillation compares distributions token by token: use a teacher with the same "
                             "tokenizer.")
        return teacher

    def _layer_map(self, student: Any, teacher: Any) -> dict[int, int]:
        s_cfg, t_cfg = student.config, teacher.config
        if s_cfg.hidden_size != t_cfg.hidden_size:
            raise InputError(f"hidden_weight needs equal hidden sizes; teacher {t_cfg.hidden_size}, student "
                             f"{s_cfg.hidden_size}.", "Set hidden_weight: 0.")
        return resolve_layer_map(self.config.layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)


def resolve_layer_map(layer_map: dict[int, int] | None, student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student layer -> teacher layer, 1-based outputs; evenly spaced when depths differ, so the last pair up."""
    if layer_map is None:
        return {i: round(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)}
    bad = {s: t for s, t in layer_map.items() if not (1 <= s <= student_layers and 1 <= t <= teacher_layers)}
    if bad:
        raise InputError(f"layer_map {bad} names layers that do not exist (student 1..{student_layers}, teacher "
                         f"1..{teacher_layers}).", "Map existing layers only.")
    return dict(layer_map)


def select_trainable(model: Any, freeze: list[str], train_only: list[str],
                     quantized: set[str]) -> tuple[list[str], int]:
    """Names of the parameters to train (each tensor once), and how many were left out for being quantized.

    A tensor shared under several names (a tied embedding and lm_head) is one parameter: `train_only`
    selects it when any of its names matches, `freeze` fixes it when any of its names matches.
    """
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    every = [n for group in names.values() for n in group]
    for field, patterns in (("freeze", freeze), ("train_only", train_only)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in every):
                raise InputError(f"distill.{field}: pattern '{pattern}' matches no parameter of the model.",
                                 f"Parameter names look like: {', '.join(every[:3])}, ... ({len(every)} in all).")

    def hit(group: list[str], patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for n in group for p in patterns)

    trainable, skipped = [], 0
    for name, p in model.named_parameters():
        group = names[id(p)]
        if (train_only and not hit(group, train_only)) or hit(group, freeze):
            continue
        if quantized.intersection(group):
            skipped += 1
            continue
        trainable.append(name)
    if not trainable:
        raise InputError("distill: no parameter is left to train (freeze/train_only and quantized weights exclude "
                         "them all).", "Loosen freeze/train_only, or distill before quantizing.")
    return trainable, skipped


# --- losses: each takes logits (B, T, V) and returns the mean over the B*T positions -------------------------------

def kl_loss(student: "torch.Tensor", teacher: "torch.Tensor", temperature: float, reverse: bool) -> "torch.Tensor":
    """T² · KL(p_t ‖ p_s) (forward) or T² · KL(p_s ‖ p_t) (reverse), on softmax(logits / T)."""
    import torch

    log_s = torch.log_softmax(student.float() / temperature, dim=-1)  # (B, T, V)
    log_t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    p, log_p, log_q = (log_s.exp(), log_s, log_t) if reverse else (log_t.exp(), log_t, log_s)
    return (p * (log_p - log_q)).sum(-1).mean() * temperature**2


def topk_targets(teacher: "torch.Tensor", k: int, temperature: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The teacher's top-k token ids (B, T, k) and log-probs (B, T, k + 1), the last being the rest's mass."""
    import torch

    log_t = torch.log_softmax(teacher.float() / temperature, dim=-1)  # (B, T, V)
    top, ids = log_t.topk(k, dim=-1)  # (B, T, k)
    return ids, torch.cat([top, _rest(log_t, ids)], dim=-1)


def topk_kl_loss(student: "torch.Tensor", ids: "torch.Tensor", teacher_logp: "torch.Tensor",
                 temperature: float) -> "torch.Tensor":
    """T² · KL between teacher and student over the k + 1 buckets: the teacher's top-k tokens and the rest."""
    import torch

    log_s = torch.log_softmax(student.float() / temperature, dim=-1)  # (B, T, V)
    log_q = torch.cat([log_s.gather(-1, ids), _rest(log_s, ids)], dim=-1)  # (B, T, k + 1)
    # An empty bucket has log-prob -inf; clamping makes its term 0 * finite = 0 instead of NaN.
    log_p, log_q = teacher_logp.clamp(min=-1e4), log_q.clamp(min=-1e4)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2


def _rest(log_probs: "torch.Tensor", ids: "torch.Tensor") -> "torch.Tensor":
    """log of the probability outside `ids`: logsumexp over the other tokens (exact, unlike log(1 - sum))."""
    return log_probs.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)  # (B, T, 1)


def lm_loss(logits: "torch.Tensor", ids: "torch.Tensor") -> "torch.Tensor":
    """Next-token cross-entropy: position t predicts ids[t + 1]."""
    import torch

    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def hidden_loss(student: tuple, teacher: tuple, layer_map: dict[int, int]) -> "torch.Tensor":
    """Mean over mapped layers of ‖h_s − h_t‖² / mean(h_t²); hidden_states[i] is layer i's output (B, T, H)."""
    terms = [((student[s].float() - teacher[t].float()) ** 2).mean() / (teacher[t].float() ** 2).mean().clamp(min=1e-8)
             for s, t in layer_map.items()]
    return sum(terms) / len(terms)

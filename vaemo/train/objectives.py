"""The three stages' objectives: what each one trains on and how its loss is assembled (the loop that
runs them is vaemo/train/trainer.py).

An objective turns a batch of clips into sequences on the host (`prepare`), then computes the loss inside
the DeepSpeed engine's forward (`loss`), so one engine call covers the whole step. Two rules keep
ZeRO-3 ranks in lock step, whatever their data: every rank makes the same model calls in the same
order (a rank without a pass runs it on a dummy sequence), and chunked lm_head loops run the global
maximum number of chunks (`StepInputs.chunks`, all-reduced by the loop before the forward).

Losses are sums normalised by global counts (all-reduced too): KD and LM terms by the response tokens
of the global batch, sample terms by the global number of samples.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vaemo.config import Config, PromptsConfig
from vaemo.data.bench import mcq_prompt
from vaemo.data.decode import DecodeSpec
from vaemo.data.stream import Batch
from vaemo.errors import UserError
from vaemo.losses import TopKTargets, distill, language_loss, per_sequence_weights, teacher_topk, va_loss
from vaemo.model import IGNORE, ModelInputs, PromptItem, VAEmotionLLM, build_model, set_trainable
from vaemo.model.vaemo_llm import best_option, per_item


@dataclass
class StepInputs:
    """One step's sequences and labels, prepared on the host."""

    passes: dict[str, ModelInputs]  # named model passes, run in a fixed order
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)  # local normalisers (all-reduced: SUM)
    positions: dict[str, int] = field(default_factory=dict)  # local response positions per pass (-> MAX)
    clips: int = 0
    step: int = 0  # the optimizer step this batch is for (set by the loop)
    tokens: int = 0  # input tokens this step (throughput)
    world_size: int = 1
    chunks: dict[str, int] = field(default_factory=dict)  # filled by the loop: global chunk counts
    global_counts: dict[str, float] = field(default_factory=dict)  # filled by the loop
    scored: list[tuple[str, str, int, int]] = field(default_factory=list)  # validation: (task, modality, options, truth)


@dataclass
class StepResult:
    loss: torch.Tensor
    sums: dict[str, float]  # raw sums (e.g. kd_sum, kd_tokens, agree): averaged exactly over ranks/steps


def pick(choices: Sequence[str], rng: np.random.Generator) -> str:
    return choices[int(rng.integers(len(choices)))]


def mcq(variants: Sequence[str], options: Sequence[str], rng: np.random.Generator, canonical: bool = False) -> str:
    """A multiple-choice question: one of its paraphrases (the first when canonical), options shuffled."""
    question = variants[0] if canonical else pick(variants, rng)
    shuffled = list(options)
    rng.shuffle(shuffled)
    return mcq_prompt(question, shuffled)


def top_layer_prefixes(encoder: nn.Module, count: int) -> tuple[str, ...]:
    """The parameter prefixes of an audio encoder's last `count` transformer layers and its final norm."""
    layers = getattr(encoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"stage1.audio_encoder_top_layers: the {type(encoder).__name__} has no `layers` to choose from")
    if count > len(layers):
        raise UserError(f"stage1.audio_encoder_top_layers={count}, but the audio encoder has {len(layers)} layers")
    final_norm = ("audio_encoder.layer_norm.",) if isinstance(getattr(encoder, "layer_norm", None), nn.Module) else ()
    return tuple(f"audio_encoder.layers.{i}." for i in range(len(layers) - count, len(layers))) + final_norm


def labelled_question_sets(cfg: Config) -> list[tuple[str, list[str], list[str], str]]:
    """(name, paraphrases, options, the clip field holding the answer) of each question whose right answer a
    clip's JSON names: emotion (prompts.emotion_questions over stage2.emotions), then each set of
    prompts.questions with an `answer_field`."""
    tasks = [("emotion", cfg.prompts.emotion_questions, list(cfg.stage2.emotions), "emotion")]
    return tasks + [
        (name, spec["ask"], list(spec["options"]), spec["answer_field"])
        for name, spec in cfg.prompts.questions.items()
        if spec.get("answer_field") and spec["answer_field"] != "emotion"
    ]


def align_sequences(
    meta: dict, rng: np.random.Generator, prompts: PromptsConfig, questions: bool, responses: str
) -> list[tuple[str, str | None]]:
    """Stage 1's (prompt, response) pairs for one clip: a description, answered with the clip's caption or
    left None for the teacher to write (stage1.responses), and, with `questions`, one multiple-choice
    question per set of prompts.questions answered with a random option (the teacher's distribution at the
    answer is then its own answer; no label is used)."""
    caption = meta.get("caption")
    has_caption = isinstance(caption, str) and bool(caption.strip())
    pairs: list[tuple[str, str | None]] = [
        (pick(prompts.describe, rng), caption if has_caption and responses != "teacher" else None)
    ]
    if questions:
        for spec in prompts.questions.values():
            options = list(spec["options"])
            pairs.append((mcq(spec["ask"], options, rng), pick(options, rng)))
    return pairs


def write_teacher_responses(
    model: VAEmotionLLM, batch: Batch, asked: list[tuple[str, str | None, int]], tokens: int, lockstep: bool
) -> list[tuple[str, str, int]]:
    """Fill every missing response with the frozen teacher's own greedy answer from the clip's frames.

    `lockstep` (training under ZeRO-3): every rank generates, exactly `tokens` tokens, when any rank has a
    response to write (a rank with none generates one it discards), because each generation step gathers
    the LLM's weights from all ranks; when no rank has one, none generates.
    """
    missing = [k for k, (_, response, _) in enumerate(asked) if response is None]
    wanted = len(missing)
    if lockstep and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([wanted], device=model.vlm.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        wanted = int(flag)
    if not wanted:
        return list(asked)  # type: ignore[arg-type]
    rows = missing or [0]
    items = [PromptItem("visual", asked[k][0], None, asked[k][2]) for k in rows]
    texts = model.generate(items, batch.video, None, batch.duration, max_new_tokens=tokens, lockstep=lockstep)
    filled = list(asked)
    for k, text in zip(missing, texts):
        filled[k] = (asked[k][0], text, asked[k][2])
    return filled  # type: ignore[return-value]


def clip_inputs(model: VAEmotionLLM, items: list[PromptItem], batch: Batch) -> ModelInputs:
    return model.prompts.batch(items, batch.video, batch.audio, batch.duration)


def normalised(total: torch.Tensor, inputs: StepInputs, count: str) -> torch.Tensor:
    """A local sum as this rank's share of the global mean (DeepSpeed averages gradients over ranks)."""
    denominator = inputs.global_counts.get(count, 0.0)
    return total * (inputs.world_size / denominator) if denominator > 0 else total * 0.0


class StageObjective(ABC):
    """Shared machinery; subclasses define the stage."""

    stage: int

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.chunk = cfg.stage1.kd_chunk_size

    @abstractmethod
    def decode_spec(self) -> DecodeSpec:
        """What the stage needs from each sample."""

    @abstractmethod
    def prepare(self, model: VAEmotionLLM, batch: Batch, rng: np.random.Generator) -> StepInputs:
        """A batch of clips -> the step's sequences and labels (host side)."""

    @abstractmethod
    def loss(self, model: VAEmotionLLM, extra: nn.Module | None, step: StepInputs) -> StepResult:
        """The step's loss, inside the engine's forward."""

    @property
    def cached(self) -> bool:
        """Teacher outputs come from an offline cache (stage 1 only; stage 2's KD term stays online)."""
        return self.stage == 1 and self.cfg.stage1.teacher.mode == "cache"

    def prepare_model(self, model: VAEmotionLLM) -> None:  # noqa: B027 (an optional hook: most stages add nothing)
        """Structural changes before freezing (stage 2 adds the EmoAdapter)."""

    def extra_modules(self, model: VAEmotionLLM) -> nn.Module | None:
        return None

    def also_trainable(self, model: VAEmotionLLM) -> tuple[str, ...]:
        """Parameter prefixes this run trains beyond the stage's own (see vaemo/model/freezing.py)."""
        if self.stage == 1 and self.cfg.stage1.train_audio_encoder:
            return ("audio_encoder.",)
        if self.stage == 1 and self.cfg.stage1.audio_encoder_top_layers:
            return top_layer_prefixes(model.audio_encoder, self.cfg.stage1.audio_encoder_top_layers)
        s2 = self.cfg.stage2
        if self.stage == 2 and not (s2.use_enhancer or s2.use_supervisor) and self.cfg.model.lora.rank == 0:
            # The "without the EmoAdapter" ablation: the same stage-2 data and losses, fine-tuning what
            # stage 1 trained, so the comparison isolates the adapter.
            return ("projector.",)
        return ()

    def response_hidden(self, model: VAEmotionLLM, inputs: ModelInputs, **kwargs):
        out = model(inputs, **kwargs)
        return out, out.hidden[inputs.pred_mask.to(out.hidden.device)]

    def note_pass(self, step: StepInputs, name: str, inputs: ModelInputs) -> None:
        step.passes[name] = inputs
        step.positions[name] = int((inputs.targets != IGNORE).sum())
        step.tokens += int(inputs.attention_mask.sum())

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Report values from summed statistics."""
        out = {}
        for term, count in (
            ("lm", "lm_tokens"),
            ("lm", "lm_sequences"),
            ("kd", "kd_tokens"),
            ("aux", "samples"),
            ("va", "va_rows"),
            ("cat", "cat_rows"),
        ):
            if sums.get(count):
                out[term] = sums.get(f"{term}_sum", 0.0) / sums[count]
        if sums.get("kd_tokens"):
            out["agreement"] = sums.get("agree", 0.0) / sums["kd_tokens"]
        for name in list(sums):
            if name.endswith("_correct"):
                total = sums.get(name.replace("_correct", "_total"), 0.0)
                if total:
                    out[name.replace("_correct", "_acc")] = sums[name] / total
        return out


class SeeObjective(StageObjective):
    """Stage 0: teach a VLM that cannot see yet to see (captions, and questions about frames), plus auxiliary
    heads on pooled visual tokens for each labelled question set: a stand-in for a real VLM's pretraining.
    It asks what the config asks (prompts.describe, the labelled sets of `labelled_question_sets`); a clip
    without a set's answer among its options is not asked that set, and its head ignores the clip."""

    stage = 0

    def decode_spec(self) -> DecodeSpec:
        d = self.cfg.data
        return DecodeSpec.for_data(d, need_video=True, need_audio=False, need_fields=("caption",))

    @functools.cached_property
    def question_sets(self) -> list[tuple[str, list[str], list[str], str]]:
        """The labelled sets, content-like ones first (the order the preset's heads and draws were made in),
        one per answer field."""
        emotion, *others = labelled_question_sets(self.cfg)
        by_field: dict[str, tuple[str, list[str], list[str], str]] = {}
        for question_set in others:
            by_field.setdefault(question_set[3], question_set)
        return [*by_field.values(), emotion]

    # Heads on the max- and the mean-pooled visual tokens: the max finds a small object's evidence quickly,
    # the mean makes the tower spread it over every token, which is what a small LLM learns to read fast.
    POOLS = ("max", "mean")

    def head_name(self, answer_field: str, pool: str) -> str:
        return f"{answer_field.replace('.', '_')}_{pool}"  # (a ModuleDict key has no dots)

    def extra_modules(self, model: VAEmotionLLM) -> nn.Module:
        heads = {
            self.head_name(answer_field, pool): nn.Linear(model.hidden_size, len(options))
            for _, _, options, answer_field in self.question_sets
            for pool in self.POOLS
        }
        return nn.ModuleDict(heads).to(model.dtype)

    def prepare(self, model: VAEmotionLLM, batch: Batch, rng: np.random.Generator) -> StepInputs:
        items = []
        first_rows = []  # each clip's first sequence: its pooled visual tokens feed the heads
        for i, meta in enumerate(batch.meta):
            first_rows.append(len(items))
            items.append(PromptItem("visual", pick(self.cfg.prompts.describe, rng), meta["caption"], i))
            for _ in range(self.cfg.stage0.questions_per_clip):
                for _, asks, options, answer_field in self.question_sets:
                    if meta.get(answer_field) in options:
                        items.append(PromptItem("visual", mcq(asks, options, rng), meta[answer_field], i))
        step = StepInputs(passes={}, clips=len(batch))
        self.note_pass(step, "lm", clip_inputs(model, items, batch))
        step.labels = {
            answer_field: torch.tensor(
                [options.index(m[answer_field]) if m.get(answer_field) in options else IGNORE for m in batch.meta]
            )
            for _, _, options, answer_field in self.question_sets
        }
        step.labels["first_rows"] = torch.tensor(first_rows)
        # Each sequence weighs the same: 2-token answers count as much as 45-token captions.
        step.counts = {"lm_sequences": len(items), "samples": len(batch)}
        return step

    def aux_loss(self, extra: nn.Module, step: StepInputs, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(
            F.cross_entropy(
                extra[self.head_name(answer_field, pool)](pooled[pool]).float(),
                step.labels[answer_field].to(pooled[pool].device),
                ignore_index=IGNORE,
                reduction="sum",
            )
            for _, _, _, answer_field in self.question_sets
            for pool in self.POOLS
        ) / len(self.POOLS)

    def loss(self, model: VAEmotionLLM, extra: nn.Module, step: StepInputs) -> StepResult:
        aux_weight = self.cfg.stage0.aux_weight
        if step.step <= self.cfg.stage0.vision_warmup_steps:  # every rank alike: ZeRO-3 stays in step
            tokens = model.video_tokens(step.passes["lm"].video)
            aux_sum = self.aux_loss(extra, step, {"max": tokens.amax(1), "mean": tokens.mean(1)})
            return StepResult(
                aux_weight * normalised(aux_sum, step, "samples"), {"aux_sum": float(aux_sum.detach()), "samples": step.clips}
            )
        inputs = step.passes["lm"]
        out, hidden = self.response_hidden(model, inputs)
        weights = per_sequence_weights(inputs.response_lengths())
        lm_sum = language_loss(hidden, model.logits, inputs.response_targets, self.chunk, step.chunks.get("lm", 0), weights)
        firsts = step.labels["first_rows"].to(out.pooled.device)  # a clip's sequences share its visual tokens
        aux_sum = self.aux_loss(extra, step, {"max": out.pooled_max[firsts], "mean": out.pooled[firsts]})
        loss = normalised(lm_sum, step, "lm_sequences") + aux_weight * normalised(aux_sum, step, "samples")
        return StepResult(
            loss,
            {
                "lm_sum": float(lm_sum.detach()),
                "lm_sequences": step.counts["lm_sequences"],
                "aux_sum": float(aux_sum.detach()),
                "samples": step.clips,
            },
        )


class AlignObjective(StageObjective):
    """Stage 1 (VG-Align): the frozen visual pass teaches the audio pass; no audio labels are used."""

    stage = 1

    def decode_spec(self) -> DecodeSpec:
        d = self.cfg.data
        if self.cached:  # the teacher's answers are in the cache: no frames to decode
            from vaemo.cache_fingerprint import fingerprint

            return DecodeSpec.for_data(d, need_video=False, need_audio=True, teacher_fingerprint=fingerprint(self.cfg)[0])
        needs = ("caption",) if self.cfg.stage1.responses == "caption" else ()
        return DecodeSpec.for_data(d, need_video=True, need_audio=True, need_fields=needs)

    def stage1_pairs(
        self, model: VAEmotionLLM, batch: Batch, rng: np.random.Generator, clips: list[int], questions: bool
    ) -> list[tuple[str, str, int]]:
        """(prompt, response, clip) for the KD passes, responses the teacher writes filled in."""
        s = self.cfg.stage1
        asked = [
            (p, r, i) for i in clips for p, r in align_sequences(batch.meta[i], rng, self.cfg.prompts, questions, s.responses)
        ]
        with self.teacher_view(model):  # the responses the teacher writes come from the same teacher
            return write_teacher_responses(model, batch, asked, s.teacher_response_tokens, lockstep=True)

    def prepare(self, model: VAEmotionLLM, batch: Batch, rng: np.random.Generator) -> StepInputs:
        # The same prompt and response for teacher (frames) and student (soundtrack).
        step = StepInputs(passes={}, clips=len(batch))
        if self.cached:
            # The prompts the teacher answered when the cache was written, and its top-k per position.
            asked = [(p, r, i) for i, record in enumerate(batch.teacher) for p, r in record.sequences]
            targets = TopKTargets.joined(batch.teacher)
            step.labels = {"ids": targets.ids, "logprobs": targets.logprobs, "tail": targets.tail}
        else:
            asked = self.stage1_pairs(model, batch, rng, list(range(len(batch))), self.cfg.stage1.questions)
            self.note_pass(step, "teacher", clip_inputs(model, [PromptItem("visual", p, r, i) for p, r, i in asked], batch))
        self.note_pass(step, "student", clip_inputs(model, [PromptItem("audio", p, r, i) for p, r, i in asked], batch))
        step.counts = {"kd_tokens": step.positions["student"]}
        return step

    def kd_settings(self) -> tuple[float, int]:
        """(temperature, top-k) of the KD term."""
        return self.cfg.stage1.temperature, self.cfg.stage1.topk

    def teacher_view(self, model: VAEmotionLLM):
        """The model the KD teacher's pass runs in (stage 1: the model itself; its visual path is frozen)."""
        return nullcontext(model)

    def kd(self, model: VAEmotionLLM, step: StepInputs, teacher: str, student: str, **student_kwargs):
        temperature, topk = self.kd_settings()
        if teacher not in step.passes:  # read from the teacher cache
            target = TopKTargets(step.labels["ids"], step.labels["logprobs"], step.labels["tail"])
            out, student_hidden = self.response_hidden(model, step.passes[student], **student_kwargs)
            if len(target) != student_hidden.shape[0]:
                raise RuntimeError(
                    f"{len(target)} cached teacher positions for {student_hidden.shape[0]} student "
                    "positions: the cache was written with another tokenizer or prompt template"
                )
            return out, distill(student_hidden, model.logits, target, temperature, self.chunk, step.chunks.get(student, 0))
        with torch.no_grad(), self.teacher_view(model):
            _, teacher_hidden = self.response_hidden(model, step.passes[teacher])
            target = (
                teacher_topk(teacher_hidden, model.logits, topk, temperature, self.chunk, step.chunks.get(teacher, 0))
                if topk
                else teacher_hidden
            )
        out, student_hidden = self.response_hidden(model, step.passes[student], **student_kwargs)
        return out, distill(student_hidden, model.logits, target, temperature, self.chunk, step.chunks.get(student, 0))

    def loss(self, model: VAEmotionLLM, extra: nn.Module | None, step: StepInputs) -> StepResult:
        _, kd = self.kd(model, step, "teacher", "student", run_all_pathways=True)
        loss = normalised(kd.kl_sum, step, "kd_tokens")
        return StepResult(loss, {"kd_sum": float(kd.kl_sum.detach()), "kd_tokens": kd.count, "agree": kd.agree})


class EmoAdapterObjective(AlignObjective):
    """Stage 2 (EmoAdapter): LM loss on emotion answers under every modality, valence/arousal (and
    category) supervision on each path's pooled tokens, and a KD term that keeps what stage 1 taught: the
    audio pass distils the visual pass of the model as stage 1 left it (no Enhancer, no LoRA: fixed
    targets, not a moving anchor) on the description and, with stage2.kd_questions, stage 1's questions."""

    stage = 2

    def kd_settings(self) -> tuple[float, int]:
        return self.cfg.stage2.kd_temperature, self.cfg.stage2.kd_topk

    def teacher_view(self, model: VAEmotionLLM):
        return model.as_stage1()

    def decode_spec(self) -> DecodeSpec:
        d = self.cfg.data
        return DecodeSpec.for_data(
            d,
            need_video=True,
            need_audio=True,
            allow_missing_audio=True,
            need_fields=("emotion", "valence", "arousal"),
            emotions=tuple(self.cfg.stage2.emotions),
        )

    def prepare_model(self, model: VAEmotionLLM) -> None:
        s, m = self.cfg.stage2, self.cfg.model
        model.enhancer, model.supervisor, model.spec.enhancer, model.spec.supervisor = None, None, None, None
        if s.use_enhancer:
            model.add_enhancer(m.enhancer.width, m.enhancer.gate_init)
        if s.use_supervisor:
            model.add_supervisor(m.supervisor.hidden_size, list(s.emotions) if m.supervisor.categorical else [])
        if m.lora.rank > 0:
            model.add_lora(m.lora.rank, m.lora.alpha, m.lora.targets)

    def prepare(self, model: VAEmotionLLM, batch: Batch, rng: np.random.Generator, score: bool = False) -> StepInputs:
        if score:
            return self.scoring_inputs(model, batch, rng)
        emotions = list(self.cfg.stage2.emotions)
        step = StepInputs(passes={}, clips=len(batch))
        items, va, category, paths = [], [], [], []
        for i, meta in enumerate(batch.meta):
            modalities = ["visual"] + (["audio", "audio_visual"] if batch.has_audio[i] else [])
            for modality in modalities:
                question = mcq(self.cfg.prompts.emotion_questions, emotions, rng)
                items.append(PromptItem(modality, question, meta["emotion"], i))
                va.append([meta["valence"], meta["arousal"]])
                category.append(emotions.index(meta["emotion"]) if meta["emotion"] in emotions else IGNORE)
                paths.append(modality)
        self.note_pass(step, "lm", clip_inputs(model, items, batch))
        step.labels = {"va": torch.tensor(va, dtype=torch.float32), "category": torch.tensor(category)}
        step.labels["path"] = torch.tensor([("visual", "audio", "audio_visual").index(p) for p in paths])
        # KD pairs for clips with a soundtrack; a rank without any runs one dummy pair on silence, with
        # weight 0 (see module doc).
        kd_clips = [i for i in range(len(batch)) if batch.has_audio[i]] or [0]
        pairs = self.stage1_pairs(model, batch, rng, kd_clips, self.cfg.stage2.kd_questions)
        weight = 1.0 if any(batch.has_audio) else 0.0
        audio = batch.audio if batch.audio is not None else torch.zeros(len(batch), model.audio_samples)
        for name, modality in (("teacher", "visual"), ("student", "audio")):
            kd_items = [PromptItem(modality, p, r, i) for p, r, i in pairs]
            self.note_pass(step, name, model.prompts.batch(kd_items, batch.video, audio, batch.duration))
        step.labels["kd_weight"] = torch.tensor(weight)
        step.counts = {
            "lm_tokens": step.positions["lm"],
            "va_rows": float(len(va)),
            "kd_tokens": step.positions["student"] * weight,
        }
        return step

    def loss(self, model: VAEmotionLLM, extra: nn.Module | None, step: StepInputs) -> StepResult:
        with model.sharing_video_tokens():  # the KD teacher reuses the LM pass's vision-tower output
            return self._loss(model, step)

    def _loss(self, model: VAEmotionLLM, step: StepInputs) -> StepResult:
        s = self.cfg.stage2
        inputs = step.passes["lm"]
        out, hidden = self.response_hidden(model, inputs, run_all_pathways=True)
        lm_sum = language_loss(hidden, model.logits, inputs.response_targets, self.chunk, step.chunks.get("lm", 0))
        loss = s.lambda_lm * normalised(lm_sum, step, "lm_tokens")
        sums = {"lm_sum": float(lm_sum.detach()), "lm_tokens": step.positions["lm"]}
        if model.supervisor is not None:
            va_pred, logits = model.supervisor(out.pooled)
            target = step.labels["va"].to(va_pred.device)
            if s.va_loss == "mse":
                va_sum = ((va_pred.float() - target) ** 2).sum(-1).sum()
                loss = loss + s.lambda_sup * normalised(va_sum, step, "va_rows")
            else:  # 1 - CCC, a statistic of the whole batch: the same value on every rank
                ccc = va_loss(va_pred, target, "ccc", step.world_size)
                va_sum = ccc.detach() * len(target)
                loss = loss + s.lambda_sup * ccc
            sums.update(va_sum=float(va_sum.detach()), va_rows=len(target))
            if logits is not None:
                cat_sum = F.cross_entropy(
                    logits.float(), step.labels["category"].to(logits.device), ignore_index=IGNORE, reduction="sum"
                )
                loss = loss + s.lambda_cat * normalised(cat_sum, step, "va_rows")
                sums.update(cat_sum=float(cat_sum.detach()), cat_rows=len(target))
        student_out, kd = self.kd(model, step, "teacher", "student")
        weight = float(step.labels["kd_weight"])
        loss = loss + s.lambda_kd * weight * normalised(kd.kl_sum, step, "kd_tokens")
        sums.update(kd_sum=float(kd.kl_sum.detach()) * weight, kd_tokens=kd.count * weight, agree=kd.agree * weight)
        return StepResult(loss, sums)

    def scored_tasks(self) -> list[tuple[str, list[str], list[str], str]]:
        return labelled_question_sets(self.cfg)

    def scoring_inputs(self, model: VAEmotionLLM, batch: Batch, rng: np.random.Generator) -> StepInputs:
        """Validation questions with every option as a response: the emotion question, and each question set
        of prompts.questions that names the clip field holding its answer (`answer_field`), under every
        modality the clip has."""
        step = StepInputs(passes={}, clips=len(batch))
        items = []
        for i, meta in enumerate(batch.meta):
            for modality in ["visual"] + (["audio", "audio_visual"] if batch.has_audio[i] else []):
                for name, asks, options, answer_field in self.scored_tasks():
                    if meta.get(answer_field) not in options:
                        continue
                    question = mcq(asks, options, rng, canonical=True)
                    items.extend(PromptItem(modality, question, option, i) for option in options)
                    step.scored.append((name, modality, len(options), options.index(meta[answer_field])))
        self.note_pass(step, "lm", clip_inputs(model, items, batch))
        return step

    @torch.no_grad()
    def score(self, model: VAEmotionLLM, step: StepInputs) -> dict[str, float]:
        """Validation accuracy per task and modality, scoring every option by its mean log-likelihood;
        `val_objective` (what sweeps rank by) is the mean over tasks of each task's accuracy."""
        means, _ = model.option_means(step.passes["lm"], self.chunk, step.chunks.get("lm", 0), run_all_pathways=True)
        sums: dict[str, float] = {}
        scores = per_item(means, [options for _, _, options, _ in step.scored])
        for (task, modality, _, truth), item_scores in zip(step.scored, scores):
            right = float(best_option(item_scores) == truth)
            for name in (f"val_{task}_{modality}", f"val_{task}"):
                sums[f"{name}_correct"] = sums.get(f"{name}_correct", 0.0) + right
                sums[f"{name}_total"] = sums.get(f"{name}_total", 0.0) + 1.0
        return sums

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        out = super().metrics(sums)
        tasks = [f"val_{name}_acc" for name, *_ in self.scored_tasks() if f"val_{name}_acc" in out]
        if tasks:
            out["val_objective"] = float(np.mean([out[name] for name in tasks]))
        return out


OBJECTIVES = {0: SeeObjective, 1: AlignObjective, 2: EmoAdapterObjective}


def objective_for(cfg: Config) -> StageObjective:
    return OBJECTIVES[cfg.stage](cfg)


@dataclass
class StageModel:
    """What a stage trains: the model with the objective's structural changes, the objective's own modules
    (heads), the names of the trainable parameters, and (stage 1 from a teacher cache) the vision tower's
    weights, taken off the model because no rank runs it."""

    model: VAEmotionLLM
    extra: nn.Module | None
    trainable: list[str]
    held_vision: dict[str, torch.Tensor]


def build_stage_model(
    cfg: Config,
    objective: StageObjective,
    drop_vision: bool = False,
    model: VAEmotionLLM | None = None,
    device: torch.device | None = None,
) -> StageModel:
    """The one way a stage's model and trainable set are built: by the training workers, the export and the
    benchmarks alike, so that they all train (and compare) the same thing. `drop_vision`: for a run that
    reads its teacher from a cache (`objective.cached`), which never runs the vision tower. `model`: a
    starting model built elsewhere (the sizing benchmarks' 7B model on the meta device). `device`: where
    checkpoint weights are read to (`build_model`)."""
    model = model if model is not None else build_model(cfg.model, cfg.data, seed=cfg.seed, device=device)
    held_vision = model.detach_vision() if drop_vision else {}
    # What the stage adds (stage 2's Enhancer, Supervisor and LoRA, stage 0's heads) is seeded here, apart
    # from the model: a model loaded from a folder leaves the RNG wherever loading and imports left it.
    torch.manual_seed(cfg.seed + 1)
    objective.prepare_model(model)
    extra = objective.extra_modules(model)
    trainable = set_trainable(model, cfg.stage, extra, objective.also_trainable(model))
    if cfg.model.activation_checkpointing:
        model.checkpoint_activations()
    return StageModel(model, extra, trainable, held_vision)

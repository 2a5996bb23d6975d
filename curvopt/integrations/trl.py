"""CAPO inside TRL's ``GRPOTrainer`` (tested with trl 1.16).

:class:`CAPOConfig` adds the CAPO settings to ``GRPOConfig`` (they parse from the command line
like every TRL option); :class:`CAPOGRPOTrainer` applies them. By default every optimizer step is
bounded by the measured whole-policy trust region: the step is taken at the scale of its update
that keeps the policy's mean per-token KL on the step's completions within
``capo_max_policy_shift`` (:data:`curvopt.settings.DEFAULT_MAX_POLICY_SHIFT`)::

    args = CAPOConfig(output_dir="out")  # the trust region at the default bound
    trainer = CAPOGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data)
    trainer.train()

The paper's token rejection is ``CAPOConfig(capo_levels=["token"], capo_max_policy_shift=None,
capo_rule="symmetric", ...)``.

How it hooks into TRL, and why:

- The optimizer the trainer creates is wrapped in :class:`curvopt.CAPO` once
  (``create_optimizer``; a later ``train()`` finds it wrapped); accelerate then wraps CAPO, so the
  step taken is CAPO's, and the LR scheduler, gradient scaler and checkpoints see a real
  ``torch.optim.Optimizer``.
- TRL's loss forward never calls ``lm_head`` (its fused log-prob path multiplies by
  ``lm_head.weight`` directly), so the hidden states are captured by a forward hook on the
  backbone, which runs once per loss forward, gradient checkpointing or not. They are sliced to
  the completion positions as TRL slices them (the state at position t predicts token t + 1).
- The trust region measures the policy TRL optimises without its logits: the completion states
  of the loss forward are the policy before the step, ``HeadInput(states, lm_head.weight,
  lm_head.bias)``, and the ``forward`` given to CAPO runs the model at the trial point on the very
  inputs TRL passed it (recorded by a forward pre-hook), with ``logits_to_keep=1``, captures the
  backbone's output and returns its ``HeadInput``. The KL is then exact and formed in vocabulary
  chunks; no ``[B, T, V]`` tensor exists. Kept per micro-batch until the step: the completion
  states ``[B, T, H]`` and references to TRL's inputs.
- ``_compute_loss`` reads its token mask once, before the forward, and uses it only afterwards.
  The trainer hands TRL a copy of the inputs whose loss mask is a fresh tensor, runs the forward
  with the real attention mask, and zeroes the rejected tokens of that tensor as soon as the
  hidden states exist. Every later use (the loss numerator and normaliser, the KL term,
  sequence-level importance weights, the entropy mask and bonus, the metrics) sees only the kept
  tokens, and the inputs buffered for ``num_iterations > 1`` are never written.
- ``dapo``, ``cispo`` and ``vespo`` divide by the token count of the generation batch, counted
  before any micro-batch runs, whereas the kept count of an optimizer step is known only after
  its last micro-batch. So the accumulated gradient is multiplied by tokens / kept tokens of the
  step, both counted over all processes, before it is clipped.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, Union, cast, get_args, get_origin

import torch
from accelerate.utils import is_peft_model
from torch import Tensor, nn
from transformers import PreTrainedModel
from trl import GRPOConfig, GRPOTrainer

from ..capo import CAPO, STEP_STATS
from ..settings import MODEL_FORM, CAPOSettings, help_text, option_types
from ..trust_region import HeadInput
from .transformers_config import logit_transform

__all__ = ["CAPOConfig", "CAPOGRPOTrainer"]

# Loss types whose normaliser is the token count of the generation batch (``num_items_in_batch``).
GLOBAL_NORMALISER = ("cispo", "dapo", "vespo")
# The CAPO options set on TRL's command line, as ``capo_<name>``; the logit transform comes from
# the GRPO settings and the model, and step_reject_frac needs a closure TRL's step does not pass.
OPTIONS = (
    "rule",
    "delta_h",
    "delta_f",
    "levels",
    "top_k",
    "fisher",
    "direction",
    "track_realised",
    "max_policy_shift",
    "shift_estimate",
)
PREFIX = "capo_"
# The trainer builds CAPO from the model, so its defaults are the model form's (the whole-policy
# trust region, no token rejection) where that differs from CAPOSettings'.
CONFIG_DEFAULTS = {f.name: MODEL_FORM.get(f.name, f.default) for f in fields(CAPOSettings)}
# Arguments TRL passes for its fused log-prob head, left out when the trust region re-runs a call.
FUSED_HEAD_ARGUMENTS = (
    "fused_lm_head",
    "labels",
    "shift_labels",
    "num_items_in_batch",
    "output_router_logits",
)


def _with_capo_options(cls: type) -> type:
    """Add a ``capo_<name>`` field for each of :data:`OPTIONS`, derived from
    :class:`curvopt.settings.CAPOSettings` (type and help; default from
    :data:`CONFIG_DEFAULTS`), before the class's own."""
    types = option_types()
    own = inspect.get_annotations(cls)
    annotations: dict[str, Any] = {}
    for name in OPTIONS:
        tp, default = types[name], CONFIG_DEFAULTS[name]
        assert default is not MISSING
        metadata = {"help": help_text(name, PREFIX)}
        if get_origin(tp) in (tuple, list, Sequence):
            # a sequence parses as a list on the command line, of its choices' type
            tp = list[_plain(get_args(tp)[0])]  # type: ignore[misc]
            value = field(default_factory=_copy_of(default), metadata=metadata)
        else:
            number = _optional_number(tp)
            if number is not None:
                # parsed as a string, so that `none` turns the option off (see __post_init__)
                tp = Union[number, str, None]  # noqa: UP007 - the parser reads the order
                metadata["help"] += " On the command line, `none` for None."
            value = field(default=default, metadata=metadata)
        annotations[PREFIX + name] = tp
        setattr(cls, PREFIX + name, value)
    cls.__annotations__ = {**annotations, **own}
    return cls


def _copy_of(default: Sequence[Any]) -> Any:
    """A default factory of fresh lists equal to ``default``."""
    return lambda: list(default)


def _plain(tp: Any) -> Any:
    """The type of a ``Literal``'s values (the parser's item type), else ``tp`` itself."""
    return type(get_args(tp)[0]) if get_origin(tp) is Literal else tp


def _optional_number(tp: Any) -> type | None:
    """``int`` or ``float`` for an option typed ``int | None`` or ``float | None``, else None."""
    args = get_args(tp)
    numbers = [a for a in args if a in (int, float)]
    if type(None) in args and len(args) == 2 and numbers:
        return cast(type, numbers[0])
    return None


def _parse_optional_number(name: str, value: str, number: type) -> Any:
    """A command-line string of an optional number: ``none``/``null`` (any case) or the number."""
    if value.strip().lower() in ("none", "null"):
        return None
    try:
        return number(value)
    except ValueError:
        raise ValueError(f"{name}: expected a {number.__name__} or 'none', got {value!r}") from None


@dataclass
@_with_capo_options
class CAPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the settings of :class:`curvopt.CAPO` (Melo, Abate, Gal, ICLR 2026,
    https://arxiv.org/abs/2510.00819).

    Each ``capo_<name>`` field is CAPO's argument ``<name>`` for the names in :data:`OPTIONS`,
    with the type and help declared in :class:`curvopt.settings.CAPOSettings` and the defaults of
    CAPO built from the model (:data:`CONFIG_DEFAULTS`): the measured whole-policy trust region
    (``capo_max_policy_shift`` = :data:`~curvopt.settings.DEFAULT_MAX_POLICY_SHIFT`,
    ``capo_shift_estimate="measured"``) and no token rejection (``capo_levels=[]``). The paper's
    token rejection: ``capo_levels=["token"], capo_max_policy_shift=None`` (on the command line
    ``--capo_levels token --capo_max_policy_shift none``). ``temperature``, the logit scale and
    the soft-cap are taken from the GRPO settings and the model, so CAPO models the policy TRL
    optimises.
    """

    capo_allow_tied_head: bool = field(
        default=False,
        metadata={
            "help": "Deprecated, no effect: a head tied to the input embedding is always "
            "accepted (the trust region measures the policy, ties included; the head-only "
            "token models warn what they leave out)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        types = option_types()
        for name in OPTIONS:
            value, number = getattr(self, PREFIX + name), _optional_number(types[name])
            if number is not None and isinstance(value, str):
                setattr(self, PREFIX + name, _parse_optional_number(PREFIX + name, value, number))
        if self.capo_allow_tied_head:
            warnings.warn(
                "capo_allow_tied_head is deprecated and has no effect: a tied head is accepted "
                "without it",
                DeprecationWarning,
                stacklevel=3,
            )
        # fail at parse time rather than once the model is loaded (CAPO's own checks)
        try:
            capo_settings(self)
        except (TypeError, ValueError) as error:
            raise type(error)(PREFIX + str(error)) from None


def capo_settings(args: Any) -> CAPOSettings:
    """The :class:`~curvopt.settings.CAPOSettings` of a :class:`CAPOConfig`'s ``capo_*`` fields."""
    return CAPOSettings(**{name: getattr(args, PREFIX + name) for name in OPTIONS})


def head_models(options: CAPOSettings) -> list[str]:
    """The settings that model the output layer's update alone (the paper's token models), as
    the fields that turn them on; empty for the trust region alone."""
    uses = []
    if options.levels:
        uses.append(f"token rejection (capo_levels={list(options.levels)})")
    if options.max_policy_shift is not None and options.shift_estimate == "jvp":
        uses.append("capo_shift_estimate='jvp'")
    if options.track_realised:
        uses.append("capo_track_realised")
    return uses


@dataclass
class _LossBatch:
    """What the loss forward needs to select tokens: the loss mask TRL will read (zeroed in place
    where CAPO rejects), the real attention mask, the sampled tokens and their advantages."""

    loss_mask: Tensor
    attention_mask: Tensor
    actions: Tensor
    advantages: Tensor


Call = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class PolicyAt:
    """The trust region's ``forward`` of one micro-batch: the policy TRL optimises at the
    current parameters, as a :class:`~curvopt.trust_region.HeadInput` of its completion tokens.

    Runs the model on each of ``calls`` (the arguments TRL's loss forward passed it, less those of
    its fused head) with ``logits_to_keep=1`` under ``autocast`` (the accelerator's), captures the
    backbone's output, keeps the ``completion`` positions that predict the completion tokens, and
    pairs them with the output layer's parameters, as TRL's fused head does: ``[B, T, H]`` states,
    never ``[B, T, V]`` logits.
    """

    calls: list[Call]
    completion: int
    autocast: Callable[[], AbstractContextManager[Any]]

    def __call__(self, model: nn.Module) -> HeadInput:
        policy = transformers_model(model)
        states: list[Tensor] = []
        hook = capture_states(policy, states)
        try:
            with self.autocast():
                for args, kwargs in self.calls:
                    model(*args, **{**kwargs, "logits_to_keep": 1, "use_cache": False})
        finally:
            hook.remove()
        head = policy.get_output_embeddings()
        hidden = completion_states(states, self.completion).to(head.weight.device)
        return HeadInput(hidden, head.weight, head.bias)


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model whose forward TRL patched (the base model under PEFT)."""
    return cast(
        PreTrainedModel, cast(Any, model).get_base_model() if is_peft_model(model) else model
    )


def capture_states(policy: PreTrainedModel, into: list[Tensor]) -> Any:
    """Append the backbone's output states ``[B, L, H]`` (detached) to ``into`` at each forward;
    returns the hook's handle."""

    def capture(module: nn.Module, inputs: Any, output: Any) -> None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        into.append(hidden.detach())

    return policy.base_model.register_forward_hook(capture)


def completion_states(states: list[Tensor], completion: int) -> Tensor:
    """The states ``[B, T, H]`` that predict the last ``completion`` tokens: the state at position
    t predicts token t + 1, so they end one position early."""
    return torch.cat(states)[:, -completion - 1 : -1]


def _record_calls(into: list[Call]) -> Callable[..., None]:
    """A forward pre-hook (``with_kwargs``) appending each call's arguments, less those of TRL's
    fused head, to ``into``."""

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        into.append((args, {k: v for k, v in kwargs.items() if k not in FUSED_HEAD_ARGUMENTS}))

    return record


def find_capo(optimizer: torch.optim.Optimizer | None) -> CAPO | None:
    """The :class:`~curvopt.CAPO` in a chain of optimizer wrappers (accelerate's), if any."""
    while optimizer is not None:
        if isinstance(optimizer, CAPO):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class CAPOGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose optimizer steps are CAPO's: by default each within the measured
    whole-policy trust region; with ``capo_levels``, on the tokens CAPO accepts.

    Takes the arguments of ``GRPOTrainer``; ``args`` must be a :class:`CAPOConfig`. ``self.capo``
    is the :class:`curvopt.CAPO` wrapping the trainer's optimizer (``None`` until training starts).

    Supported: every ``loss_type`` of trl 1.16 (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo,
    vespo), ``num_iterations > 1``, ``steps_per_generation``, gradient accumulation (the trust
    region bounds the optimizer step over all its micro-batches) and checkpointing, ``beta > 0``,
    tool masks, ``temperature``, models with a logit scale or soft-cap, heads tied to the input
    embedding, PEFT/LoRA (``peft_config``; the trust region moves the trainable parameters and
    measures the whole policy), any ``optim`` with the trust region, one process or DDP, and a
    second ``train()``. Raises for DeepSpeed, FSDP and tensor-parallel loading; for the head-only
    token models (``capo_levels``, ``capo_track_realised``, ``capo_shift_estimate="jvp"``) with
    a frozen head or an optimizer curvopt cannot model; and for ``dapo``/``cispo``/``vespo`` with
    TRL's entropy bonus or MoE auxiliary loss (their normalisation goes through the gradient,
    which would rescale those terms too).

    Metrics, reduced over all processes, appended to TRL's metrics after every optimizer step (so
    averaged over the steps of a logging interval): ``capo/skipped_frac`` (1 for a step not
    taken: no token kept, or a non-finite gradient or KL), ``capo/rejected_frac``; with the trust
    region ``capo/step_scale``, ``capo/step_policy_shift`` (the measured KL of the unscaled step),
    ``capo/policy_shift_realised`` (of the step taken) and ``capo/trust_region_trials``; with
    ``capo_levels``, ``capo/objective_shift_mean`` and ``capo/policy_shift_mean``; with
    ``capo_track_realised``, ``capo/policy_shift_realised`` and ``capo/policy_shift_step_model``
    (see :class:`curvopt.CAPO`). Evaluation computes TRL's loss on all tokens and selects nothing.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, CAPOConfig):
            raise TypeError(
                f"args: expected a CAPOConfig (it holds the CAPO settings), "
                f"got {type(self.args).__name__}"
            )
        self._check_supported()
        self.capo: CAPO | None = None
        self._capo_batch: _LossBatch | None = None
        self._capo_window_loss = 0.0
        self._capo_skipped = 0.0

    # ------------------------------------------------------------------ set-up

    @property
    def _capo_args(self) -> CAPOConfig:
        return cast(CAPOConfig, self.args)

    @property
    def _capo(self) -> CAPO:
        assert self.capo is not None  # training has started
        return self.capo

    def _policy(self) -> PreTrainedModel:
        """The transformers model whose forward TRL patched (the base model under PEFT)."""
        return transformers_model(self.accelerator.unwrap_model(self.model))

    def _check_supported(self) -> None:
        args = self._capo_args
        supported = (
            "CAPOGRPOTrainer trains on one process or with DDP (`accelerate launch "
            "--multi_gpu` or `torchrun`, no DeepSpeed or FSDP configuration)"
        )
        if self.is_deepspeed_enabled:
            raise ValueError(
                "CAPOGRPOTrainer does not support DeepSpeed: its engine steps the optimizer "
                "inside backward, so CAPO can neither take the step at the trust region's scale "
                f"nor skip it. {supported}."
            )
        if (
            self.is_fsdp_enabled
            or self.is_fsdp_xla_enabled
            or self.is_distributed_loading_by_transformers
        ):
            raise ValueError(
                "CAPOGRPOTrainer does not support FSDP or tensor parallelism: accelerate enables "
                "FSDP only on accelerators (GPUs), not on CPU, so this integration is not tested "
                "with it. "
                f"{supported}. In a training loop of your own, curvopt.CAPO's trust region "
                "supports FSDP2 (`fully_shard`; see docs/distributed.md)."
            )
        options = capo_settings(args)
        if (
            options.levels
            and args.loss_type in GLOBAL_NORMALISER
            and (self._entropy_bonus_enabled or self.aux_loss_enabled)
        ):
            raise ValueError(
                f"loss_type={args.loss_type!r} with an entropy bonus (entropy_coef, "
                "use_adaptive_entropy) or a MoE auxiliary loss is not supported with token "
                "rejection: CAPO normalises this loss by the kept tokens by rescaling the "
                "accumulated gradient, which would rescale those terms too. Use "
                "loss_type='bnpo' (normalised per micro-batch), turn the extra term off, or use "
                "the trust region alone (capo_levels=[], which keeps every token)."
            )
        uses = " and ".join(head_models(options))
        if not uses:
            return
        model = self._policy()
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Module) or not any(p.requires_grad for p in head.parameters()):
            raise ValueError(
                f"{uses}: these model the update of the output layer (lm_head), which is not "
                "trained here (e.g. PEFT/LoRA adapters train other layers). Use the trust "
                "region, which measures the whole policy whatever parameters train: "
                "capo_levels=[] and "
                "capo_max_policy_shift=<bound> (the defaults), without capo_track_realised."
            )
        embedding = model.get_input_embeddings()
        if embedding is not None and getattr(embedding, "weight", None) is head.weight:
            warnings.warn(
                f"lm_head.weight is tied to the input embedding: {uses} model each update from "
                "the head's own gradient alone, without the embedding's share of the shared "
                "matrix's gradient, which moves the head too. The trust region "
                "(capo_max_policy_shift, capo_shift_estimate='measured') measures the whole "
                "policy, ties included.",
                UserWarning,
                stacklevel=3,
            )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The trainer's optimizer, wrapped in :class:`curvopt.CAPO` once (a later ``train()``
        gets it back wrapped by accelerate, and keeps it)."""
        optimizer = super().create_optimizer(model)
        found = find_capo(optimizer)
        if found is not None:
            if found is not self.capo:
                raise TypeError(
                    "optimizers: CAPOGRPOTrainer wraps the optimizer in curvopt.CAPO itself, "
                    "from the CAPOConfig; pass the optimizer CAPO should wrap"
                )
            return optimizer
        args = self._capo_args
        options = capo_settings(args)
        policy = self._policy()
        scale, softcap = logit_transform(policy)
        try:
            capo = CAPO(
                optimizer,
                policy.get_output_embeddings(),
                model=self.accelerator.unwrap_model(self.model),
                **{name: getattr(options, name) for name in OPTIONS},
                temperature=args.temperature,
                logit_scale=scale,
                softcap=softcap,
            )
        except (TypeError, ValueError) as error:
            uses = " and ".join(head_models(options))
            if not uses:
                raise
            inner = type(optimizer)
            optim = getattr(args.optim, "value", args.optim)
            raise type(error)(
                f"{uses} models the update of the trainer's optimizer, optim={optim!r} "
                f"({inner.__module__}.{inner.__qualname__}), and curvopt cannot model it "
                f"({str(error).rstrip('.')}). The trust region works with any optimizer: "
                "capo_levels=[] and capo_max_policy_shift=<bound> (the defaults), without "
                "capo_track_realised."
            ) from error
        capo.register_step_pre_hook(self._before_capo_step)
        capo.register_step_post_hook(self._log_capo)
        self.capo = capo
        self.optimizer = capo
        return capo

    # ------------------------------------------------------------------ the loss

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """TRL's loss on a copy of ``inputs`` whose loss mask CAPO narrows during the forward."""
        if not cast(nn.Module, self.model).training or self.capo is None:
            return super()._compute_loss(model, inputs)
        completion_mask = inputs["completion_mask"]
        # TRL's loss mask: this very tensor, so zeroing it after the forward reaches every use
        if "tool_mask" in inputs:
            loss_mask = completion_mask * inputs["tool_mask"]
        else:
            loss_mask = completion_mask.clone()
        local = {k: v for k, v in inputs.items() if k != "tool_mask"}
        local["completion_mask"] = loss_mask
        self._capo_batch = _LossBatch(
            loss_mask=loss_mask,
            attention_mask=torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            actions=inputs["completion_ids"],
            advantages=inputs["advantages"],
        )
        try:
            return super()._compute_loss(model, local)
        finally:
            self._capo_batch = None

    def _get_per_token_logps_and_entropies(
        self,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        logits_to_keep: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """TRL's log-probabilities; in the loss forward, also select the tokens to train on from
        the backbone's output, zero the others in the loss mask, and give the trust region the
        policy before the step and the ``forward`` that measures it after."""
        batch, self._capo_batch = self._capo_batch, None
        if batch is None:  # generation-time log-probs, the reference model, evaluation
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        capo = self._capo
        measured = capo.trust_region is not None
        states: list[Tensor] = []
        calls: list[Call] = []
        policy = self._policy()
        hooks = [capture_states(policy, states)]
        if measured:
            hooks.append(model.register_forward_pre_hook(_record_calls(calls), with_kwargs=True))
        try:
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, batch.attention_mask, logits_to_keep, *args, **kwargs
            )
        finally:
            for hook in hooks:
                hook.remove()
        if not states:
            raise RuntimeError(
                "CAPOGRPOTrainer: the backbone's forward hook did not run during the loss forward, "
                "so there are no hidden states to select tokens from; the model's forward is not "
                "the one TRL's fused LM head expects."
            )
        # a copy: the view would keep the prompt positions' states until the step
        hidden = completion_states(states, logits_to_keep).clone()
        # onto the head's device, as TRL does with a split model
        hidden = hidden.to(policy.get_output_embeddings().weight.device)
        forward = PolicyAt(calls, logits_to_keep, self.accelerator.autocast) if measured else None
        keep = capo.select(
            hidden,
            batch.actions,
            batch.advantages,
            batch.loss_mask.bool(),
            forward=forward,
        )
        batch.loss_mask.mul_(keep)
        return out

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        """TRL's micro-batch step; at the end of a step's window, the kept-token normalisation of
        dapo/cispo/vespo (Trainer clips and steps only after this returns)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.loss_type not in GLOBAL_NORMALISER or self.capo is None:
            return loss
        self._capo_window_loss += float(loss)
        if not self.accelerator.sync_gradients:
            return loss
        window, self._capo_window_loss = self._capo_window_loss, 0.0
        stats = self.capo.stats
        kept = stats.get("kept_tokens", 0.0)
        # no token kept: no policy gradient, CAPO skips the step; all kept: nothing to rescale
        if not kept or kept == stats["tokens"]:
            return loss
        ratio = stats["tokens"] / kept
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(ratio)
        # the logged loss is summed over the window's micro-batches: rescale that sum too
        return loss + (ratio - 1.0) * window

    def _before_capo_step(self, *_: Any) -> None:
        self._capo_skipped = self._capo.stats["skipped_steps"]

    def _log_capo(self, *_: Any) -> None:
        """After each optimizer step (taken or skipped): its window's statistics, already reduced
        over the processes by CAPO."""
        stats = self._capo.stats
        metrics = self._metrics["train"]
        for name in STEP_STATS:
            if name in stats:
                metrics[f"capo/{name}"].append(stats[name])
        # averaged at log time: the fraction of steps not taken
        metrics["capo/skipped_frac"].append(float(stats["skipped_steps"] > self._capo_skipped))

"""The gradient of one optimizer step: grad_accum micro-batches, each loss weighted per target token
over every rank, a non-finite loss or gradient norm refused before the optimizer steps."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from a3lm.training.curriculum import GroupPolicy, describe, draw_group_ids
from a3lm.training.distributed import Dist


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) was NaN/inf: the step was not taken."""


@dataclass
class GradientStep:
    """What one phase's steps need to compute gradients (rebuilt with the phase's model and optimizer).

    model: the phase's model (its parameters; FSDP's gradient sync); ddp_model: what runs the forward
    (DDP-wrapped, or the model itself); grad_clip: max gradient norm (<= 0: none).
    """

    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    dist: Dist
    device: torch.device
    amp_dtype: torch.dtype | None
    fsdp: bool
    grad_clip: float

    def _micro_loss(
        self, batch: dict[str, torch.Tensor], policy: GroupPolicy, group_gen: torch.Generator
    ) -> tuple[torch.Tensor, int]:
        """(mean loss over the micro-batch's targets, number of targets); batch input_ids [B, N].

        Instruction batches carry labels (-100 off the answers) and known_mask (BOS and prompt, the
        first groups); packed rows have every token after BOS as a target.
        """
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        labels = batch["labels"].to(self.device) if "labels" in batch else ids
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        if policy.order == "ar":
            with amp:
                logits = self.ddp_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            # next-token loss in fp32 (HF's label shift); -100 marks no target (instruction data)
            targets = labels[:, 1:].flatten()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=-100)
            return loss, int((targets != -100).sum())
        group_ids = draw_group_ids(policy, batch["attention_mask"], group_gen, batch.get("known_mask"))
        with amp:
            out = self.ddp_model(
                input_ids=ids, group_ids=group_ids.to(self.device), attention_mask=mask, labels=labels
            )
        return out.loss, int(out.num_targets)

    def _no_sync(self, last: bool) -> Any:
        """Gradients are reduced once per step, after the last micro-batch."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        elif self.dist.enabled and not last:
            return self.ddp_model.no_sync()
        return nullcontext()

    def _check_finite(self, loss: torch.Tensor, policy: GroupPolicy, step: int) -> None:
        finite = self.dist.all_reduce(torch.isfinite(loss.detach()).float(), dist.ReduceOp.MIN)
        if not bool(finite):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite loss ({float(loss.detach()):.4g} on rank {self.dist.rank}) at step {step} "
                f"({describe(policy)}): the optimizer did not step, so the weights are those after step "
                f"{step - 1}; the last checkpoint is intact. Lower optim.lr or use precision=fp32"
            )

    def accumulate(
        self,
        batches: list[dict[str, torch.Tensor]],
        policy: GroupPolicy,
        group_gen: torch.Generator,
        step: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate the gradient of the global per-target mean loss; (loss sum, global target count)."""
        # Every grouping puts BOS (and an instruction's prompt) first, so the targets are known before
        # the forward, for exact weighting: every token after BOS of a packed row, the answer's tokens
        # (labels != -100) of an instruction row, under both objectives.
        counts = [
            int((b["labels"][:, 1:] != -100).sum()) if "labels" in b else b["input_ids"][:, 1:].numel()
            for b in batches
        ]
        total = self.dist.all_reduce(torch.tensor(float(sum(counts)), device=self.device))
        loss_sum = torch.zeros((), device=self.device)
        for i, (batch, n) in enumerate(zip(batches, counts, strict=True)):
            with self._no_sync(i == len(batches) - 1):
                loss, n_targets = self._micro_loss(batch, policy, group_gen)
                if n_targets != n:
                    raise RuntimeError(f"expected {n} targets in micro-batch, the model counted {n_targets}")
                self._check_finite(loss, policy, step)
                # DDP averages gradients over ranks: scale so the result is the global per-token mean
                (loss * (n * self.dist.world_size / total)).backward()
            loss_sum += loss.detach() * n
        return loss_sum, total

    def clipped_grad_norm(self, policy: GroupPolicy, step: int) -> float:
        clip = self.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip > 0 else float("inf")
        )
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite gradient norm at step {step} ({describe(policy)}): the optimizer "
                "did not step. Lower optim.lr or use precision=fp32"
            )
        return float(grad_norm)

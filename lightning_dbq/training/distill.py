"""Progressive in-place knowledge distillation (off by default).

Within one batch the bits are trained highest first; bit ``b_i`` additionally matches the *detached* logits that
bit ``b_(i-1)`` produced moments earlier (w8 → w6 → w4 → w2), with a temperature-scaled KL divergence.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["kd_loss"]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, batch-mean; the teacher gets no gradient."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits.detach() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)

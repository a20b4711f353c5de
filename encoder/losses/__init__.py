"""Self-supervised training losses: DINO (CLS), iBOT (masked patches), KoLeo (feature spread)."""

from .dino import DINOLoss
from .ibot import IBOTPatchLoss
from .koleo import KoLeoLoss

__all__ = ["DINOLoss", "IBOTPatchLoss", "KoLeoLoss"]

"""Device names from configs and command lines, checked against this machine."""
from __future__ import annotations

import torch

from .errors import ConfigError


def check_device(name: "str | torch.device", field: str = "optim.device") -> torch.device:
    """``torch.device(name)`` after checking that this machine has it (else ConfigError)."""
    name = str(name)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(field, f"{name!r} is not a device name (e.g. auto, cpu, cuda, cuda:0, mps): "
                                 f"{' '.join(str(exc).split())[:120]}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(field, f"{name!r} requested but this machine has no usable CUDA GPU "
                                     f"(torch.cuda.is_available() is False); use auto or cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(field, f"{name!r}: this machine has {count} CUDA GPU(s), numbered 0..{count - 1}")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(field, f"{name!r}: Apple MPS is not available on this machine; use auto or cpu")
    elif device.type != "cpu":
        raise ConfigError(field, f"{name!r}: userlab trains on cpu, cuda or mps, not {device.type}")
    return device

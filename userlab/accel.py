"""Optional training accelerators that leave results and checkpoints unchanged.

:func:`compile_dense_parts` is ``optim.compile``: ``torch.compile`` on the image encoders' dense
blocks. Off by default: on the 2-core CPU it was measured (bench/RESULTS.md) to cost minutes of
compilation for no faster step; on a GPU it may help. bf16 autocast is ``optim.amp``
(:func:`userlab.train.amp_dtype`).
"""
from __future__ import annotations

import warnings

from torch import nn


def compile_dense_parts(model: nn.Module, backend: str = "inductor") -> int:
    """Compile SGE, CGE and the region MLP of every image encoder in ``model``, in place.

    In place (``Module.compile``), so parameter names, ``state_dict`` keys and checkpoints are
    those of the eager model. The GRUs over packed sequences and GPO's per-length BiGRU stay
    eager (they would break the graph anyway). Graceful: a backend that fails while compiling
    falls back to eager execution (``torch._dynamo.config.suppress_errors``), and where
    ``torch.compile`` is unavailable a warning says so and nothing is compiled.

    Args:
        model: a :class:`~userlab.models.user.RetrievalModel` or anything holding image encoders.
        backend: the ``torch.compile`` backend (``"eager"`` checks the wiring without compiling).

    Returns:
        The number of modules set to compile (0 when compilation is unavailable).
    """
    from .models.image import ClipGuidedEnhancement, RegionMLP, SelfGuidedEnhancement
    targets = [m for m in model.modules()
               if isinstance(m, (SelfGuidedEnhancement, ClipGuidedEnhancement, RegionMLP))]
    try:
        import torch._dynamo
        torch._dynamo.config.suppress_errors = True
        for module in targets:
            module.compile(backend=backend)
    except (ImportError, RuntimeError, AttributeError) as exc:  # no dynamo on this platform
        warnings.warn(f"optim.compile: torch.compile is unavailable here ({exc}); training eagerly",
                      RuntimeWarning, stacklevel=2)
        return 0
    return len(targets)

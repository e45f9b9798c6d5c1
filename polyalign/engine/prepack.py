"""oneDNN-prepacked bf16 linear weights for CPU forwards (only where bf16 is native; checked bitwise)."""
from __future__ import annotations

import contextlib
import logging
from functools import partial

import torch
import torch.nn.functional as F

from polyalign import hardware
from polyalign.engine.model_parts import decoder_of

log = logging.getLogger(__name__)


class PrepackedLinears:
    """oneDNN-prepacked copies of the decoder's bf16 linear weights for forwards on a CPU: what
    torch.compile's weight freezing does, without the compile (here ~4% faster end to end, and
    bitwise the same outputs: checked once at start, else not used). The copies cost their size
    again in memory, so only decoders up to `max_bytes` get them."""

    def __init__(self, model, max_bytes: int = 4 << 30):
        self.packed: dict = {}
        lins = [m for m in decoder_of(model).modules() if isinstance(m, torch.nn.Linear)
                and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"]
        # Without native bf16 oneDNN's packed kernels round otherwise than plain F.linear (seen on
        # AVX2-only CPUs), and bf16 there is emulated anyway: models.resolve_dtype already warned.
        if not lins or sum(m.weight.numel() * 2 for m in lins) > max_bytes or not hardware.native_bf16():
            return
        try:
            with torch.no_grad():
                self.packed = {m: self._pack(m) for m in lins}
                m = lins[0]
                x = torch.randn(5, m.in_features, dtype=torch.bfloat16)
                if not torch.equal(self._linear(self.packed[m], m, x), F.linear(x, m.weight, m.bias)):
                    log.warning("oneDNN-prepacked bf16 weights are not bitwise the plain ones on this CPU "
                                "(%s): using plain linears", hardware.cpu_class())
                    self.packed = {}
        except (RuntimeError, AttributeError):      # no oneDNN in this torch build
            self.packed = {}

    @staticmethod
    def _pack(m):
        return torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 512), m.weight._version

    @staticmethod
    def _linear(packed, m, x, *args, **kwargs):
        return torch.ops.mkldnn._linear_pointwise(x, packed[0], m.bias, "none", [], "")

    @contextlib.contextmanager
    def active(self):
        for m in self.packed:
            if self.packed[m][1] != m.weight._version:     # the weights were changed in place: pack again
                self.packed[m] = self._pack(m)
            m.forward = partial(self._linear, self.packed[m], m)
        try:
            yield
        finally:
            for m in self.packed:
                m.__dict__.pop("forward", None)

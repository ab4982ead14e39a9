"""Sequential backends for :class:`engine.orchestration.OrchestratedEngine`.

* :class:`NativeSequentialBackend`: the native engine in sequential mode (CPU, tests, reference).
* :class:`~engine.backends.sglang.SGLangEngine` / :class:`~engine.backends.sglang.SGLangBackend`: stock SGLang
  (GPU). Importing this package never imports ``sglang``; constructing an SGLang engine does.
"""

from .native import NativeSequentialBackend
from .sglang import SGLangBackend, SGLangEngine, sglang_unavailable_reason

__all__ = ["NativeSequentialBackend", "SGLangBackend", "SGLangEngine", "sglang_unavailable_reason"]

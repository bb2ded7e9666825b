"""What third-party libraries print on the terminal: nothing, for every command, unless ``--verbose``.

Iris speaks for itself (one progress line per loading step, each error as one line). The libraries under it
print progress bars (transformers' and huggingface_hub's, the GGUF reader's own tqdm bar), notices on their
loggers (bitsandbytes' optional ``kernels`` package, transformers' advice) and deprecation warnings (PyTorch's
quantized tensors, PEFT) that a user cannot act on. ``quiet_libraries`` runs once, in the root callback, before
any of those libraries is imported: their switches are environment variables read at import time, which child
processes (training under ``accelerate launch``) inherit too.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "IRIS_VERBOSE"

QUIET_ENVIRONMENT = {
    "TQDM_DISABLE": "1",  # every tqdm bar, also those libraries create with plain tqdm (the GGUF reader's)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTHONWARNINGS": "ignore",  # child processes
}
LIBRARY_LOGGERS = ("transformers", "huggingface_hub", "bitsandbytes", "accelerate", "peft", "torch", "torchao",
                   "datasets", "onnx", "onnxruntime", "xllamacpp")


def verbose_enabled() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def quiet_libraries() -> None:
    """Silence library progress bars, notices and warnings (a user's own settings of these variables win)."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.simplefilter("ignore")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # A library imported before this call (an in-process caller such as a test) has read its switches already.
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()

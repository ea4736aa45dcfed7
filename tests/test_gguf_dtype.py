"""transformers' advice to load GGUF weights in float32 is silenced only where specbench chose another dtype."""

from __future__ import annotations

import logging

import pytest
from transformers.quantizers import quantizer_gguf

from specbench.models import GGUF_DTYPE_ADVICE, ModelSpec, _chosen_gguf_dtype

ADVICE = f"{GGUF_DTYPE_ADVICE}, and this one was asked for in torch.bfloat16. ... Pass `dtype=torch.float32`"


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def gguf_logger():
    """The logger transformers' GGUF quantizer warns on, and specbench's, enabled whatever earlier logging setups
    (Hydra's disables existing loggers) did to them."""
    loggers = [quantizer_gguf.logger, logging.getLogger("specbench.models")]
    saved = [(logger.disabled, logger.level) for logger in loggers]
    disabled_below = logging.root.manager.disable
    for logger in loggers:
        logger.disabled = False
        logger.setLevel(logging.DEBUG)
    logging.disable(logging.NOTSET)
    yield quantizer_gguf.logger
    for logger, (disabled, level) in zip(loggers, saved, strict=True):
        logger.disabled = disabled
        logger.setLevel(level)
    logging.disable(disabled_below)


def test_the_advice_is_dropped_for_a_gguf_in_a_chosen_dtype_only(gguf_logger, caplog):
    collect = Collect()
    gguf_logger.addHandler(collect)
    try:
        chosen = ModelSpec("models", "q.gguf", "bfloat16", "cpu")
        with caplog.at_level(logging.DEBUG, logger="specbench.models"), _chosen_gguf_dtype(chosen):
            gguf_logger.warning(ADVICE)
            gguf_logger.warning("another warning")
        with _chosen_gguf_dtype(ModelSpec("models", "q.gguf", "float32", "cpu")):
            gguf_logger.warning(ADVICE)
        with _chosen_gguf_dtype(ModelSpec("models", None, "bfloat16", "cpu")):  # not a GGUF
            gguf_logger.warning(ADVICE)
        gguf_logger.warning(ADVICE)  # after loading, the filter is gone
    finally:
        gguf_logger.removeHandler(collect)
    assert collect.messages == ["another warning", ADVICE, ADVICE, ADVICE]
    [note] = [record for record in caplog.records if record.name == "specbench.models"]
    assert note.levelno == logging.DEBUG and "q.gguf: bfloat16 chosen on purpose" in note.getMessage()

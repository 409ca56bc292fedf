"""Logging set-up for the command-line tools.

Only the ``sglformer`` logger gets a handler: spikingjelly logs its optional-import failures on the
root logger at INFO level, which would otherwise flood every run on a machine without CuPy.
"""
import logging
import sys

LOGGER_NAME = 'sglformer'


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted, so that a handler made while another
    program (a test runner, a notebook) had replaced it never writes to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup_logging(is_main_process=True, log_file=None):
    """Log INFO and above to stderr (and ``log_file``) on the main process, warnings elsewhere."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO if is_main_process else logging.WARNING)
    logger.propagate = False
    formatter = logging.Formatter('%(asctime)s %(message)s', datefmt='%H:%M:%S')
    handlers = [_StderrHandler()]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger

"""`python -m soundctm_rt.train ...`: the `soundctm-rt train` group on its own (what torchrun starts); it logs
progress as `soundctm-rt train` does without -q/-v."""

import logging

from ..logs import setup_logging
from .cli import app

setup_logging(logging.INFO)
app()

"""The `tfp-em` command line, and the data files it reads."""
from tfp_em.cli.main import main

__all__ = ["main"]

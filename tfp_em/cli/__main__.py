"""`python -m tfp_em.cli ...` runs the `tfp-em` command."""
import sys

from tfp_em.cli.main import main

sys.exit(main())

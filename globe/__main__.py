"""`python -m globe ...` is the `globe` command; it is also what torchrun runs for a sharded fit:

    torchrun --nproc_per_node=N -m globe fit model.path=PATH output_dir=DIR [overrides]
"""

import sys

from globe.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m effllm.data build | list`` (see :mod:`effllm.data.cli`)."""

import sys

from effllm.data.cli import main

sys.exit(main())

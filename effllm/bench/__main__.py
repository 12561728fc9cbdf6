import sys

from effllm.bench import main

sys.exit(main())

import sys

from megatron_rcpa.train.cli import main

sys.exit(main())

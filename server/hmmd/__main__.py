import sys

from hmmd.cli import main

sys.exit(main())
